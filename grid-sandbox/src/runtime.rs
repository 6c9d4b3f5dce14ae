//! Runtimes on a host: the files a pinned runtime's guest sees, and its one extra import.
//!
//! A runtime's stdlib zip is laid out once per host, in a folder named by its SHA-256: `lib/`
//! holds the zip alone (the guest sees it read-only at `/usr/local/lib`, where the interpreter
//! looks for it), `mpl-data/` holds matplotlib's data, extracted from the zip's inner archive
//! (matplotlib reads fonts and its rc file from real paths), and `grid/` holds Grid's helper
//! modules (at `/usr/local/grid`, put on `sys.path` by [`guest_argv`]): `grid.py`, which
//! programs import, and `_grid_site.py`, which the prelude imports to say plainly what the
//! sandbox does not offer (a package not in the runtime, processes, threads, sockets) when a
//! program fails for it. The layout is built in a temporary
//! folder and renamed into place, so a half-written one is never used, and two processes laying
//! out the same zip at once both end with a whole one.

use crate::task_state::TaskState;
use anyhow::{Context, Result, bail};
use grid_proto::Sha256Hex;
use grid_proto::runtime::Runtime;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Grid's helper module for Python programs (`import grid`): the same contract as `grid-guest`.
pub const GRID_PY: &str = include_str!("../../guest-sdk/python/grid.py");

/// The hook the prelude installs before the program runs: an uncaught exception for something
/// the sandbox does not offer ends its traceback with one line in Grid's words (see the file).
pub const SITE_PY: &str = include_str!("../../guest-sdk/python/_grid_site.py");

/// The files of the helper folder, by name.
const HELPERS: [(&str, &str); 2] = [("grid.py", GRID_PY), ("_grid_site.py", SITE_PY)];

/// Bytes read of a package's `METADATA` (its headers come first; they are a few KiB).
const METADATA_BYTES: u64 = 1 << 20;

/// Where the guest sees Grid's helper module.
pub const HELPER_GUEST_DIR: &str = "/usr/local/grid";

/// matplotlib's data inside the stdlib zip, and where matplotlib looks for it in the guest.
const MPL_DATA_MEMBER: &str = "matplotlib/mpl-data.zip";
const MPL_DATA_GUEST: &str = "matplotlib/mpl-data";

/// A runtime's files laid out on this host, see the module docs.
#[derive(Clone, Debug)]
pub struct RuntimeFiles {
    pub dir: PathBuf,
}

impl RuntimeFiles {
    /// The layout for `runtime` under `root`, if one is there already.
    pub fn find(root: &Path, runtime: &Runtime) -> Option<Self> {
        let dir = root.join(layout_name(runtime));
        let files = Self { dir };
        files.is_whole(runtime).then_some(files)
    }

    /// Lays out `stdlib` (the runtime's zip, checked here against its pin) under `root`.
    pub fn install(root: &Path, runtime: &Runtime, stdlib: &[u8]) -> Result<Self> {
        let sha = Sha256Hex::of(stdlib);
        if sha.to_string() != runtime.stdlib_sha256 {
            bail!(
                "{} of runtime {} has sha256 {sha}, not the pinned {}",
                runtime.stdlib_file,
                runtime.name,
                runtime.stdlib_sha256
            );
        }
        if let Some(found) = Self::find(root, runtime) {
            return Ok(found);
        }
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(".layout-")
            .tempdir_in(root)
            .with_context(|| format!("creating a folder in {}", root.display()))?;
        let lib = tmp.path().join("lib");
        std::fs::create_dir_all(&lib)?;
        std::fs::write(lib.join(runtime.stdlib_guest_name), stdlib)?;
        extract_mpl_data(stdlib, &tmp.path().join("mpl-data"))?;
        write_helper(tmp.path())?;
        let dir = root.join(layout_name(runtime));
        match std::fs::rename(tmp.path(), &dir) {
            Ok(()) => {
                // The temporary folder is the layout now: nothing to clean up.
                let _ = tmp.keep();
            }
            // Another process put a whole layout there first: keep that one.
            Err(_) if Self::find(root, runtime).is_some() => {}
            Err(e) => return Err(e).with_context(|| format!("moving into {}", dir.display())),
        }
        let files = Self { dir };
        files.refresh_helper()?;
        Ok(files)
    }

    /// Rewrites the helper modules if this build's differ (the layout outlives Grid upgrades,
    /// and the prelude imports `_grid_site`: call it before a task runs on a layout found).
    pub fn refresh_helper(&self) -> Result<()> {
        let stale = HELPERS.iter().any(|(name, text)| {
            std::fs::read_to_string(self.dir.join("grid").join(name))
                .ok()
                .as_deref()
                != Some(*text)
        });
        if stale {
            write_helper(&self.dir)?;
        }
        Ok(())
    }

    /// The packages the runtime ships, `(name, version)` sorted by name (case aside): the
    /// `Name` and `Version` headers of each `<package>.dist-info/METADATA` at the top of its
    /// stdlib zip, the files `importlib.metadata` reads in the guest.
    pub fn packages(&self, runtime: &Runtime) -> Result<Vec<(String, String)>> {
        let path = self.dir.join("lib").join(runtime.stdlib_guest_name);
        let file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .with_context(|| format!("reading {}", path.display()))?;
        let members: Vec<String> = zip
            .file_names()
            .filter(|n| {
                n.strip_suffix(".dist-info/METADATA")
                    .is_some_and(|dist| !dist.is_empty() && !dist.contains('/'))
            })
            .map(str::to_string)
            .collect();
        let mut packages = Vec::new();
        for member in members {
            let mut bytes = Vec::new();
            zip.by_name(&member)
                .with_context(|| format!("reading {member} in {}", path.display()))?
                .take(METADATA_BYTES)
                .read_to_end(&mut bytes)
                .with_context(|| format!("reading {member} in {}", path.display()))?;
            let text = String::from_utf8_lossy(&bytes);
            // Email-style headers, up to the first blank line (a line that starts with
            // whitespace continues the header before it).
            let header = |key: &str| {
                text.lines()
                    .take_while(|l| !l.trim().is_empty())
                    .filter(|l| !l.starts_with([' ', '\t']))
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case(key)
                            .then(|| v.trim().to_string())
                    })
            };
            if let (Some(name), Some(version)) = (header("Name"), header("Version")) {
                packages.push((name, version));
            }
        }
        packages.sort_by_key(|(name, _)| name.to_lowercase());
        Ok(packages)
    }

    fn is_whole(&self, runtime: &Runtime) -> bool {
        self.dir
            .join("lib")
            .join(runtime.stdlib_guest_name)
            .is_file()
            && self.dir.join("mpl-data").is_dir()
            && self.dir.join("grid").is_dir()
    }

    /// The read-only folders the guest sees: (host path, guest path).
    pub fn guest_dirs(&self, runtime: &Runtime) -> Vec<(PathBuf, String)> {
        vec![
            (self.dir.join("lib"), Runtime::STDLIB_GUEST_DIR.to_string()),
            (
                self.dir.join("mpl-data"),
                format!(
                    "{}/{}/{MPL_DATA_GUEST}",
                    Runtime::STDLIB_GUEST_DIR,
                    runtime.stdlib_guest_name
                ),
            ),
            (self.dir.join("grid"), HELPER_GUEST_DIR.to_string()),
        ]
    }
}

fn layout_name(runtime: &Runtime) -> String {
    format!("{}-{}", runtime.name, &runtime.stdlib_sha256[..16])
}

fn write_helper(dir: &Path) -> Result<()> {
    let helper = dir.join("grid");
    std::fs::create_dir_all(&helper)?;
    for (name, text) in HELPERS {
        let mut tmp = tempfile::NamedTempFile::new_in(&helper)?;
        std::io::Write::write_all(&mut tmp, text.as_bytes())?;
        tmp.persist(helper.join(name)).map_err(|e| e.error)?;
    }
    Ok(())
}

/// Extracts matplotlib's data (an inner archive of the stdlib zip) into `dest`; an empty
/// folder when the zip has none.
fn extract_mpl_data(stdlib: &[u8], dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    let mut outer =
        zip::ZipArchive::new(std::io::Cursor::new(stdlib)).context("reading the stdlib zip")?;
    let mut inner = Vec::new();
    match outer.by_name(MPL_DATA_MEMBER) {
        Ok(mut member) => {
            member.read_to_end(&mut inner)?;
        }
        Err(zip::result::ZipError::FileNotFound) => return Ok(()),
        Err(e) => return Err(e).context("reading matplotlib's data"),
    }
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(inner)).context("reading matplotlib's data")?;
    // `extract` refuses names that would leave `dest` (`..`, absolute paths).
    archive
        .extract(dest)
        .context("extracting matplotlib's data")?;
    Ok(())
}

/// The guest's argv before the program's path: the interpreter's `argv[0]`, then a `-c`
/// prelude that puts Grid's helper folder on `sys.path`, installs `_grid_site`'s hook (every
/// step returns `None`, so the `or` chain goes on) and runs the rest of argv through the
/// reactor's own argument handling (the way the runtime's own runner adds import paths: the
/// pre-initialized interpreter computed its path before any env was read, so `PYTHONPATH`
/// would not reach it). The program then sees `sys.argv == ["/job/<file>", args…]`.
pub fn guest_argv(runtime: &Runtime) -> [String; 3] {
    let argv0 = runtime.argv0;
    let prelude = format!(
        "__import__('linecache')._interactive_cache.clear() or \
         __import__('sys').path.extend(['{HELPER_GUEST_DIR}']) or \
         __import__('_grid_site').install() or \
         __import__('sys').exit(__import__('_reactor').run(\
         ['{argv0}', *__import__('sys').argv[1:]], dict(__import__('os').environ)))"
    );
    [argv0.to_string(), "-c".to_string(), prelude]
}

/// The environment a runtime's guest starts with; the job's own env goes on top, and `GRID_*`
/// on top of that.
///
/// No `PYTHONHASHSEED`: the pre-initialized interpreter fixed its hash secret when its snapshot
/// was made, so str hashes (and set order) are the same in every task anyway.
pub fn guest_env() -> Vec<(String, String)> {
    vec![
        // /tmp is the task's own scratch folder (matplotlib keeps its caches under HOME).
        ("HOME".to_string(), "/tmp".to_string()),
        ("TMPDIR".into(), "/tmp".into()),
        ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
        ("PYTHONTZPATH".into(), String::new()),
        ("MPLBACKEND".into(), "Agg".into()),
    ]
}

/// `host::call(ptr, len, out_ptr_ptr, out_len_ptr) -> i32`: the runtime's door to an embedder.
/// Grid grants nothing through it: every call answers -1, "no host".
pub fn add_host_call(linker: &mut wasmtime::Linker<TaskState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "host",
        "call",
        |_: wasmtime::Caller<'_, TaskState>, _: i32, _: i32, _: i32, _: i32| -> i32 { -1 },
    )?;
    Ok(())
}
