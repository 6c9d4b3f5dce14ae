//! The Python benchmark (`cargo xtask bench python` installs numpy on the host and runs it).
//!
//! Side by side, in one run: (a) the runtime's cold compile (once per machine), optimised and
//! quick ([`Compiler`]), with what the quick compile costs the tasks after; (b) the fixed cost
//! of a warm Python task — instantiate the compiled runtime, start the interpreter, run a
//! trivial script, collect — through the sandbox; (c) a numpy-heavy script in the sandbox vs the
//! same script on the host's CPython with numpy, both for the numerical work alone (timed inside
//! the script) and for the whole task (interpreter start and `import numpy` included).

use grid_proto::runtime::PYTHON;
use grid_sandbox::runtime::RuntimeFiles;
use grid_sandbox::{Compiler, LoadedModule, Program, Sandbox, SandboxConfig, TaskSpec};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::median;

fn main() -> anyhow::Result<()> {
    let reps = 7;
    let host_python = std::env::var("GRID_BENCH_HOST_PYTHON").unwrap_or_else(|_| "python3".into());
    // `cargo xtask bench python` names the folder of the runtime's files that its setup checked.
    let artifacts = std::env::var_os("GRID_RUNTIME_DIR")
        .map(PathBuf::from)
        .ok_or_else(|| {
            anyhow::anyhow!("GRID_RUNTIME_DIR is not set: run `cargo xtask bench python`")
        })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let work = tempfile::tempdir()?;
    let files = RuntimeFiles::install(
        &work.path().join("runtimes"),
        &PYTHON,
        &std::fs::read(artifacts.join(PYTHON.stdlib_file))?,
    )?;
    let programs = work.path().join("programs");
    std::fs::create_dir_all(&programs)?;
    std::fs::write(programs.join("trivial.py"), "pass\n")?;
    let numpy_work = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/python/numpy_work.py");
    std::fs::copy(&numpy_work, programs.join("numpy_work.py"))?;

    // (a) the cold compile, into an empty cache, with each of Cranelift's settings.
    let module_bytes = std::fs::read(artifacts.join(PYTHON.module_file))?;
    let compile = |compiler: Compiler| -> anyhow::Result<(Sandbox, LoadedModule, Duration)> {
        let sandbox = Sandbox::new(SandboxConfig {
            cache_dir: Some(work.path().join(format!("compiled-{compiler:?}"))),
            compiler,
            ..Default::default()
        })?;
        let bytes = module_bytes.clone();
        let started = Instant::now();
        let module = rt
            .block_on(sandbox.load_runtime(&PYTHON, async { Ok(bytes) }))
            .map_err(|r| anyhow::anyhow!("{r}"))?;
        Ok((sandbox, module, started.elapsed()))
    };
    let (quick_sandbox, quick_module, quick_cold) = compile(Compiler::Quick)?;
    let (sandbox, module, cold) = compile(Compiler::Optimized)?;
    println!(
        "  cold compile of the runtime (once per machine): {:.1} s optimised; {:.1} s quick (Cranelift unoptimised, single-pass registers): {:.2}x",
        cold.as_secs_f64(),
        quick_cold.as_secs_f64(),
        quick_cold.as_secs_f64() / cold.as_secs_f64()
    );

    let run_on = |sandbox: &Sandbox,
                  module: &LoadedModule,
                  file: &str|
     -> anyhow::Result<(Duration, String)> {
        let out = tempfile::tempdir()?;
        let mut spec = TaskSpec::new(out.path());
        // Real clocks: the script times its own work.
        spec.deterministic = false;
        spec.program = Some(Program {
            runtime: &PYTHON,
            files: files.clone(),
            dir: programs.clone(),
            file: file.into(),
        });
        let started = Instant::now();
        let report = rt.block_on(sandbox.run(module, spec));
        let took = started.elapsed();
        anyhow::ensure!(
            report.outcome == grid_proto::Outcome::Succeeded,
            "{file}: {:?}: {}",
            report.outcome,
            String::from_utf8_lossy(&report.stderr)
        );
        Ok((took, String::from_utf8_lossy(&report.stdout).into_owned()))
    };

    let run = |file: &str| run_on(&sandbox, &module, file);

    // (b) a warm trivial task.
    run("trivial.py")?;
    let warm = median(
        (0..reps)
            .map(|_| run("trivial.py").map(|r| r.0))
            .collect::<Result<_, _>>()?,
    );
    // The same, and the numpy task whole, on the quickly compiled runtime.
    let quick = |file: &str| -> anyhow::Result<Duration> {
        run_on(&quick_sandbox, &quick_module, file)?;
        Ok(median(
            (0..reps)
                .map(|_| run_on(&quick_sandbox, &quick_module, file).map(|r| r.0))
                .collect::<Result<_, _>>()?,
        ))
    };
    // The quick compile's code takes more stack: the numpy task may overflow the default
    // 1 MiB wasm stack there, which is said rather than fatal to the benchmark.
    let quick_trivial = quick("trivial.py")?;
    let quick_numpy = quick("numpy_work.py");

    // (c) numpy-heavy: sandbox vs host, alternating.
    let inner = |stdout: &str| -> anyhow::Result<f64> {
        Ok(stdout
            .split_whitespace()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no timing in {stdout:?}"))?
            .parse()?)
    };
    let host = |script: &Path| -> anyhow::Result<(Duration, String)> {
        let started = Instant::now();
        let out = std::process::Command::new(&host_python)
            .arg(script)
            .output()?;
        let took = started.elapsed();
        anyhow::ensure!(
            out.status.success(),
            "{host_python} {}: {} (the bench needs numpy on the host: `cargo xtask bench python` installs it)",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let (mut sandbox_whole, mut sandbox_inner, mut host_whole, mut host_inner) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    run("numpy_work.py")?;
    host(&numpy_work)?;
    for _ in 0..reps {
        let (took, stdout) = run("numpy_work.py")?;
        sandbox_whole.push(took);
        sandbox_inner.push(Duration::from_secs_f64(inner(&stdout)?));
        let (took, stdout) = host(&numpy_work)?;
        host_whole.push(took);
        host_inner.push(Duration::from_secs_f64(inner(&stdout)?));
    }
    let (sw, si, hw, hi) = (
        median(sandbox_whole),
        median(sandbox_inner),
        median(host_whole),
        median(host_inner),
    );
    println!(
        "python runtime ({} {}), medians of {reps}:",
        PYTHON.package, PYTHON.version
    );
    println!(
        "  warm trivial task (instantiate + interpreter start + `pass` + collect): {:.1} ms",
        warm.as_secs_f64() * 1e3
    );
    println!(
        "  numpy work alone: sandbox {:.3} s, host CPython {:.3} s: {:.2}x",
        si.as_secs_f64(),
        hi.as_secs_f64(),
        si.as_secs_f64() / hi.as_secs_f64()
    );
    println!(
        "  numpy task whole (start + import + work): sandbox {:.3} s, host {:.3} s: {:.2}x",
        sw.as_secs_f64(),
        hw.as_secs_f64(),
        sw.as_secs_f64() / hw.as_secs_f64()
    );
    println!(
        "  on the quick compile: trivial task {:.1} ms ({:.2}x); numpy task whole: {}",
        quick_trivial.as_secs_f64() * 1e3,
        quick_trivial.as_secs_f64() / warm.as_secs_f64(),
        match quick_numpy {
            Ok(took) => format!(
                "{:.3} s ({:.2}x)",
                took.as_secs_f64(),
                took.as_secs_f64() / sw.as_secs_f64()
            ),
            Err(e) => format!("fails: {}", grid_proto::one_line(&e.to_string(), " ")),
        }
    );
    Ok(())
}
