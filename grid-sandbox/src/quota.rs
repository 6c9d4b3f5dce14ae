//! The `/out` quota of one task: an upper bound on the bytes and entries under `/out`.
//!
//! The apparent size of `/out` (sparse files count at their full length, a hard-linked file
//! once) is tracked as an upper bound: the total found by the last exact walk of `/out`, plus
//! the current size (`fstat`) of every file opened for writing since. Only when that bound
//! passes the limit is `/out` walked again (without following symlinks), which makes the bound
//! exact. An honest task far from its limit pays one `fstat` per open writable file per write;
//! a task near its limit pays walks, charged to its own time. Entry counts work the same way:
//! creations are counted and checked by a walk when the count passes the limit. The hooks that
//! feed it are in [`crate::fs_guard`].
//!
//! # Failing closed
//! The walks go through directory handles ([`crate::tree`]), so a tree nested past `PATH_MAX`
//! is counted like any other. A walk that cannot account for the whole tree — an entry it
//! cannot stat, a folder it cannot open, more than [`crate::tree::MAX_DEPTH`] folders deep —
//! makes the bound infinite: the check that asked fails, and the task ends with `limit: output`
//! (or `limit: files`). What the hooks had no cause to walk, the sandbox's walk of `/out` when
//! the task ends catches (see [`crate::sandbox`]).
//!
//! # Disk use on the node
//! A task's disk use never exceeds its output limit plus a small slack, bounded by its entry
//! limit. Every call that can grow a file or add an entry is checked *before* it runs (see
//! [`crate::fs_guard`]), and `fd_allocate` is refused by wasmtime-wasi, so nothing is
//! preallocated. A write past the end of a file, or `fd_filestat_set_size`, can make a file's
//! apparent size pass the limit, but only as a hole, which takes no blocks; the check after the
//! call ends the task. What the bytes do not count, per entry (at most `max_output_files`):
//!
//! - a file's partly used last block: under one block;
//! - a folder's own blocks: one block, more only for a folder that lists many names, at most
//!   264 bytes a name (8 + a name of up to 255 bytes, rounded up to 4), twice that in the
//!   half-full blocks of an ext4 hashed folder — names that are themselves counted entries;
//! - a symlink's target, when longer than the 60 bytes kept in its inode: one block;
//! - the file system's map of a file's blocks: on ext4 one 4 KiB block per 340 extents, at most
//!   0.3% of the file's bytes in the worst case (one block per extent; 0.1% for ext2/3's
//!   indirect blocks).
//!
//! With 4 KiB blocks that is at most `max_output_bytes` × 1.003 + `max_output_files` × 4.6 KiB:
//! the limit plus under 45 MiB at the default 10,000 entries. (XFS also preallocates
//! speculatively past the end of a file being written, and gives it back when it is closed.)
//! Folders and tails are not charged as bytes: `max_output_bytes` stays the bytes of the files a
//! user gets back (and the `bytes_out` billed), the same on every file system, and the entry
//! limit bounds the difference instead.

use crate::tree::{Tally, TreeError};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Quota state of one task.
pub struct OutputQuota {
    /// `/out`, and a runtime task's scratch folder (`/tmp`): one quota for both.
    roots: Vec<PathBuf>,
    pub(crate) max_bytes: u64,
    max_files: u64,
    /// Bytes of files not opened for writing since the last walk.
    walked_bytes: u64,
    /// (dev, ino) → last seen size, for every file opened for writing since the last walk.
    touched: HashMap<(u64, u64), u64>,
    /// Upper bound on entries under `/out`.
    entries: u64,
}

impl OutputQuota {
    pub fn new(out_dir: &Path, max_bytes: u64, max_files: u64) -> Self {
        Self {
            roots: vec![out_dir.to_path_buf()],
            max_bytes,
            max_files,
            walked_bytes: 0,
            touched: HashMap::new(),
            entries: 0,
        }
    }

    /// Counts what the guest writes in `dir` (a scratch folder) against the same limits.
    pub fn also_count(&mut self, dir: &Path) {
        self.roots.push(dir.to_path_buf());
    }

    fn bound(&self) -> u64 {
        // Saturating: sizes past the end of a sparse file can be near `u64::MAX` together.
        self.touched
            .values()
            .fold(self.walked_bytes, |total, size| total.saturating_add(*size))
    }

    /// Updates the sizes of the task's open writable files; true if `extra` more bytes fit.
    pub(crate) fn fits(&mut self, state_files: &[((u64, u64), u64)], extra: u64) -> bool {
        for (id, size) in state_files {
            self.touched.insert(*id, *size);
        }
        if self.bound().saturating_add(extra) <= self.max_bytes {
            return true;
        }
        self.walk(state_files);
        self.bound().saturating_add(extra) <= self.max_bytes
    }

    /// Makes the counts exact by walking `/out`, or, when it cannot be walked whole, counts it
    /// as over every limit.
    fn walk(&mut self, open_files: &[((u64, u64), u64)]) {
        let open: HashSet<(u64, u64)> = open_files.iter().map(|(id, _)| *id).collect();
        match count(&self.roots, &open) {
            Ok(tally) => {
                self.walked_bytes = tally.bytes;
                self.entries = tally.entries;
            }
            Err(e) => {
                tracing::debug!(error = %e, "a task's output folders cannot be walked whole: over its limits");
                self.walked_bytes = u64::MAX;
                self.entries = u64::MAX;
            }
        }
        self.touched = open_files.iter().copied().collect();
    }

    pub(crate) fn add_entry(&mut self, open_files: &[((u64, u64), u64)]) -> bool {
        self.entries = self.entries.saturating_add(1);
        if self.entries <= self.max_files {
            return true;
        }
        self.walk(open_files);
        self.entries <= self.max_files
    }
}

/// Entries and bytes under `roots`, leaving out the bytes of the files in `open` (counted by
/// their `fstat`).
fn count(roots: &[PathBuf], open: &HashSet<(u64, u64)>) -> Result<Tally, TreeError> {
    let mut tally = Tally::default();
    for root in roots {
        crate::tree::walk(root, |entry| {
            tally.add(entry, open);
            Ok::<(), TreeError>(())
        })?;
    }
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::MAX_DEPTH;
    use crate::tree::testing::{create_at, nest};
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn files_past_path_max_count_against_the_quota() {
        let out = tempfile::tempdir().unwrap();
        // 30 folders of 200-byte names: the file at the bottom has a path of 6 KB.
        let bottom = nest(out.path(), 30, &"d".repeat(200));
        let mut file = create_at(&bottom, "hidden.bin");
        file.write_all(&vec![1u8; 3 << 20]).unwrap();
        let meta = file.metadata().unwrap();
        let id = (meta.dev(), meta.ino());
        let mut quota = OutputQuota::new(out.path(), 4 << 20, 10_000);
        assert!(quota.fits(&[(id, 3 << 20)], 0));
        drop(file);
        // Closed, the file is found by the walk that 2 MiB more calls for, 6 KB down.
        assert!(!quota.fits(&[], 2 << 20), "3 + 2 MiB is over 4 MiB");
        assert!(quota.fits(&[], 1 << 20), "3 + 1 MiB is within it");
    }

    #[test]
    fn a_tree_too_deep_to_walk_is_over_the_quota() {
        let shallow = tempfile::tempdir().unwrap();
        drop(nest(shallow.path(), MAX_DEPTH, "d"));
        let deep = tempfile::tempdir().unwrap();
        drop(nest(deep.path(), MAX_DEPTH + 1, "d"));
        for (dir, fits) in [(shallow.path(), true), (deep.path(), false)] {
            let mut quota = OutputQuota::new(dir, 1 << 20, 10_000);
            // A file written and gone: the bound passes the limit, and a walk decides.
            assert!(quota.fits(&[((0, 0), 900 << 10)], 0));
            assert_eq!(quota.fits(&[], 200 << 10), fits, "{}", dir.display());
            // One entry more than the tree holds fits; the one after calls for a walk.
            let mut entries = OutputQuota::new(dir, 1 << 20, (MAX_DEPTH + 1) as u64);
            for _ in 0..=MAX_DEPTH {
                entries.add_entry(&[]);
            }
            assert_eq!(entries.add_entry(&[]), fits, "entries: {}", dir.display());
        }
    }

    #[test]
    fn a_folder_that_cannot_be_walked_is_over_the_quota() {
        let gone = tempfile::tempdir().unwrap().path().join("gone");
        let mut quota = OutputQuota::new(&gone, 1 << 20, 10);
        assert!(quota.fits(&[], 0), "within the bound, nothing is walked");
        assert!(!quota.fits(&[((0, 0), 1 << 20)], 1));
        assert!(!quota.fits(&[], 0), "and it stays over");
    }
}
