//! The sandbox benchmark (`cargo xtask bench sandbox` builds its inputs and runs it).
//!
//! Side by side, in one run: the synth-data example (a) through the sandbox with every limit on,
//! (b) in bare wasmtime + wasmtime-wasi with no limits, (b') the same with epoch interruption on,
//! (c) as a native build, run in interleaved rounds; and the per-task
//! fixed cost of an empty `_start` — instantiate, WASI context, `/in` and `/out`, run, collect —
//! with the compiled module in memory, from the on-disk cache, and compiled from scratch.

use grid_sandbox::{Limits, Sandbox, SandboxConfig, TaskSpec};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use wasmtime::{Engine, Linker, Module, Store};
use wasmtime_wasi::p1::{self, WasiP1Ctx};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

mod common;
use common::{median, target_dir};

fn main() -> anyhow::Result<()> {
    let rows: u64 = std::env::var("GRID_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let reps: usize = 9;
    let wasm_path = target_dir().join("wasm32-wasip1/guest/synth-data.wasm");
    let native_path = target_dir().join("guest/synth-data");
    let wasm = std::fs::read(&wasm_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}; run `cargo xtask bench`", wasm_path.display()))?;
    anyhow::ensure!(
        native_path.exists(),
        "{} is missing; run `cargo xtask bench`",
        native_path.display()
    );
    let params = format!(r#"{{"rows": {rows}}}"#).into_bytes();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cache = tempfile::tempdir()?;

    // (a) the sandbox, all limits on.
    let sandbox = Sandbox::new(SandboxConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..Default::default()
    })?;
    let module = rt
        .block_on(sandbox.load(&wasm, &Limits::default()))
        .map_err(|r| anyhow::anyhow!("{r}"))?;
    let sandboxed_run = || -> anyhow::Result<Duration> {
        let out = tempfile::tempdir()?;
        let mut spec = TaskSpec::new(out.path());
        spec.stdin = params.clone();
        let started = Instant::now();
        let report = rt.block_on(sandbox.run(&module, spec));
        let took = started.elapsed();
        anyhow::ensure!(
            report.outcome == grid_proto::Outcome::Succeeded,
            "{:?}",
            report.outcome
        );
        Ok(took)
    };

    // (b) bare wasmtime: default engine, no limits, no guard; and (b') the same with epoch
    // interruption on, which is what the sandbox's time limit costs running code.
    // `GRID_BENCH_PERFMAP=1` writes /tmp/perf-PID.map so that `perf report` names the guest's
    // functions.
    let bare_engine = |epochs: bool| -> anyhow::Result<Engine> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(epochs);
        if std::env::var_os("GRID_BENCH_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        Engine::new(&config).map_err(|e| anyhow::anyhow!("{e}"))
    };
    let (engine, epoch_engine) = (bare_engine(false)?, bare_engine(true)?);
    let bare_module = Module::new(&engine, &wasm).map_err(|e| anyhow::anyhow!("{e}"))?;
    let epoch_module = Module::new(&epoch_engine, &wasm).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut linker: Linker<WasiP1Ctx> = Linker::new(&engine);
    p1::add_to_linker_async(&mut linker, |s| s).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut epoch_linker: Linker<WasiP1Ctx> = Linker::new(&epoch_engine);
    p1::add_to_linker_async(&mut epoch_linker, |s| s).map_err(|e| anyhow::anyhow!("{e}"))?;
    let bare_run = |module: &Module, linker: &Linker<WasiP1Ctx>| -> anyhow::Result<Duration> {
        let out = tempfile::tempdir()?;
        let started = Instant::now();
        let mut b = WasiCtxBuilder::new();
        b.allow_blocking_current_thread(true).arg("job.wasm").stdin(
            wasmtime_wasi::p2::pipe::MemoryInputPipe::new(params.clone()),
        );
        b.preopened_dir(out.path(), "/out", FsPerms::ReadWrite)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut store = Store::new(module.engine(), b.build_p1());
        // Epochs never advance here: the checks run, none fires.
        store.set_epoch_deadline(u64::MAX / 2);
        rt.block_on(async {
            let instance = linker.instantiate_async(&mut store, module).await?;
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            start.call_async(&mut store, ()).await
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(started.elapsed())
    };

    // (c) native build of the same example.
    let native_run = || -> anyhow::Result<Duration> {
        let out = tempfile::tempdir()?;
        let started = Instant::now();
        let mut child = std::process::Command::new(&native_path)
            .env("GRID_OUT_DIR", out.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&params)?;
        anyhow::ensure!(child.wait()?.success());
        Ok(started.elapsed())
    };

    // Interleaved, one of each per round (the first round warms up and is not counted): a
    // slower minute of a shared machine then slows all four alike instead of one.
    let (mut sandboxed, mut bare, mut bare_epochs, mut native) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..=reps {
        let times = [
            sandboxed_run()?,
            bare_run(&bare_module, &linker)?,
            bare_run(&epoch_module, &epoch_linker)?,
            native_run()?,
        ];
        if round > 0 {
            sandboxed.push(times[0]);
            bare.push(times[1]);
            bare_epochs.push(times[2]);
            native.push(times[3]);
        }
    }

    // (d) per-task fixed cost: an empty `_start`.
    let empty =
        wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#)?;
    let empty_writer = wat::parse_str(
        r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                   (memory (export "memory") 1) (func (export "_start")))"#,
    )?;
    // As a node runs tasks: instances, memories and stacks pooled for its 2 slots.
    let pooled = Sandbox::new(SandboxConfig {
        pooled_tasks: Some(2),
        ..Default::default()
    })?;
    let fixed = |sandbox: &Sandbox, bytes: &[u8], n: usize| -> anyhow::Result<Duration> {
        let m = rt
            .block_on(sandbox.load(bytes, &Limits::default()))
            .map_err(|r| anyhow::anyhow!("{r}"))?;
        let out = tempfile::tempdir()?;
        let started = Instant::now();
        for _ in 0..n {
            let r = rt.block_on(sandbox.run(&m, TaskSpec::new(out.path())));
            anyhow::ensure!(r.outcome == grid_proto::Outcome::Succeeded);
        }
        Ok(started.elapsed() / n as u32)
    };
    let n = 2000;
    let fixed_plain = fixed(&sandbox, &empty, n)?;
    let fixed_guarded = fixed(&sandbox, &empty_writer, n)?;
    let pooled_plain = fixed(&pooled, &empty, n)?;
    let pooled_guarded = fixed(&pooled, &empty_writer, n)?;
    let bare_module_empty = Module::new(&engine, &empty).map_err(|e| anyhow::anyhow!("{e}"))?;
    let bare_fixed = {
        let out = tempfile::tempdir()?;
        let started = Instant::now();
        for _ in 0..n {
            let mut b = WasiCtxBuilder::new();
            b.preopened_dir(out.path(), "/out", FsPerms::ReadWrite)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut store = Store::new(&engine, b.build_p1());
            rt.block_on(async {
                let instance = linker
                    .instantiate_async(&mut store, &bare_module_empty)
                    .await?;
                instance
                    .get_typed_func::<(), ()>(&mut store, "_start")?
                    .call_async(&mut store, ())
                    .await
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        started.elapsed() / n as u32
    };
    // Load + run of the example with a cold sandbox: compiled from scratch, and from the disk cache.
    let cold = |cache_dir: Option<PathBuf>| -> anyhow::Result<Duration> {
        let fresh = Sandbox::new(SandboxConfig {
            cache_dir,
            ..Default::default()
        })?;
        let out = tempfile::tempdir()?;
        let started = Instant::now();
        let m = rt
            .block_on(fresh.load(&wasm, &Limits::default()))
            .map_err(|r| anyhow::anyhow!("{r}"))?;
        let mut spec = TaskSpec::new(out.path());
        spec.stdin = br#"{"rows": 1}"#.to_vec();
        let r = rt.block_on(fresh.run(&m, spec));
        anyhow::ensure!(r.outcome == grid_proto::Outcome::Succeeded);
        Ok(started.elapsed())
    };
    let compile_cold = median((0..5).map(|_| cold(None)).collect::<anyhow::Result<_>>()?);
    let disk_cached = median(
        (0..5)
            .map(|_| cold(Some(cache.path().to_path_buf())))
            .collect::<anyhow::Result<_>>()?,
    );

    let (a, b, e, c) = (
        median(sandboxed),
        median(bare),
        median(bare_epochs),
        median(native),
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("synth-data, {rows} rows, median of {reps} interleaved rounds:");
    println!(
        "  (a) sandbox, all limits   {:9.1} ms   {:.3}x native   {:.3}x bare wasmtime",
        ms(a),
        ms(a) / ms(c),
        ms(a) / ms(b)
    );
    println!(
        "  (b) bare wasmtime         {:9.1} ms   {:.3}x native",
        ms(b),
        ms(b) / ms(c)
    );
    println!(
        "  (b') + epoch interruption {:9.1} ms   {:.3}x native   {:.3}x bare (the time limit's checks)",
        ms(e),
        ms(e) / ms(c),
        ms(e) / ms(b)
    );
    println!("  (c) native (incl. spawn)  {:9.1} ms   1.000x", ms(c));
    println!("per-task fixed cost (empty _start, mean of {n}):");
    println!(
        "  sandbox, module in memory            {:8.1} µs",
        us(fixed_plain)
    );
    println!(
        "  sandbox, module that imports fd_write {:7.1} µs   (guard instance + /out quota)",
        us(fixed_guarded)
    );
    println!(
        "  pooled sandbox (a node's), in memory {:8.1} µs   {:.2}x",
        us(pooled_plain),
        us(pooled_plain) / us(fixed_plain)
    );
    println!(
        "  pooled sandbox, imports fd_write     {:8.1} µs   {:.2}x",
        us(pooled_guarded),
        us(pooled_guarded) / us(fixed_guarded)
    );
    println!(
        "  bare wasmtime                        {:8.1} µs",
        us(bare_fixed)
    );
    println!("cold start of synth-data (load + 1-row task, median of 5):");
    println!(
        "  compiled from scratch                {:8.1} ms",
        ms(compile_cold)
    );
    println!(
        "  from the on-disk compile cache       {:8.1} ms   ({:.1}x faster)",
        ms(disk_cached),
        ms(compile_cold) / ms(disk_cached)
    );
    Ok(())
}
