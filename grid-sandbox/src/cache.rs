//! The on-disk cache of compiled modules.
//!
//! Compiling is the expensive part of running a module, so a node compiles each module once and
//! keeps the machine code on disk, keyed by the module's SHA-256 and the engine's compatibility
//! hash (wasmtime version, target, and every setting that changes generated code).
//!
//! **Architecture invariant:** a node only deserializes compiled code it wrote itself.
//! `Module::deserialize` runs whatever machine code it is given, so an artifact from anywhere else —
//! another node, a copied or shared cache directory, a tampered file — must never reach it. Each
//! artifact is stored with an HMAC-SHA256 tag under a 256-bit key that the node generates on first
//! use and keeps in the cache directory with mode 0600 (the directory itself is 0700). The tag
//! covers the cache key and the bytes; an artifact whose tag does not verify is deleted and the
//! module is compiled again. Someone who can read the node's key file already runs as the node's
//! user, and could as well change its binary.
//!
//! **Shared by one user's processes.** Processes of one user on one machine — the nodes of a
//! provider, the nodes `grid up` starts and `grid run` — may open one cache directory: one trust
//! domain, one key. A runtime's 100 MB module is then compiled once per machine, not once per
//! process. Artifacts are written to a temporary file and renamed into place (a reader sees a
//! whole artifact or none), the key is created the same way, and a compile holds a lock file
//! for its artifact ([`ModuleCache::lock`]) so that a second process wanting the same module
//! waits for the first one's artifact instead of compiling it again.

use anyhow::{Context, Result};
use grid_proto::Sha256Hex;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use wasmtime::{Engine, Module};

type HmacSha256 = Hmac<Sha256>;
const TAG_BYTES: usize = 32;
const KEY_FILE: &str = "node.key";
/// This machine's compile rate, in core-seconds per MB (see [`ModuleCache::record_compile`]).
const RATE_FILE: &str = "compile-rate";

pub struct ModuleCache {
    dir: PathBuf,
    key: [u8; 32],
    engine_hash: u64,
}

impl ModuleCache {
    /// Opens (creating if needed) the cache in `dir` for artifacts of `engine`.
    pub fn open(dir: &Path, engine: &Engine) -> Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating the module cache {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).with_context(|| {
            format!(
                "restricting the module cache {} to its owner",
                dir.display()
            )
        })?;
        let key = load_or_create_key(&dir.join(KEY_FILE))?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
            engine_hash: hasher.finish(),
        })
    }

    fn name(&self, module: &Sha256Hex, variant: &str) -> String {
        format!("{module}-{variant}-{:016x}.cwasm", self.engine_hash)
    }

    fn tag(&self, name: &str, artifact: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(name.as_bytes());
        mac.update(artifact);
        mac
    }

    /// The compiled module, if this node cached it before and the artifact is intact.
    pub fn get(&self, engine: &Engine, module: &Sha256Hex, variant: &str) -> Option<Module> {
        let name = self.name(module, variant);
        let path = self.dir.join(&name);
        let bytes = fs::read(&path).ok()?;
        if bytes.len() < TAG_BYTES {
            let _ = fs::remove_file(&path);
            return None;
        }
        let (tag, artifact) = bytes.split_at(TAG_BYTES);
        if self.tag(&name, artifact).verify_slice(tag).is_err() {
            tracing::warn!(path = %path.display(), "compiled artifact failed its integrity check; recompiling");
            let _ = fs::remove_file(&path);
            return None;
        }
        // SAFETY: the HMAC above proves this node wrote these bytes with `Module::serialize`
        // (see the module docs); wasmtime additionally rejects artifacts of another version.
        match unsafe { Module::deserialize(engine, artifact) } {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "stale compiled artifact; recompiling");
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Holds the lock for the artifact of (`module`, `variant`) until dropped: between looking it
    /// up and storing it, so that processes sharing the cache compile it once. Blocks while
    /// another holds it. `None` (logged) when the lock file cannot be made: the compile goes
    /// ahead unlocked, at worst twice.
    pub fn lock(&self, module: &Sha256Hex, variant: &str) -> Option<fs::File> {
        let path = self
            .dir
            .join(format!("{}.lock", self.name(module, variant)));
        let locked = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .and_then(|file| file.lock().map(|()| file));
        match locked {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not lock a compile");
                None
            }
        }
    }

    /// Keeps this machine's compile rate (core-seconds per MB of wasm, see
    /// [`crate::Sandbox::compile_estimate`]) from a compile of `wasm_bytes` that took `took`.
    /// Small modules say little of the rate: only compiles of 4 MB or more count.
    pub fn record_compile(&self, wasm_bytes: usize, took: std::time::Duration) {
        if wasm_bytes < 4_000_000 {
            return;
        }
        let cores = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(16);
        let rate = took.as_secs_f64() * cores as f64 / (wasm_bytes as f64 / 1e6);
        let mut tmp = match tempfile::NamedTempFile::new_in(&self.dir) {
            Ok(tmp) => tmp,
            Err(_) => return,
        };
        if writeln!(tmp, "{rate}").is_ok() {
            let _ = tmp.persist(self.dir.join(RATE_FILE));
        }
    }

    /// The compile rate [`ModuleCache::record_compile`] kept, if any.
    pub fn compile_rate(&self) -> Option<f64> {
        let text = fs::read_to_string(self.dir.join(RATE_FILE)).ok()?;
        text.trim()
            .parse::<f64>()
            .ok()
            .filter(|r| r.is_finite() && *r > 0.0)
    }

    /// Stores `compiled` for later runs; `variant` tells apart forms of one module (plain, guarded). Failures only cost a recompile later, so they are logged.
    pub fn put(&self, module: &Sha256Hex, variant: &str, compiled: &Module) {
        if let Err(e) = self.try_put(module, variant, compiled) {
            tracing::warn!(error = %format!("{e:#}"), "could not cache a compiled module");
        }
    }

    fn try_put(&self, module: &Sha256Hex, variant: &str, compiled: &Module) -> Result<()> {
        let name = self.name(module, variant);
        let artifact = compiled.serialize().map_err(crate::task_state::wasm_err)?;
        let tag = self.tag(&name, &artifact).finalize().into_bytes();
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(&tag)?;
        tmp.write_all(&artifact)?;
        tmp.persist(self.dir.join(&name))?;
        Ok(())
    }
}

fn load_or_create_key(path: &Path) -> Result<[u8; 32]> {
    let mut key = [0u8; 32];
    match fs::File::open(path) {
        Ok(mut f) => {
            let meta = f.metadata()?;
            if meta.permissions().mode() & 0o077 != 0 || meta.len() != 32 {
                anyhow::bail!(
                    "{} must be 32 bytes readable only by its owner (chmod 600), or deleted to make a new one",
                    path.display()
                );
            }
            f.read_exact(&mut key)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::File::open("/dev/urandom")
                .and_then(|mut r| r.read_exact(&mut key))
                .context("reading /dev/urandom for the cache key")?;
            // Written whole, then linked into place unless another process sharing the cache
            // made its key first: then that one is the key.
            let dir = path.parent().unwrap_or(Path::new("."));
            let mut tmp = tempfile::NamedTempFile::new_in(dir)
                .with_context(|| format!("creating a key in {}", dir.display()))?;
            tmp.write_all(&key)?;
            if let Err(e) = tmp.persist_noclobber(path) {
                if e.error.kind() != std::io::ErrorKind::AlreadyExists {
                    return Err(e.error).with_context(|| format!("creating {}", path.display()));
                }
                return load_or_create_key(path);
            }
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    Ok(key)
}
