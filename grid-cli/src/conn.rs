//! Finding the grid as a tenant: `--nats` and `--creds` (shared by every command that talks
//! to a grid), the tenant's session over them, and the exit code of a refusal.

use anyhow::Result;
use clap::Args;
pub use grid_client::tenant::Session;
use std::path::PathBuf;

/// `--nats URL` and `--creds FILE`, shared by every command that talks to a grid.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// NATS server(s) of the grid [default: GRID_NATS_URL or nats://127.0.0.1:4222]
    #[arg(long, value_name = "URL", global = true)]
    pub nats: Option<String>,
    /// Your credentials on the grid (`grid tenant add` makes them) [default: GRID_CREDS, else
    /// the default tenant's of `grid up` in its default data dir]
    #[arg(long, value_name = "FILE", global = true)]
    pub creds: Option<PathBuf>,
}

impl Conn {
    /// Connects for `grid COMMAND`, a tenant's command (see [`Session::open`]).
    pub async fn open(&self, command: &str) -> Result<Session> {
        Session::open(self.nats.as_deref(), self.creds.as_deref(), command).await
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A failure that is the job's or the input's, not a usage error: exit code 1.
#[derive(Debug)]
pub struct Refused(pub String);
impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Refused {}
