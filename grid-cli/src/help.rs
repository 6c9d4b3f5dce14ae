//! Help texts that are more than one flag's line: the JOB argument several commands take, and
//! each command's examples, shown at the end of its `--help` as `gh` shows them. An example
//! uses only flags its command has: `tests/all/cli.rs` checks each against the command's help.

/// "Examples:" in the style clap gives its own headings (bold, underlined); the escapes are
/// dropped where clap drops its colours (a pipe, `NO_COLOR`).
macro_rules! heading {
    ($title:literal) => {
        concat!("\x1b[1m\x1b[4m", $title, "\x1b[0m")
    };
}

/// An "Examples:" section: each example a `# what it does` line over its `$ grid …` line.
macro_rules! examples {
    ($($what:literal => $line:literal),+ $(,)?) => {
        concat!(heading!("Examples:") $(, "\n  # ", $what, "\n  $ ", $line)+)
    };
}

/// How a JOB argument names a job (see `grid_client::tenant::Session::resolve_job`). Ids begin
/// with the time, so jobs submitted close together share a long prefix: no fixed length is
/// promised.
pub const JOB: &str = "The job: its id as `grid submit` printed it, a prefix of the id unique among \
                       your jobs, or its --name (your newest job of that name)";

/// `grid --help`: the way through a first job, then what every command has in common.
pub const GRID: &str = concat!(
    heading!("Quick start:"),
    "
  $ grid up                                                   # a local grid, until Ctrl-C
  $ grid submit job.wasm --params params.jsonl --name sweep   # in another terminal
  $ grid status sweep --wait                                  # follow it to its end
  $ grid results sweep -o out                                 # outputs in out/<index>/
  $ grid logs sweep --failed                                  # what failed tasks printed

",
    heading!("Exit codes:"),
    "
  0  success
  1  a task or job failed, was refused, cancelled or disputed
  2  a usage or setup error (a bad flag, no grid at --nats, credentials refused)

",
    heading!("Environment:"),
    "
  GRID_NATS_URL  the grid, where --nats is not given [default: nats://127.0.0.1:4222]
  GRID_CREDS     your credentials file, where --creds is not given
  RUST_LOG       which log lines reach stderr [default: warn], e.g. `RUST_LOG=info`,
                 `RUST_LOG=grid_broker=debug`
  NO_COLOR       no colours on a terminal

Each command's --help ends with examples: `grid submit --help`."
);

pub const RUN: &str = examples!(
    "Run a task here, its params line on stdin, its /out kept in out/"
        => r#"echo '{"rows": 3}' | grid run job.wasm --output out"#,
    "A Python program, with data/ at /in and more memory than the default"
        => "grid run job.py --input data --memory 1GiB",
    "Rerun task 3 of a grid job here, exactly as it ran there but with more memory"
        => "grid run --from sweep --task 3 --memory 1GiB",
    "Arguments after -- go to the task"
        => "grid run render.wasm --timeout 30s -- --quality high",
);

pub const UP: &str = examples!(
    "nats-server, a broker and two nodes, until Ctrl-C"
        => "grid up",
    "Four nodes of two task slots each, sharing 8 GiB for their tasks"
        => "grid up --nodes 4 --slots 2 --memory-budget 8GiB",
    "Three nats-servers as one JetStream cluster, so that one may die"
        => "grid up --cluster 3",
);

pub const SUBMIT: &str = examples!(
    "One task per line of params.jsonl, followed to its end (exit 0 if all succeed)"
        => "grid submit sweep.wasm --params params.jsonl --name sweep --wait",
    "One task per file of shards/, every task seeing ref/ at /in/shared/"
        => "grid submit job.wasm --input shards --shared ref --memory 1GiB --timeout 1h",
    "100 tasks of a Python program, each run on 3 nodes that must agree"
        => "grid submit job.py --tasks 100 --replicas 3",
    "The job id alone on stdout, for a script"
        => "job=$(grid submit job.wasm --tasks 10)",
);

pub const STATUS: &str = examples!(
    "Follow a job to its end: exit 0 only if every task succeeded"
        => "grid status sweep --wait",
    "Each failed task: why it failed, after how many attempts"
        => "grid status 01a24ab97d --failed",
    "The counts as JSON, for a script"
        => "grid status sweep --json | jq .tasks",
);

pub const JOBS: &str = examples!(
    "Your jobs: id, name, module, state, progress and age"
        => "grid jobs",
    "The ids of your failed jobs"
        => r#"grid jobs --json | jq -r 'select(.state == "failed") | .job_id'"#,
);

pub const NODES: &str = examples!(
    "The nodes online: slots, memory, tasks done, GPU"
        => "grid nodes",
    "Free slots across the grid"
        => "grid nodes --json | jq -s 'map(.slots - .busy) | add'",
);

/// `--json` for `grid jobs`, and for `grid nodes` [`NODES_JSON`]: the two share their flags
/// (`status::ListArgs`), not what they print.
pub const JOBS_JSON: &str = "Print one JSON object per line, a job each: its status as `grid status \
                             --json` prints it, with module and created_unix_ms";

/// `--json` for `grid nodes`.
pub const NODES_JSON: &str = "Print one JSON object per line, a node each: id, classes, gpu, \
                              slots, busy, running, memory_reserved_bytes, memory_budget_bytes, \
                              tasks_done, votes_agreed, votes_lost, preparing and the limits it \
                              accepts (accepts: {memory_bytes, timeout_ms, …})";

pub const RESULTS: &str = examples!(
    "Every task's outputs in out/<index>/, listed in out/manifest.jsonl"
        => "grid results sweep -o out",
    "Also every task's part-*.csv joined into one table, out/part-all.csv"
        => "grid results sweep -o out --concat 'part-*.csv'",
);

pub const LOGS: &str = examples!(
    "What the failed tasks printed, a header per task and stream"
        => "grid logs sweep --failed",
    "Task 3's stdout byte for byte (its stderr stays on stderr)"
        => "grid logs sweep --task 3 > task-3.txt",
    "Tasks' logs as they finish, until the job ends"
        => "grid logs 01a24ab97d --follow",
);

pub const CANCEL: &str = examples!(
    "Drop a job's queued tasks and stop its running ones"
        => "grid cancel sweep",
);

pub const RETRY: &str = examples!(
    "Run the failed tasks again, with more memory, and wait for them"
        => "grid retry sweep --failed --memory 1GiB --wait",
    "Tasks that ran out of time, given an hour"
        => "grid retry 01a24ab97d --failed --timeout 1h",
);

pub const DELETE: &str = examples!(
    "Free the store of a job you have collected"
        => "grid results sweep -o out && grid delete sweep",
);

pub const USAGE: &str = examples!(
    "What every job, tenant and provider used"
        => "grid usage",
    "A tenant's last week"
        => "grid usage --tenant alice --since 7days",
    "One job's CPU seconds, from the JSON"
        => "grid usage --job 01a24ab97d80c3f1e2 --json | jq .total.cpu_seconds",
);

pub const DASHBOARD: &str = examples!(
    "The dashboard of the grid of `grid up`, on this machine"
        => "grid dashboard",
    "Served to others, reached as grid.example.org"
        => "grid dashboard --listen 0.0.0.0:8470 --allow-host grid.example.org",
    "Another grid's, as a tenant of it"
        => "grid dashboard --nats nats://grid.example.org:4222 --creds alice.creds",
);

pub const DOCTOR: &str = examples!(
    "Check this machine and the grid your commands would use"
        => "grid doctor",
    "Check another grid and your credentials on it"
        => "grid doctor --nats nats://grid.example.org:4222 --creds alice.creds",
);

pub const COMPLETIONS: &str = examples!(
    "Bash, for every user"
        => "grid completions bash > /etc/bash_completion.d/grid",
    "Zsh, for you (a folder on your $fpath)"
        => "grid completions zsh > ~/.zfunc/_grid",
);

pub const AUTH: &str = examples!(
    "An operator setup where `grid up` keeps it; prints the config nats-server includes"
        => "grid auth init",
    "One of your own, for a nats-server you run"
        => "grid auth init --auth-dir /etc/grid/auth",
);

pub const TENANT: &str = examples!(
    "Credentials for alice, to hand to her; she passes them with --creds"
        => "grid tenant add alice",
    "From the operator setup in another folder"
        => "grid tenant add alice --auth-dir /etc/grid/auth",
);

pub const PROVIDER: &str = examples!(
    "Credentials for a provider, for its nodes' --creds"
        => "grid provider add lab-3",
    "From the operator setup in another folder"
        => "grid provider add lab-3 --auth-dir /etc/grid/auth",
);

pub const SITE: &str = examples!(
    "A site whose leaf dials the core over TLS for provider lab-3 (credentials and CA from the operator)"
        => "grid site init /etc/grid/site --hub tls://core-1.example.org:7422,tls://core-2.example.org:7422 --creds lab-3.creds --ca ca.pem",
    "Then, on the site: its leaf node, and the node"
        => "nats-server -c /etc/grid/site/leaf.conf & grid-node --config /etc/grid/site/node-lab-3.toml",
);

pub const PYTHON: &str = examples!(
    "What a .py job can import, and which version"
        => "grid python packages",
    "Whether numpy is there"
        => "grid python packages --json | jq -r 'select(.name == \"numpy\") | .version'",
);

pub const BROKER: &str = examples!(
    "A broker for a nats-server run with the setup of `grid auth init --auth-dir /etc/grid/auth`"
        => "grid broker --nats nats://127.0.0.1:4222 --creds /etc/grid/auth/creds/operator-broker.creds",
    "Tenant alice gets three times the slots of others, and metrics are served"
        => "grid broker --tenant-weight alice=3 --metrics 127.0.0.1:9101",
);

pub const NODE: &str = examples!(
    "A provider's node: its tasks run here, 8 at once"
        => "grid node --nats nats://grid.example.org:4222 --creds lab-3.creds --slots 8",
    "Only tasks that ask for at most 2 GiB and an hour each"
        => "grid node --max-memory 2GiB --max-time 1h",
    "Its settings from a file (flags win over it)"
        => "grid node --config node.toml",
);
