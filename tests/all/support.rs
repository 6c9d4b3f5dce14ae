//! Helpers shared by the tests: guest modules, a shared sandbox, fresh directories, `grid`.

use grid_sandbox::{Sandbox, SandboxConfig, TaskReport, TaskSpec};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("grid-cli sits in the workspace")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A guest built by `cargo xtask build-guests`; fails with the command to run when missing.
pub fn guest(name: &str) -> PathBuf {
    let path = target_dir()
        .join("wasm32-wasip1/guest")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the guests with `cargo xtask build-guests` (`cargo xtask test` does it for you)",
        path.display()
    );
    path
}

pub fn guest_bytes(name: &str) -> Vec<u8> {
    std::fs::read(guest(name)).expect("readable guest")
}

pub fn wat(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("valid WAT in the test")
}

/// One sandbox for the whole test binary: every test's tasks share its engine, concurrently,
/// which is how a node runs them.
pub fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        let cache = tempfile::tempdir().expect("temp dir").keep();
        Sandbox::new(SandboxConfig {
            cache_dir: Some(cache),
            ..SandboxConfig::default()
        })
        .expect("sandbox starts")
    })
}

/// A task's world on the host: `root/in` (with `data.txt`) and `root/out`. Anything else that
/// appears under `root` was written outside the sandbox's `/out`.
pub struct TaskDirs {
    pub root: tempfile::TempDir,
}

impl TaskDirs {
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(root.path().join("in")).unwrap();
        std::fs::create_dir(root.path().join("out")).unwrap();
        std::fs::write(root.path().join("in/data.txt"), "input data").unwrap();
        Self { root }
    }
    pub fn input(&self) -> PathBuf {
        self.root.path().join("in")
    }
    pub fn output(&self) -> PathBuf {
        self.root.path().join("out")
    }

    /// Asserts that nothing appeared beside `in/` and `out/`, and that `in/` is unchanged.
    pub fn assert_nothing_outside_out(&self) {
        let mut names: Vec<String> = std::fs::read_dir(self.root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["in", "out"], "the task wrote outside /out");
        let mut inputs: Vec<String> = std::fs::read_dir(self.input())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        inputs.sort();
        assert_eq!(inputs, ["data.txt"], "the task changed /in");
        assert_eq!(
            std::fs::read_to_string(self.input().join("data.txt")).unwrap(),
            "input data"
        );
    }
}

/// Loads `bytes` and runs one task of it with `configure` applied to the spec.
pub async fn run_task(
    bytes: &[u8],
    dirs: &TaskDirs,
    configure: impl FnOnce(&mut TaskSpec),
) -> TaskReport {
    let mut spec = TaskSpec::new(&dirs.output());
    spec.input_dir = Some(dirs.input());
    configure(&mut spec);
    match sandbox().load(bytes, &spec.limits).await {
        Ok(module) => sandbox().run(&module, spec).await,
        Err(reason) => TaskReport::refused(reason),
    }
}

pub fn reason(report: &TaskReport) -> String {
    report
        .outcome
        .reason()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "succeeded".into())
}

/// Runs a well-behaved task in the shared engine and checks its result: proof that whatever
/// ran before left the engine healthy.
pub async fn assert_a_good_task_runs() {
    let dirs = TaskDirs::new();
    let report = run_task(&guest_bytes("monte-carlo-pi"), &dirs, |s| {
        s.stdin = br#"{"samples": 20000}"#.to_vec()
    })
    .await;
    assert_eq!(
        reason(&report),
        "succeeded",
        "stderr: {}",
        String::from_utf8_lossy(&report.stderr)
    );
    assert!(!report.out_empty, "it wrote estimate.json");
    let estimate = std::fs::read_to_string(dirs.output().join("estimate.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&estimate).unwrap();
    assert_eq!(v["samples"], 20000);
    assert!((v["pi"].as_f64().unwrap() - std::f64::consts::PI).abs() < 0.1);
}

/// `grid` with `args`, `stdin` on its standard input, and a private module cache.
/// How long one `grid` command may run in a test before it is killed and the test fails:
/// far above any command's normal time, so a hang shows up as a failure with its output instead
/// of a stuck test run.
pub const GRID_COMMAND_LIMIT: Duration = Duration::from_secs(240);

pub fn grid(args: &[&str], stdin: &[u8]) -> Output {
    use std::io::{Read, Write};
    let cache = cli_cache_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_grid"))
        .args(args)
        .env("GRID_CACHE_DIR", cache)
        // The default tenant of the tests' operator, unless a test passes --creds.
        .env(
            "GRID_CREDS",
            tenant_creds(grid_proto::names::DEFAULT_TENANT),
        )
        // Never the credentials of a `grid up` of this machine's user.
        .env("XDG_DATA_HOME", cli_cache_dir().join("xdg"))
        .env("GRID_TEST_HOST_SECRET", "must-not-leak")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("grid starts");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = std::time::Instant::now() + GRID_COMMAND_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for grid") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            panic!(
                "grid {args:?} still ran after {GRID_COMMAND_LIMIT:?}; killed it. stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn cli_cache_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap().keep())
}

/// `grid COMMAND… --help`, which must exit 0.
pub fn help_of(command: &[&str]) -> String {
    let mut args = command.to_vec();
    args.push("--help");
    let out = grid(&args, b"");
    assert!(
        out.status.success(),
        "grid {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// The subcommands a help text lists under `Commands:`, less clap's own `help`.
pub fn commands_listed(help: &str) -> Vec<String> {
    let Some(listed) = help.split("Commands:\n").nth(1) else {
        return Vec::new();
    };
    listed
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// A params file of `lines` in `dir`.
pub fn write_params(dir: &Path, lines: impl Iterator<Item = String>) -> PathBuf {
    let path = dir.join("params.jsonl");
    std::fs::write(&path, lines.map(|l| l + "\n").collect::<String>()).unwrap();
    path
}

/// `grid run --json …`: the parsed JSON line and the exit code.
pub fn grid_run_json(args: &[&str], stdin: &[u8]) -> (serde_json::Value, i32) {
    let mut all = vec!["run", "--json"];
    all.extend_from_slice(args);
    let out = grid(&all, stdin);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "--json prints exactly one line, got: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    (value, out.status.code().expect("exit code"))
}

/// The operator setup every test server trusts (one for the test binary: a cluster's servers
/// must trust the same operator), and credentials issued from it, made once per name.
struct TestAuth {
    dir: grid_client::auth::AuthDir,
    issued: std::sync::Mutex<std::collections::HashMap<(Role, String), PathBuf>>,
}

fn test_auth() -> &'static TestAuth {
    static AUTH: OnceLock<TestAuth> = OnceLock::new();
    AUTH.get_or_init(|| {
        let dir = grid_client::auth::AuthDir::new(tempfile::tempdir().unwrap().keep().join("auth"));
        dir.init().expect("operator setup");
        TestAuth {
            dir,
            issued: Default::default(),
        }
    })
}

pub use grid_client::auth::Role;

/// Credentials of `role` named `name` on every test server.
pub fn creds(role: Role, name: &str) -> PathBuf {
    let auth = test_auth();
    let mut issued = auth.issued.lock().unwrap_or_else(|p| p.into_inner());
    issued
        .entry((role, name.to_string()))
        .or_insert_with(|| match role {
            Role::Operator => auth.dir.operator_creds(),
            _ => auth.dir.issue(role, name).expect("credentials issued"),
        })
        .clone()
}

pub fn tenant_creds(name: &str) -> PathBuf {
    creds(Role::Tenant, name)
}

pub fn operator_creds() -> PathBuf {
    creds(Role::Operator, "broker")
}

/// A NATS connection to `url` as the operator (for tests that act on the wire themselves).
pub async fn connect_operator(url: &str) -> async_nats::Client {
    connect_as(url, &operator_creds()).await
}

/// The default tenant's object store on the grid at `url`, opened as the operator.
pub async fn default_store(url: &str) -> async_nats::jetstream::object_store::ObjectStore {
    let js = async_nats::jetstream::new(connect_operator(url).await);
    js.get_object_store(grid_proto::names::tenant_store(
        grid_proto::names::DEFAULT_TENANT,
    ))
    .await
    .expect("the default tenant's store")
}

/// A NATS connection to `url` with the credentials at `creds` (and their inbox prefix).
pub async fn connect_as(url: &str, creds: &Path) -> async_nats::Client {
    grid_client::connect_with(url, false, Some(creds))
        .await
        .expect("connected")
}

/// A real `nats-server` with JetStream on a port the OS picks, its store in a temp dir; killed
/// and removed on drop.
pub struct NatsServer {
    child: Option<std::process::Child>,
    pub url: String,
    dir: tempfile::TempDir,
    port: u16,
}

impl NatsServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, 0)
    }

    fn start_in(dir: tempfile::TempDir, port: u16) -> Self {
        Self::start_with(dir, port, &[])
    }

    /// `n` servers on loopback joined in one JetStream cluster (routes between all of them).
    /// The grid's URL is their client URLs joined with commas ([`cluster_url`]).
    pub fn start_cluster(n: usize) -> Vec<Self> {
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        (0..n)
            .map(|i| {
                let name = format!("grid-{i}");
                let cluster = format!("nats://127.0.0.1:{}", cluster_ports[i]);
                Self::start_with(
                    tempfile::tempdir().unwrap(),
                    client_ports[i],
                    &[
                        "-n",
                        &name,
                        "--cluster_name",
                        "grid",
                        "--cluster",
                        &cluster,
                        "--routes",
                        &routes,
                    ],
                )
            })
            .collect()
    }

    /// A server that also takes leaf nodes (a provider site's, `grid site init`) on loopback:
    /// the server and its leaf-node port.
    pub fn start_with_leafnodes() -> (Self, u16) {
        let dir = tempfile::tempdir().unwrap();
        let leaf_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("hub.conf");
        let auth = std::fs::read_to_string(test_auth().dir.server_config()).unwrap();
        std::fs::write(
            &config,
            format!("{auth}\nleafnodes {{ listen: \"127.0.0.1:{leaf_port}\" }}\n"),
        )
        .unwrap();
        (Self::start_configured(dir, &config, 0, &[]), leaf_port)
    }

    fn start_with(dir: tempfile::TempDir, port: u16, extra: &[&str]) -> Self {
        Self::start_configured(dir, &test_auth().dir.server_config(), port, extra)
    }

    fn start_configured(dir: tempfile::TempDir, config: &Path, port: u16, extra: &[&str]) -> Self {
        let bin = grid_client::find_nats_server().unwrap_or_else(|| {
            panic!(
                "{} (the tests need a real nats-server)",
                grid_client::NATS_SERVER_MISSING
            )
        });
        let ports_dir = dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).unwrap();
        let port_arg = if port == 0 {
            "-1".to_string()
        } else {
            port.to_string()
        };
        let child = Command::new(bin)
            .arg("-c")
            .arg(config)
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(dir.path().join("store"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let url = loop {
            let found = std::fs::read_dir(&ports_dir)
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| e.ok());
            if let Some(entry) = found
                && let Ok(text) = std::fs::read_to_string(entry.path())
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(url) = v["nats"][0].as_str()
            {
                break url.to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not report its port"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        Self {
            child: Some(child),
            url,
            dir,
            port,
        }
    }

    /// A stand-in that owns nothing, for `std::mem::replace` while restarting.
    pub fn placeholder() -> Self {
        Self {
            child: None,
            url: String::new(),
            dir: tempfile::tempdir().unwrap(),
            port: 0,
        }
    }

    /// Kills the server (SIGKILL) and leaves it dead.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and store.
    pub fn restart(mut self) -> Self {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        Self::start_in(dir, self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `grid broker` or `grid node` process; SIGKILLed on drop.
pub struct GridProcess {
    child: std::process::Child,
}

/// The URL of a cluster: every server's client URL, comma-separated.
pub fn cluster_url(servers: &[NatsServer]) -> String {
    servers
        .iter()
        .map(|s| s.url.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

impl GridProcess {
    pub fn broker(nats: &NatsServer, extra: &[&str]) -> Self {
        // JetStream reserves each store's quota out of three quarters of the free disk when
        // the store is made: the defaults (10 GiB a tenant, 4 GiB a node's stage) would make a
        // test with a few nodes fail on a disk with less than about 40 GB free. Tests write
        // megabytes; a test of the quotas gives its own.
        let mut args = vec!["broker", "--nats", &nats.url];
        for (flag, small) in [("--tenant-quota", "1GiB"), ("--stage-quota", "256MiB")] {
            if !extra.contains(&flag) {
                args.extend([flag, small]);
            }
        }
        Self::spawn(&[&args[..], extra].concat())
    }

    /// `grid ARGS --nats URL` as a long-running part of a grid (for a cluster's URL list).
    pub fn start_at(url: &str, args: &[&str]) -> Self {
        Self::spawn(&[args, &["--nats", url]].concat())
    }

    /// A CPU-only node (`--no-gpu`): most tests need no GPU worker.
    pub fn node(nats: &NatsServer, id: &str, cache: &Path, slots: u32) -> Self {
        Self::node_with(nats, id, cache, slots, &["--no-gpu"])
    }

    /// A node with `extra` flags; without `--no-gpu` it serves the `gpu` class on this
    /// machine's GPU (lavapipe on CPU-only machines).
    pub fn node_with(
        nats: &NatsServer,
        id: &str,
        cache: &Path,
        slots: u32,
        extra: &[&str],
    ) -> Self {
        let slots = slots.to_string();
        let args = [
            "node",
            "--nats",
            &nats.url,
            "--id",
            id,
            "--slots",
            &slots,
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        Self::spawn(&[&args[..], extra].concat())
    }

    /// A broker that aborts at the test-only fault point `crash_at` (`GRID_TEST_CRASH_AT`).
    pub fn broker_crashing_at(nats: &NatsServer, crash_at: &str) -> Self {
        Self::broker_with_env(nats, &[("GRID_TEST_CRASH_AT", crash_at)])
    }

    /// A broker with test-only fault injection in its environment (`GRID_TEST_…`).
    pub fn broker_with_env(nats: &NatsServer, env: &[(&str, &str)]) -> Self {
        Self::spawn_with(&["broker", "--nats", &nats.url], env)
    }

    /// The process id (to read its `/proc` entry).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited (without waiting).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn spawn(args: &[&str]) -> Self {
        Self::spawn_with(args, &[])
    }

    fn spawn_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        // A broker gets the operator's credentials, a node its provider's (its `--id`).
        let creds = if args.contains(&"--creds") {
            None
        } else {
            match args.first() {
                Some(&"broker") => Some(operator_creds()),
                Some(&"node") => args
                    .windows(2)
                    .find(|w| w[0] == "--id")
                    .map(|w| creds(Role::Provider, w[1])),
                _ => None,
            }
        };
        let child = Command::new(env!("CARGO_BIN_EXE_grid"))
            .args(args)
            .args(
                creds
                    .iter()
                    .flat_map(|c| [std::ffi::OsStr::new("--creds"), c.as_os_str()]),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("grid starts");
        Self { child }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `grid ARGS` as a long-running part of a grid (a node from a config file, say).
    pub fn start(args: &[&str]) -> Self {
        Self::spawn(args)
    }

    /// Sends SIGTERM and waits for the process to exit (the deadline only guards against a
    /// hang); returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the process did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for GridProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A grid for one test: a server, a broker and `nodes` nodes with their own caches.
pub struct TestGrid {
    pub nats: NatsServer,
    pub broker: GridProcess,
    pub nodes: Vec<GridProcess>,
    pub caches: tempfile::TempDir,
}

impl TestGrid {
    pub fn start(nodes: usize, broker_args: &[&str]) -> Self {
        Self::start_with(nodes, |nats| GridProcess::broker(nats, broker_args))
    }

    /// A grid whose broker `broker` starts (one with test-only fault injection, say).
    pub fn start_with(nodes: usize, broker: impl FnOnce(&NatsServer) -> GridProcess) -> Self {
        Self::start_on(NatsServer::start(), nodes, broker)
    }

    /// A grid on `nats` (one that takes leaf nodes, say).
    pub fn start_on(
        nats: NatsServer,
        nodes: usize,
        broker: impl FnOnce(&NatsServer) -> GridProcess,
    ) -> Self {
        let broker = broker(&nats);
        let caches = tempfile::tempdir().unwrap();
        let nodes = (0..nodes)
            .map(|i| {
                GridProcess::node(
                    &nats,
                    &format!("node-{i}"),
                    &caches.path().join(format!("node-{i}")),
                    2,
                )
            })
            .collect();
        let grid = Self {
            nats,
            broker,
            nodes,
            caches,
        };
        grid.wait_for_nodes(grid.nodes.len());
        grid
    }

    /// `grid ARGS --nats URL`.
    pub fn grid(&self, args: &[&str]) -> Output {
        // Right after the subcommand: anything after `--` belongs to the task.
        let mut all = args.to_vec();
        all.splice(1..1, ["--nats", self.nats.url.as_str()]);
        grid(&all, b"")
    }

    /// `grid ARGS --json --nats URL`, parsed; panics unless it exits with `code`.
    pub fn grid_json(&self, args: &[&str], code: i32) -> serde_json::Value {
        let mut all = args.to_vec();
        all.insert(1, "--json");
        let out = self.grid(&all);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(code),
            "grid {args:?}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("{e}: {stdout}"))
    }

    /// Waits until the broker has set the grid up and `n` nodes sent heartbeats.
    pub fn wait_for_nodes(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.grid(&["nodes", "--json"]);
            if out.status.success() && String::from_utf8_lossy(&out.stdout).lines().count() >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nodes did not report: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `grid results JOB -o DIR` into a new temp dir: the dir and its `manifest.jsonl` lines.
    pub fn results(&self, job: &str) -> (tempfile::TempDir, Vec<serde_json::Value>) {
        let dir = tempfile::tempdir().unwrap();
        let out = self.grid(&["results", job, "-o", dir.path().to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let manifest = std::fs::read_to_string(dir.path().join("manifest.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (dir, manifest)
    }

    /// Waits for the job to end (the deadline only guards against a hang) and returns its status
    /// (`--wait` exits 0 for a job that is done, 1 for one that failed or was cancelled).
    pub fn wait(&self, job: &str) -> serde_json::Value {
        let out = self.grid(&["status", job, "--wait", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        let done = status["state"] == "done";
        assert_eq!(
            out.status.code(),
            Some(if done { 0 } else { 1 }),
            "{status} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        status
    }
}

/// A GET of `http://HOST:PORT/PATH` over HTTP/1.0: the response's head and body, `None` when
/// nothing answers (yet).
pub fn http_get(url: &str) -> Option<(String, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.to_string(), body.to_string()))
}

/// A task message the broker handed the test, playing node `node`.
pub struct Taken {
    client: async_nats::Client,
    node: String,
    pub id: u64,
}

impl Taken {
    /// Reports it done (the broker acks it).
    pub async fn done(&self) {
        self.report(true).await;
    }

    /// Hands it back at once.
    pub async fn back(&self) {
        self.report(false).await;
    }

    async fn report(&self, done: bool) {
        let report = grid_proto::DeliveryReport {
            done: if done { vec![self.id] } else { vec![] },
            back: if done { vec![] } else { vec![self.id] },
            ..Default::default()
        };
        self.client
            .request(
                grid_proto::names::provider_subject(&self.node, "report"),
                grid_proto::encode(&report).into(),
            )
            .await
            .expect("the broker answers");
    }
}

/// A heartbeat for node `node` (class `cpu`, 2 slots), written with `client`.
pub async fn heartbeat(client: &async_nats::Client, node: &str) {
    heartbeat_ready(client, node, Vec::new()).await;
}

/// [`heartbeat`], claiming the runtimes `ready` loaded.
pub async fn heartbeat_ready(client: &async_nats::Client, node: &str, ready: Vec<String>) {
    let info = grid_proto::NodeInfo {
        id: node.into(),
        classes: vec!["cpu".into()],
        gpu: None,
        slots: 2,
        gpu_slots: 0,
        busy: 0,
        running: 0,
        memory_reserved_bytes: 0,
        memory_budget_bytes: 8 << 30,
        tasks_done: 0,
        started_unix_ms: grid_client::now_unix_ms(),
        preparing: None,
        runtimes_ready: ready,
        accepts: grid_proto::JobLimits {
            memory_bytes: 8 << 30,
            timeout_ms: 86_400_000,
            max_output_bytes: 10 << 30,
            gpu_memory_bytes: 0,
            gpu_time_ms: 0,
        },
    };
    let js = async_nats::jetstream::new(client.clone());
    js.publish(
        format!("$KV.{}.{node}", grid_proto::names::NODES_BUCKET),
        grid_proto::encode(&info).into(),
    )
    .await
    .expect("published")
    .await
    .expect("stored");
}

/// Takes task messages of class `cpu` from the broker with `client`, as node `node` does (a
/// heartbeat first), until `n` tasks have come or 10 s have passed; settles none. Each task of
/// a run comes alone (`TaskMsg::split`) beside its delivery.
pub async fn pull_tasks(
    client: &async_nats::Client,
    node: &str,
    n: usize,
) -> Vec<(grid_proto::TaskMsg, std::sync::Arc<Taken>)> {
    heartbeat(client, node).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut tasks = Vec::new();
    while tasks.len() < n && std::time::Instant::now() < deadline {
        let take = grid_proto::TakeRequest {
            class: "cpu".into(),
            max: (n - tasks.len()) as u32,
        };
        let reply = client
            .request(
                grid_proto::names::provider_subject(node, "take"),
                grid_proto::encode(&take).into(),
            )
            .await
            .expect("the broker answers");
        let answer: grid_proto::Answer<grid_proto::Deliveries> =
            grid_proto::decode(&reply.payload).expect("an answer");
        let grid_proto::Answer::Granted(deliveries) = answer else {
            panic!("taking tasks as {node}: {answer:?}");
        };
        for delivery in deliveries.deliveries {
            let task: grid_proto::TaskMsg =
                grid_proto::decode(&delivery.task).expect("a task message");
            let taken = std::sync::Arc::new(Taken {
                client: client.clone(),
                node: node.into(),
                id: delivery.id,
            });
            for one in task.split() {
                tasks.push((one, taken.clone()));
            }
        }
    }
    tasks
}

/// The result of `task` that a node named `node` would report for a run that succeeded and
/// wrote nothing, with `usage`.
pub fn empty_result(
    task: &grid_proto::TaskMsg,
    node: &str,
    usage: grid_proto::Usage,
) -> grid_proto::ResultMsg {
    let outcome = grid_proto::Outcome::Succeeded;
    grid_proto::ResultMsg {
        tenant: task.spec.tenant.clone(),
        job_id: task.job_id.clone(),
        index: task.index,
        attempt: task.attempt,
        replica: task.replica,
        node_id: node.into(),
        digest: grid_proto::result_digest(&outcome, &[]),
        outcome,
        usage,
        files: vec![],
        stdout: None,
        stderr: None,
        logs_truncated: false,
        detail: None,
        seal: task.seal,
        staged: vec![],
    }
}
