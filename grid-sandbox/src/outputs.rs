//! What a task left in `/out`, read without following symlinks.

use grid_proto::Sha256Hex;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

pub use grid_proto::OutputFile;

/// Every entry under `dir` (not following symlinks), in byte order of their relative paths.
fn walk(dir: &Path) -> Vec<(String, PathBuf, std::fs::Metadata)> {
    let mut found = Vec::new();
    let mut stack = vec![(String::new(), dir.to_path_buf())];
    while let Some((prefix, dir)) = stack.pop() {
        let Ok(read) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in read.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push((rel.clone(), entry.path()));
            }
            found.push((rel, entry.path(), meta));
        }
    }
    found.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    found
}

/// Sum of the lengths of the regular files under `dir` (sparse files at full length).
pub fn apparent_size(dir: &Path) -> u64 {
    walk(dir)
        .iter()
        .filter(|(_, _, m)| m.is_file())
        .map(|(_, _, m)| m.len())
        .sum()
}

/// The regular files under `dir`, hashed, in byte order of path. Symlinks and other non-regular
/// entries are skipped: they are never followed and never part of a result.
pub fn manifest(dir: &Path) -> std::io::Result<Vec<OutputFile>> {
    let mut files = Vec::new();
    for (rel, path, meta) in walk(dir) {
        if !meta.is_file() {
            continue;
        }
        let mut hasher = Sha256::new();
        let mut f = std::fs::File::open(&path)?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        files.push(OutputFile {
            path: rel,
            bytes: meta.len(),
            sha256: Sha256Hex::from_hasher(hasher),
        });
    }
    Ok(files)
}

/// Removes everything inside `dir` (not `dir` itself), without following symlinks.
pub fn clear(dir: &Path) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in read.flatten() {
        let path = entry.path();
        let removed = match path.symlink_metadata() {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        if let Err(e) = removed {
            tracing::warn!(path = %path.display(), error = %e, "could not remove an output");
        }
    }
}
