//! Hostile guests, one test each: the exact reason, nothing written outside `/out`, and a good
//! task running fine right after in the same engine.

use crate::support::*;
use grid_sandbox::Limits;
use std::time::Duration;

fn small_limits() -> Limits {
    Limits {
        memory_bytes: 64 << 20,
        timeout: Duration::from_secs(2),
        max_output_bytes: 10 << 20,
        max_output_files: 200,
        max_open_files: 64,
        ..Limits::default()
    }
}

/// Runs `hostile MODE` with small limits and returns the report after the common checks.
async fn hostile(mode: &str) -> (grid_sandbox::TaskReport, TaskDirs) {
    let dirs = TaskDirs::new();
    let report = run_task(&guest_bytes("hostile"), &dirs, |s| {
        s.args = vec![mode.to_string()];
        s.limits = small_limits();
    })
    .await;
    dirs.assert_nothing_outside_out();
    (report, dirs)
}

async fn wat_task(text: &str, timeout: Duration) -> grid_sandbox::TaskReport {
    let dirs = TaskDirs::new();
    let report = run_task(&wat(text), &dirs, |s| {
        s.limits = Limits {
            timeout,
            ..small_limits()
        };
    })
    .await;
    dirs.assert_nothing_outside_out();
    report
}

#[tokio::test(flavor = "multi_thread")]
async fn infinite_loop_is_stopped_by_the_time_limit() {
    let r = wat_task(
        r#"(module (func (export "_start") (loop (br 0))))"#,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(reason(&r), "limit: time");
    assert!(
        r.wall_seconds < 5.0,
        "stopped promptly, took {}",
        r.wall_seconds
    );
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_guest_is_stopped_by_the_time_limit() {
    let (r, _) = hostile("spin").await;
    assert_eq!(reason(&r), "limit: time");
    // Measured, and never more than the wall time of one thread (how much CPU a spin gets in
    // its 2 s depends on the machine's load).
    assert!(
        r.cpu_seconds > 0.05 && r.cpu_seconds <= r.wall_seconds + 0.05,
        "CPU time is measured: {} s CPU in {} s wall",
        r.cpu_seconds,
        r.wall_seconds
    );
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sleeping_guest_is_stopped_by_the_wall_time_limit() {
    let (r, _) = hostile("sleep").await;
    assert_eq!(reason(&r), "limit: time");
    assert!(r.wall_seconds < 10.0);
    assert_a_good_task_runs().await;
}

/// `poll_oneoff` on clocks, as the node shadows it (see grid-sandbox's `poll`): a lone relative
/// timer (its own asynchronous sleep) and two timers (wasmtime-wasi's implementation) both wake
/// at the first timer and report its event. The guest exits with nevents × 100 + userdata.
#[tokio::test(flavor = "multi_thread")]
async fn poll_oneoff_on_timers_wakes_at_the_first_one() {
    for subscriptions in [1, 2] {
        let r = wat_task(
            &format!(
                r#"(module
                  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
                  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                  (memory (export "memory") 1)
                  (func (export "_start")
                    ;; 7: a monotonic timer in 5 ms; 9: one in an hour
                    (i64.store (i32.const 0) (i64.const 7))
                    (i32.store (i32.const 16) (i32.const 1))
                    (i64.store (i32.const 24) (i64.const 5000000))
                    (i64.store (i32.const 48) (i64.const 9))
                    (i32.store (i32.const 64) (i32.const 1))
                    (i64.store (i32.const 72) (i64.const 3600000000000))
                    (if (call $poll (i32.const 0) (i32.const 256) (i32.const {subscriptions}) (i32.const 512))
                      (then (call $exit (i32.const 99))))
                    (call $exit (i32.add
                      (i32.mul (i32.load (i32.const 512)) (i32.const 100))
                      (i32.wrap_i64 (i64.load (i32.const 256)))))))"#
            ),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(reason(&r), "exit: 107", "{subscriptions} subscriptions");
        assert!(r.wall_seconds < 5.0, "{subscriptions} subscriptions");
    }
}

/// Socket calls return WASI's errnos: EBADF (8) for a descriptor that is not open, ENOTSOCK
/// (57) for one that is not a socket (fd 3 is `/in`).
#[tokio::test(flavor = "multi_thread")]
async fn sock_shutdown_errnos() {
    for (fd, errno) in [(99, 8), (3, 57), (1, 57)] {
        let r = wat_task(
            &format!(
                r#"(module
                  (import "wasi_snapshot_preview1" "sock_shutdown" (func $shutdown (param i32 i32) (result i32)))
                  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                  (memory (export "memory") 1)
                  (func (export "_start")
                    (call $exit (call $shutdown (i32.const {fd}) (i32.const 1)))))"#
            ),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(
            reason(&r),
            format!("exit: {errno}"),
            "sock_shutdown on fd {fd}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_bomb_hits_the_memory_limit() {
    let (r, _) = hostile("memory-bomb").await;
    assert_eq!(reason(&r), "limit: memory");
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_grow_loop_fails_inside_the_guest_and_hits_the_memory_limit() {
    // memory.grow returns -1 past the limit (the host does not abort); the guest then traps.
    let r = wat_task(
        r#"(module (memory 1)
            (func (export "_start")
              (loop (br_if 0 (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
              unreachable))"#,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(reason(&r), "limit: memory");
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_initial_memory_is_refused_before_running() {
    let r = wat_task(
        r#"(module (memory 65536) (func (export "_start")))"#,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(r.outcome.status(), grid_proto::TaskStatus::Refused);
    assert!(
        reason(&r).starts_with("invalid: declared minimum memory"),
        "{}",
        reason(&r)
    );
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_table_is_refused_before_running() {
    let r = wat_task(
        r#"(module (table 10000000 funcref) (func (export "_start")))"#,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        reason(&r).starts_with("invalid: declared minimum table size"),
        "{}",
        reason(&r)
    );
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn table_grow_loop_hits_the_table_limit() {
    let r = wat_task(
        r#"(module (table 1 funcref)
            (func (export "_start")
              (loop (br_if 0 (i32.ne (table.grow (ref.null func) (i32.const 10000)) (i32.const -1))))
              unreachable))"#,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(reason(&r), "limit: table");
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_recursion_is_a_stack_overflow_trap() {
    let r = wat_task(
        r#"(module (func $f (export "_start") (call $f)))"#,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(reason(&r), "trap: stack overflow");
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_is_a_trap() {
    let r = wat_task(
        r#"(module (func (export "_start") unreachable))"#,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(reason(&r), "trap: unreachable");
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_guest_is_a_trap_with_its_message_in_stderr() {
    let (r, _) = hostile("panic").await;
    assert_eq!(reason(&r), "trap: unreachable");
    assert!(String::from_utf8_lossy(&r.stderr).contains("the guest panicked on purpose"));
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn non_zero_exit_is_reported_with_its_code() {
    let dirs = TaskDirs::new();
    let r = run_task(&guest_bytes("hostile"), &dirs, |s| {
        s.args = vec!["exit".into(), "7".into()]
    })
    .await;
    assert_eq!(reason(&r), "exit: 7");
    assert_eq!(r.outcome.exit_code(), Some(7));
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_fill_stops_at_the_output_limit_and_leaves_nothing() {
    let (r, dirs) = hostile("disk-fill").await;
    assert_eq!(reason(&r), "limit: output");
    assert_eq!(
        r.bytes_out, 0,
        "a task over its output limit leaves an empty /out"
    );
    assert_eq!(std::fs::read_dir(dirs.output()).unwrap().count(), 0);
    assert!(r.out_empty, "emptied, and said so");
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_write_larger_than_the_quota_is_refused_before_it_reaches_the_disk() {
    let (r, _) = hostile("one-big-write").await;
    assert_eq!(reason(&r), "limit: output");
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sparse_file_past_the_quota_hits_the_output_limit() {
    let (r, dirs) = hostile("sparse-seek").await;
    assert_eq!(reason(&r), "limit: output");
    assert_eq!(
        grid_sandbox::outputs::measure(&dirs.output())
            .unwrap()
            .bytes,
        0
    );
    assert_a_good_task_runs().await;
}

/// 16 MiB and 10,000 entries: room for trees of a few hundred folders.
fn output_limits() -> Limits {
    Limits {
        max_output_bytes: 16 << 20,
        max_output_files: 10_000,
        timeout: Duration::from_secs(30),
        ..small_limits()
    }
}

/// Runs `hostile ARGS…` with `limits`, after the common checks.
async fn hostile_with(args: &[&str], limits: Limits) -> (grid_sandbox::TaskReport, TaskDirs) {
    let dirs = TaskDirs::new();
    let report = run_task(&guest_bytes("hostile"), &dirs, |s| {
        s.args = args.iter().map(|a| a.to_string()).collect();
        s.limits = limits;
    })
    .await;
    dirs.assert_nothing_outside_out();
    (report, dirs)
}

#[tokio::test(flavor = "multi_thread")]
async fn files_hidden_past_path_max_count_against_the_output_limit() {
    // 30 folders of 200-byte names (paths of 6 KB at the bottom, past PATH_MAX), then 64 MiB
    // there in files of 4 MiB, each closed before the next.
    let (r, dirs) = hostile_with(&["deep-nest", "30", "200", "64"], output_limits()).await;
    assert_eq!(
        reason(&r),
        "limit: output",
        "stdout: {}",
        String::from_utf8_lossy(&r.stdout)
    );
    assert_eq!(r.bytes_out, 0);
    // The limit plus its slack at most while it ran; nothing once it ended.
    assert_eq!(
        grid_sandbox::outputs::measure(&dirs.output()).unwrap(),
        grid_sandbox::outputs::Measured::default(),
        "a task over its output limit leaves an empty /out"
    );
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tree_deeper_than_the_walk_goes_is_over_the_output_limit() {
    let deeper = (grid_sandbox::tree::MAX_DEPTH + 10).to_string();
    let (r, dirs) = hostile_with(&["deep-nest", deeper.as_str(), "1", "0"], output_limits()).await;
    assert_eq!(reason(&r), "limit: output");
    assert_eq!(std::fs::read_dir(dirs.output()).unwrap().count(), 0);

    // Within the walk's depth and the 4096 bytes a result may name, a deep tree is a result.
    let (r, dirs) = hostile_with(&["deep-nest", "10", "200", "8"], output_limits()).await;
    assert_eq!(reason(&r), "succeeded");
    assert_eq!(r.bytes_out, 8 << 20);
    assert!(!r.out_empty);
    // Folders without a byte in them are not an empty /out either: the node empties it.
    let (r, folders) = hostile_with(&["deep-nest", "3", "10", "0"], output_limits()).await;
    assert_eq!(reason(&r), "succeeded");
    assert_eq!(r.bytes_out, 0);
    assert!(
        !r.out_empty,
        "{:?}",
        std::fs::read_dir(folders.output()).unwrap().count()
    );
    let files = grid_sandbox::outputs::manifest(&dirs.output()).unwrap();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| f.path.len() > 2000 && f.bytes == 4 << 20)
    );
    assert_a_good_task_runs().await;
}

/// Needs `path_link` within `/out` (refused with EPERM before hard links were allowed there).
#[tokio::test(flavor = "multi_thread")]
async fn a_hard_linked_file_counts_once_against_the_output_limit() {
    // 4 MiB under six names, a 10 MiB file written and removed, then 8 MiB: the walk the
    // stale 10 MiB calls for must count the linked file once (4 + 8), not six times (24 + 8).
    let (r, dirs) = hostile_with(&["hard-links"], output_limits()).await;
    assert_eq!(
        reason(&r),
        "succeeded",
        "stderr: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(r.bytes_out, 12 << 20);
    let files = grid_sandbox::outputs::manifest(&dirs.output()).unwrap();
    assert_eq!(
        files.len(),
        7,
        "data.bin, its five other names and more.bin"
    );
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn set_len_past_the_quota_hits_the_output_limit() {
    let (r, _) = hostile("set-len").await;
    assert_eq!(reason(&r), "limit: output");
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn millions_of_files_stop_at_the_files_limit() {
    let (r, _) = hostile("many-files").await;
    assert_eq!(reason(&r), "limit: files");
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn directory_bomb_stops_at_the_files_limit() {
    let (r, _) = hostile("many-dirs").await;
    assert_eq!(reason(&r), "limit: files");
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rewriting_one_file_many_times_is_not_counted_as_many_files() {
    let (r, dirs) = hostile("rewrite-one-file").await;
    assert_eq!(reason(&r), "succeeded");
    assert_eq!(
        std::fs::read_to_string(dirs.output().join("state.txt"))
            .unwrap()
            .len(),
        1000
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn too_many_open_files_hits_the_open_files_limit() {
    let (r, _) = hostile("open-files").await;
    assert_eq!(reason(&r), "limit: open-files");
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stdout_flood_is_truncated_and_marked_not_fatal() {
    let dirs = TaskDirs::new();
    let r = run_task(&guest_bytes("hostile"), &dirs, |s| {
        s.args = vec!["stdout-flood".into()]
    })
    .await;
    assert_eq!(reason(&r), "succeeded");
    assert!(r.logs_truncated);
    assert_eq!(r.stdout.len() as u64, Limits::default().max_log_bytes);
    assert_eq!(r.stderr, b"done\n", "the guest went on after the cap");
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn host_paths_with_dotdot_cannot_be_read_or_written() {
    let (r, _) = hostile("escape").await;
    assert_eq!(
        reason(&r),
        "succeeded",
        "escapes: {}",
        String::from_utf8_lossy(&r.stdout)
    );
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inputs_cannot_be_linked_moved_or_removed() {
    let (r, _) = hostile("links-from-in").await;
    assert_eq!(
        reason(&r),
        "succeeded",
        "escapes: {}",
        String::from_utf8_lossy(&r.stdout)
    );
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn symlinks_cannot_point_out_of_out_and_are_not_followed() {
    let (r, dirs) = hostile("symlinks").await;
    assert_eq!(
        reason(&r),
        "succeeded",
        "links made: {}",
        String::from_utf8_lossy(&r.stdout)
    );
    assert!(
        dirs.output()
            .join("alias.txt")
            .symlink_metadata()
            .unwrap()
            .is_symlink()
    );
    let manifest = grid_sandbox::outputs::manifest(&dirs.output()).unwrap();
    let paths: Vec<&str> = manifest.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["real.txt"], "links are never collected as files");
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_guest_sees_only_its_own_env() {
    let dirs = TaskDirs::new();
    // SAFETY: tests in this binary do not read this variable concurrently.
    unsafe { std::env::set_var("GRID_TEST_SANDBOX_SECRET", "must-not-leak") };
    let r = run_task(&guest_bytes("hostile"), &dirs, |s| {
        s.args = vec!["env".into()];
        s.env = vec![
            ("MY_VAR".into(), "1".into()),
            ("GRID_SEED".into(), "spoofed".into()),
        ];
    })
    .await;
    let stdout = String::from_utf8(r.stdout).unwrap();
    let mut names: Vec<&str> = stdout
        .lines()
        .map(|l| l.split('=').next().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "GRID_ATTEMPT",
            "GRID_JOB_ID",
            "GRID_SEED",
            "GRID_TASK_COUNT",
            "GRID_TASK_INDEX",
            "MY_VAR"
        ]
    );
    assert!(
        !stdout.contains("spoofed"),
        "GRID_* is set by the sandbox, not the job"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn in_is_read_only_and_stdin_and_args_arrive() {
    let dirs = TaskDirs::new();
    let r = run_task(&guest_bytes("hostile"), &dirs, |s| {
        s.args = vec!["read-input".into(), "extra".into()];
        s.stdin = b"{\"k\":1}".to_vec();
    })
    .await;
    let stdout = String::from_utf8(r.stdout.clone()).unwrap();
    assert_eq!(reason(&r), "succeeded", "{stdout}");
    assert!(stdout.contains("data.txt: input data"));
    assert!(stdout.contains("write to /in denied: true"));
    assert!(stdout.contains("stdin: {\"k\":1}"));
    assert!(
        stdout.contains(r#"args: ["job.wasm", "read-input", "extra"]"#),
        "{stdout}"
    );
    dirs.assert_nothing_outside_out();
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_import_is_refused_and_named() {
    let r = wat_task(
        r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        reason(&r).starts_with("invalid: unknown import env::launch_missiles"),
        "{}",
        reason(&r)
    );
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wasi_import_of_the_wrong_type_is_refused() {
    let r = wat_task(
        r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32)))
                   (memory (export "memory") 1) (func (export "_start")))"#,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        r.outcome.status(),
        grid_proto::TaskStatus::Refused,
        "{}",
        reason(&r)
    );
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_empty_and_truncated_bytes_are_refused() {
    let good = guest_bytes("monte-carlo-pi");
    let cases: [(&[u8], &str); 4] = [
        (b"", "invalid: empty module"),
        (
            b"#!/bin/sh\nrm -rf /\n",
            "invalid: not a WebAssembly module",
        ),
        (
            &good[..good.len() / 2],
            "invalid: malformed or truncated module",
        ),
        (b"\0asm\x0d\0\x01\0", "invalid: a component"),
    ];
    for (bytes, want) in cases {
        let dirs = TaskDirs::new();
        let r = run_task(bytes, &dirs, |_| {}).await;
        assert!(
            reason(&r).starts_with(want),
            "got {:?}, want {want:?}",
            reason(&r)
        );
    }
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_memory_is_refused() {
    let r = wat_task(
        r#"(module (memory 1 1 shared) (func (export "_start")))"#,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        reason(&r).starts_with("invalid: shared memory"),
        "{}",
        reason(&r)
    );
    assert_a_good_task_runs().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_library_without_start_is_refused() {
    let r = wat_task(r#"(module (func (export "run")))"#, Duration::from_secs(5)).await;
    assert!(
        reason(&r).starts_with("invalid: no `_start` export"),
        "{}",
        reason(&r)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_over_the_size_cap_is_refused_before_parsing() {
    // A valid module whose custom section makes it 65 MiB, over the 64 MiB default cap.
    let mut bytes = wat(r#"(module (func (export "_start")))"#);
    let payload = 65usize << 20;
    bytes.push(0); // custom section id
    let mut len = payload + 2;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        bytes.push(if len == 0 { byte } else { byte | 0x80 });
        if len == 0 {
            break;
        }
    }
    bytes.extend_from_slice(&[1, b'x']);
    bytes.resize(bytes.len() + payload, 0);
    let dirs = TaskDirs::new();
    let r = run_task(&bytes, &dirs, |_| {}).await;
    assert!(
        reason(&r).contains("over the cap of 67108864 bytes"),
        "{}",
        reason(&r)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn many_hostile_tasks_at_once_share_one_engine() {
    let modes = [
        "memory-bomb",
        "disk-fill",
        "escape",
        "spin",
        "many-files",
        "stdout-flood",
    ];
    let runs = modes.iter().map(|m| hostile(m));
    let reports = futures_join_all(runs).await;
    let reasons: Vec<String> = reports.iter().map(|(r, _)| reason(r)).collect();
    assert_eq!(
        reasons,
        [
            "limit: memory",
            "limit: output",
            "succeeded",
            "limit: time",
            "limit: files",
            "succeeded"
        ]
    );
    assert_a_good_task_runs().await;
}

async fn futures_join_all<F: Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task did not panic"));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn deterministic_mode_gives_the_same_bytes_twice() {
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let dirs = TaskDirs::new();
        let r = run_task(&guest_bytes("hostile"), &dirs, |s| {
            s.args = vec!["random".into()];
            s.seed = 42;
        })
        .await;
        assert_eq!(reason(&r), "succeeded");
        outputs.push((
            r.stdout,
            std::fs::read(dirs.output().join("random.txt")).unwrap(),
        ));
    }
    assert_eq!(outputs[0], outputs[1]);
    let stdout = String::from_utf8_lossy(&outputs[0].0);
    assert!(
        stdout.contains("946684800s"),
        "the wall clock is fixed: {stdout}"
    );

    let dirs = TaskDirs::new();
    let other_seed = run_task(&guest_bytes("hostile"), &dirs, |s| {
        s.args = vec!["random".into()];
        s.seed = 43;
    })
    .await;
    assert_ne!(
        other_seed.stdout, outputs[0].0,
        "the seed drives the randomness"
    );
}
