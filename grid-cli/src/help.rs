//! Help texts that are more than one flag's line: the JOB argument several commands take, and
//! what `--json` prints where commands share the flag but not the output.

/// How a JOB argument names a job (see `grid_client::tenant::Session::resolve_job`). Ids begin
/// with the time, so jobs submitted close together share a long prefix: no fixed length is
/// promised.
pub const JOB: &str = "The job: its id as `grid submit` printed it, a prefix of the id unique among \
                       your jobs, or its --name (your newest job of that name)";

/// `--json` for `grid jobs`, and for `grid nodes` [`NODES_JSON`]: the two share their flags
/// (`status::ListArgs`), not what they print.
pub const JOBS_JSON: &str = "Print one JSON object per line, a job each: its status as `grid status \
                             --json` prints it, with module and created_unix_ms";

/// `--json` for `grid nodes`.
pub const NODES_JSON: &str = "Print one JSON object per line, a node each: id, classes, gpu, \
                              slots, busy, running, memory_reserved_bytes, memory_budget_bytes, \
                              tasks_done, votes_agreed, votes_lost, preparing and the limits it \
                              accepts (accepts: {memory_bytes, timeout_ms, …})";
