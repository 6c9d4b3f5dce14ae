//! hostile: a guest that misbehaves on purpose, one behaviour per first argument.
//! The sandbox tests run it with each mode and assert how the task ends.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "disk-fill" => {
            let mut f = File::create("/out/fill.bin").unwrap();
            let chunk = vec![7u8; 1 << 20];
            loop {
                f.write_all(&chunk).unwrap();
            }
        }
        "one-big-write" => {
            // A single write larger than the whole quota: nothing of it may reach the disk.
            let mut f = File::create("/out/big.bin").unwrap();
            f.write_all(&vec![1u8; 24 << 20]).unwrap();
        }
        "sparse-seek" => {
            let mut f = File::create("/out/sparse.bin").unwrap();
            f.seek(SeekFrom::Start(100 << 30)).unwrap();
            f.write_all(b"x").unwrap();
        }
        "set-len" => {
            let f = File::create("/out/huge.bin").unwrap();
            f.set_len(100 << 30).unwrap();
        }
        "many-files" => {
            for i in 0.. {
                File::create(format!("/out/f{i}")).unwrap();
            }
        }
        "many-dirs" => {
            for i in 0.. {
                fs::create_dir(format!("/out/d{i}")).unwrap();
            }
        }
        "deep-nest" => {
            // Folders LEVELS deep with names NAME_LEN bytes long, each made and opened through
            // its parent's handle (a path stops resolving at PATH_MAX, a handle never does),
            // then MIB mebibytes at the bottom, in files of 4 MiB each closed before the next.
            let arg = |i: usize, default: u64| -> u64 {
                std::env::args()
                    .nth(i)
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(default)
            };
            let (levels, name_len, mib) = (arg(2, 30), arg(3, 200), arg(4, 64));
            let name = "d".repeat(name_len as usize);
            let mut dir = at::OUT;
            for _ in 0..levels {
                at::mkdir(dir, &name).unwrap();
                let inner = at::open_dir(dir, &name).unwrap();
                if dir != at::OUT {
                    at::close(dir);
                }
                dir = inner;
            }
            let chunk = vec![7u8; 1 << 20];
            for part in 0..mib.div_ceil(4) {
                let file = at::create(dir, &format!("part{part}")).unwrap();
                for _ in 0..(mib - 4 * part).min(4) {
                    at::write_all(file, &chunk).unwrap();
                }
                at::close(file);
            }
            println!("wrote {mib} MiB {levels} folders down");
        }
        "hard-links" => {
            // 4 MiB under six names; 10 MiB written and removed; then 8 MiB. 12 MiB are left,
            // in files that a listing by name would count as 32.
            fs::write("/out/data.bin", vec![3u8; 4 << 20]).unwrap();
            for i in 0..5 {
                fs::hard_link("/out/data.bin", format!("/out/link{i}.bin")).unwrap();
            }
            fs::write("/out/scratch.bin", vec![5u8; 10 << 20]).unwrap();
            fs::remove_file("/out/scratch.bin").unwrap();
            fs::write("/out/more.bin", vec![4u8; 8 << 20]).unwrap();
        }
        "rewrite-one-file" => {
            // Rewriting one small file many times stays within any sensible quota.
            for i in 0..2000 {
                fs::write("/out/state.txt", format!("{i:0>1000}")).unwrap();
            }
        }
        "open-files" => {
            File::create("/out/a").unwrap();
            let mut keep = Vec::new();
            loop {
                keep.push(File::open("/out/a").unwrap());
            }
        }
        "escape" => {
            // Every attempt must fail; the exit code counts the ones that did not.
            let mut escaped = 0;
            for path in [
                "/etc/passwd",
                "/in/../../etc/passwd",
                "../etc/passwd",
                "/proc/self/environ",
                "/out/../../etc/hostname",
            ] {
                if fs::read(path).is_ok() {
                    println!("read {path}");
                    escaped += 1;
                }
            }
            for path in [
                "/out/../escaped.txt",
                "/in/escaped.txt",
                "/escaped.txt",
                "/tmp/escaped.txt",
                "/out/../../escaped.txt",
            ] {
                if fs::write(path, b"escaped").is_ok() {
                    println!("wrote {path}");
                    escaped += 1;
                }
            }
            std::process::exit(escaped);
        }
        "links-from-in" => {
            // A hard link or a rename of an input into /out would make it writable.
            let mut escaped = 0;
            if fs::hard_link("/in/data.txt", "/out/stolen.txt").is_ok() {
                println!("hard-linked /in/data.txt");
                escaped += 1;
                if fs::write("/out/stolen.txt", b"overwritten").is_ok() {
                    println!("wrote through the link");
                }
            }
            if fs::rename("/in/data.txt", "/out/moved.txt").is_ok() {
                println!("moved /in/data.txt");
                escaped += 1;
            }
            if fs::remove_file("/in/data.txt").is_ok() {
                println!("removed /in/data.txt");
                escaped += 1;
            }
            std::process::exit(escaped);
        }
        "symlinks" => {
            let mut made = 0;
            for target in ["/etc/passwd", "../../../etc/passwd", "..", "../in"] {
                if symlink(target, &format!("link{made}")) {
                    println!("linked to {target}");
                    made += 1;
                }
            }
            fs::write("/out/real.txt", b"data").unwrap();
            assert!(
                symlink("real.txt", "alias.txt"),
                "a contained link must be allowed"
            );
            // Writing through an escaping link must not be possible either.
            if made > 0 && fs::write("/out/link0", b"x").is_ok() {
                made += 1;
            }
            std::process::exit(made);
        }
        "env" => {
            for (k, v) in std::env::vars() {
                println!("{k}={v}");
            }
        }
        "stdout-flood" => {
            let line = "x".repeat(1023) + "\n";
            let mut out = std::io::stdout().lock();
            for _ in 0..(16 * 1024) {
                out.write_all(line.as_bytes()).unwrap();
            }
            eprintln!("done");
        }
        "terminal-escapes" => {
            // What a terminal would obey: CSI and OSC sequences, BEL, CR, C1 CSI as UTF-8 and
            // as a lone byte, and bytes that are not UTF-8. Kept equal to GUEST_STDOUT and
            // GUEST_STDERR in tests/all/grid.rs, which expect them back byte for byte.
            std::io::stdout()
                .write_all(b"plain\tline\n\x1b[31mred\x1b[0m \x1b]0;title\x07 \xc2\x9b2J \x9b \xff\xfe fake\rreal\n")
                .unwrap();
            std::io::stderr().write_all(b"\x1b[2Kerr\x07\n").unwrap();
        }
        "sleep" => std::thread::sleep(std::time::Duration::from_secs(3600)),
        "spin" => {
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "alloc" => {
            // Holds arg 2 MiB at once, then writes how many to /out.
            let mib: usize = std::env::args()
                .nth(2)
                .and_then(|m| m.parse().ok())
                .unwrap_or(1);
            let held: Vec<Vec<u8>> = (0..mib).map(|_| vec![1u8; 1 << 20]).collect();
            fs::write("/out/held.txt", held.len().to_string()).unwrap();
        }
        "memory-bomb" => {
            let mut keep: Vec<Vec<u8>> = Vec::new();
            loop {
                keep.push(vec![1u8; 1 << 20]);
            }
        }
        "random" => {
            let mut bytes = [0u8; 16];
            File::open("/dev/urandom")
                .map(|mut f| f.read_exact(&mut bytes))
                .ok();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            let mono = std::time::Instant::now();
            let hash = std::collections::hash_map::RandomState::new();
            use std::hash::BuildHasher;
            println!("{}", hash.hash_one(42u32));
            println!("{now:?} {:?}", mono.elapsed());
            fs::write(
                "/out/random.txt",
                format!("{} {}", hash.hash_one(7u32), now.as_nanos()),
            )
            .unwrap();
        }
        "read-input" => {
            let mut names: Vec<String> = fs::read_dir("/in")
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            for name in names {
                let text = fs::read_to_string(format!("/in/{name}")).unwrap();
                println!("{name}: {text}");
            }
            let denied = OpenOptions::new()
                .append(true)
                .open("/in/data.txt")
                .is_err();
            println!("write to /in denied: {denied}");
            let mut stdin = String::new();
            std::io::stdin().read_to_string(&mut stdin).unwrap();
            println!("stdin: {stdin}");
            println!("args: {:?}", std::env::args().collect::<Vec<_>>());
        }
        "show-inputs" => {
            // Prints every file under /in, sorted, as `path: content`.
            let mut stack = vec![std::path::PathBuf::from("/in")];
            let mut lines = Vec::new();
            while let Some(dir) = stack.pop() {
                for entry in fs::read_dir(&dir).unwrap() {
                    let path = entry.unwrap().path();
                    if path.is_dir() {
                        stack.push(path);
                    } else {
                        lines.push(format!(
                            "{}: {}",
                            path.display(),
                            fs::read_to_string(&path).unwrap()
                        ));
                    }
                }
            }
            lines.sort();
            for line in lines {
                println!("{line}");
            }
        }
        "gpu-double" => {
            // Doubles 0..n on the GPU, or says it had to fall back to the CPU.
            use grid_guest::gpu::Gpu;
            let n = 4096u32;
            let values: Vec<u32> = (0..n).collect();
            match Gpu::open() {
                Err(e) if e.is_unavailable() => {
                    let doubled: u64 = values.iter().map(|v| u64::from(*v) * 2).sum();
                    println!("cpu fallback: {doubled}");
                }
                Err(e) => panic!("{e}"),
                Ok(gpu) => {
                    let xs = gpu.buffer_from(&values).unwrap();
                    let k = gpu
                        .kernel(
                            "@group(0) @binding(0) var<storage, read_write> xs: array<u32>;\n\
                             @compute @workgroup_size(64) fn main(@builtin(global_invocation_id) id: vec3<u32>) {\n\
                             if (id.x < arrayLength(&xs)) { xs[id.x] = xs[id.x] * 2u; } }",
                            "main",
                        )
                        .unwrap();
                    k.dispatch(&[&xs], [n / 64, 1, 1]).unwrap();
                    let out = xs.read_u32().unwrap();
                    assert!(out.iter().enumerate().all(|(i, v)| *v == 2 * i as u32));
                    println!("gpu: {}", out.iter().map(|v| u64::from(*v)).sum::<u64>());
                }
            }
        }
        "gpu-spin" => {
            // Hours of GPU work in one dispatch: a million workgroups of invocations that each
            // loop as long as lavapipe lets them (on a real GPU, forever).
            let gpu = grid_guest::gpu::Gpu::open().unwrap();
            let xs = gpu.buffer(64).unwrap();
            let k = gpu
                .kernel(
                    "@group(0) @binding(0) var<storage, read_write> xs: array<u32>;\n\
                     @compute @workgroup_size(64) fn main(@builtin(global_invocation_id) id: vec3<u32>) {\n\
                     var acc = id.x;\n\
                     loop { acc = acc * 1664525u + 1013904223u; if (acc == 7u) { break; } }\n\
                     xs[id.x % 16u] = acc; }",
                    "main",
                )
                .unwrap();
            fs::write("/out/dispatching", b"").unwrap();
            k.dispatch(&[&xs], [65_535, 16, 1]).unwrap();
            println!("the GPU finished");
        }
        "gpu-hold" => {
            // Makes a GPU buffer (with arg 2 `none`: makes one and frees it again), says so in
            // /out/holding, waits for /in/release, then uses the GPU.
            use grid_guest::gpu::Gpu;
            let gpu = Gpu::open().unwrap();
            let mut xs = Some(gpu.buffer_from(&[1u32, 2, 3, 4]).unwrap());
            if std::env::args().nth(2).as_deref() == Some("none") {
                xs = None;
            }
            fs::write("/out/holding", b"").unwrap();
            for _ in 0..1200 {
                if fs::metadata("/in/release").is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let xs = match xs {
                Some(xs) => xs,
                None => gpu.buffer_from(&[1u32, 2, 3, 4]).unwrap(),
            };
            println!("read {:?}", xs.read_u32().unwrap());
        }
        "gpu-objects-bomb" => {
            let gpu = grid_guest::gpu::Gpu::open().unwrap();
            let mut keep = Vec::new();
            loop {
                keep.push(gpu.buffer(4).unwrap());
            }
        }
        "gpu-bad-calls" => {
            // Wild pointers, bad handles, bad WGSL: each a clean status, never a crash.
            use grid_guest::gpu::Gpu;
            let gpu = Gpu::open().unwrap();
            let b = gpu.buffer(16).unwrap();
            assert_eq!(
                b.write(0, &[0u8; 32]).unwrap_err().status,
                2,
                "write past the end"
            );
            assert_eq!(gpu.kernel("not wgsl", "main").unwrap_err().status, 3);
            wild_gpu_calls();
            println!("all refused");
        }
        "flaky" => {
            // Runs past its time limit on its first two attempts (a failure that can change, so
            // it is retried), succeeds on the third.
            let attempt: u32 = std::env::var("GRID_ATTEMPT").unwrap().parse().unwrap();
            if attempt < 2 {
                eprintln!("stuck on attempt {attempt}");
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
            fs::write("/out/attempt.txt", attempt.to_string()).unwrap();
        }
        "odd-fail-first" => {
            // Odd tasks fail on attempt 0 and succeed on any later one; even tasks succeed.
            let attempt: u32 = std::env::var("GRID_ATTEMPT").unwrap().parse().unwrap();
            let index: u64 = std::env::var("GRID_TASK_INDEX").unwrap().parse().unwrap();
            if index % 2 == 1 && attempt == 0 {
                eprintln!("task {index} failing on attempt 0");
                std::process::exit(9);
            }
            fs::write("/out/attempt.txt", attempt.to_string()).unwrap();
        }
        "csv-parts" => {
            // Three tables with one header, written out of path order, one in a folder: what
            // `grid results --concat` joins (a task's files in path order, the header once).
            let index = std::env::var("GRID_TASK_INDEX").unwrap();
            fs::write("/out/part-b.csv", format!("task,part\n{index},b\n")).unwrap();
            fs::write("/out/part-a.csv", format!("task,part\n{index},a\n")).unwrap();
            fs::create_dir("/out/sub").unwrap();
            fs::write("/out/sub/part-c.csv", format!("task,part\n{index},c\n")).unwrap();
        }
        mode @ ("nap" | "nap-first") => {
            // A short task that takes real time: arg 2 is milliseconds. `nap-first` naps on
            // attempt 0 only: a long task whose retry is quick.
            let attempt: u32 = std::env::var("GRID_ATTEMPT").unwrap().parse().unwrap();
            if mode == "nap" || attempt == 0 {
                let ms: u64 = std::env::args()
                    .nth(2)
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(200);
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            let index = std::env::var("GRID_TASK_INDEX").unwrap();
            fs::write("/out/index.txt", index).unwrap();
        }
        "exit" => std::process::exit(
            std::env::args()
                .nth(2)
                .and_then(|c| c.parse().ok())
                .unwrap_or(3),
        ),
        "panic" => panic!("the guest panicked on purpose"),
        "noisy-panic" => {
            // A megabyte of stderr (several object chunks), then a panic.
            let line = "y".repeat(1023) + "\n";
            let mut err = std::io::stderr().lock();
            for _ in 0..1024 {
                err.write_all(line.as_bytes()).unwrap();
            }
            drop(err);
            panic!("the guest panicked on purpose");
        }
        other => {
            eprintln!("hostile: unknown mode {other:?}");
            std::process::exit(64);
        }
    }
}

/// `path_symlink` relative to `/out` (preopen fd 4: the sandbox opens /in, then /out).
#[cfg(target_os = "wasi")]
fn symlink(target: &str, link: &str) -> bool {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    unsafe extern "C" {
        fn path_symlink(
            old: *const u8,
            old_len: usize,
            fd: u32,
            new: *const u8,
            new_len: usize,
        ) -> u16;
    }
    // SAFETY: pointers and lengths come from live &str values.
    unsafe { path_symlink(target.as_ptr(), target.len(), 4, link.as_ptr(), link.len()) == 0 }
}

#[cfg(not(target_os = "wasi"))]
fn symlink(_target: &str, _link: &str) -> bool {
    false
}

/// Preview 1 calls on handles (`path_create_directory`, `path_open`, `fd_write` relative to an
/// open folder), for trees whose paths pass PATH_MAX. Errors are WASI errno values.
#[cfg(target_os = "wasi")]
mod at {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    unsafe extern "C" {
        fn path_create_directory(fd: i32, path: i32, path_len: i32) -> i32;
        fn path_open(
            fd: i32,
            dirflags: i32,
            path: i32,
            path_len: i32,
            oflags: i32,
            rights_base: i64,
            rights_inheriting: i64,
            fdflags: i32,
            opened: i32,
        ) -> i32;
        fn fd_write(fd: i32, iovs: i32, iovs_len: i32, written: i32) -> i32;
        fn fd_close(fd: i32) -> i32;
    }

    /// `/out`: the sandbox preopens `/in` (fd 3), then `/out`.
    pub const OUT: i32 = 4;
    const OFLAGS_CREAT: i32 = 1;
    const OFLAGS_DIRECTORY: i32 = 2;
    const OFLAGS_TRUNC: i32 = 8;
    const RIGHTS_FD_READ: i64 = 1 << 1;
    const RIGHTS_FD_WRITE: i64 = 1 << 6;

    fn ok(errno: i32) -> Result<(), i32> {
        if errno == 0 { Ok(()) } else { Err(errno) }
    }

    pub fn mkdir(dir: i32, name: &str) -> Result<(), i32> {
        // SAFETY: the pointer and length come from a live &str.
        ok(unsafe { path_create_directory(dir, name.as_ptr() as i32, name.len() as i32) })
    }

    fn open(dir: i32, name: &str, oflags: i32, rights: i64) -> Result<i32, i32> {
        let mut fd = 0u32;
        // SAFETY: the pointers come from a live &str and a live u32.
        ok(unsafe {
            path_open(
                dir,
                0,
                name.as_ptr() as i32,
                name.len() as i32,
                oflags,
                rights,
                rights,
                0,
                &mut fd as *mut u32 as i32,
            )
        })?;
        Ok(fd as i32)
    }

    pub fn open_dir(dir: i32, name: &str) -> Result<i32, i32> {
        open(dir, name, OFLAGS_DIRECTORY, RIGHTS_FD_READ)
    }

    pub fn create(dir: i32, name: &str) -> Result<i32, i32> {
        open(
            dir,
            name,
            OFLAGS_CREAT | OFLAGS_TRUNC,
            RIGHTS_FD_READ | RIGHTS_FD_WRITE,
        )
    }

    pub fn write_all(fd: i32, mut bytes: &[u8]) -> Result<(), i32> {
        while !bytes.is_empty() {
            // One ciovec: the buffer's address and length.
            let iov = [bytes.as_ptr() as i32, bytes.len() as i32];
            let mut written = 0u32;
            // SAFETY: the pointers come from a live slice, array and u32.
            ok(unsafe { fd_write(fd, iov.as_ptr() as i32, 1, &mut written as *mut u32 as i32) })?;
            bytes = bytes.get(written as usize..).unwrap_or_default();
        }
        Ok(())
    }

    pub fn close(fd: i32) {
        // SAFETY: closing a handle has no memory effects.
        unsafe {
            fd_close(fd);
        }
    }
}

/// Off WASI (the workspace's host build of this crate), every call fails with ENOTSUP.
#[cfg(not(target_os = "wasi"))]
mod at {
    pub const OUT: i32 = 4;
    const ENOTSUP: i32 = 58;

    pub fn mkdir(_dir: i32, _name: &str) -> Result<(), i32> {
        Err(ENOTSUP)
    }

    pub fn open_dir(_dir: i32, _name: &str) -> Result<i32, i32> {
        Err(ENOTSUP)
    }

    pub fn create(_dir: i32, _name: &str) -> Result<i32, i32> {
        Err(ENOTSUP)
    }

    pub fn write_all(_fd: i32, _bytes: &[u8]) -> Result<(), i32> {
        Err(ENOTSUP)
    }

    pub fn close(_fd: i32) {}
}

/// Raw `grid_gpu_v1` calls with pointers and lengths outside memory and foreign handles.
#[cfg(target_os = "wasi")]
fn wild_gpu_calls() {
    use grid_guest::gpu::abi::{buffer_create, buffer_read, destroy, dispatch, kernel_create};
    let wild = usize::MAX - 16;
    // SAFETY: the host must refuse these without touching the pointers.
    unsafe {
        assert_eq!(buffer_create(16, wild as *mut u32), 2);
        let mut h = 0;
        assert_eq!(buffer_create(16, &mut h), 0);
        assert_eq!(buffer_read(h, 0, wild as *mut u8, 16), 2);
        assert_eq!(
            buffer_read(h, 0, std::ptr::null_mut::<u8>().wrapping_add(8), u32::MAX),
            2
        );
        assert_eq!(
            kernel_create(wild as *const u8, 100, wild as *const u8, 4, &mut h),
            2
        );
        assert_eq!(dispatch(12345, wild as *const u32, 3, 1, 1, 1), 2);
        assert_eq!(destroy(999_999), 1, "a handle this task never had");
        assert_eq!(destroy(h), 0);
        assert_eq!(destroy(h), 1, "use after destroy");
    }
}

#[cfg(not(target_os = "wasi"))]
fn wild_gpu_calls() {}
