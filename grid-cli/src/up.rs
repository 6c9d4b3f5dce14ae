//! `grid up`: a whole grid on this machine — nats-server with JetStream, a broker, N nodes —
//! in the foreground until Ctrl-C. Each part is its own process (`grid broker`, `grid node`), as
//! it would be across machines; a second `grid up` on the same data dir resumes unfinished jobs.

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use grid_client::{Grid, NATS_SERVER_MISSING, find_nats_server};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Nodes to start.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub nodes: u32,
    /// Task slots per node [default: CPUs / nodes, at least 1]
    #[arg(long, value_name = "N")]
    pub slots: Option<u32>,
    /// Memory all nodes' running tasks together may be given, shared equally among the nodes
    /// (each node's `--memory-budget`), e.g. 8GiB [default: this machine's RAM less an eighth,
    /// kept for nats-server, the broker and the rest of the machine]
    #[arg(long, value_name = "SIZE", value_parser = grid_proto::units::parse_size)]
    pub memory_budget: Option<u64>,
    /// Where JetStream and the nodes' caches live [default: ~/.local/share/grid]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to serve [default: GRID_NATS_URL or nats://127.0.0.1:4222; port 0 picks a free one]
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// Serve no GPU jobs (otherwise node-1 serves them when this machine has a GPU).
    #[arg(long)]
    pub no_gpu: bool,
    /// Run N nats-servers as one JetStream cluster, every stream and bucket kept on min(N, 3)
    /// of them, so that a server can die without the grid noticing (1: no cluster).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cluster: u32,
    /// Run without NATS auth: anyone who reaches the port can do anything (for debugging).
    /// By default the grid has an operator setup in DIR/auth, a tenant `default` whose
    /// credentials `grid` commands find on their own, and a provider per node.
    #[arg(long)]
    pub no_auth: bool,
    /// Where to serve the dashboard (a free port when this one is taken). It asks for the
    /// token in the URL it prints.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8470")]
    pub dashboard: String,
    /// Also answer dashboard requests for NAME (see `grid dashboard --allow-host`); repeatable.
    #[arg(long, value_name = "NAME")]
    pub dashboard_allow_host: Vec<String>,
    /// The dashboard's token, instead of a random one (for scripts): at least 16 of A-Z a-z
    /// 0-9 - _ . ~
    #[arg(
        long,
        value_name = "TOKEN",
        env = "GRID_DASHBOARD_TOKEN",
        hide_env_values = true
    )]
    pub dashboard_token: Option<String>,
    /// Serve no dashboard.
    #[arg(long)]
    pub no_dashboard: bool,
    /// Do not compile the Python runtime as the grid starts (its first Python task then waits
    /// for the compile, about a minute the first time on a machine)
    #[arg(long)]
    pub no_warm_runtimes: bool,
}

use grid_client::auth::default_data_dir;

fn host_port(url: &str) -> Result<(String, u16)> {
    let rest = url.strip_prefix("nats://").unwrap_or(url);
    let rest = rest.split(',').next().unwrap_or(rest);
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--nats {url}: expected nats://HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| anyhow!("--nats {url}: bad port"))?;
    if port == 0 {
        let free = std::net::TcpListener::bind((host, 0))
            .with_context(|| format!("binding {host}"))?
            .local_addr()?
            .port();
        return Ok((host.to_string(), free));
    }
    Ok((host.to_string(), port))
}

/// A child that dies with `grid up` even if `grid up` is killed.
fn spawn(cmd: &mut Command, log: &Path) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    // SAFETY: only an async-signal-safe prctl between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
                .map_err(std::io::Error::from)
        });
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    cmd.spawn().with_context(|| format!("starting {cmd:?}"))
}

fn terminate(children: &mut [(String, Child)]) {
    for (_, child) in children.iter() {
        if let Some(pid) = rustix::process::Pid::from_child(child).into() {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for (name, child) in children.iter_mut() {
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !matches!(child.try_wait(), Ok(Some(_))) {
            tracing::warn!("{name} did not stop; killing it");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn up(args: UpArgs) -> Result<ExitCode> {
    let nats_server = find_nats_server().ok_or_else(|| anyhow!(NATS_SERVER_MISSING))?;
    let url = grid_client::nats_url(args.nats.as_deref());
    let (host, port) = host_port(&url)?;
    let data = args.data_dir.unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(data.join("logs"))
        .with_context(|| format!("creating {}", data.display()))?;
    // One grid per data dir: a second would share the first's JetStream store and rewrite its
    // credentials. Held until this process ends.
    let _lock = lock_data_dir(&data, &url)?;
    if port != 0 && std::net::TcpListener::bind((host.as_str(), port)).is_err() {
        bail!(
            "port {port} on {host} is in use (another grid, or another program): stop what serves it, or pick a free port with --nats nats://{host}:0"
        );
    }
    let exe = std::env::current_exe()?;
    let slots = args.slots.unwrap_or_else(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        (cpus / args.nodes.max(1)).max(1)
    });

    if !(1..=5).contains(&args.cluster) {
        bail!("--cluster must be 1 to 5 servers, got {}", args.cluster);
    }
    let node_memory = node_memory_budget(
        args.memory_budget,
        grid_node::settings::physical_memory(),
        args.nodes,
    );
    if let Some(each) = node_memory
        && each < grid_proto::JobLimits::MIN_MEMORY_BYTES
    {
        bail!(
            "--memory-budget shared by {} nodes gives each {}: a node needs at least {}",
            args.nodes,
            grid_proto::units::size_text(each),
            grid_proto::units::size_text(grid_proto::JobLimits::MIN_MEMORY_BYTES)
        );
    }
    // Checked before anything starts: a bad --dashboard-token is a usage error.
    let dashboard_token = (!args.no_dashboard)
        .then(|| crate::dashboard::token(args.dashboard_token.as_deref()))
        .transpose()
        .context("--dashboard-token")?;
    // The operator setup: made once, kept across restarts (handed-out credentials stay valid).
    let auth = (!args.no_auth)
        .then(|| -> Result<_> {
            let auth = grid_client::auth::AuthDir::new(data.join("auth"));
            auth.init()?;
            auth.issue(
                grid_client::auth::Role::Tenant,
                grid_proto::names::DEFAULT_TENANT,
            )?;
            Ok(auth)
        })
        .transpose()?;
    let operator_creds = auth.as_ref().map(|a| a.operator_creds());
    let free_port = || -> Result<u16> {
        Ok(std::net::TcpListener::bind((host.as_str(), 0))?
            .local_addr()?
            .port())
    };
    // Server 0 serves the asked port; the others, and the cluster routes, free ones.
    let mut client_ports = vec![port];
    for _ in 1..args.cluster {
        client_ports.push(free_port()?);
    }
    let route_ports = (0..args.cluster)
        .map(|_| free_port())
        .collect::<Result<Vec<_>>>()?;
    let routes = route_ports
        .iter()
        .map(|p| format!("nats://{host}:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let url = client_ports
        .iter()
        .map(|p| format!("nats://{host}:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut servers: Vec<(String, Child)> = Vec::new();
    let mut children: Vec<(String, Child)> = Vec::new();
    // Prometheus metrics of the broker and each node, on free local ports.
    let mut metrics: Vec<(String, String)> = Vec::new();
    let result = (|| -> Result<()> {
        for (i, client_port) in client_ports.iter().enumerate() {
            let (name, store) = if args.cluster == 1 {
                ("nats-server".to_string(), data.join("jetstream"))
            } else {
                (
                    format!("nats-server-{i}"),
                    data.join(format!("jetstream-{i}")),
                )
            };
            let log = data.join(format!("logs/{name}.log"));
            let mut cmd = Command::new(&nats_server);
            if let Some(auth) = &auth {
                cmd.arg("-c").arg(auth.server_config());
            }
            cmd.args(["-js", "-sd"])
                .arg(store)
                .args(["-a", &host, "-p", &client_port.to_string()]);
            if args.cluster > 1 {
                cmd.args(["-n", &format!("grid-{i}"), "--cluster_name", "grid"])
                    .args(["--cluster", &format!("nats://{host}:{}", route_ports[i])])
                    .args(["--routes", &routes]);
            }
            servers.push((name, spawn(&mut cmd, &log)?));
            let last = servers.len() - 1;
            wait_for_port(&host, *client_port, &mut servers[last].1, &log)?;
        }
        let replicas = args.cluster.min(3).to_string();
        let mut broker = Command::new(&exe);
        let broker_metrics = format!("{host}:{}", free_port()?);
        broker
            .args(["broker", "--nats", &url, "--stream-replicas", &replicas])
            .args(["--metrics", &broker_metrics]);
        metrics.push(("broker".into(), broker_metrics));
        if let Some(creds) = &operator_creds {
            broker.arg("--creds").arg(creds);
        }
        let broker = spawn(&mut broker, &data.join("logs/broker.log"))?;
        children.push(("broker".into(), broker));
        for i in 1..=args.nodes {
            let id = format!("node-{i}");
            let node_metrics = format!("{host}:{}", free_port()?);
            let creds = auth
                .as_ref()
                .map(|a| a.issue(grid_client::auth::Role::Provider, &id))
                .transpose()?;
            let node = spawn(
                Command::new(&exe)
                    .args([
                        "node",
                        "--nats",
                        &url,
                        "--id",
                        &id,
                        "--slots",
                        &slots.to_string(),
                        // Ctrl-C: running tasks get 3 s, then go back to the queue (kept on disk).
                        "--grace",
                        "3s",
                        "--metrics",
                        &node_metrics,
                    ])
                    .arg("--cache-dir")
                    .arg(data.join(format!("node-{i}")))
                    // One compiled cache for the machine: `grid run`'s, shared by the nodes, so
                    // a module (the Python runtime's 100 MB) is compiled once, not once each.
                    .args(
                        crate::run::default_cache_dir()
                            .iter()
                            .flat_map(|d| [std::ffi::OsStr::new("--compiled-dir"), d.as_os_str()]),
                    )
                    // The Python runtime compiled now, once for the machine, not at the first
                    // Python task.
                    .args((!args.no_warm_runtimes).then_some("--warm-runtimes"))
                    // One GPU worker per machine: node-1 serves GPU jobs if there is a GPU.
                    .args((i > 1 || args.no_gpu).then_some("--no-gpu"))
                    // Its share of the machine, not all of it (see `node_memory_budget`).
                    .args(
                        node_memory
                            .iter()
                            .flat_map(|bytes| ["--memory-budget".to_string(), format!("{bytes}B")]),
                    )
                    .args(
                        creds
                            .iter()
                            .flat_map(|c| [std::ffi::OsStr::new("--creds"), c.as_os_str()]),
                    ),
                &data.join(format!("logs/node-{i}.log")),
            )?;
            children.push((format!("node-{i}"), node));
            metrics.push((id, node_metrics));
        }
        wait_for_nodes(
            &url,
            operator_creds.as_deref(),
            args.nodes as usize,
            &mut children,
        )
    })();
    if let Err(e) = result {
        // Nodes and broker before the servers they talk to.
        terminate(&mut children);
        terminate(&mut servers);
        return Err(e.context(format!("logs are in {}", data.join("logs").display())));
    }
    println!("grid: ready {url}");
    let _ = std::io::stdout().flush();
    if let Some(auth) = &auth {
        let creds = auth.tenant_creds(grid_proto::names::DEFAULT_TENANT);
        let found = grid_client::auth::creds_path(None).is_some_and(|p| p == creds);
        eprintln!(
            "grid: auth on; tenant `default`: {}{}; more with `grid tenant add NAME --auth-dir {}`",
            creds.display(),
            if found {
                ""
            } else {
                " (pass --creds or set GRID_CREDS)"
            },
            auth.path().display()
        );
    }
    let scrape = metrics
        .iter()
        .map(|(name, addr)| format!("{name} http://{addr}/metrics"))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!("grid: Prometheus metrics: {scrape}");
    let memory = node_memory
        .filter(|_| args.nodes > 0)
        .map(|each| format!(", {} of memory each", grid_proto::units::size_text(each)))
        .unwrap_or_default();
    eprintln!(
        "grid: {} node(s) × {slots} slot(s){memory}; data in {}; Ctrl-C stops the grid",
        args.nodes,
        data.display()
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The dashboard, as the operator (or anyone, without auth): this machine's own grid.
    if let Some(token) = dashboard_token {
        let dashboard = start_dashboard(
            &args.dashboard,
            &args.dashboard_allow_host,
            token,
            &url,
            operator_creds.as_deref(),
        );
        if let Err(e) = rt.block_on(dashboard) {
            eprintln!("grid: no dashboard: {e:#}");
        }
    }
    let exited = rt.block_on(async {
        let signal = grid_client::shutdown_signal();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                () = &mut signal => return None,
                () = tokio::time::sleep(Duration::from_millis(500)) => {
                    for (name, child) in children.iter_mut().chain(servers.iter_mut()) {
                        if let Ok(Some(status)) = child.try_wait() {
                            return Some(format!("{name} exited ({status})"));
                        }
                    }
                }
            }
        }
    });
    eprintln!("grid: stopping");
    terminate(&mut children);
    terminate(&mut servers);
    match exited {
        None => Ok(ExitCode::SUCCESS),
        Some(why) => bail!("{why}; logs are in {}", data.join("logs").display()),
    }
}

/// Each node's memory budget: `given` (else the machine's RAM less an eighth, kept for
/// nats-server, the broker and the rest of the machine) shared equally among `nodes`. A node
/// left to itself claims the whole machine, so that two of them would promise their tasks
/// twice the RAM there is. `None` when neither is known: each node then takes its own default.
fn node_memory_budget(given: Option<u64>, machine: Option<u64>, nodes: u32) -> Option<u64> {
    let total = given.or_else(|| machine.map(|ram| ram - ram / 8))?;
    Some(total / u64::from(nodes.max(1)))
}

/// Serves the dashboard on `listen`, or on a free port of its host when that one is taken, and
/// says where, token included.
async fn start_dashboard(
    listen: &str,
    allow_hosts: &[String],
    token: String,
    url: &str,
    creds: Option<&Path>,
) -> Result<()> {
    let client = grid_client::connect_with(url, true, creds).await?;
    let grid = Grid::open(client).await?;
    let (listener, addr) = match crate::dashboard::bind(listen).await {
        Ok(bound) => bound,
        Err(_) => {
            let host = listen.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
            crate::dashboard::bind(&format!("{host}:0")).await?
        }
    };
    let source = crate::dashboard::Source { grid, tenant: None };
    let access = crate::dashboard::Access::new(addr, token, allow_hosts);
    eprintln!("grid: dashboard at {}", access.url(addr));
    if !addr.ip().is_loopback() {
        eprintln!("{}", crate::dashboard::beyond_loopback_note(addr));
    }
    tokio::spawn(async move {
        if let Err(e) = crate::dashboard::serve(listener, source, access).await {
            tracing::warn!("dashboard: {e:#}");
        }
    });
    Ok(())
}

/// Locks `data` for this `grid up` (serving `url`), or says which one holds it.
fn lock_data_dir(data: &Path, url: &str) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = data.join("grid.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if let Err(e) = file.try_lock() {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        return Err(match e {
            std::fs::TryLockError::WouldBlock => anyhow!(
                "another `grid up` runs on data dir {} ({}): stop it first, or pass another --data-dir",
                data.display(),
                if holder.is_empty() {
                    "pid unknown"
                } else {
                    holder
                }
            ),
            std::fs::TryLockError::Error(e) => anyhow!("locking {}: {e}", path.display()),
        });
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "pid {}, serving {url}", std::process::id())?;
    Ok(file)
}

fn wait_for_port(host: &str, port: u16, server: &mut Child, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect((host, port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = server.try_wait() {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let last = tail.lines().last().unwrap_or("").to_string();
            bail!("nats-server exited ({status}): {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nats-server did not open {host}:{port} within 15 s")
}

fn wait_for_nodes(
    url: &str,
    creds: Option<&Path>,
    want: usize,
    children: &mut [(String, Child)],
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = grid_client::connect_with(url, false, creds).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for (name, child) in children.iter_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("{name} exited while starting ({status})");
                }
            }
            if let Ok(grid) = Grid::open(client.clone()).await
                && let Ok(nodes) = grid.nodes().await
                && let Ok(mut keys) = nodes.keys().await
            {
                use futures::StreamExt;
                let mut n = 0;
                while let Some(Ok(_)) = keys.next().await {
                    n += 1;
                }
                if n >= want {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the nodes did not report within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_share_the_machine_instead_of_each_claiming_it() {
        const GIB: u64 = 1 << 30;
        assert_eq!(node_memory_budget(None, Some(16 * GIB), 2), Some(7 * GIB));
        assert_eq!(node_memory_budget(None, Some(16 * GIB), 1), Some(14 * GIB));
        for nodes in 1..=7 {
            let each = node_memory_budget(None, Some(16 * GIB), nodes).unwrap();
            assert!(each * u64::from(nodes) <= 16 * GIB, "{nodes} nodes");
        }
        assert_eq!(
            node_memory_budget(Some(10 * GIB), Some(16 * GIB), 4),
            Some(10 * GIB / 4),
            "a budget given is shared as it is"
        );
        assert_eq!(node_memory_budget(None, None, 2), None);
        assert_eq!(node_memory_budget(None, Some(16 * GIB), 0), Some(14 * GIB));
    }
}
