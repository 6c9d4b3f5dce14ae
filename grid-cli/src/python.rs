//! `grid python`: what Grid's Python runtime offers. A group of its own (rather than, say,
//! `grid runtime packages python`) because Python is the one runtime, named as `--runtime
//! python` names it; a second runtime would get a group beside it.

use anyhow::Result;
use clap::Subcommand;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum PythonCommand {
    /// List the packages in Grid's Python runtime and their versions (read from the runtime's
    /// files, laid out on first use as `grid run job.py` lays them out).
    #[command(after_help = crate::help::PYTHON)]
    Packages {
        /// Print one JSON object per line, a package each: {name, version}.
        #[arg(long)]
        json: bool,
    },
}

pub fn python(command: PythonCommand) -> Result<ExitCode> {
    match command {
        PythonCommand::Packages { json } => packages(json),
    }
}

fn packages(json: bool) -> Result<ExitCode> {
    let runtime = &grid_proto::runtime::PYTHON;
    let packages = crate::run::local_runtime_files(runtime)?.packages(runtime)?;
    let width = packages
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0);
    for (name, version) in &packages {
        if json {
            println!(
                "{}",
                serde_json::json!({ "name": name, "version": version })
            );
        } else {
            println!("{name:<width$}  {version}");
        }
    }
    if !json {
        eprintln!(
            "grid: {} packages in the {} runtime ({} {}); nothing else can be imported but \
             the standard library and pure-Python code shipped with the job",
            packages.len(),
            runtime.name,
            runtime.package,
            runtime.version
        );
    }
    Ok(ExitCode::SUCCESS)
}
