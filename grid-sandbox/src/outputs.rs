//! What a task left in `/out`: measured against its limits, listed and hashed as its result,
//! opened for staging, or cleared.
//!
//! All of it goes through directory handles ([`crate::tree`]), never by absolute path, and
//! never follows a symlink: a tree nested past `PATH_MAX` is measured, listed and removed like
//! any other, and what cannot be read is an error rather than something left out. The sandbox
//! measures `/out` when a task ends ([`measure`]) and ends a task whose `/out` cannot be listed
//! as a result with `limit: output`, so that [`manifest`] fails only on the host's own trouble.

use crate::tree::{Entry, Tally, TreeError};
use grid_proto::Sha256Hex;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

pub use grid_proto::OutputFile;

/// Why a task's `/out` cannot be listed as a result.
#[derive(Debug, thiserror::Error)]
pub enum OutputsError {
    /// A folder or entry that cannot be read, or a tree deeper than [`crate::tree::MAX_DEPTH`].
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// A file whose path a result cannot name ([`OutputFile::is_plain_path`]: at most 4096
    /// bytes of UTF-8).
    #[error("{0}: a path a result cannot name (longer than 4096 bytes, or not UTF-8)")]
    Path(String),
    #[error("reading output {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a task left in `/out`, as its limits count it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Measured {
    /// Apparent bytes of the regular files, each file once however many names it has.
    pub bytes: u64,
    /// Files, folders and symlinks.
    pub entries: u64,
}

/// Measures `dir`, and checks that [`manifest`] can list it: an `Err` is a tree no result can
/// hold (see [`OutputsError`]), which the sandbox counts as over the output limit.
pub fn measure(dir: &Path) -> Result<Measured, OutputsError> {
    let mut tally = Tally::default();
    let none = HashSet::new();
    crate::tree::walk(dir, |entry| -> Result<(), OutputsError> {
        tally.add(entry, &none);
        if entry.is_file() {
            result_path(entry)?;
        }
        Ok(())
    })?;
    Ok(Measured {
        bytes: tally.bytes,
        entries: tally.entries,
    })
}

/// The regular files under `dir`, hashed, in byte order of path. Symlinks and other non-regular
/// entries are skipped: they are never followed and never part of a result. A hard-linked file
/// is listed under each of its names.
pub fn manifest(dir: &Path) -> Result<Vec<OutputFile>, OutputsError> {
    let mut files = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    crate::tree::walk(dir, |entry| -> Result<(), OutputsError> {
        if !entry.is_file() {
            return Ok(());
        }
        let path = result_path(entry)?;
        match hash(entry, &mut buf) {
            Ok((bytes, sha256)) => files.push(OutputFile {
                path,
                bytes,
                sha256,
            }),
            Err(source) => return Err(OutputsError::Read { path, source }),
        }
        Ok(())
    })?;
    files.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    Ok(files)
}

/// Opens output `path` (as [`manifest`] lists it) under `dir` for reading: one name at a time
/// through folder handles, so a path past `PATH_MAX` opens, and never through a symlink.
pub fn open(dir: &Path, path: &str) -> std::io::Result<std::fs::File> {
    crate::tree::open_file(dir, path)
}

/// Removes everything inside `dir` (not `dir` itself), at any depth, without following
/// symlinks; what cannot be removed is logged.
pub fn clear(dir: &Path) {
    if let Err(e) = crate::tree::remove_contents(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove a task's outputs");
    }
}

fn result_path(entry: &Entry<'_>) -> Result<String, OutputsError> {
    match std::str::from_utf8(entry.path) {
        Ok(path) if OutputFile::is_plain_path(path) => Ok(path.to_string()),
        _ => Err(OutputsError::Path(crate::tree::shown(entry.path))),
    }
}

/// The length and SHA-256 of the file `entry` is, read through `buf`.
fn hash(entry: &Entry<'_>, buf: &mut [u8]) -> std::io::Result<(u64, Sha256Hex)> {
    let mut file = entry.open()?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    loop {
        let n = match file.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let read = buf.get(..n).unwrap_or_default();
        hasher.update(read);
        bytes = bytes.saturating_add(read.len() as u64);
    }
    Ok((bytes, Sha256Hex::from_hasher(hasher)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::testing::{create_at, nest};
    use std::io::Write;

    #[test]
    fn files_past_path_max_are_measured_listed_and_opened() {
        let out = tempfile::tempdir().unwrap();
        // 20 folders of 200-byte names and a 70-byte file name: 4090 bytes under /out, within
        // what a result may name, but past PATH_MAX from the host's root.
        let (folder, name) = ("d".repeat(200), "f".repeat(70));
        let bottom = nest(out.path(), 20, &folder);
        create_at(&bottom, &name).write_all(b"deep data").unwrap();
        drop(bottom);
        let rel = format!("{}/{name}", [folder.as_str(); 20].join("/"));
        assert_eq!(rel.len(), 4090);
        assert!(
            std::fs::read(out.path().join(&rel)).is_err(),
            "no path reaches it"
        );

        let measured = measure(out.path()).unwrap();
        assert_eq!(
            measured,
            Measured {
                bytes: 9,
                entries: 21
            }
        );
        let files = manifest(out.path()).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path, rel);
        assert_eq!(files[0].bytes, 9);
        assert_eq!(files[0].sha256, Sha256Hex::of(b"deep data"));
        let mut read = Vec::new();
        open(out.path(), &rel)
            .unwrap()
            .read_to_end(&mut read)
            .unwrap();
        assert_eq!(read, b"deep data");

        clear(out.path());
        assert_eq!(measure(out.path()).unwrap(), Measured::default());
    }

    #[test]
    fn a_file_no_result_can_name_is_an_error() {
        let out = tempfile::tempdir().unwrap();
        // 30 folders of 200-byte names: 6 KB of path, more than a result may hold.
        let bottom = nest(out.path(), 30, &"d".repeat(200));
        create_at(&bottom, "f").write_all(b"x").unwrap();
        drop(bottom);
        assert!(matches!(measure(out.path()), Err(OutputsError::Path(_))));
        assert!(matches!(manifest(out.path()), Err(OutputsError::Path(_))));
    }

    #[test]
    fn a_tree_too_deep_is_an_error() {
        let out = tempfile::tempdir().unwrap();
        drop(nest(out.path(), crate::tree::MAX_DEPTH + 1, "d"));
        assert!(matches!(
            measure(out.path()),
            Err(OutputsError::Tree(TreeError::TooDeep { .. }))
        ));
        clear(out.path());
        assert_eq!(measure(out.path()).unwrap(), Measured::default());
    }
}
