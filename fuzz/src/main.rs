//! `grid-fuzz`: bounded fuzzing of the three places where Grid takes bytes from strangers.
//!
//! | target | what it feeds | what must hold |
//! |---|---|---|
//! | `wire` | random bytes, and valid messages with bytes flipped, cut or added, to `decode` of every message type | no panic; whatever decodes re-encodes to the same value |
//! | `sandbox` | modules from `wasm-smith` (importing real WASI calls, exporting `_start`) and raw bytes, run under small limits | no panic; the task ends within its time limit; nothing appears outside `/out` and `/in` is untouched |
//! | `gpu` | scripts of `grid_gpu_v1` calls — mostly plausible, some with wild handles, pointers, lengths and sizes, some with mangled WGSL — run by a guest through the node's GPU worker | no panic; the task ends in time; a good GPU task succeeds after each batch |
//!
//! Inputs come from a seeded generator, so a run is repeatable (`--seed`). A failing input is
//! written to the findings folder and can be run again alone (`grid-fuzz replay TARGET FILE`);
//! each one becomes a regression test. This is a random, not coverage-guided, fuzzer: it runs
//! on the stable toolchain in CI. `cargo fuzz` targets can call the same `case` functions.
//!
//! Usage: `grid-fuzz [--seconds N] [--seed S] [--findings DIR] [TARGET...]`, or
//! `grid-fuzz replay TARGET FILE`. Exit 1 when a finding was made. `GRID_FUZZ_VERBOSE=1` splits
//! the summary finer (each `invalid:` reason; the GPU calls' statuses), to see what a target
//! reaches. `cargo xtask fuzz` builds and runs it, and replays `fuzz/regressions/` first.

mod gpu;
mod sandbox;
mod wire;

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// What one case came to: a label for the summary, or a finding.
pub type Verdict = std::result::Result<String, String>;

/// A fuzz target: turns an input into a case and checks what must hold.
pub enum Target {
    Wire,
    Sandbox(Box<sandbox::Fuzzer>),
    Gpu(Box<gpu::Fuzzer>),
}

impl Target {
    async fn open(name: &str) -> Result<Self> {
        Ok(match name {
            "wire" => Target::Wire,
            "sandbox" => Target::Sandbox(Box::new(sandbox::Fuzzer::new()?)),
            "gpu" => Target::Gpu(Box::new(gpu::Fuzzer::new().await?)),
            other => bail!("unknown target {other}; the targets are wire, sandbox and gpu"),
        })
    }

    async fn case(&self, input: &[u8]) -> Verdict {
        match self {
            Target::Wire => wire::case(input),
            Target::Sandbox(f) => f.case(input).await,
            Target::Gpu(f) => f.case(input).await,
        }
    }

    /// A check between batches of cases (the GPU still serves).
    async fn after_batch(&self) -> std::result::Result<(), String> {
        match self {
            Target::Gpu(f) => f.good_task_succeeds().await,
            _ => Ok(()),
        }
    }
}

/// SplitMix64: small, seeded, and the same on every machine.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Random bytes, mostly short, sometimes long.
    fn input(&mut self) -> Vec<u8> {
        let len = match self.next() % 8 {
            0 => self.next() % 16_384,
            _ => self.next() % 1_024,
        } as usize;
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            bytes.extend_from_slice(&self.next().to_le_bytes());
        }
        bytes.truncate(len);
        bytes
    }
}

/// Runs one case as a task of its own, so that a panic is caught and reported as a finding.
async fn run_case(target: &std::sync::Arc<Target>, input: Vec<u8>) -> Verdict {
    let target = target.clone();
    match tokio::spawn(async move { target.case(&input).await }).await {
        Ok(verdict) => verdict,
        Err(e) if e.is_panic() => Err(format!("panic: {}", panic_text(e.into_panic()))),
        Err(e) => Err(format!("the case did not finish: {e}")),
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

struct Args {
    seconds: u64,
    seed: u64,
    findings: PathBuf,
    targets: Vec<String>,
    replay: Option<(String, PathBuf)>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        seconds: 10,
        seed: 1,
        findings: PathBuf::from("fuzz-findings"),
        targets: Vec::new(),
        replay: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |what: &str| it.next().with_context(|| format!("{arg} needs {what}"));
        match arg.as_str() {
            "--seconds" => args.seconds = value("N")?.parse().context("--seconds N")?,
            "--seed" => args.seed = value("S")?.parse().context("--seed S")?,
            "--findings" => args.findings = value("DIR")?.into(),
            "replay" => {
                let target = value("TARGET")?;
                args.replay = Some((target, value("FILE")?.into()));
            }
            t if !t.starts_with('-') => args.targets.push(t.to_string()),
            other => bail!(
                "unknown flag {other}; usage: grid-fuzz [--seconds N] [--seed S] [--findings DIR] [wire|sandbox|gpu...] | grid-fuzz replay TARGET FILE"
            ),
        }
    }
    if args.targets.is_empty() {
        args.targets = vec!["wire".into(), "sandbox".into(), "gpu".into()];
    }
    Ok(args)
}

async fn fuzz(args: Args) -> Result<bool> {
    if let Some((name, file)) = &args.replay {
        let target = std::sync::Arc::new(Target::open(name).await?);
        let input = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        return Ok(match run_case(&target, input).await {
            Ok(label) => {
                println!("{name}: {label}: nothing wrong");
                true
            }
            Err(finding) => {
                println!("{name}: FINDING: {finding}");
                false
            }
        });
    }
    let mut clean = true;
    for name in &args.targets {
        let target = std::sync::Arc::new(Target::open(name).await?);
        let mut rng = Rng(args.seed
            ^ name
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))));
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let mut labels: BTreeMap<String, u64> = BTreeMap::new();
        let (mut cases, mut findings) = (0u64, 0u64);
        let mut last = Vec::new();
        // A few findings say enough; a broken target would otherwise write thousands.
        while Instant::now() < deadline && findings < 3 {
            let input = rng.input();
            last.clone_from(&input);
            let verdict = run_case(&target, input.clone()).await;
            cases += 1;
            let problem = match verdict {
                Ok(label) => {
                    *labels.entry(label).or_default() += 1;
                    None
                }
                Err(finding) => Some(finding),
            };
            let problem = match problem {
                None if cases % 16 == 0 => target.after_batch().await.err(),
                other => other,
            };
            if let Some(finding) = problem {
                findings += 1;
                std::fs::create_dir_all(&args.findings)?;
                let file = args
                    .findings
                    .join(format!("{name}-{}-{cases}.bin", args.seed));
                std::fs::write(&file, &last)?;
                println!(
                    "{name}: FINDING: {finding}\n  input saved: {} (run it alone: grid-fuzz replay {name} {})",
                    file.display(),
                    file.display()
                );
            }
        }
        if let Err(finding) = target.after_batch().await {
            findings += 1;
            println!("{name}: FINDING: {finding}");
        }
        let top: Vec<String> = labels
            .iter()
            .map(|(label, n)| format!("{label} ×{n}"))
            .collect();
        println!(
            "{name}: {cases} cases in {} s, {findings} findings; outcomes: {}",
            args.seconds,
            top.join(", ")
        );
        clean &= findings == 0;
    }
    Ok(clean)
}

fn main() -> ExitCode {
    grid_sandbox::gpu_worker::serve_if_asked(grid_client::init_tracing);
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("grid-fuzz: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("grid-fuzz: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(fuzz(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("grid-fuzz: {e:#}");
            ExitCode::from(2)
        }
    }
}
