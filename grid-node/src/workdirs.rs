//! Task folders (`in/` and `out/` of one task), reused rather than made and removed for
//! every task.
//!
//! Why: making and removing three directories per task is most of a trivial task's cost on
//! some file systems — ext4 mounted with `discard` frees each directory's block with a
//! synchronous discard. A folder that comes back is emptied (its contents removed, the
//! folder and its `in/` and `out/` kept) before another task gets it, so no task ever sees
//! another's files. A folder that cannot be emptied is removed instead.
//!
//! The folders are the node's user's alone (mode 0700, the pool's root too): a task's inputs
//! and outputs are its tenant's. They are emptied and removed through directory handles
//! ([`grid_sandbox::tree`]): a guest can nest folders deeper than any path reaches, or than a
//! recursive removal has handles and stack for.

use grid_sandbox::tree::{remove_all, remove_contents};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The node's pool of task folders under `<cache>/work`.
#[derive(Clone)]
pub struct WorkDirs {
    root: PathBuf,
    free: Arc<Mutex<Vec<PathBuf>>>,
    /// Folders kept for reuse at most; more are removed.
    keep: usize,
}

/// One task's folder: emptied and given back when dropped.
pub struct WorkDir {
    path: PathBuf,
    pool: WorkDirs,
}

impl WorkDirs {
    /// A pool under `root`. Folders left by an earlier run of the node are removed.
    pub fn new(root: &Path, keep: usize) -> std::io::Result<Self> {
        private_dir(root)?;
        for entry in std::fs::read_dir(root)?.flatten() {
            let _ = remove_all(&entry.path());
        }
        Ok(Self {
            root: root.to_path_buf(),
            free: Arc::default(),
            keep,
        })
    }

    /// An empty folder with empty `in/` and `out/`.
    pub fn take(&self) -> std::io::Result<WorkDir> {
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let path = match reused {
            Some(path) => path,
            None => {
                let path = tempfile::Builder::new()
                    .prefix("task-")
                    .permissions(std::fs::Permissions::from_mode(0o700))
                    .tempdir_in(&self.root)?
                    .keep();
                for sub in ["in", "out"] {
                    std::fs::DirBuilder::new()
                        .mode(0o700)
                        .create(path.join(sub))?;
                }
                path
            }
        };
        Ok(WorkDir {
            path,
            pool: self.clone(),
        })
    }

    /// Keeps `path` for reuse when it was `emptied` and the pool has room; removes it otherwise.
    fn give_back(&self, path: PathBuf, emptied: bool) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if emptied && free.len() < self.keep {
            free.push(path);
        } else {
            drop(free);
            let _ = remove_all(&path);
        }
    }
}

impl WorkDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the folder back as it is, without emptying it: for a caller that knows nothing is
    /// in it — it wrote no inputs, and the sandbox found `/out` empty once the task had ended
    /// (nothing else writes there). Spares a trivial task three folder listings.
    pub fn give_back_unused(mut self) {
        let path = std::mem::take(&mut self.path);
        self.pool.give_back(path, true);
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.path);
        if !path.as_os_str().is_empty() {
            let emptied = empty(&path).is_ok();
            self.pool.give_back(path, emptied);
        }
    }
}

/// Makes `path` (and any missing parent) a folder only the node's user can enter, and makes
/// one an older node left with the default mode so too.
pub(crate) fn private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Removes everything in `dir` but its `in/` and `out/`, and everything in those; fails when
/// they are not plain directories any more.
fn empty(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if (name == "in" || name == "out") && entry.file_type()?.is_dir() {
            remove_contents(&entry.path())?;
        } else {
            remove_all(&entry.path())?;
        }
    }
    for sub in ["in", "out"] {
        let meta = std::fs::symlink_metadata(dir.join(sub))?;
        if !meta.is_dir() {
            return Err(std::io::Error::other("not a directory"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_comes_back_empty_and_is_reused() {
        let root = tempfile::tempdir().unwrap();
        let pool = WorkDirs::new(root.path(), 4).unwrap();
        let first = pool.take().unwrap();
        let path = first.path().to_path_buf();
        std::fs::write(path.join("out/result.csv"), b"x").unwrap();
        std::fs::create_dir_all(path.join("out/a/b")).unwrap();
        std::fs::write(path.join("in/data"), b"y").unwrap();
        std::fs::write(path.join("stray"), b"z").unwrap();
        drop(first);
        let again = pool.take().unwrap();
        assert_eq!(again.path(), path, "reused");
        for dir in [
            root.path().to_path_buf(),
            path.clone(),
            path.join("in"),
            path.join("out"),
        ] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{} is the node's user's alone", dir.display());
        }
        for sub in ["in", "out"] {
            assert_eq!(
                std::fs::read_dir(path.join(sub)).unwrap().count(),
                0,
                "{sub} empty"
            );
        }
        assert_eq!(
            std::fs::read_dir(&path).unwrap().count(),
            2,
            "only in/ and out/"
        );
        // Given back unused (nothing was written): reused as it is.
        let path = again.path().to_path_buf();
        again.give_back_unused();
        let again = pool.take().unwrap();
        assert_eq!(again.path(), path, "reused");
        // A task that replaced out/ with a file: the folder is not reused.
        std::fs::remove_dir(path.join("out")).unwrap();
        std::fs::write(path.join("out"), b"not a dir").unwrap();
        drop(again);
        assert!(!path.exists());
    }
}
