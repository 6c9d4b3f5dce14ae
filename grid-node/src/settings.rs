//! A node's settings: command-line flags, and a TOML config file for what a provider sets once.
//!
//! Every setting can be given either way; a flag wins over the file, and both merge into one
//! [`NodeConfig`], what the node runs with. Sizes and durations take a unit, in the grammar of
//! every other flag (`2GiB`, `5min`; see `grid_proto::units`), and limits their floors (memory
//! at least 1 MiB, time at least 1 ms). An unknown key in the file is an error that names it, so
//! a typo never silently falls back to a default.
//!
//! ```toml
//! nats = "nats://grid.example.org:4222"
//! creds = "/etc/grid/provider.creds"
//! id = "lab-box-1"
//! slots = 4
//! class = "cpu"
//! cache_dir = "/var/cache/grid"
//! compiled_dir = "/var/cache/grid/compiled"  # share with the provider's other nodes
//! warm_runtimes = true  # compile the Python runtime at start, not at the first Python task
//! gpu = true            # look for a GPU and serve the gpu class too
//! gpu_slots = 1
//! grace = "30s"         # on shutdown, how long running tasks may finish
//! user = "grid"         # started as root: run as this user
//!
//! [caps]                # the largest limits a job may ask for; a job asking for more is
//! memory = "2GiB"       # not taken (another node may take it; the broker refuses a job
//! time = "1h"           # that no live node takes)
//! gpu_memory = "1GiB"
//! gpu_time = "5min"
//! ```
//!
//! Caps default to what a node can give: memory up to its memory budget, 24 h of time, 10 GiB
//! of output, 2 GiB of GPU buffers and 1 h of GPU time.

use grid_proto::units::{duration_at_least, parse_duration, parse_size, size_at_least};
use grid_proto::{JobLimits, names};
use grid_sandbox::limits::{Limits, NodeCaps};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// Command-line flags of a node (`grid-node` and `grid node`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NodeArgs {
    /// Settings file (TOML); flags win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// NATS server(s) of the grid [default: GRID_NATS_URL or nats://127.0.0.1:4222]
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// NATS credentials file [default: GRID_CREDS]
    #[arg(long, value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// Tasks run at once [default: the number of CPUs]
    #[arg(long)]
    pub slots: Option<u32>,
    /// Where modules, compiled code and task work dirs are kept [default: ~/.cache/grid/node]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Where compiled code is kept; nodes of one user on one machine may share it, so that a
    /// module (a runtime's 100 MB) is compiled once per machine [default: CACHE_DIR/compiled]
    #[arg(long, value_name = "DIR")]
    pub compiled_dir: Option<PathBuf>,
    /// At start, lay out and compile (in the background) each runtime whose files this machine
    /// has — GRID_RUNTIME_DIR, or the package `cargo xtask setup` installs — so that the first
    /// Python task finds it ready instead of waiting a minute for the compile
    #[arg(long)]
    pub warm_runtimes: bool,
    /// Capability class to serve: cpu, or gpu (only GPU jobs) [default: cpu]
    #[arg(long)]
    pub class: Option<String>,
    /// This node's id [default: host name and a random suffix]
    #[arg(long)]
    pub id: Option<String>,
    /// Do not look for a GPU (serve only --class).
    #[arg(long)]
    pub no_gpu: bool,
    /// GPU tasks run at once, besides --slots [default: 1]
    #[arg(long)]
    pub gpu_slots: Option<u32>,
    /// On shutdown, how long running tasks may take to finish before they are handed back to
    /// the grid [default: 10s]
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub grace: Option<Duration>,
    /// Started as root: run as this user instead (its cache folder becomes the user's). See
    /// `grid_node::privileges` for what else the node gives up.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// Take no job that asks for more memory per task, e.g. 1GiB [default: --memory-budget]
    #[arg(long, value_name = "SIZE", value_parser = parse_memory)]
    pub max_memory: Option<u64>,
    /// Take no job that asks for more time per task, e.g. 1h [default: 24h]
    #[arg(long, value_name = "DUR", value_parser = parse_time)]
    pub max_time: Option<Duration>,
    /// Memory all running tasks together may be given: a task starts only when its memory
    /// limit fits beside the running ones' [default: this machine's RAM]
    #[arg(long, value_name = "SIZE", value_parser = parse_memory)]
    pub memory_budget: Option<u64>,
    /// Disk the node's caches (fetched modules, compiled code) may fill; least recently used
    /// modules are evicted past it [default: 10GiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub disk_budget: Option<u64>,
    /// Take no job that asks for more GPU buffer bytes per task, e.g. 1GiB [default: 2GiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_gpu_memory: Option<u64>,
    /// Take no job that asks for more GPU time per task, e.g. 5min [default: 1h]
    #[arg(long, value_name = "DUR", value_parser = parse_time)]
    pub max_gpu_time: Option<Duration>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9102)
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// TEST ONLY: corrupt every task's outputs (a lying provider, for replica tests).
    #[arg(long, hide = true)]
    pub test_corrupt_outputs: bool,
}

/// A node's settings, merged from its flags and its config file ([`NodeArgs::into_config`]).
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub nats_url: String,
    /// NATS credentials file (else `GRID_CREDS`, else none).
    pub creds: Option<PathBuf>,
    /// Started as root: the user to run as (`--user`).
    pub user: Option<String>,
    pub node_id: String,
    pub class: String,
    pub slots: u32,
    pub cache_dir: PathBuf,
    /// Compiled code (`grid_sandbox::cache`), perhaps shared with other nodes of this user.
    pub compiled_dir: PathBuf,
    /// Compile the runtimes whose files this machine has at start (`--warm-runtimes`).
    pub warm_runtimes: bool,
    /// Look for a GPU and, when there is one, also serve the `gpu` class.
    pub use_gpu: bool,
    /// GPU tasks run at once (they also take turns on the GPU itself).
    pub gpu_slots: u32,
    /// This provider's ceilings on every task's limits.
    pub caps: NodeCaps,
    /// Memory all running tasks together may be given (their memory limits, summed).
    pub memory_budget_bytes: u64,
    /// Disk the caches may fill (see [`crate::disk`]).
    pub disk_budget_bytes: u64,
    /// On shutdown, how long running tasks may take to finish before they are handed back.
    pub grace: Duration,
    /// Where to serve Prometheus metrics (see `grid_client::metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// TEST ONLY: add a file of this node's own to every task's outputs, so that its replica
    /// results never agree with anyone's.
    pub test_corrupt_outputs: bool,
}

/// The config file, as written.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    nats: Option<String>,
    creds: Option<PathBuf>,
    id: Option<String>,
    slots: Option<u32>,
    class: Option<String>,
    cache_dir: Option<PathBuf>,
    compiled_dir: Option<PathBuf>,
    warm_runtimes: Option<bool>,
    gpu: Option<bool>,
    gpu_slots: Option<u32>,
    memory_budget: Option<String>,
    disk_budget: Option<String>,
    grace: Option<String>,
    user: Option<String>,
    metrics: Option<std::net::SocketAddr>,
    #[serde(default)]
    caps: CapsFile,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct CapsFile {
    memory: Option<String>,
    time: Option<String>,
    gpu_memory: Option<String>,
    gpu_time: Option<String>,
}

/// A memory budget or cap: a size of at least the least a task may have (the budget is counted
/// in MiB, and a cap below every job's limit takes no job).
fn parse_memory(s: &str) -> Result<u64, String> {
    size_at_least(s, JobLimits::MIN_MEMORY_BYTES)
}

/// A time cap: a duration of at least the least a task may have.
fn parse_time(s: &str) -> Result<Duration, String> {
    duration_at_least(s, JobLimits::MIN_TIME)
}

/// Parses an optional `key = "…"` value of the file with `parse`, naming the key when it fails.
fn parsed<T>(
    key: &str,
    value: Option<&String>,
    parse: fn(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    value
        .map(|v| parse(v).map_err(|e| format!("{key} = {v:?}: {e}")))
        .transpose()
}

impl NodeArgs {
    /// The node's settings: flags, then the config file, then defaults. `Err` is one line that
    /// names the file and the problem.
    pub fn into_config(self) -> Result<NodeConfig, String> {
        let file = match &self.config {
            None => NodeFile::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
                toml::from_str::<NodeFile>(&text).map_err(|e| {
                    format!(
                        "config {}: {}",
                        path.display(),
                        grid_proto::one_line(&e.to_string(), " ")
                    )
                })?
            }
        };
        let in_file = |e: String| match &self.config {
            Some(path) => format!("config {}: {e}", path.display()),
            None => e,
        };
        let grace = parsed("grace", file.grace.as_ref(), parse_duration).map_err(in_file)?;
        let memory_budget =
            parsed("memory_budget", file.memory_budget.as_ref(), parse_memory).map_err(in_file)?;
        let disk_budget =
            parsed("disk_budget", file.disk_budget.as_ref(), parse_size).map_err(in_file)?;
        let memory =
            parsed("caps.memory", file.caps.memory.as_ref(), parse_memory).map_err(in_file)?;
        let time = parsed("caps.time", file.caps.time.as_ref(), parse_time).map_err(in_file)?;
        let gpu_memory = parsed("caps.gpu_memory", file.caps.gpu_memory.as_ref(), parse_size)
            .map_err(in_file)?;
        let gpu_time =
            parsed("caps.gpu_time", file.caps.gpu_time.as_ref(), parse_time).map_err(in_file)?;

        let class = self
            .class
            .or(file.class)
            .unwrap_or_else(|| names::DEFAULT_CLASS.into());
        if !names::CLASSES.contains(&class.as_str()) {
            return Err(format!(
                "unknown class {class:?}: a node serves {}",
                names::CLASSES.join(" or ")
            ));
        }
        let slots = self
            .slots
            .or(file.slots)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
        let gpu_slots = self.gpu_slots.or(file.gpu_slots).unwrap_or(1);
        if slots == 0 || gpu_slots == 0 {
            return Err("slots and gpu_slots must be at least 1".into());
        }
        let cache_dir = self.cache_dir.or(file.cache_dir).unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir)
                .join(".cache/grid/node")
        });
        let compiled_dir = self
            .compiled_dir
            .or(file.compiled_dir)
            .unwrap_or_else(|| cache_dir.join("compiled"));
        let creds = self.creds.or(file.creds).or_else(|| {
            std::env::var_os("GRID_CREDS")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        });
        // A provider's credentials name its node: NATS lets it publish results and heartbeats
        // under that id only.
        let provider = match &creds {
            Some(path) => {
                let who = grid_client::auth::Identity::of_creds_file(path)
                    .map_err(|e| format!("{e:#}"))?;
                match who.role {
                    grid_client::auth::Role::Provider => Some(who.name),
                    grid_client::auth::Role::Operator => None,
                    grid_client::auth::Role::Tenant => {
                        return Err(format!(
                            "{} are a tenant's credentials: a node needs a provider's (`grid provider add NAME`)",
                            path.display()
                        ));
                    }
                }
            }
            None => None,
        };
        let node_id = match (self.id.or(file.id), provider) {
            (Some(id), Some(provider)) if id != provider => {
                return Err(format!(
                    "node id {id:?} is not the provider of the credentials ({provider:?}): drop --id, or use that provider's credentials"
                ));
            }
            (Some(id), _) => id,
            (None, Some(provider)) => provider,
            (None, None) => default_id(),
        };
        if node_id.is_empty()
            || !node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "node id {node_id:?}: use letters, digits, - and _ only"
            ));
        }
        // What a node takes by default: all it can give (see the module docs).
        let mut caps = Limits {
            timeout: Duration::from_secs(24 * 3600),
            max_output_bytes: 10 << 30,
            ..Limits::default()
        };
        caps.gpu.max_buffer_bytes = 2 << 30;
        caps.gpu.gpu_time = Duration::from_secs(3600);
        let memory_budget_bytes = self
            .memory_budget
            .or(memory_budget)
            .or_else(physical_memory)
            .unwrap_or(u64::MAX);
        if memory_budget_bytes < JobLimits::MIN_MEMORY_BYTES {
            return Err(format!(
                "memory_budget must be at least {}",
                grid_proto::units::size_text(JobLimits::MIN_MEMORY_BYTES)
            ));
        }
        // No task may be given more than all of them together.
        caps.memory_bytes = self
            .max_memory
            .or(memory)
            .unwrap_or(memory_budget_bytes)
            .min(memory_budget_bytes);
        caps.timeout = self.max_time.or(time).unwrap_or(caps.timeout);
        caps.gpu.max_buffer_bytes = self
            .max_gpu_memory
            .or(gpu_memory)
            .unwrap_or(caps.gpu.max_buffer_bytes);
        caps.gpu.gpu_time = self.max_gpu_time.or(gpu_time).unwrap_or(caps.gpu.gpu_time);
        Ok(NodeConfig {
            nats_url: grid_client::nats_url(self.nats.or(file.nats).as_deref()),
            creds,
            user: self.user.or(file.user),
            node_id,
            class,
            slots,
            cache_dir,
            compiled_dir,
            warm_runtimes: self.warm_runtimes || file.warm_runtimes.unwrap_or(false),
            use_gpu: !self.no_gpu && file.gpu.unwrap_or(true),
            gpu_slots,
            caps: NodeCaps(caps),
            memory_budget_bytes,
            disk_budget_bytes: self.disk_budget.or(disk_budget).unwrap_or(10 << 30),
            grace: self.grace.or(grace).unwrap_or(Duration::from_secs(10)),
            metrics: self.metrics.or(file.metrics),
            test_corrupt_outputs: self.test_corrupt_outputs,
        })
    }
}

/// The host name and a suffix that differs per process.
fn default_id() -> String {
    let host: String = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "{host}-{}-{:x}",
        std::process::id(),
        grid_client::now_unix_ms() % 0xffffff
    )
}

/// This machine's RAM (`MemTotal` of `/proc/meminfo`), if it can be read: a node's default
/// memory budget, and what `grid up` shares among its nodes.
pub fn physical_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_file(text: &str, args: NodeArgs) -> Result<NodeConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        NodeArgs {
            config: Some(path),
            ..args
        }
        .into_config()
    }

    #[test]
    fn the_file_sets_what_flags_leave_out_and_flags_win() {
        let text = r#"
nats = "nats://10.0.0.1:4222"
id = "lab-box-1"
slots = 3
gpu = false
grace = "30s"
[caps]
memory = "1GiB"
time = "2h"
gpu_time = "5min"
"#;
        let c = with_file(
            text,
            NodeArgs {
                slots: Some(7),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.nats_url, "nats://10.0.0.1:4222");
        assert_eq!(c.node_id, "lab-box-1");
        assert_eq!(c.slots, 7, "the flag wins");
        assert!(!c.use_gpu);
        assert_eq!(c.grace, Duration::from_secs(30));
        assert_eq!(c.caps.0.memory_bytes, 1 << 30);
        assert_eq!(c.caps.0.gpu.gpu_time, Duration::from_secs(300));
        assert_eq!(c.caps.0.timeout, Duration::from_secs(7200));
        assert_eq!(c.class, "cpu");
    }

    #[test]
    fn the_memory_budget_defaults_to_the_machine_and_caps_every_task() {
        let c = NodeArgs::default().into_config().unwrap();
        assert_eq!(Some(c.memory_budget_bytes), physical_memory());
        assert!(c.memory_budget_bytes > 0);
        let c = with_file("memory_budget = \"300MiB\"\n", NodeArgs::default()).unwrap();
        assert_eq!(c.memory_budget_bytes, 300 << 20);
        assert_eq!(
            c.caps.0.memory_bytes,
            300 << 20,
            "no task gets more than all"
        );
        assert_eq!(c.disk_budget_bytes, 10 << 30, "the default disk budget");
        let c = with_file("disk_budget = \"2GiB\"\n", NodeArgs::default()).unwrap();
        assert_eq!(c.disk_budget_bytes, 2 << 30);
        let e = with_file("memory_budget = \"1KiB\"\n", NodeArgs::default()).unwrap_err();
        assert!(e.contains("memory_budget"), "{e}");
    }

    #[test]
    fn mistakes_in_the_file_are_named() {
        let e = with_file("slotz = 3\n", NodeArgs::default()).unwrap_err();
        assert!(e.contains("slotz"), "{e}");
        assert!(e.contains("node.toml"), "{e}");
        let e = with_file("[caps]\nmemory = \"lots\"\n", NodeArgs::default()).unwrap_err();
        assert!(e.contains("caps.memory"), "{e}");
        let e = with_file("disk_budget = \"100\"\n", NodeArgs::default()).unwrap_err();
        assert!(
            e.contains("disk_budget = \"100\": give a unit, e.g. 100MiB"),
            "one grammar for flags and files: {e}"
        );
        let e = with_file("[caps]\ntime = \"0\"\n", NodeArgs::default()).unwrap_err();
        assert!(e.contains("caps.time = \"0\": must be at least 1ms"), "{e}");
        let e = with_file("memory_budget = \"512KiB\"\n", NodeArgs::default()).unwrap_err();
        assert!(e.contains("must be at least 1 MiB"), "{e}");
        let e = with_file("class = \"tpu\"\n", NodeArgs::default()).unwrap_err();
        assert!(e.contains("unknown class"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        let e = NodeArgs {
            config: Some("/nonexistent/node.toml".into()),
            ..Default::default()
        }
        .into_config()
        .unwrap_err();
        assert!(
            e.starts_with("cannot read config /nonexistent/node.toml"),
            "{e}"
        );
    }
}
