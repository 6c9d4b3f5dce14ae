//! `grid auth init`, `grid tenant add`, `grid provider add`: the operator's side of NATS auth
//! (see `grid_client::auth` for what each role may do).

use anyhow::Result;
use clap::{Args, Subcommand};
use grid_client::auth::{AuthDir, Role, default_data_dir};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct AuthDirArg {
    /// The operator's folder (keys, server config, credentials) [default: the auth folder of
    /// `grid up`'s default data dir]
    #[arg(long = "auth-dir", value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

impl AuthDirArg {
    fn open(&self) -> AuthDir {
        AuthDir::new(
            self.dir
                .clone()
                .unwrap_or_else(|| default_data_dir().join("auth")),
        )
    }
}

#[derive(Subcommand, Debug)]
pub enum AuthCommand {
    /// Make an operator setup: keys, a nats-server config to include, the broker's credentials.
    /// Keeps what exists.
    #[command(after_help = crate::help::AUTH)]
    Init(AuthDirArg),
}

#[derive(Subcommand, Debug)]
pub enum AddCommand {
    /// Write credentials for NAME (a new key; older files for NAME stay valid).
    Add {
        /// Whom the credentials are for: the tenant's or provider's name, 1 to 32 letters,
        /// digits, - and _.
        name: String,
        #[command(flatten)]
        dir: AuthDirArg,
    },
}

pub fn auth(command: AuthCommand) -> Result<ExitCode> {
    match command {
        AuthCommand::Init(dir) => {
            let auth = dir.open();
            auth.init()?;
            println!("{}", auth.server_config().display());
            eprintln!(
                "grid: start nats-server with `-c {}` (and -js); the broker connects with --creds {}",
                auth.server_config().display(),
                auth.operator_creds().display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn add(role: Role, command: AddCommand) -> Result<ExitCode> {
    let AddCommand::Add { name, dir } = command;
    let auth = dir.open();
    if !auth.server_config().is_file() {
        anyhow::bail!(
            "{} has no operator setup: run `grid auth init --auth-dir {}` (or `grid up` once)",
            auth.path().display(),
            auth.path().display()
        );
    }
    let path = auth.issue(role, &name)?;
    println!("{}", path.display());
    eprintln!(
        "grid: credentials of {} {name} written; use them with --creds {} (or GRID_CREDS)",
        role.as_str(),
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}
