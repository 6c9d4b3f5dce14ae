//! `grid run` as scripts use it: the JSON line, exit codes, one-line errors.

use crate::support::*;

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn json_line_has_every_field_of_the_contract() {
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("o");
    let (v, code) = grid_run_json(
        &[path(&guest("synth-data")), "--output", path(&target)],
        br#"{"rows": 3}"#,
    );
    assert_eq!(code, 0);
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut want = [
        "status",
        "exit_code",
        "reason",
        "cpu_seconds",
        "wall_seconds",
        "bytes_out",
        "output_dir",
        "stdout",
        "stderr",
        "logs_truncated",
    ];
    want.sort();
    let mut keys = keys;
    keys.sort();
    assert_eq!(keys, want);
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["exit_code"], 0);
    assert!(v["reason"].is_null());
    assert_eq!(v["stdout"], "wrote 3 rows to part-00000.csv\n");
    assert_eq!(v["logs_truncated"], false);
    assert!(v["wall_seconds"].as_f64().unwrap() > 0.0);
    let csv = std::fs::read_to_string(target.join("part-00000.csv")).unwrap();
    assert_eq!(v["bytes_out"].as_u64().unwrap(), csv.len() as u64);
    assert_eq!(
        v["output_dir"],
        target.canonicalize().unwrap().to_str().unwrap()
    );
}

#[test]
fn a_failed_task_exits_1_with_its_reason() {
    let (v, code) = grid_run_json(
        &[
            path(&guest("hostile")),
            "--memory",
            "32MiB",
            "--",
            "memory-bomb",
        ],
        b"",
    );
    assert_eq!(code, 1);
    assert_eq!(v["status"], "failed");
    assert_eq!(v["reason"], "limit: memory");
    assert!(v["exit_code"].is_null());
}

#[test]
fn timeout_takes_a_human_duration() {
    let (v, code) = grid_run_json(
        &[path(&guest("hostile")), "--timeout", "300ms", "--", "sleep"],
        b"",
    );
    assert_eq!(code, 1);
    assert_eq!(v["reason"], "limit: time");
    assert!(v["wall_seconds"].as_f64().unwrap() < 5.0);
}

#[test]
fn max_output_takes_a_human_size() {
    let (v, code) = grid_run_json(
        &[
            path(&guest("hostile")),
            "--max-output",
            "2MiB",
            "--",
            "disk-fill",
        ],
        b"",
    );
    assert_eq!(code, 1);
    assert_eq!(v["reason"], "limit: output");
}

#[test]
fn a_refused_module_exits_1_with_status_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, b"not wasm at all").unwrap();
    let (v, code) = grid_run_json(&[path(&bad)], b"");
    assert_eq!(code, 1);
    assert_eq!(v["status"], "refused");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .starts_with("invalid: not a WebAssembly module")
    );
}

#[test]
fn guest_exit_code_is_reported() {
    let (v, code) = grid_run_json(&[path(&guest("hostile")), "--", "exit", "42"], b"");
    assert_eq!(code, 1);
    assert_eq!(v["exit_code"], 42);
    assert_eq!(v["reason"], "exit: 42");
}

#[test]
fn usage_and_setup_errors_exit_2_with_one_line() {
    for args in [
        vec!["run", "/no/such/module.wasm"],
        vec!["run", "x.wasm", "--memory", "lots"],
        vec!["run", "x.wasm", "--timeout", "soon"],
        vec!["run", "x.wasm", "--env", "NOEQUALS"],
        vec!["frobnicate"],
    ] {
        let out = grid(&args, b"");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.starts_with("grid: ") || stderr.starts_with("error: "),
            "{args:?}: {stderr}"
        );
    }
    let out = grid(&["run", "/no/such/module.wasm"], b"");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/no/such/module.wasm"));
}

/// One grammar for sizes and durations, in every command: a unit is required (`--memory 100`
/// was once 100 bytes), a limit no task can run under is refused as the flag is read rather
/// than failing the task later (`--timeout 0` was `limit: time`), and the messages speak in
/// the units people write.
#[test]
fn sizes_and_durations_take_a_unit_and_limits_their_floor_everywhere() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "x.wasm", "--memory", "100"],
            "give a unit, e.g. 100MiB",
        ),
        (
            &["run", "x.wasm", "--memory", "0"],
            "must be at least 1 MiB",
        ),
        (
            &["run", "x.wasm", "--memory", "512m"],
            "write 512MiB or 512MB",
        ),
        (
            &["run", "x.wasm", "--timeout", "30"],
            "give a unit, e.g. 30s",
        ),
        (&["run", "x.wasm", "--timeout", "0"], "must be at least 1ms"),
        (
            &["submit", "x.wasm", "--timeout", "0s"],
            "must be at least 1ms",
        ),
        (
            &["submit", "x.wasm", "--gpu-time", "0"],
            "must be at least 1ms",
        ),
        (
            &["submit", "x.wasm", "--max-output", "10"],
            "give a unit, e.g. 10MiB",
        ),
        (
            &["node", "--memory-budget", "100"],
            "give a unit, e.g. 100MiB",
        ),
        (&["node", "--max-memory", "0"], "must be at least 1 MiB"),
        (&["node", "--max-time", "30"], "give a unit, e.g. 30s"),
        (
            &["broker", "--stage-quota", "4096"],
            "give a unit, e.g. 4096MiB",
        ),
        (
            &["broker", "--take-back-grace", "300"],
            "give a unit, e.g. 300s",
        ),
        (&["up", "--memory-budget", "8"], "give a unit, e.g. 8MiB"),
    ];
    for (args, says) in cases {
        let out = grid(args, b"");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        let value = args.last().unwrap();
        assert!(
            stderr.contains(&format!("'{value}'")),
            "the value is quoted with its flag: {stderr}"
        );
    }
    // Zero is zero in every unit, where zero means something: no output at all.
    let (v, code) = grid_run_json(
        &[
            path(&guest("hostile")),
            "--max-output",
            "0",
            "--",
            "exit",
            "0",
        ],
        b"",
    );
    assert_eq!(code, 0, "{v}");
    // A module that needs more memory than its limit is refused in the same units.
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("big.wasm");
    std::fs::write(
        &module,
        wat(r#"(module (memory 32) (func (export "_start")))"#),
    )
    .unwrap();
    let (v, code) = grid_run_json(&[path(&module), "--memory", "1MiB"], b"");
    assert_eq!(code, 1, "{v}");
    assert_eq!(
        v["reason"],
        "invalid: declared minimum memory of 2 MiB exceeds the task's memory limit of 1 MiB"
    );
}

#[test]
fn a_non_empty_output_dir_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep.txt"), "mine").unwrap();
    let out = grid(
        &[
            "run",
            path(&guest("synth-data")),
            "--output",
            path(dir.path()),
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not empty"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("keep.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn without_json_guest_output_passes_through_and_the_output_dir_is_printed() {
    let out = grid(&["run", path(&guest("hostile")), "--", "exit", "5"], b"");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("grid: task failed: exit: 5"), "{stderr}");
    let out = grid(
        &["run", path(&guest("monte-carlo-pi"))],
        br#"{"samples": 1000}"#,
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8(out.stdout).unwrap().starts_with("pi ≈ "));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let dir = stderr
        .lines()
        .find_map(|l| l.strip_prefix("grid: output in "))
        .expect("output dir printed");
    assert!(std::path::Path::new(dir).join("estimate.json").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn env_input_stdin_and_task_index_reach_the_guest_and_host_env_does_not() {
    let input = tempfile::tempdir().unwrap();
    std::fs::write(input.path().join("data.txt"), "hello").unwrap();
    let (v, code) = grid_run_json(
        &[
            path(&guest("hostile")),
            "--input",
            path(input.path()),
            "--env",
            "A=1",
            "--",
            "read-input",
        ],
        b"params",
    );
    assert_eq!(code, 0, "{v}");
    let stdout = v["stdout"].as_str().unwrap();
    assert!(stdout.contains("data.txt: hello"));
    assert!(stdout.contains("stdin: params"));

    let (v, _) = grid_run_json(
        &[
            path(&guest("hostile")),
            "--env",
            "A=1",
            "--seed",
            "9",
            "--task-index",
            "4",
            "--",
            "env",
        ],
        b"",
    );
    let stdout = v["stdout"].as_str().unwrap();
    assert!(stdout.contains("A=1"));
    assert!(stdout.contains("GRID_TASK_INDEX=4"));
    assert!(stdout.contains(&format!("GRID_SEED={}", grid_proto::task_seed(9, 4))));
    assert!(
        !stdout.contains("must-not-leak"),
        "host env leaked: {stdout}"
    );
}

#[test]
fn version_names_the_wire_version() {
    let out = grid(&["--version"], b"");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        format!(
            "grid {} (wire version {})",
            env!("CARGO_PKG_VERSION"),
            grid_proto::WIRE_VERSION
        )
    );
}

#[test]
fn completions_come_for_bash_zsh_and_fish() {
    for (shell, marker) in [
        ("bash", "_grid()"),
        ("zsh", "#compdef grid"),
        ("fish", "complete -c grid"),
    ] {
        let out = grid(&["completions", shell], b"");
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script:.200}");
        assert!(
            script.contains("submit") && script.contains("dashboard"),
            "{shell}"
        );
    }
    let out = grid(&["completions", "tcsh"], b"");
    assert_eq!(out.status.code(), Some(2));
}

/// `grid doctor` on this machine (where `cargo xtask setup` has run): everything found, one
/// line each, no colour codes when stdout is not a terminal — and colours when forced.
#[test]
fn doctor_checks_the_machine_and_colours_only_a_terminal() {
    let out = grid(&["doctor"], b"");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needed in [
        "wasm32-wasip1",
        "nats-server 2.",
        "GPU: ",
        "Python runtime",
        "127.0.0.1:4222",
        "port 8470",
    ] {
        assert!(text.contains(needed), "{needed} missing in:\n{text}");
    }
    assert!(!text.contains('\x1b'), "colour codes into a pipe: {text:?}");
    let forced = std::process::Command::new(env!("CARGO_BIN_EXE_grid"))
        .arg("doctor")
        .env("CLICOLOR_FORCE", "1")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&forced.stdout).contains("\x1b["));
}

/// SIGPIPE's number on Linux.
const SIGPIPE: i32 = 13;

/// A reader that stops reading (`grid completions bash | head -1`) ends a printing command
/// quietly, as it ends `cat`: no panic, no message.
#[test]
fn a_closed_pipe_ends_a_listing_quietly() {
    use std::os::unix::process::ExitStatusExt;
    for args in [&["completions", "bash"][..], &["completions", "zsh"][..]] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_grid"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || out.status.signal() == Some(SIGPIPE),
            "{args:?}: {:?} {stderr}",
            out.status
        );
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

/// `grid run --from JOB` without the task asks for it by the name the README uses.
#[test]
fn run_from_asks_for_the_task_by_its_name() {
    let out = grid(&["run", "--from", "01a2"], b"");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--task <I>"), "{stderr}");
}

/// A run that leaves nothing in `/out` leaves no folder behind: refused, failed or silent.
#[test]
fn a_run_that_writes_nothing_leaves_no_folder_behind() {
    let garbage = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(garbage.path(), b"not wasm").unwrap();
    for args in [
        vec![path(garbage.path())],
        vec![path(&guest("hostile")), "--", "exit", "5"],
    ] {
        let (v, code) = grid_run_json(&args, b"");
        assert_eq!(code, 1, "{v}");
        assert!(v["output_dir"].is_null(), "{v}");
    }
    let out = grid(&["run", path(&guest("hostile")), "--", "exit", "0"], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("grid: the task wrote no output"),
        "{stderr}"
    );
}

/// A grid that answers and refuses says so, and which credentials to pass; no library's log
/// line reaches the terminal.
#[test]
fn a_refused_connection_names_the_credentials_to_pass() {
    let grid = TestGrid::start(0, &[]);
    let nowhere = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_grid"))
        .args(["nodes", "--nats", grid.nats.url.as_str()])
        .env("GRID_CREDS", "")
        .env("XDG_DATA_HOME", nowhere.path())
        .env("HOME", nowhere.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("answered but refused a connection without credentials")
            && stderr.contains("--creds FILE or GRID_CREDS"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("ERROR") && !stderr.contains("async_nats"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// An empty listing says so, and what to do, rather than print nothing.
#[test]
fn empty_listings_say_what_to_do() {
    let grid = TestGrid::start(0, &[]);
    let erin = tenant_creds("erin");
    for (command, says) in [
        (
            "jobs",
            "grid: no jobs of tenant erin yet: submit one with `grid submit",
        ),
        ("nodes", "grid: no node is online: start one with `grid up`"),
    ] {
        let out = grid.grid(&[command, "--creds", erin.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{command}: {stderr}");
        assert!(out.stdout.is_empty(), "{command}");
        assert!(stderr.contains(says), "{command}: {stderr}");
    }
}

/// Every command `grid --help` lists, in its order. A new command goes here, and with it its
/// examples (`grid-cli/src/help.rs`), so that the test below reads its help too.
const COMMANDS: [&str; 22] = [
    "run",
    "up",
    "submit",
    "status",
    "jobs",
    "nodes",
    "results",
    "logs",
    "cancel",
    "retry",
    "delete",
    "usage",
    "dashboard",
    "doctor",
    "completions",
    "auth",
    "tenant",
    "provider",
    "site",
    "python",
    "broker",
    "node",
];

/// The options and arguments a help text lists, each as the line's name for it (`-o,
/// --output <DIR>`, `<JOB>`) and its description, clap's own notes (`[default: …]`,
/// `[possible values: …]`) taken out: what is left is what a person wrote. Clap writes a
/// description on the name's line after two spaces or more, or (its long layout) under it.
fn described(help: &str) -> Vec<(String, String)> {
    let mut entries: Vec<(String, String)> = Vec::new();
    let mut in_list = false;
    for line in help.lines() {
        if !line.is_empty() && !line.starts_with(' ') {
            in_list = matches!(line, "Arguments:" | "Options:");
            continue;
        }
        if !in_list {
            continue;
        }
        let names_one = line.starts_with("      --")
            || line
                .strip_prefix("  ")
                .is_some_and(|rest| rest.starts_with(['-', '<', '[']));
        if names_one {
            let text = line.trim_start();
            let (name, description) = text.split_once("  ").unwrap_or((text, ""));
            entries.push((name.to_string(), description.trim().to_string()));
        } else if let Some((_, description)) = entries.last_mut() {
            description.push(' ');
            description.push_str(line.trim());
        }
    }
    for (_, description) in &mut entries {
        for note in [
            "[default: ",
            "[possible values: ",
            "[env: ",
            "[alias: ",
            "[aliases: ",
        ] {
            while let Some(at) = description.find(note) {
                let end = description[at..]
                    .find(']')
                    .map_or(description.len(), |end| at + end + 1);
                description.replace_range(at..end, "");
            }
        }
        *description = description.trim().to_string();
    }
    entries
}

/// The `grid` commands of a help text's `$ …` example lines, each as its words after `grid`,
/// up to where that command ends: a pipe, `&&`, `;`, `>`, `)`, a `#` comment, or the `--`
/// after which words are the task's.
fn example_commands(help: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for line in help.lines() {
        let Some(line) = line.trim_start().strip_prefix("$ ") else {
            continue;
        };
        let mut words = line.split_whitespace();
        while let Some(word) = words.next() {
            if word != "grid" && !word.ends_with("(grid") {
                continue;
            }
            let mut command = Vec::new();
            for word in words.by_ref() {
                if ["|", "||", "&&", ";", ">", "#", "--"].contains(&word) {
                    break;
                }
                command.push(word.trim_end_matches(')').to_string());
                if word.ends_with(')') {
                    break;
                }
            }
            found.push(command);
        }
    }
    found
}

/// `--help` as `gh` has it: every flag and argument of every command (groups' subcommands
/// too) says what it is, `--json` says what it prints, JOB says how a job may be named, and
/// every command ends with examples — whose flags its help lists, so they cannot rot.
#[test]
fn every_command_explains_its_flags_and_shows_examples() {
    let mut helps = std::collections::BTreeMap::<Vec<String>, String>::new();
    let mut help = |path: &[String]| -> String {
        helps
            .entry(path.to_vec())
            .or_insert_with(|| help_of(&path.iter().map(String::as_str).collect::<Vec<_>>()))
            .clone()
    };

    let top = help(&[]);
    assert_eq!(
        commands_listed(&top),
        COMMANDS,
        "`grid --help` lists other commands than COMMANDS: add the new one there"
    );
    for part in ["Quick start:", "Exit codes:", "RUST_LOG"] {
        assert!(top.contains(part), "`grid --help` has no {part:?}:\n{top}");
    }

    let mut paths: Vec<Vec<String>> = COMMANDS.iter().map(|c| vec![c.to_string()]).collect();
    let mut examples = example_commands(&top);
    let mut read = 0;
    while let Some(path) = paths.pop() {
        let text = help(&path);
        let shown = format!("grid {} --help", path.join(" "));
        read += 1;
        assert!(
            text.contains("\nExamples:\n  # "),
            "{shown} has no examples:\n{text}"
        );
        let entries = described(&text);
        assert!(
            entries.iter().any(|(name, _)| name.contains("--help")),
            "{shown}: no options found in:\n{text}"
        );
        for (name, description) in &entries {
            assert!(
                !description.is_empty(),
                "{shown}: {name} has no description"
            );
            if name.contains("--json") {
                assert!(
                    description.contains("JSON"),
                    "{shown}: --json: {description}"
                );
            }
            if name.contains("JOB>") {
                assert!(
                    description.contains("prefix") && description.contains("--name"),
                    "{shown}: {name} does not say how a job is named: {description}"
                );
            }
        }
        examples.extend(example_commands(&text));
        for sub in commands_listed(&text) {
            paths.push([path.clone(), vec![sub]].concat());
        }
    }
    // Four groups' subcommands besides the commands themselves.
    assert!(read >= COMMANDS.len() + 4, "read {read} helps");

    assert!(
        examples.len() > 40,
        "only {} examples found",
        examples.len()
    );
    for command in examples {
        // The command's path (`tenant add`), then its arguments.
        let mut path: Vec<String> = Vec::new();
        while let Some(word) = command.get(path.len())
            && commands_listed(&help(&path)).contains(word)
        {
            path.push(word.clone());
        }
        assert!(
            !path.is_empty(),
            "an example runs no command: grid {command:?}"
        );
        let names: Vec<String> = described(&help(&path))
            .into_iter()
            .flat_map(|(name, _)| {
                name.split([' ', ','])
                    .filter(|w| w.starts_with('-'))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        for word in &command[path.len()..] {
            let flag = word.split('=').next().unwrap_or_default();
            let is_flag = flag.starts_with("--")
                || flag
                    .strip_prefix('-')
                    .is_some_and(|rest| rest.starts_with(char::is_alphabetic));
            assert!(
                !is_flag || names.iter().any(|n| n == flag),
                "an example runs `grid {}`, but `grid {} --help` has no {flag}",
                command.join(" "),
                path.join(" ")
            );
        }
    }
}

#[test]
fn grid_run_gives_a_task_the_limits_asked_for_above_the_defaults() {
    // 600 MiB at once, past the 512 MiB default: refused at the default, run when asked for.
    let hostile = guest("hostile");
    let (v, code) = grid_run_json(&[hostile.to_str().unwrap(), "--", "alloc", "600"], b"");
    assert_eq!(
        (code, v["reason"].as_str()),
        (1, Some("limit: memory")),
        "{v}"
    );
    let (v, code) = grid_run_json(
        &[
            hostile.to_str().unwrap(),
            "--memory",
            "1GiB",
            "--",
            "alloc",
            "600",
        ],
        b"",
    );
    assert_eq!(code, 0, "{v}");
}
