//! The dashboard in a real browser: headless Chromium (Debian's `chromium`, driven by
//! `playwright-core` from `tests/browser`, which `cargo xtask setup` installs) follows a job
//! part-way and to its end, and opens a failed job's page. What it shows must be what `grid
//! status --json` says. The screenshot taken part-way is kept in `target/dashboard.png`.

use crate::support::*;
use std::io::BufRead;
use std::process::{Command, Stdio};

/// A `grid dashboard` for tenant `tenant`, killed on drop; its address.
struct Dashboard {
    child: std::process::Child,
    url: String,
}

impl Dashboard {
    fn start(grid: &TestGrid, tenant: &str) -> Self {
        let creds = tenant_creds(tenant);
        let mut child = Command::new(env!("CARGO_BIN_EXE_grid"))
            .args([
                "dashboard",
                "--listen",
                "127.0.0.1:0",
                "--nats",
                &grid.nats.url,
            ])
            .arg("--creds")
            .arg(&creds)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("grid dashboard starts");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("grid: dashboard at ")
            .unwrap_or_else(|| panic!("grid dashboard said {line:?}"))
            .to_string();
        Self { child, url }
    }
}

/// The body of a GET of `url`.
fn body(url: &str) -> String {
    http_get(url).map(|(_, body)| body).unwrap_or_default()
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_dashboard_shows_a_job_progressing_then_what_grid_status_says() {
    let browser = workspace_root().join("tests/browser");
    assert!(
        browser.join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing in {}: run `cargo xtask setup` (it runs `npm ci` there)",
        browser.display()
    );
    let chromium = std::env::var("GRID_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: run `cargo xtask setup` (it installs Debian's chromium), or set GRID_CHROMIUM"
    );
    let grid = TestGrid::start(1, &[]);
    let dashboard = Dashboard::start(&grid, "viewer");
    let as_viewer = |args: &[&str]| {
        let creds = tenant_creds("viewer");
        let mut all = args.to_vec();
        all.splice(1..1, ["--creds", creds.to_str().unwrap()]);
        grid.grid(&all)
    };
    // 40 tasks of about 0.25 s on 2 slots: several seconds, seen part-way at one update a second.
    let tmp = tempfile::tempdir().unwrap();
    let params = write_params(
        tmp.path(),
        (0..40).map(|_| r#"{"samples": 50000000}"#.to_string()),
    );
    let submitted = as_viewer(&[
        "submit",
        guest("monte-carlo-pi").to_str().unwrap(),
        "--params",
        params.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let job: serde_json::Value = serde_json::from_slice(&submitted.stdout).unwrap();
    let job = job["job_id"].as_str().unwrap().to_string();
    // A job whose tasks all fail, with something on stderr.
    let failing = as_viewer(&[
        "submit",
        guest("hostile").to_str().unwrap(),
        "--tasks",
        "2",
        "--retries",
        "0",
        "--json",
        "--",
        "panic",
    ]);
    let failing: serde_json::Value = serde_json::from_slice(&failing.stdout).unwrap();
    let failing = failing["job_id"].as_str().unwrap().to_string();

    let screenshot = target_dir().join("dashboard.png");
    let out = Command::new("node")
        .arg(browser.join("dashboard.mjs"))
        .args([&dashboard.url, &job, &failing])
        .arg(&screenshot)
        .env("GRID_CHROMIUM", &chromium)
        .current_dir(&browser)
        .output()
        .expect("node runs (install Node.js: apt-get install nodejs)");
    assert!(
        out.status.success(),
        "the browser script failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();

    // Part-way, then done.
    let count = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap().parse::<u64>().unwrap();
    let midway = &seen["midway"];
    assert!(
        count(midway, "done") > 0 && count(midway, "done") < 40,
        "{midway}"
    );
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000);
    // What the page shows once the job ended is what `grid status` says.
    let status = as_viewer(&["status", &job, "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let done = &seen["done"];
    assert_eq!(done["state"], status["state"]);
    for key in [
        "succeeded",
        "failed",
        "running",
        "queued",
        "disputed",
        "total",
    ] {
        assert_eq!(
            count(done, key),
            status["tasks"][key].as_u64().unwrap(),
            "{key}: page {done}, grid status {status}"
        );
    }
    assert_eq!(count(done, "succeeded"), 40);
    assert_eq!(seen["live"], "live");
    assert_eq!(seen["nodes"], serde_json::json!(["node-0"]));
    assert!(seen["chartPoints"].as_u64().unwrap() >= 2, "{seen}");
    // The failed job's page lists its tasks with their reasons and stderr.
    let failed = seen["failedTasks"].as_array().unwrap();
    assert_eq!(failed.len(), 2, "{seen}");
    for task in failed {
        let cells = task["cells"].as_array().unwrap();
        assert_eq!(cells[1], "failed");
        assert!(cells[2].as_str().unwrap().starts_with("trap"), "{task}");
    }
    assert!(
        seen["logs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("panicked on purpose")),
        "{seen}"
    );
    // And says how to look at a failed task, and how to run them again.
    let hint = seen["hint"].as_str().unwrap();
    assert!(
        hint.contains("grid retry") && hint.contains("--failed"),
        "{seen}"
    );
    assert!(hint.contains("grid run --from"), "{seen}");
}

/// A tenant's dashboard shows that tenant's jobs only: NATS's permissions decide.
#[test]
fn a_tenants_dashboard_shows_its_own_jobs_only() {
    let grid = TestGrid::start(1, &[]);
    let submit = |tenant: &str| {
        let creds = tenant_creds(tenant);
        let out = grid.grid(&[
            "submit",
            "--creds",
            creds.to_str().unwrap(),
            guest("hostile").to_str().unwrap(),
            "--wait",
            "--json",
            "--",
            "exit",
            "0",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap())
                .unwrap();
        v["job_id"].as_str().unwrap().to_string()
    };
    let mine = submit("alice");
    let theirs = submit("bob");
    let dashboard = Dashboard::start(&grid, "alice");
    let state = body(&format!("{}api/state", dashboard.url));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut state = state;
    // Its job, and its usage from the ledger (one attempt billed).
    while !(state.contains(&mine) && state.contains(r#""attempts":1"#)) {
        assert!(std::time::Instant::now() < deadline, "{state}");
        std::thread::sleep(std::time::Duration::from_millis(200));
        state = body(&format!("{}api/state", dashboard.url));
    }
    assert!(!state.contains(&theirs), "{state}");
    assert!(!state.contains(r#""tenant":"bob""#), "{state}");
    assert!(state.contains("\"scope\":\"tenant alice\""), "{state}");
    let other = body(&format!("{}api/jobs/{theirs}", dashboard.url));
    assert!(other.contains("no job"), "{other}");

    // The page follows the jobs as they change: a new one appears, a deleted one goes.
    let next = submit("alice");
    let alice = tenant_creds("alice");
    let out = grid.grid(&["delete", "--creds", alice.to_str().unwrap(), &mine]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !state.contains(&next) || state.contains(&mine) {
        assert!(std::time::Instant::now() < deadline, "{state}");
        std::thread::sleep(std::time::Duration::from_millis(200));
        state = body(&format!("{}api/state", dashboard.url));
    }
    assert!(state.contains(r#""jobs_total":1"#), "{state}");

    // A failed task's page shows the tail of its log, however long the log is.
    let creds = tenant_creds("alice");
    let noisy = grid.grid_json(
        &[
            "submit",
            "--creds",
            creds.to_str().unwrap(),
            guest("hostile").to_str().unwrap(),
            "--retries",
            "0",
            "--wait",
            "--",
            "noisy-panic",
        ],
        1,
    );
    let page = body(&format!(
        "{}api/jobs/{}",
        dashboard.url,
        noisy["job_id"].as_str().unwrap()
    ));
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    let tail = page["failed_tasks"][0]["logs"]["stderr"]
        .as_str()
        .unwrap_or_default();
    assert!(tail.contains("panicked on purpose"), "{page}");
    assert!(tail.len() <= 2048, "{} bytes", tail.len());
}
