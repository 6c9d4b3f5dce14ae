//! `grid-broker`: the coordinator. Thin shell over [`grid_broker`].

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "grid-broker",
    version,
    about = "Coordinate a grid: job intake, fan-out, results, retries"
)]
struct Args {
    #[command(flatten)]
    broker: grid_broker::BrokerArgs,
}

fn main() -> std::process::ExitCode {
    grid_client::init_tracing();
    grid_broker::main(Args::parse().broker)
}
