//! `grid`: the command users type. Thin: it parses arguments and calls the libraries.
//!
//! Exit codes (every command): 0 success; 1 a task or job failed, was refused, cancelled or
//! disputed; 2 usage or setup error. Errors are one line, `grid: …`, on stderr.

mod auth;
mod conn;
mod control;
mod dashboard;
mod doctor;
mod flags;
mod help;
mod python;
mod results;
mod run;
mod site;
mod status;
mod style;
mod submit;
mod terminal;
mod up;
mod usage;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "grid",
    version = version(),
    about = "Run WebAssembly batch jobs in a sandbox, on your machine or a grid",
    after_help = help::GRID
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one task locally, in exactly the sandbox a node uses.
    #[command(after_help = help::RUN)]
    Run(run::RunArgs),
    /// Start a local grid (nats-server, a broker, nodes) in the foreground.
    #[command(after_help = help::UP)]
    Up(up::UpArgs),
    /// Submit a job to the grid.
    #[command(after_help = help::SUBMIT)]
    Submit(submit::SubmitArgs),
    /// Show a job's state.
    #[command(after_help = help::STATUS)]
    Status(status::StatusArgs),
    /// List jobs.
    #[command(after_help = help::JOBS, mut_arg("json", |json| json.help(help::JOBS_JSON)))]
    Jobs(status::ListArgs),
    /// List nodes that sent a heartbeat recently.
    #[command(after_help = help::NODES, mut_arg("json", |json| json.help(help::NODES_JSON)))]
    Nodes(status::ListArgs),
    /// Collect a job's outputs into a folder (works while it runs).
    #[command(after_help = help::RESULTS)]
    Results(results::ResultsArgs),
    /// Print tasks' captured stdout and stderr, on stdout under a header per task and stream.
    #[command(after_help = help::LOGS)]
    Logs(results::LogsArgs),
    /// Cancel a job: queued tasks are dropped, running ones stopped.
    #[command(after_help = help::CANCEL)]
    Cancel(control::CancelArgs),
    /// Run an ended job's failed (or cancelled) tasks again, in the same job.
    #[command(
        after_help = help::RETRY,
        // A retry keeps the job's limits unless told: not the defaults a new job gets.
        mut_arg("memory", |a| a.help("New memory limit for the tasks run again, e.g. 1GiB [default: the job's]")),
        mut_arg("timeout", |a| a.help("New time limit for the tasks run again, e.g. 1h [default: the job's]")),
        mut_arg("max_output", |a| a.help("New output limit for the tasks run again, e.g. 2GiB [default: the job's]")),
        mut_arg("gpu_memory", |a| a.help("New GPU buffer limit for the tasks run again [default: the job's]")),
        mut_arg("gpu_time", |a| a.help("New GPU time limit for the tasks run again [default: the job's]"))
    )]
    Retry(control::RetryArgs),
    /// Delete an ended job: its records, outputs and logs, and inputs no other job uses.
    #[command(after_help = help::DELETE)]
    Delete(control::DeleteArgs),
    /// What tasks used, from the usage ledger: per job, tenant and provider.
    #[command(after_help = help::USAGE)]
    Usage(usage::UsageArgs),
    /// Serve a live web dashboard of the grid (nodes, jobs, throughput, usage).
    #[command(after_help = help::DASHBOARD)]
    Dashboard(dashboard::DashboardArgs),
    /// Check this machine and your grid: wasm target, nats-server, GPU, Python runtime, the grid
    /// and your credentials.
    #[command(after_help = help::DOCTOR)]
    Doctor(doctor::DoctorArgs),
    /// Print a shell completion script: `grid completions bash > /etc/bash_completion.d/grid`.
    #[command(after_help = help::COMPLETIONS)]
    Completions {
        /// The shell to complete `grid` in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The grid's NATS auth: an operator setup for nats-server.
    #[command(subcommand, after_help = help::AUTH)]
    Auth(auth::AuthCommand),
    /// Tenants: who may submit jobs and read their own.
    #[command(
        subcommand,
        after_help = help::TENANT,
        mut_subcommand("add", |add| add.after_help(help::TENANT))
    )]
    Tenant(auth::AddCommand),
    /// Providers: whose nodes may take tasks.
    #[command(
        subcommand,
        after_help = help::PROVIDER,
        mut_subcommand("add", |add| add.after_help(help::PROVIDER))
    )]
    Provider(auth::AddCommand),
    /// Provider sites: a leaf node that links a site's providers to the grid's core.
    #[command(subcommand, after_help = help::SITE)]
    Site(site::SiteCommand),
    /// Grid's Python runtime: `grid python packages` lists what a `.py` job can import.
    #[command(subcommand, after_help = help::PYTHON)]
    Python(python::PythonCommand),
    /// Run a grid's broker against a nats-server (what `grid up` starts; also built as
    /// `grid-broker`).
    #[command(after_help = help::BROKER)]
    Broker(grid_broker::BrokerArgs),
    /// Run a node: take a grid's tasks and run them here, as a provider (also built as
    /// `grid-node`).
    #[command(after_help = help::NODE)]
    Node(grid_node::settings::NodeArgs),
}

/// `grid --version`: the release and the wire version (a grid's parts must share it).
fn version() -> &'static str {
    static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "{} (wire version {})",
            env!("CARGO_PKG_VERSION"),
            grid_proto::WIRE_VERSION
        )
    });
    VERSION.as_str()
}

impl Command {
    /// Whether the command's work is to print (a listing, logs, completions), so that a reader
    /// who stops reading (`grid usage | head -1`) ends it.
    fn prints_a_listing(&self) -> bool {
        matches!(
            self,
            Command::Status(_)
                | Command::Jobs(_)
                | Command::Nodes(_)
                | Command::Logs(_)
                | Command::Usage(_)
                | Command::Python(_)
                | Command::Completions { .. }
        )
    }
}

/// A closed pipe ends the process quietly, as it ends `cat` (Rust ignores SIGPIPE, so a print
/// to a closed pipe would panic). Only for commands that just print: servers keep ignoring it.
fn quiet_on_a_closed_pipe() {
    // SAFETY: restoring a signal's default action, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    grid_sandbox::gpu_worker::serve_if_asked(grid_client::init_tracing);
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // A user's command says what went wrong in its own words: no libraries' lines (the NATS
    // client's, say) on the terminal unless RUST_LOG asks. Servers log everything.
    match cli.command {
        Command::Broker(_) | Command::Node(_) | Command::Up(_) | Command::Dashboard(_) => {
            grid_client::init_tracing()
        }
        _ => grid_client::init_tracing_or("warn,async_nats=off"),
    }
    if cli.command.prints_a_listing() {
        quiet_on_a_closed_pipe();
    }
    let result = match cli.command {
        Command::Run(args) => run::main(args),
        Command::Up(args) => up::up(args),
        Command::Submit(args) => submit::submit(args),
        Command::Status(args) => status::status(args),
        Command::Jobs(args) => status::jobs(args),
        Command::Nodes(args) => status::nodes(args),
        Command::Results(args) => results::results(args),
        Command::Logs(args) => results::logs(args),
        Command::Cancel(args) => control::cancel(args),
        Command::Retry(args) => control::retry(args),
        Command::Delete(args) => control::delete(args),
        Command::Usage(args) => usage::usage(args),
        Command::Dashboard(args) => dashboard::dashboard(args),
        Command::Doctor(args) => doctor::doctor(args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "grid", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Auth(command) => auth::auth(command),
        Command::Tenant(command) => auth::add(grid_client::auth::Role::Tenant, command),
        Command::Provider(command) => auth::add(grid_client::auth::Role::Provider, command),
        Command::Site(command) => site::site(command),
        Command::Python(command) => python::python(command),
        Command::Broker(args) => return grid_broker::main(args),
        Command::Node(args) => return grid_node::worker::main(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // An error may quote the grid or a provider: shown, not obeyed, on a terminal.
            let line = grid_proto::one_line(&format!("{e:#}"), " ");
            eprintln!("grid: {}", terminal::for_stderr(&line));
            // A refused job or module is the job's failure (1); anything else is usage or setup (2).
            ExitCode::from(if e.downcast_ref::<conn::Refused>().is_some() {
                1
            } else {
                2
            })
        }
    }
}
