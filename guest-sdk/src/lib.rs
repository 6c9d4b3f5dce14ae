//! `grid-guest`: write Grid jobs in Rust.
//!
//! A Grid job is a WASI preview 1 command (`cargo build --target wasm32-wasip1`). Each task of a
//! job runs the module once, in a sandbox, and sees:
//!
//! | what | where | this crate |
//! |---|---|---|
//! | which task it is | env `GRID_JOB_ID`, `GRID_TASK_INDEX`, `GRID_TASK_COUNT`, `GRID_SEED`, `GRID_ATTEMPT` | [`Task::current`] |
//! | its parameters | stdin: one line of the job's params file (JSON) | [`Task::params`], [`Task::params_or_default`] |
//! | its inputs | `/in`, read-only | [`input_files`] (sorted), [`read_input`], [`input_dir`] |
//! | its outputs | `/out`, quota-limited; what is there at exit is the result | [`output_dir`], [`create_output`] |
//! | randomness | seeded from `GRID_SEED`: the same task gives the same bytes on any node | [`Task::rng`] |
//! | fast text output | numbers written without `core::fmt`, whose cost doubles in wasm | [`write_fixed`], [`itoa`] |
//!
//! No network, no threads, no host files. Exit non-zero (or panic) to fail the task; Grid
//! reports `exit: N` or `trap: …` and retries if the job allows it.
//!
//! The same code also builds natively (for tests and benchmarks): then `/in` and `/out` are read
//! from `GRID_IN_DIR` / `GRID_OUT_DIR` when set.
//!
//! # Example: a complete job
//!
//! (The README's "Writing a job" shows this same program; a test keeps the two alike.)
//! ```no_run
//! use grid_guest::{Task, create_output, rand::RngExt};
//! use std::io::Write;
//!
//! /// One line of the job's params file, e.g. `{"rows": 1000}`.
//! #[derive(serde::Deserialize, Default)]
//! struct Params {
//!     rows: Option<u64>,
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let task = Task::current(); // job id, index, count, seed, attempt
//!     let params: Params = task.params_or_default()?; // stdin as JSON; empty: the default
//!     let mut rng = task.rng(); // seeded: same task, same numbers
//!     let mut out = create_output(format!("part-{}.csv", task.index))?; // in /out
//!     writeln!(out, "id,value")?;
//!     for id in 0..params.rows.unwrap_or(10) {
//!         writeln!(out, "{id},{}", rng.random::<f64>())?;
//!     }
//!     out.flush()?;
//!     Ok(())
//! }
//! ```

pub mod gpu;

use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::path::{Path, PathBuf};

pub use itoa;
pub use rand;
pub use rand_xoshiro;

/// The task's random number generator: xoshiro256++, seeded from `GRID_SEED`. Its output is the
/// same on every platform and every run of the task. It is statistically strong (it passes
/// BigCrush) but not for cryptography — as numpy's default PCG64 is not. It suits wasm: 64-bit
/// adds, shifts and rotates, which run in a sandbox about as fast as natively, where a ChaCha
/// generator runs 3.5× slower than its native SIMD build. A job that needs a cryptographic
/// generator can seed `rand_chacha` from this one, or read WASI's `random_get`.
pub type Rng = rand_xoshiro::Xoshiro256PlusPlus;

/// Writes `x` with exactly `decimals` digits after the point, as `{:.N}` would, without
/// `core::fmt`: in wasm its dynamic calls make formatting about 2.2× slower than natively, and
/// a generator of text data spends most of its time there. `x` is scaled by 10^N, rounded (ties
/// to even) and its digits laid out two at a time in one stack buffer, which goes to `out` in a
/// single write; so the last digit can differ from `{:.N}` when x × 10^N lies within a rounding
/// error of a half. Beyond 2^53 after scaling, and for NaN and infinities, it writes `{:.N}`
/// itself. `decimals` above 15 are written as 15.
#[inline]
pub fn write_fixed(out: &mut impl io::Write, x: f64, decimals: u8) -> io::Result<()> {
    const POW10: [u64; 16] = {
        let mut table = [1u64; 16];
        let mut i = 1;
        while i < 16 {
            table[i] = table[i - 1] * 10;
            i += 1;
        }
        table
    };
    let decimals = usize::from(decimals.min(15));
    let scale = POW10[decimals];
    let scaled = (x.abs() * scale as f64).round_ties_even();
    if !scaled.is_finite() || scaled >= (1u64 << 53) as f64 {
        return write!(out, "{x:.*}", decimals);
    }
    // Exact: `scaled` is a whole number below 2^53, so at most 16 digits, a point and a sign.
    let scaled = scaled as u64;
    let mut buf = [b'0'; 18];
    let mut at = buf.len();
    let mut fraction = scaled % scale;
    let mut left = decimals;
    while left >= 2 {
        at -= 2;
        buf[at..at + 2].copy_from_slice(digit_pair(fraction % 100));
        fraction /= 100;
        left -= 2;
    }
    if left == 1 {
        at -= 1;
        buf[at] = b'0' + fraction as u8;
    }
    if decimals > 0 {
        at -= 1;
        buf[at] = b'.';
    }
    let mut whole = scaled / scale;
    while whole >= 10 {
        at -= 2;
        buf[at..at + 2].copy_from_slice(digit_pair(whole % 100));
        whole /= 100;
    }
    if whole > 0 || at == buf.len() || buf[at] == b'.' {
        at -= 1;
        buf[at] = b'0' + whole as u8;
    }
    if x.is_sign_negative() {
        at -= 1;
        buf[at] = b'-'; // as `{:.N}` writes -0.00 for -0.001
    }
    out.write_all(&buf[at..])
}

/// The two ASCII digits of `n` (below 100).
#[inline]
fn digit_pair(n: u64) -> &'static [u8] {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let i = n as usize * 2;
    &PAIRS[i..i + 2]
}

/// Who this task is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub job_id: String,
    /// 0-based index of this task in its job.
    pub index: u64,
    /// Number of tasks in the job.
    pub count: u64,
    /// This task's seed, derived by Grid from the job seed and the index.
    pub seed: u64,
    /// Which try this is: 0 the first, 1 the first retry, … (results should not depend on it).
    pub attempt: u32,
}

/// Reading the task's parameters failed.
#[derive(Debug)]
pub enum ParamsError {
    Io(io::Error),
    Json(serde_json::Error),
}

impl std::fmt::Display for ParamsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamsError::Io(e) => write!(f, "reading task params from stdin: {e}"),
            ParamsError::Json(e) => write!(f, "task params are not the expected JSON: {e}"),
        }
    }
}

impl std::error::Error for ParamsError {}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Task {
    /// The task as Grid described it in the environment (outside Grid: job `local`, task 0 of 1,
    /// seed 0).
    pub fn current() -> Self {
        Self {
            job_id: std::env::var("GRID_JOB_ID").unwrap_or_else(|_| "local".into()),
            index: env_u64("GRID_TASK_INDEX", 0),
            count: env_u64("GRID_TASK_COUNT", 1),
            seed: env_u64("GRID_SEED", 0),
            attempt: env_u64("GRID_ATTEMPT", 0) as u32,
        }
    }

    /// A fresh RNG seeded with this task's seed.
    pub fn rng(&self) -> Rng {
        use rand::SeedableRng;
        Rng::seed_from_u64(self.seed)
    }

    /// The task's parameters: stdin parsed as JSON.
    pub fn params<T: serde::de::DeserializeOwned>(&self) -> Result<T, ParamsError> {
        let text = read_stdin()?;
        serde_json::from_str(&text).map_err(ParamsError::Json)
    }

    /// Like [`Task::params`], but an empty stdin gives `T::default()`.
    pub fn params_or_default<T: serde::de::DeserializeOwned + Default>(
        &self,
    ) -> Result<T, ParamsError> {
        let text = read_stdin()?;
        if text.trim().is_empty() {
            return Ok(T::default());
        }
        serde_json::from_str(&text).map_err(ParamsError::Json)
    }
}

fn read_stdin() -> Result<String, ParamsError> {
    let mut text = String::new();
    io::stdin()
        .read_to_string(&mut text)
        .map_err(ParamsError::Io)?;
    Ok(text)
}

fn dir_from_env(var: &str, sandbox_path: &str) -> PathBuf {
    if cfg!(target_os = "wasi") {
        PathBuf::from(sandbox_path)
    } else {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(sandbox_path))
    }
}

/// `/in`: the task's inputs (and the job's shared inputs under `/in/shared`), read-only.
pub fn input_dir() -> PathBuf {
    dir_from_env("GRID_IN_DIR", "/in")
}

/// `/out`: what is here when the task exits is its result.
pub fn output_dir() -> PathBuf {
    dir_from_env("GRID_OUT_DIR", "/out")
}

/// The names of the files in `/in` (not `/in/shared`), in byte order.
///
/// Directory listings come from the provider's filesystem in whatever order it keeps them;
/// iterate over this list, not over `read_dir`, so that the task gives the same bytes on every
/// node.
pub fn input_files() -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(input_dir())? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// Reads a whole input file, `name` relative to `/in`.
pub fn read_input(name: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    std::fs::read(input_dir().join(name))
}

/// Creates (or truncates) an output file, `name` relative to `/out`, creating its parent
/// directories, and returns it buffered. Call `flush` before dropping it to see write errors.
pub fn create_output(name: impl AsRef<Path>) -> io::Result<BufWriter<File>> {
    let path = output_dir().join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    Ok(BufWriter::with_capacity(64 * 1024, File::create(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn fixed(x: f64, decimals: u8) -> String {
        let mut out = Vec::new();
        write_fixed(&mut out, x, decimals).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn write_fixed_writes_what_format_writes() {
        let mut rng = Rng::seed_from_u64(1);
        let mut compared = 0;
        for _ in 0..200_000 {
            let magnitude = 10f64.powi(rng.random_range(-8..12));
            let x = (rng.random::<f64>() - 0.5) * magnitude;
            let decimals = rng.random_range(0..=9u8);
            // Away from a half after scaling, where the two roundings cannot disagree.
            let scaled = x.abs() * 10f64.powi(i32::from(decimals));
            if (scaled.fract() - 0.5).abs() < 1e-3 {
                continue;
            }
            assert_eq!(
                fixed(x, decimals),
                format!("{x:.*}", usize::from(decimals)),
                "{x:e} with {decimals} decimals"
            );
            compared += 1;
        }
        assert!(compared > 150_000);
        for (x, d) in [
            (0.0, 2),
            (-0.0, 2),
            (-0.001, 2),
            (0.125, 2),
            (2.5, 0),
            (1.005, 2),
            (123.0, 0),
            (1e300, 3),
            (-1e17, 1),
            (f64::NAN, 2),
            (f64::INFINITY, 2),
            (f64::NEG_INFINITY, 0),
            (0.1, 15),
        ] {
            assert_eq!(
                fixed(x, d),
                format!("{x:.*}", usize::from(d)),
                "{x:e} with {d} decimals"
            );
        }
        assert_eq!(
            fixed(0.5, 30),
            format!("{:.15}", 0.5),
            "at most 15 decimals"
        );
    }
}
