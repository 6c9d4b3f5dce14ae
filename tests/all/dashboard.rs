//! The dashboard in a real browser: headless Chromium (Debian's `chromium`, driven by
//! `playwright-core` from `tests/browser`, which `cargo xtask setup` installs) follows a job
//! part-way and to its end, and opens a failed job's page. What it shows must be what `grid
//! status --json` says. The screenshot taken part-way is kept in `target/dashboard.png`.
//!
//! And who may look: without its token, or for another `Host`, every route answers with no
//! job data.

use crate::support::*;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A `grid dashboard` for tenant `tenant`, killed on drop; where it is.
struct Dashboard {
    child: std::process::Child,
    /// What it printed to open, token included.
    url: String,
    /// `IP:PORT` to connect to.
    addr: String,
    token: String,
}

impl Dashboard {
    fn start(grid: &TestGrid, tenant: &str) -> Self {
        Self::start_with(grid, tenant, &["--listen", "127.0.0.1:0"])
    }

    fn start_with(grid: &TestGrid, tenant: &str, args: &[&str]) -> Self {
        let creds = tenant_creds(tenant);
        let mut child = Command::new(env!("CARGO_BIN_EXE_grid"))
            .args(["dashboard", "--nats", &grid.nats.url])
            .args(args)
            .arg("--creds")
            .arg(&creds)
            .env_remove("GRID_DASHBOARD_TOKEN")
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
        let (addr, token) = url
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once("/?token="))
            .unwrap_or_else(|| panic!("no token in {url:?}"));
        let (addr, token) = (addr.to_string(), token.to_string());
        Self {
            child,
            url,
            addr,
            token,
        }
    }

    /// A GET of `/PATH` with the token: the body, or "" when nothing answers (yet).
    fn get(&self, path: &str) -> String {
        let bearer = format!("Bearer {}", self.token);
        request(
            &self.addr,
            &format!("/{path}"),
            &[("Authorization", bearer.as_str())],
        )
        .body
    }
}

/// An HTTP response, as [`request`] read it.
#[derive(Debug, Default)]
struct Reply {
    /// 0 when nothing answered.
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }
}

/// A GET of `path` from `addr` over HTTP/1.0 with `headers` (`Host: ADDR` unless one is
/// given). An event stream never ends: what came in a few seconds is kept.
fn request(addr: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return Reply::default();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let mut text = format!("GET {path} HTTP/1.0\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        text.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("\r\n");
    if stream.write_all(text.as_bytes()).is_err() {
        return Reply::default();
    }
    // What comes in 3 seconds at most (an event stream sends keep-alives forever).
    let (mut bytes, mut chunk) = (Vec::new(), [0u8; 4096]);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
    let response = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or((response.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
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
    // 100 tasks of about 0.35 s on 2 slots: some 18 s, seen part-way at one update a second even
    // when the browser takes seconds to start (a 5 s job could end before the page loaded).
    let tmp = tempfile::tempdir().unwrap();
    let params = write_params(
        tmp.path(),
        (0..100).map(|_| r#"{"samples": 100000000}"#.to_string()),
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
        count(midway, "done") > 0 && count(midway, "done") < 100,
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
    assert_eq!(count(done, "succeeded"), 100);
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
    let state = dashboard.get("api/state");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut state = state;
    // Its job, and its usage from the ledger (one attempt billed).
    while !(state.contains(&mine) && state.contains(r#""attempts":1"#)) {
        assert!(Instant::now() < deadline, "{state}");
        std::thread::sleep(Duration::from_millis(200));
        state = dashboard.get("api/state");
    }
    assert!(!state.contains(&theirs), "{state}");
    assert!(!state.contains(r#""tenant":"bob""#), "{state}");
    assert!(state.contains("\"scope\":\"tenant alice\""), "{state}");
    let other = dashboard.get(&format!("api/jobs/{theirs}"));
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while !state.contains(&next) || state.contains(&mine) {
        assert!(Instant::now() < deadline, "{state}");
        std::thread::sleep(Duration::from_millis(200));
        state = dashboard.get("api/state");
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
    let page = dashboard.get(&format!("api/jobs/{}", noisy["job_id"].as_str().unwrap()));
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    let tail = page["failed_tasks"][0]["logs"]["stderr"]
        .as_str()
        .unwrap_or_default();
    assert!(tail.contains("panicked on purpose"), "{page}");
    assert!(tail.len() <= 2048, "{} bytes", tail.len());
}

/// Without its token, every route answers 401 with a hint and nothing of the grid; the token
/// as a bearer, as `?token=` on an API request, or in the cookie that a first `?token=` sets
/// (with a redirect that drops it from the address) lets a request in. Served beyond loopback
/// it still asks for the token, and refuses a `Host` it was not given.
#[test]
fn the_dashboard_lets_in_its_token_and_its_hosts_only() {
    let grid = TestGrid::start(1, &[]);
    let creds = tenant_creds("carol");
    let job = grid.grid_json(
        &[
            "submit",
            "--creds",
            creds.to_str().unwrap(),
            guest("hostile").to_str().unwrap(),
            "--wait",
            "--",
            "exit",
            "0",
        ],
        0,
    );
    let job = job["job_id"].as_str().unwrap().to_string();
    let shows_the_job = |dashboard: &Dashboard| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dashboard.get("api/state").contains(&job) {
            assert!(Instant::now() < deadline, "the job never showed");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let port_of = |dashboard: &Dashboard| {
        let (_, port) = dashboard.addr.rsplit_once(':').unwrap();
        port.to_string()
    };

    let dashboard = Dashboard::start(&grid, "carol");
    shows_the_job(&dashboard);
    let port = port_of(&dashboard);
    let bearer = format!("Bearer {}", dashboard.token);

    // No token, or a wrong one anywhere: 401 on every route, with nothing of the grid.
    let wrong = "0".repeat(64);
    let wrong_bearer = format!("Bearer {wrong}");
    let wrong_cookie = format!("grid-dashboard-{port}={wrong}");
    let routes = [
        "/".to_string(),
        "/api/state".into(),
        "/api/events".into(),
        format!("/api/jobs/{job}"),
        "/favicon.ico".into(),
        "/no/such/page".into(),
    ];
    for route in &routes {
        let wrong_query = format!("{route}?token={wrong}");
        let short_query = format!("{route}?token=x");
        let tries: [(&str, Vec<(&str, &str)>); 5] = [
            (route.as_str(), vec![]),
            (wrong_query.as_str(), vec![]),
            (short_query.as_str(), vec![]),
            (
                route.as_str(),
                vec![("Authorization", wrong_bearer.as_str())],
            ),
            (route.as_str(), vec![("Cookie", wrong_cookie.as_str())]),
        ];
        for (path, headers) in tries {
            let reply = request(&dashboard.addr, path, &headers);
            assert_eq!(reply.status, 401, "{path} {headers:?}: {reply:?}");
            assert!(
                !reply.body.contains(&job) && !reply.body.contains("carol"),
                "{path} {headers:?}: {reply:?}"
            );
            assert!(reply.body.contains("?token="), "{reply:?}");
        }
    }

    // The token as a bearer (`get`), or as `?token=` on an API request.
    assert!(dashboard.get("api/state").contains(&job));
    let by_query = request(
        &dashboard.addr,
        &format!("/api/state?token={}", dashboard.token),
        &[],
    );
    assert_eq!(by_query.status, 200, "{by_query:?}");
    assert!(by_query.body.contains(&job), "{by_query:?}");
    let events = request(
        &dashboard.addr,
        "/api/events",
        &[("Authorization", bearer.as_str())],
    );
    assert_eq!(events.status, 200, "{events:?}");
    assert!(events.body.contains(&job), "{events:?}");

    // A browser's way: the first `?token=` sets a cookie and sends it to the same address
    // without the token; the cookie alone does after that.
    let first = request(
        &dashboard.addr,
        &format!("/?token={}", dashboard.token),
        &[],
    );
    assert_eq!(first.status, 303, "{first:?}");
    assert_eq!(first.header("location"), Some("/"), "{first:?}");
    assert!(!first.body.contains(&job), "{first:?}");
    let set = first.header("set-cookie").unwrap_or_default();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().trim().to_string();
    assert!(
        cookie.starts_with(&format!("grid-dashboard-{port}=")),
        "{cookie}"
    );
    let page = request(&dashboard.addr, "/", &[("Cookie", cookie.as_str())]);
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("/api/events"), "{page:?}");
    let among_others = format!("theme=dark; {cookie}");
    let state = request(
        &dashboard.addr,
        "/api/state",
        &[("Cookie", among_others.as_str())],
    );
    assert!(state.body.contains(&job), "{state:?}");
    let kept = request(
        &dashboard.addr,
        &format!("/?x=1&token={}", dashboard.token),
        &[],
    );
    assert_eq!(kept.header("location"), Some("/?x=1"), "{kept:?}");

    // Another host name is refused, token or not (DNS rebinding); localhost is this one.
    let evil = request(
        &dashboard.addr,
        "/api/state",
        &[("Host", "evil.example"), ("Authorization", bearer.as_str())],
    );
    assert_eq!(evil.status, 403, "{evil:?}");
    assert!(!evil.body.contains(&job));
    let localhost = format!("localhost:{port}");
    let local = request(
        &dashboard.addr,
        "/api/state",
        &[
            ("Host", localhost.as_str()),
            ("Authorization", bearer.as_str()),
        ],
    );
    assert!(local.body.contains(&job), "{local:?}");

    // Beyond loopback: the URL to open here is a loopback one, the token is still asked
    // for, and only the names it knows or was given are answered.
    let wide = Dashboard::start_with(
        &grid,
        "carol",
        &["--listen", "0.0.0.0:0", "--allow-host", "grid.example"],
    );
    assert!(wide.url.starts_with("http://127.0.0.1:"), "{}", wide.url);
    shows_the_job(&wide);
    let port = port_of(&wide);
    let bearer = format!("Bearer {}", wide.token);
    let reply = request(&wide.addr, "/api/state", &[]);
    assert_eq!(reply.status, 401, "{reply:?}");
    assert!(!reply.body.contains(&job));
    let refused = [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        format!("grid.example.evil:{port}"),
    ];
    for host in &refused {
        let reply = request(
            &wide.addr,
            "/api/state",
            &[("Host", host.as_str()), ("Authorization", bearer.as_str())],
        );
        assert_eq!(reply.status, 403, "{host}: {reply:?}");
        assert!(!reply.body.contains(&job), "{host}: {reply:?}");
    }
    let answered = [
        format!("grid.example:{port}"),
        format!("GRID.example:{port}"),
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
    ];
    for host in &answered {
        let reply = request(
            &wide.addr,
            "/api/state",
            &[("Host", host.as_str()), ("Authorization", bearer.as_str())],
        );
        assert_eq!(reply.status, 200, "{host}: {reply:?}");
        assert!(reply.body.contains(&job), "{host}: {reply:?}");
    }
}
