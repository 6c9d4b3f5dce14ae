//! The `/out` quota of one task: an upper bound on the bytes and entries under `/out`.
//!
//! The apparent size of `/out` (sparse files count at their full length) is tracked as an upper
//! bound: the total found by the last exact walk of `/out`, plus the current size (`fstat`) of
//! every file opened for writing since. Only when that bound passes the limit is `/out` walked
//! again (without following symlinks), which makes the bound exact. An honest task far from its
//! limit pays one `fstat` per open writable file per write; a task near its limit pays walks,
//! charged to its own time. Entry counts work the same way: creations are counted and checked
//! by a walk when the count passes the limit. The hooks that feed it are in [`crate::fs_guard`].

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
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
        self.walked_bytes
            .saturating_add(self.touched.values().sum::<u64>())
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

    /// Makes the counts exact by walking `/out`.
    fn walk(&mut self, open_files: &[((u64, u64), u64)]) {
        let open: HashSet<(u64, u64)> = open_files.iter().map(|(id, _)| *id).collect();
        let mut seen = HashSet::new();
        let (mut bytes, mut entries) = (0u64, 0u64);
        let mut stack = self.roots.clone();
        while let Some(dir) = stack.pop() {
            let Ok(read) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in read.flatten() {
                entries += 1;
                let Ok(meta) = entry.path().symlink_metadata() else {
                    continue;
                };
                if meta.is_dir() {
                    stack.push(entry.path());
                } else if meta.is_file() {
                    let id = (meta.dev(), meta.ino());
                    if !open.contains(&id) && seen.insert(id) {
                        bytes = bytes.saturating_add(meta.len());
                    }
                }
            }
        }
        self.walked_bytes = bytes;
        self.touched = open_files.iter().copied().collect();
        self.entries = entries;
    }

    pub(crate) fn add_entry(&mut self, open_files: &[((u64, u64), u64)]) -> bool {
        self.entries += 1;
        if self.entries <= self.max_files {
            return true;
        }
        self.walk(open_files);
        self.entries <= self.max_files
    }
}
