//! Walking and removing a task's folders through directory handles, never by path.
//!
//! A guest builds its `/out` (and a runtime's `/tmp`) through WASI, which resolves every path
//! relative to an open directory, so its tree can nest far past `PATH_MAX` (4096 bytes). A walk
//! by absolute paths fails down there, and one that skips what it cannot stat undercounts
//! exactly what a hostile guest hid there: a guest once wrote 241 MB under a 16 MiB limit that
//! way. Here every folder is opened relative to its parent's handle (`openat` with
//! `O_DIRECTORY | O_NOFOLLOW`), every entry is stat'ed relative to it (`fstatat` with
//! `AT_SYMLINK_NOFOLLOW`), and files are opened the same way, so depth hides nothing.
//!
//! **Fail closed.** What [`walk`] cannot account for — an entry it cannot stat, a folder it
//! cannot open or read, anything more than [`MAX_DEPTH`] folders down — is a [`TreeError`],
//! never a smaller count. Its callers (the quota in [`crate::quota`], the outputs in
//! [`crate::outputs`]) take an error as over the limit.
//!
//! **Bounded handles.** A walk holds one handle per level it is in, at most `MAX_DEPTH + 1`
//! (about as many as a task's own `max_open_files`). [`remove_contents`] removes a tree of any
//! depth with the same bound and no recursion: a folder found more than `MAX_DEPTH` levels
//! down is first moved up into the root, and removed from there on a later pass.
//! (`std::fs::remove_dir_all` also works through handles, but recursively: one handle and one
//! stack frame per level, which a tree 10,000 folders deep turns into `EMFILE` or a stack
//! overflow of the node.)
//!
//! Symlinks are listed and never followed. A hard-linked file is listed once per name; callers
//! count its bytes once, by its (device, inode) pair ([`Tally`]).
//!
//! Built on rustix, the sandbox's way to these system calls already, rather than cap-std: the
//! walk resolves no paths, only names just read from a folder it holds open, so cap-std's
//! sandboxed path resolution would add nothing here.

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;
use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

/// How many folders deep a tree may go below the folder walked; an entry deeper than this is a
/// [`TreeError::TooDeep`].
pub const MAX_DEPTH: usize = 256;

/// Why a walk could not account for a whole tree. Paths are relative to the folder walked,
/// shortened to their first 120 bytes.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path}: more than {max} folders deep", max = MAX_DEPTH)]
    TooDeep { path: String },
    #[error("{path}: cannot be read")]
    Unreadable {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// One entry found by [`walk`].
pub struct Entry<'a> {
    /// Relative to the folder walked, `/`-separated; names are bytes, as the file system has them.
    pub path: &'a [u8],
    /// 1 for an entry of the folder walked itself.
    pub depth: usize,
    /// The entry's `fstatat`, not following a symlink.
    pub stat: &'a Stat,
    parent: BorrowedFd<'a>,
    name: &'a CStr,
}

impl Entry<'_> {
    pub fn kind(&self) -> FileType {
        FileType::from_raw_mode(self.stat.st_mode)
    }

    pub fn is_file(&self) -> bool {
        self.kind() == FileType::RegularFile
    }

    /// (device, inode): one file, however many names it has.
    pub fn id(&self) -> (u64, u64) {
        (self.stat.st_dev, self.stat.st_ino)
    }

    /// The apparent size: a sparse file counts at its full length.
    pub fn bytes(&self) -> u64 {
        u64::try_from(self.stat.st_size).unwrap_or(u64::MAX)
    }

    /// Opens the entry, a regular file, for reading: relative to its folder's handle, not
    /// following a symlink, and checked to be the very file stat'ed.
    pub fn open(&self) -> io::Result<std::fs::File> {
        open_file_at(self.parent, self.name, Some(self.id()))
    }
}

/// Bytes and entries of a tree as the output limits count them: every entry once, and the
/// bytes of each regular file once, however many names (hard links) it has.
#[derive(Debug, Default)]
pub struct Tally {
    pub bytes: u64,
    pub entries: u64,
    seen: HashSet<(u64, u64)>,
}

impl Tally {
    /// Counts `entry`; the bytes of a file in `skip` (counted elsewhere) are left out.
    pub fn add(&mut self, entry: &Entry<'_>, skip: &HashSet<(u64, u64)>) {
        self.entries = self.entries.saturating_add(1);
        if entry.is_file() && !skip.contains(&entry.id()) && self.seen.insert(entry.id()) {
            self.bytes = self.bytes.saturating_add(entry.bytes());
        }
    }
}

/// Calls `visit` on every entry under `root` (not `root` itself), depth first, parents before
/// their contents, in no particular order within a folder. Stops at the first error, its own
/// (a [`TreeError`]: see the module docs) or `visit`'s.
pub fn walk<E: From<TreeError>>(
    root: &Path,
    mut visit: impl FnMut(&Entry<'_>) -> Result<(), E>,
) -> Result<(), E> {
    struct Level {
        dir: Dir,
        /// Length of the folder's own path in `path`.
        path_len: usize,
    }
    let dir = rustix::fs::open(root, dir_flags(), Mode::empty())
        .and_then(Dir::new)
        .map_err(|e| unreadable(b"", e))?;
    let mut levels = vec![Level { dir, path_len: 0 }];
    let mut path: Vec<u8> = Vec::new();
    loop {
        // The depth of the entries of the folder being read.
        let depth = levels.len();
        let Some(level) = levels.last_mut() else {
            return Ok(());
        };
        path.truncate(level.path_len);
        let found = match level.dir.read() {
            None => {
                levels.pop();
                continue;
            }
            Some(Err(e)) => return Err(unreadable(&path, e).into()),
            Some(Ok(found)) => found,
        };
        let name = found.file_name();
        if is_dot(name) {
            continue;
        }
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name.to_bytes());
        if depth > MAX_DEPTH {
            return Err(TreeError::TooDeep { path: shown(&path) }.into());
        }
        let parent = level.dir.fd().map_err(|e| unreadable(&path, e))?;
        let stat = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| unreadable(&path, e))?;
        let entry = Entry {
            path: &path,
            depth,
            stat: &stat,
            parent,
            name,
        };
        visit(&entry)?;
        if entry.kind() == FileType::Directory {
            let dir = rustix::fs::openat(parent, name, dir_flags(), Mode::empty())
                .and_then(Dir::new)
                .map_err(|e| unreadable(&path, e))?;
            levels.push(Level {
                dir,
                path_len: path.len(),
            });
        }
    }
}

/// Opens the regular file at `rel` (`/`-separated, relative to `root`, as [`walk`] gives it)
/// for reading, one name at a time through folder handles: a path past `PATH_MAX` opens, and
/// no symlink is followed on the way.
pub fn open_file(root: &Path, rel: &str) -> io::Result<std::fs::File> {
    let mut names = rel.split('/');
    let last = names.next_back().unwrap_or_default();
    let mut dir = rustix::fs::open(root, dir_flags(), Mode::empty())?;
    for name in names {
        dir = rustix::fs::openat(&dir, plain_name(name)?, dir_flags(), Mode::empty())?;
    }
    open_file_at(dir.as_fd(), plain_name(last)?, None)
}

/// Removes everything inside `root` (not `root`), at any depth, without following symlinks,
/// holding at most `MAX_DEPTH + 3` handles (see the module docs).
pub fn remove_contents(root: &Path) -> io::Result<()> {
    let root = rustix::fs::open(root, dir_flags(), Mode::empty())?;
    let mut moved = 0u64;
    loop {
        let pass = remove_pass(root.as_fd(), &mut moved)?;
        // A pass that found nothing in the root leaves it as empty as it found it (a task's
        // folders mostly): no second listing to check.
        if !pass.found || is_empty(root.as_fd())? {
            return Ok(());
        }
        if !pass.progress {
            return Err(io::Error::other("a folder could not be emptied"));
        }
    }
}

/// What one pass of [`remove_contents`] saw and did.
struct Pass {
    /// The root listed an entry.
    found: bool,
    /// It removed or moved something.
    progress: bool,
}

/// Removes `path`: a folder with everything in it (see [`remove_contents`]), anything else
/// (a symlink too) by its name.
pub fn remove_all(path: &Path) -> io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        remove_contents(path)?;
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// One pass of [`remove_contents`]: removes what it reaches, and moves folders deeper than
/// [`MAX_DEPTH`] up into `root`.
fn remove_pass(root: BorrowedFd<'_>, moved: &mut u64) -> io::Result<Pass> {
    struct Level {
        dir: Dir,
        /// The folder's name in its parent (empty for the root).
        name: CString,
    }
    let mut levels = vec![Level {
        dir: Dir::read_from(root)?,
        name: CString::default(),
    }];
    let (mut progress, mut listed) = (false, false);
    loop {
        let depth = levels.len();
        let Some(level) = levels.last_mut() else {
            return Ok(Pass {
                found: listed,
                progress,
            });
        };
        let Some(found) = level.dir.read() else {
            // Its folder is empty now: remove it from its parent (the root stays).
            if let Some(done) = levels.pop()
                && let Some(parent) = levels.last()
            {
                let name = done.name.as_c_str();
                match rustix::fs::unlinkat(parent.dir.fd()?, name, AtFlags::REMOVEDIR) {
                    Ok(()) => progress = true,
                    // An entry the listing did not return: the next pass finds it.
                    Err(Errno::NOTEMPTY) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            continue;
        };
        let found = found?;
        let name = found.file_name();
        if is_dot(name) {
            continue;
        }
        listed = true;
        let dir = level.dir.fd()?;
        let is_dir = match found.file_type() {
            FileType::Directory => true,
            FileType::Unknown => {
                let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
                FileType::from_raw_mode(stat.st_mode) == FileType::Directory
            }
            _ => false,
        };
        if !is_dir {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
            progress = true;
        } else if depth > MAX_DEPTH {
            move_up(dir, name, root, moved)?;
            progress = true;
        } else {
            let child = rustix::fs::openat(dir, name, dir_flags(), Mode::empty())?;
            levels.push(Level {
                dir: Dir::new(child)?,
                name: name.to_owned(),
            });
        }
    }
}

/// Moves folder `name` of `dir` into `root` under a name of its own, to be removed from there.
fn move_up(
    dir: BorrowedFd<'_>,
    name: &CStr,
    root: BorrowedFd<'_>,
    moved: &mut u64,
) -> io::Result<()> {
    for _ in 0..1000 {
        *moved += 1;
        let fresh = format!(".grid-removing-{moved}");
        match rustix::fs::renameat(dir, name, root, fresh.as_str()) {
            Ok(()) => return Ok(()),
            // The tree has an entry of that name (the guest chose it): the next name.
            Err(Errno::EXIST | Errno::NOTEMPTY | Errno::ISDIR | Errno::NOTDIR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::other("no free name to move a deep folder to"))
}

fn is_empty(dir: BorrowedFd<'_>) -> io::Result<bool> {
    for found in Dir::read_from(dir)? {
        if !is_dot(found?.file_name()) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn open_file_at(
    dir: BorrowedFd<'_>,
    name: impl rustix::path::Arg,
    expect: Option<(u64, u64)>,
) -> io::Result<std::fs::File> {
    // Non-blocking: a FIFO in its place must not hang the node (regular files read the same).
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, Mode::empty())?;
    let stat = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile
        || expect.is_some_and(|id| id != (stat.st_dev, stat.st_ino))
    {
        return Err(io::Error::other("not the regular file that was listed"));
    }
    Ok(std::fs::File::from(fd))
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn plain_name(name: &str) -> io::Result<&str> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a name in a folder"),
        ));
    }
    Ok(name)
}

fn is_dot(name: &CStr) -> bool {
    matches!(name.to_bytes(), b"." | b"..")
}

fn unreadable(path: &[u8], e: Errno) -> TreeError {
    TreeError::Unreadable {
        path: shown(path),
        source: e.into(),
    }
}

/// `path` for a message: lossy UTF-8, its first 120 bytes, `.` for the folder walked.
pub(crate) fn shown(path: &[u8]) -> String {
    const MOST: usize = 120;
    if path.is_empty() {
        return ".".into();
    }
    match path.get(..MOST) {
        Some(head) if path.len() > MOST => format!("{}…", String::from_utf8_lossy(head)),
        _ => String::from_utf8_lossy(path).into_owned(),
    }
}

/// Trees for tests, made through handles: their paths may pass `PATH_MAX`.
#[cfg(test)]
pub(crate) mod testing {
    use super::dir_flags;
    use rustix::fs::{Mode, OFlags};
    use std::os::fd::OwnedFd;
    use std::path::Path;

    /// `levels` folders named `name`, each in the one before, under `root`: the deepest, open.
    pub(crate) fn nest(root: &Path, levels: usize, name: &str) -> OwnedFd {
        let mut dir = rustix::fs::open(root, dir_flags(), Mode::empty()).unwrap();
        for _ in 0..levels {
            rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)).unwrap();
            dir = rustix::fs::openat(&dir, name, dir_flags(), Mode::empty()).unwrap();
        }
        dir
    }

    /// A new file `name` in `dir`, open for writing.
    pub(crate) fn create_at(dir: &OwnedFd, name: &str) -> std::fs::File {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC;
        std::fs::File::from(
            rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(0o644)).unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{create_at, nest};
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn tally(root: &Path) -> Result<Tally, TreeError> {
        let mut tally = Tally::default();
        let none = HashSet::new();
        walk(root, |entry| {
            tally.add(entry, &none);
            Ok::<(), TreeError>(())
        })?;
        Ok(tally)
    }

    fn entries_in(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn a_tree_deeper_than_path_max_is_walked_whole_and_removed() {
        let root = tempfile::tempdir().unwrap();
        // 40 folders of 200-byte names: the file at the bottom has a path of 8 KB.
        let name = "d".repeat(200);
        let bottom = nest(root.path(), 40, &name);
        create_at(&bottom, "data.bin")
            .write_all(&[7u8; 5000])
            .unwrap();
        drop(bottom);
        let by_path = root
            .path()
            .join([name.as_str(); 40].join("/"))
            .join("data.bin");
        assert!(
            std::fs::metadata(by_path).is_err(),
            "past PATH_MAX, a path does not resolve"
        );

        let mut longest = 0;
        walk(root.path(), |entry| {
            longest = longest.max(entry.path.len());
            Ok::<(), TreeError>(())
        })
        .unwrap();
        assert_eq!(longest, 40 * 201 + "data.bin".len());
        let counted = tally(root.path()).unwrap();
        assert_eq!((counted.entries, counted.bytes), (41, 5000));

        remove_contents(root.path()).unwrap();
        assert_eq!(entries_in(root.path()), 0);
    }

    #[test]
    fn a_hard_linked_file_counts_once_and_a_sparse_file_at_full_length() {
        let root = tempfile::tempdir().unwrap();
        let a = &root.path().join("a");
        let sub = &root.path().join("sub");
        std::fs::write(a, vec![1u8; 3000]).unwrap();
        std::fs::create_dir(sub).unwrap();
        std::fs::hard_link(a, sub.join("b")).unwrap();
        std::fs::hard_link(a, root.path().join("c")).unwrap();
        let counted = tally(root.path()).unwrap();
        assert_eq!(
            (counted.entries, counted.bytes),
            (4, 3000),
            "a, sub, sub/b, c"
        );

        let sparse = std::fs::File::create(root.path().join("sparse")).unwrap();
        sparse.set_len(64 << 30).unwrap();
        assert!(
            sparse.metadata().unwrap().blocks() * 512 < 1 << 20,
            "64 GiB long, nothing on disk"
        );
        let counted = tally(root.path()).unwrap();
        assert_eq!((counted.entries, counted.bytes), (5, 3000 + (64 << 30)));
    }

    #[test]
    fn a_tree_deeper_than_max_depth_is_an_error_and_still_removed() {
        let root = tempfile::tempdir().unwrap();
        let bottom = nest(root.path(), MAX_DEPTH, "d");
        assert_eq!(tally(root.path()).unwrap().entries, MAX_DEPTH as u64);
        create_at(&bottom, "f").write_all(b"x").unwrap();
        drop(bottom);
        match tally(root.path()) {
            Err(TreeError::TooDeep { path }) => assert!(path.ends_with('…'), "{path}"),
            other => panic!("{other:?}"),
        }

        // Three times deeper, with 100-byte names: folders are moved up and removed in passes.
        let deeper = tempfile::tempdir().unwrap();
        let bottom = nest(deeper.path(), 3 * MAX_DEPTH + 7, &"n".repeat(100));
        create_at(&bottom, "f").write_all(b"x").unwrap();
        drop(bottom);
        remove_contents(deeper.path()).unwrap();
        assert_eq!(entries_in(deeper.path()), 0);
    }

    #[test]
    fn what_cannot_be_read_is_an_error_not_a_smaller_count() {
        let root = tempfile::tempdir().unwrap();
        let missing = tally(&root.path().join("missing"));
        assert!(
            matches!(missing, Err(TreeError::Unreadable { .. })),
            "{missing:?}"
        );
        std::fs::write(root.path().join("file"), b"x").unwrap();
        let not_a_folder = tally(&root.path().join("file"));
        assert!(
            matches!(not_a_folder, Err(TreeError::Unreadable { .. })),
            "{not_a_folder:?}"
        );

        // A folder its owner may not open. Root opens it anyway: checked only for another user.
        if rustix::process::geteuid().is_root() {
            return;
        }
        let locked = &root.path().join("locked");
        std::fs::create_dir(locked).unwrap();
        std::fs::write(locked.join("hidden"), vec![0u8; 1000]).unwrap();
        std::fs::set_permissions(locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        let counted = tally(root.path());
        std::fs::set_permissions(locked, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(
            matches!(counted, Err(TreeError::Unreadable { .. })),
            "{counted:?}"
        );
    }

    #[test]
    fn files_open_by_relative_path_without_following_links() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("sub")).unwrap();
        std::fs::write(root.path().join("sub/real"), b"data").unwrap();
        std::os::unix::fs::symlink("real", root.path().join("sub/alias")).unwrap();
        std::os::unix::fs::symlink("sub", root.path().join("via")).unwrap();
        let mut text = String::new();
        io::Read::read_to_string(&mut open_file(root.path(), "sub/real").unwrap(), &mut text)
            .unwrap();
        assert_eq!(text, "data");
        for refused in [
            "sub/alias",
            "via/real",
            "sub",
            "sub/../sub/real",
            "",
            "sub//real",
        ] {
            assert!(open_file(root.path(), refused).is_err(), "{refused}");
        }
    }
}
