//! The broker: job intake, fair fan-out of tasks, exactly-once counting of results, retries,
//! replicas' votes and the usage ledger.
//!
//! It keeps no state of its own: job records live in KV (`grid_jobs`), each task's final state
//! in KV (`grid_tasks`, created once — a second result for the same task finds the key taken),
//! tasks and results in streams. Killed and restarted, it reloads unfinished jobs, recounts them
//! from `grid_tasks` (in the background: it serves requests meanwhile, and a job's results wait
//! until its count is in), and goes on; a task it had published but not yet recorded is
//! published again under the same message id, and JetStream drops the copy. A job's final
//! record is written before the broker lets go of the job; until that write succeeds the job
//! stays held and the write is retried on every tick. One broker at a time: job-state writes
//! are not compare-and-set yet.
//!
//! Two halves:
//! - [`rules`] — every decision (accept, count, retry, vote, bill, fill, finish), with no I/O:
//!   events in, what to do out. Unit-tested in memory.
//! - `shell` — the loop over NATS that feeds the rules and does what they say against
//!   JetStream (stores, publishes, acks, replies), in `shell::requests` (tenants' requests),
//!   `shell::results` (results in) and `shell::store` (the reads and writes).
//!
//! [`faults`] holds the test-only fault points the fault tests kill it at.

mod args;
pub mod faults;
pub mod rules;
mod shell;

pub use args::{BrokerArgs, BrokerConfig, main};
pub use shell::run;
