//! The node's disk budget: its caches stay within `--disk-budget`, least recently used first.
//!
//! What a node keeps on disk between tasks is fetched modules (`modules/<sha>.wasm`) and their
//! compiled code (`compiled/<sha>-<variant>-<engine>.cwasm`). Both are caches: anything evicted
//! is fetched or compiled again when a task needs it. A module and its compiled code go
//! together, as one entry whose last use is the module file's mtime (the node touches it each
//! time a task uses the module). Not evicted: the node's key, runtimes' laid-out files and
//! programs, which running tasks may have open, and task work folders, which live only while
//! their task runs and are bounded by its output quota.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// One module's files: its bytes and its compiled code.
#[derive(Default)]
struct Entry {
    files: Vec<PathBuf>,
    bytes: u64,
    module_used: Option<SystemTime>,
    compiled_used: Option<SystemTime>,
}

impl Entry {
    /// The module file's time (touched at each use); compiled code without a module (the
    /// guard's) counts its own.
    fn last_used(&self) -> Option<SystemTime> {
        self.module_used.or(self.compiled_used)
    }
}

/// What a pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub modules: u64,
    pub bytes: u64,
    /// What the caches hold after the pass.
    pub kept_bytes: u64,
}

/// Removes least recently used modules (with their compiled code) from the caches `modules` and
/// `compiled` until they hold at most `budget` bytes. A file that vanishes meanwhile (another
/// pass, a task's fresh copy) is skipped. Compiled code shared with other nodes (`--compiled-dir`)
/// is counted whole in each node's budget.
pub fn evict_to(modules: &Path, compiled: &Path, budget: u64) -> Evicted {
    let mut entries: HashMap<String, Entry> = HashMap::new();
    for (dir, is_module) in [(modules, true), (compiled, false)] {
        let Ok(list) = std::fs::read_dir(dir) else {
            continue;
        };
        for file in list.flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            let Ok(meta) = file.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let key = if is_module {
                match name.strip_suffix(".wasm") {
                    Some(sha) => sha.to_string(),
                    None => continue, // a temp file being written
                }
            } else {
                match name
                    .strip_suffix(".cwasm")
                    .and_then(|n| n.split('-').next())
                {
                    Some(sha) => sha.to_string(),
                    None => continue, // the node's key, a temp file
                }
            };
            let entry = entries.entry(key).or_default();
            entry.files.push(file.path());
            entry.bytes += meta.len();
            let used = meta.modified().ok();
            if is_module {
                entry.module_used = used;
            } else {
                entry.compiled_used = entry.compiled_used.max(used);
            }
        }
    }
    let mut total: u64 = entries.values().map(|e| e.bytes).sum();
    let mut oldest_first: Vec<Entry> = entries.into_values().collect();
    oldest_first.sort_by_key(Entry::last_used);
    let mut evicted = Evicted::default();
    for entry in oldest_first {
        if total <= budget {
            break;
        }
        for file in &entry.files {
            let _ = std::fs::remove_file(file);
        }
        total -= entry.bytes;
        evicted.modules += 1;
        evicted.bytes += entry.bytes;
    }
    evicted.kept_bytes = total;
    evicted
}

/// Marks `path` as used now (best effort), for [`evict_to`]'s order.
pub fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn file(path: &Path, bytes: usize, age_s: u64) {
        std::fs::write(path, vec![0u8; bytes]).unwrap();
        let f = std::fs::File::options().append(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .unwrap();
    }

    #[test]
    fn least_recently_used_modules_go_first_with_their_compiled_code() {
        let dir = tempfile::tempdir().unwrap();
        let (m, c) = (dir.path().join("modules"), dir.path().join("compiled"));
        std::fs::create_dir_all(&m).unwrap();
        std::fs::create_dir_all(&c).unwrap();
        // Module a: used 300 s ago; b: 200 s ago; c: 100 s ago. 1,000 + 4,000 bytes each.
        for (sha, age) in [("a", 300), ("b", 200), ("c", 100)] {
            file(&m.join(format!("{sha}.wasm")), 1_000, age);
            // Compiled code written long ago (at the first compile) does not make it older.
            file(&c.join(format!("{sha}-guarded-0123.cwasm")), 4_000, 10_000);
        }
        file(&c.join("node.key"), 32, 10_000);
        std::fs::write(m.join(".tmpXYZ"), [0u8; 10]).unwrap();

        assert_eq!(evict_to(&m, &c, 1 << 20).modules, 0, "all fit");
        let evicted = evict_to(&m, &c, 11_000);
        assert_eq!(evicted.modules, 1);
        assert_eq!(evicted.bytes, 5_000);
        assert_eq!(evicted.kept_bytes, 10_000);
        assert!(!m.join("a.wasm").exists() && !c.join("a-guarded-0123.cwasm").exists());
        assert!(m.join("b.wasm").exists() && c.join("b-guarded-0123.cwasm").exists());

        // Using b makes c the oldest.
        touch(&m.join("b.wasm"));
        evict_to(&m, &c, 6_000);
        assert!(m.join("b.wasm").exists());
        assert!(!m.join("c.wasm").exists());
        assert!(c.join("node.key").exists(), "the key is never evicted");
        // A budget smaller than one module empties the caches.
        assert_eq!(evict_to(&m, &c, 100).kept_bytes, 0);
        assert!(c.join("node.key").exists());
    }
}
