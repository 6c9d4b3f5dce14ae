//! `grid doctor` against a grid: the grid and the credentials every command would use, found
//! where every command finds them, and no lines of the Vulkan loader on the terminal.

use crate::support::*;
use std::process::{Command, Output};

/// `grid doctor ARGS` with no credentials, no grid named in the environment, no
/// `XDG_RUNTIME_DIR` (which makes the Vulkan loader complain) and libraries' logs at their
/// default; a test adds what it checks.
fn doctor(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_grid"));
    command
        .arg("doctor")
        .args(args)
        .env("GRID_CREDS", "")
        // Never the credentials of a `grid up` of this machine's user.
        .env("XDG_DATA_HOME", tempfile::tempdir().unwrap().keep())
        .env_remove("GRID_NATS_URL")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("RUST_LOG");
    command
}

/// The line of `out`'s stdout that mentions `needle`, which must start with `word`.
fn line_with(out: &Output, word: &str, needle: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| {
            panic!(
                "no line with {needle:?} in:\n{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(line.starts_with(&format!("{word}  ")), "{line}");
    line.to_string()
}

fn no_loader_noise(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
}

/// A grid that answers and takes the credentials: doctor says so, with the nodes online, and
/// exits 0.
#[test]
fn doctor_reaches_the_grid_with_the_credentials_given() {
    let grid = TestGrid::start(1, &[]);
    let creds = tenant_creds(grid_proto::names::DEFAULT_TENANT);
    let out = doctor(&[
        "--nats",
        grid.nats.url.as_str(),
        "--creds",
        creds.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let line = line_with(&out, "ok", "is reachable and accepts");
    assert!(
        line.contains(&format!("the grid at {}", grid.nats.url))
            && line.contains("the credentials of tenant default")
            && line.contains("1 node online"),
        "{line}"
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    no_loader_noise(&out);
}

/// A grid that answers and refuses: doctor says which credentials it refused and how to pass
/// others, and exits 1.
#[test]
fn doctor_names_the_credentials_a_grid_refuses() {
    let grid = TestGrid::start(0, &[]);
    let out = doctor(&["--nats", grid.nats.url.as_str()])
        .output()
        .unwrap();
    let line = line_with(&out, "fix", "answered but refused");
    assert!(
        line.contains("a connection without credentials") && line.contains("--creds FILE"),
        "{line}"
    );
    assert_eq!(out.status.code(), Some(1));
    no_loader_noise(&out);

    // A tenant of another grid's operator, through GRID_CREDS.
    let elsewhere = tempfile::tempdir().unwrap();
    let auth = grid_client::auth::AuthDir::new(elsewhere.path().join("auth"));
    auth.init().unwrap();
    let stranger = auth.issue(Role::Tenant, "mallory").unwrap();
    let out = doctor(&["--nats", grid.nats.url.as_str()])
        .env("GRID_CREDS", &stranger)
        .output()
        .unwrap();
    let line = line_with(&out, "fix", "answered but refused");
    assert!(
        line.contains(&format!("the credentials in {}", stranger.display())),
        "{line}"
    );
    assert_eq!(out.status.code(), Some(1));
}

/// Nothing listening at the grid `GRID_NATS_URL` names: doctor says so (not the default port's
/// state) and exits 1; an empty `XDG_RUNTIME_DIR` brings no loader noise either.
#[test]
fn doctor_says_nothing_listens_at_the_grid_named() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let out = doctor(&[])
        .env("GRID_NATS_URL", &url)
        .env("XDG_RUNTIME_DIR", "")
        .output()
        .unwrap();
    let line = line_with(&out, "fix", &format!("cannot reach the grid at {url}"));
    assert!(line.contains("grid up"), "{line}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("4222"), "{stdout}");
    assert_eq!(out.status.code(), Some(1));
    no_loader_noise(&out);
}
