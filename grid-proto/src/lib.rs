//! Grid's shared vocabulary: the words every other crate, the wire and the CLI use.
//!
//! **Architecture invariant:** this crate has no I/O and no async runtime. It holds the types that
//! cross a boundary — a task's [`Outcome`] and its [`Reason`], content hashes — so that the node, the
//! broker and the `grid` command can never disagree on what a reason means or how it is spelled.

pub mod hash;
pub mod names;
pub mod outcome;
pub mod runtime;
pub mod units;
pub mod wire;

pub use hash::Sha256Hex;
pub use outcome::{Limit, Outcome, Reason, TaskStatus};
pub use wire::*;

/// The seed of task `index` of a job with seed `job_seed` (`GRID_SEED`): the first 8 bytes,
/// little-endian, of SHA-256(`"grid-seed-v1"` ‖ job_seed as u64 LE ‖ index as u64 LE).
/// Stable across versions, platforms and nodes: results depend on it.
pub fn task_seed(job_seed: u64, index: u64) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"grid-seed-v1");
    h.update(job_seed.to_le_bytes());
    h.update(index.to_le_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// `text` on one line: its lines trimmed, blank ones dropped, joined with `separator`. Errors that
/// reach a user (reasons, `grid: …` lines) are always one line.
pub fn one_line(text: &str, separator: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(separator)
}
