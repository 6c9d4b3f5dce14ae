//! `grid`: the command users type. Thin: it parses arguments and calls the libraries.
//!
//! Exit codes (every command): 0 success; 1 a task or job failed, was refused, cancelled or
//! disputed; 2 usage or setup error. Errors are one line, `grid: …`, on stderr.

mod run;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "grid",
    version,
    about = "Run WebAssembly batch jobs in a sandbox, on your machine or a grid"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one task locally, in exactly the sandbox a node uses.
    Run(run::RunArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Run(args) => run::main(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("grid: {e:#}");
            ExitCode::from(2)
        }
    }
}
