//! The broker's settings and flags (`grid-broker` and the hidden `grid broker`). Sizes and
//! durations take a unit, as every flag of Grid's does (`grid_proto::units`).

use grid_proto::units::{parse_duration, parse_size};

/// What a broker is started with.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    pub nats_url: String,
    /// Tasks of one job queued or running at once.
    pub window: u64,
    /// Tasks of one tenant's jobs queued or running at once.
    pub tenant_window: u64,
    /// Tenants' shares of the slots (1 for a tenant not named).
    pub tenant_weights: std::collections::HashMap<String, u32>,
    /// Servers of the NATS cluster that keep each stream and bucket.
    pub stream_replicas: usize,
    /// NATS credentials (the operator's, on a grid with auth).
    pub creds: Option<std::path::PathBuf>,
    /// Bytes each tenant's object store may hold (0: no limit).
    pub tenant_quota_bytes: u64,
    /// Bytes each provider's stage may hold.
    pub stage_quota_bytes: u64,
    /// How long past its time limit a node may hold a task before the broker takes it back.
    pub take_back_grace: std::time::Duration,
    /// Where to serve Prometheus metrics (see `grid_client::metrics`).
    pub metrics: Option<std::net::SocketAddr>,
}

/// Command-line flags of the broker (`grid-broker` and `grid broker`).
#[derive(clap::Args, Debug, Clone)]
pub struct BrokerArgs {
    /// NATS server(s) of the grid [default: GRID_NATS_URL or nats://127.0.0.1:4222]
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// Tasks of one job queued or running at once.
    #[arg(long, default_value_t = 256)]
    pub window: u64,
    /// Tasks of one tenant's jobs queued or running at once: what keeps every tenant's next
    /// tasks within sight of the broker's fair share (see `--tenant-weight`).
    #[arg(long, default_value_t = 2048)]
    pub tenant_window: u64,
    /// A tenant's share of the slots, as NAME=WEIGHT (repeat for several): a tenant of weight 3
    /// gets three times the slots of one of weight 1 while both have tasks waiting. Tenants
    /// not named weigh 1.
    #[arg(long = "tenant-weight", value_name = "NAME=WEIGHT", value_parser = parse_weight)]
    pub tenant_weights: Vec<(String, u32)>,
    /// Copies of every stream, bucket and object store in a NATS cluster (3 on a 3-server
    /// cluster: any one server may die).
    #[arg(long, default_value_t = 1)]
    pub stream_replicas: usize,
    /// NATS credentials file: the operator's on a grid with auth [default: GRID_CREDS]
    #[arg(long, value_name = "FILE")]
    pub creds: Option<std::path::PathBuf>,
    /// What each tenant may keep in its object store (modules, inputs, outputs, logs); 0 for
    /// no limit. Applies when a tenant's store is made.
    #[arg(long, value_name = "SIZE", default_value = "10GiB", value_parser = parse_size)]
    pub tenant_quota: u64,
    /// What each provider's stage may hold: the outputs and logs it has handed in that the
    /// broker has not yet copied into tenants' stores. A full stage refuses that provider's
    /// next output until the broker catches up; no other provider notices.
    #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = parse_size)]
    pub stage_quota: u64,
    /// How long past its time limit (its job's `--timeout`, for each task of a run) a node may
    /// hold a task before the broker takes it back and offers it to others, whatever the node
    /// says. Covers the wait for a slot and a first compile (the Python runtime's: minutes).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub take_back_grace: std::time::Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9101)
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

fn parse_weight(s: &str) -> Result<(String, u32), String> {
    let (name, weight) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=WEIGHT (e.g. alice=3)"))?;
    let weight: u32 = weight
        .parse()
        .ok()
        .filter(|w| *w > 0)
        .ok_or_else(|| format!("{s:?}: the weight must be a whole number of at least 1"))?;
    if !grid_proto::names::valid_name(name) {
        return Err(format!("{s:?}: {name:?} is not a tenant name"));
    }
    Ok((name.to_string(), weight))
}

/// Runs a broker from its flags until Ctrl-C or SIGTERM.
pub fn main(args: BrokerArgs) -> std::process::ExitCode {
    let config = BrokerConfig {
        nats_url: grid_client::nats_url(args.nats.as_deref()),
        window: args.window,
        tenant_window: args.tenant_window,
        tenant_weights: args.tenant_weights.into_iter().collect(),
        stream_replicas: args.stream_replicas,
        creds: args.creds,
        tenant_quota_bytes: args.tenant_quota,
        stage_quota_bytes: args.stage_quota,
        take_back_grace: args.take_back_grace,
        metrics: args.metrics,
    };
    grid_client::run_service("grid-broker", |shutdown| crate::run(config, shutdown))
}
