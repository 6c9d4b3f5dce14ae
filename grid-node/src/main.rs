//! `grid-node`: a provider. Thin shell over [`grid_node::worker`].

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "grid-node",
    version,
    about = "Serve a grid: run its tasks in the sandbox"
)]
struct Args {
    #[command(flatten)]
    node: grid_node::settings::NodeArgs,
}

fn main() -> std::process::ExitCode {
    grid_sandbox::gpu_worker::serve_if_asked(grid_client::init_tracing);
    grid_client::init_tracing();
    let args = Args::parse();
    grid_node::worker::main(args.node)
}
