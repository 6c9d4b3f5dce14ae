// Opens the dashboard in headless Chromium and follows one job: it must show the job part-way
// (a screenshot is taken then), then done; then the numbers the page shows for it, its failed
// tasks from the job page, and the nodes. Prints one JSON object for the Rust test to check.
//
// node dashboard.mjs URL JOB_ID FAILING_JOB_ID SCREENSHOT.png
// URL is the one `grid dashboard` printed, ?token= included: the first visit trades it for a
// cookie, which the page's own requests then carry.
import { chromium } from "playwright-core";

const [url, jobId, failingId, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.GRID_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 960 } });
  await page.goto(url);
  const row = (id) => `tr.job[data-job="${id}"]`;
  await page.waitForSelector(row(jobId), { timeout: 30_000 });
  // Part-way: some tasks ended, not all.
  await page.waitForFunction(
    (sel) => {
      const r = document.querySelector(sel);
      return r && +r.dataset.done > 0 && +r.dataset.done < +r.dataset.total;
    },
    row(jobId),
    { timeout: 60_000, polling: 100 },
  );
  const midway = await page.$eval(row(jobId), (r) => ({ ...r.dataset }));
  await page.screenshot({ path: screenshot, fullPage: true });
  await page.waitForFunction(
    (sel) => document.querySelector(sel)?.dataset.state === "done",
    row(jobId),
    { timeout: 120_000, polling: 100 },
  );
  const done = await page.$eval(row(jobId), (r) => ({ ...r.dataset }));
  const live = await page.textContent("#live");
  const nodes = await page.$$eval("#nodes tr[data-node]", (rows) => rows.map((r) => r.dataset.node));
  const chartPoints = await page.$eval("#chart polyline", (p) => p.getAttribute("points").trim().split(/\s+/).length).catch(() => 0);
  // The failing job's page: its failed tasks, with reasons and logs.
  await page.waitForSelector(row(failingId), { timeout: 30_000 });
  await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.state === "failed", row(failingId), { timeout: 60_000 });
  await page.click(row(failingId));
  await page.waitForSelector(`#job-detail[data-job="${failingId}"] tr.failed-task`, { timeout: 30_000 });
  const failedTasks = await page.$$eval("#job-detail tr.failed-task", (rows) =>
    rows.map((r) => ({ index: +r.dataset.index, cells: [...r.cells].map((c) => c.textContent) })));
  const logs = await page.$$eval("#job-detail pre", (pres) => pres.map((p) => p.textContent));
  const hint = await page.$eval("#job-detail .hint", (p) => p.textContent).catch(() => "");
  console.log(JSON.stringify({ midway, done, live, nodes, chartPoints, failedTasks, logs, hint }));
} finally {
  await browser.close();
}
