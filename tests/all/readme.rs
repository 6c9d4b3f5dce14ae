//! The README, checked against what it describes: the commands it tells a reader to type
//! exist, its `Cargo.toml` snippet names the guest SDK where it is, and its Rust job is the
//! SDK's own example (which `cargo test` compiles as a doc test).

use crate::support::{commands_listed, help_of, workspace_root};
use std::path::{Component, Path, PathBuf};

fn readme() -> String {
    std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md")
}

/// The text under `heading` (a whole `## …` line), up to the next heading of that level.
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no {heading:?} in the README"));
    let rest = &text[start + heading.len() + 2..];
    &rest[..rest.find("\n## ").unwrap_or(rest.len())]
}

/// The fenced blocks of `text` (with their language), and the text outside them.
fn split_fences(text: &str) -> (Vec<(String, String)>, String) {
    let (mut blocks, mut prose) = (Vec::new(), String::new());
    let mut open: Option<(String, String)> = None;
    for line in text.lines() {
        match (open.take(), line.strip_prefix("```")) {
            (None, Some(lang)) => open = Some((lang.trim().to_string(), String::new())),
            (None, None) => {
                prose.push_str(line);
                prose.push('\n');
            }
            (Some(block), Some(_)) => blocks.push(block),
            (Some((lang, mut body)), None) => {
                body.push_str(line);
                body.push('\n');
                open = Some((lang, body));
            }
        }
    }
    (blocks, prose)
}

fn blocks_of(text: &str, lang: &str) -> Vec<String> {
    split_fences(text)
        .0
        .into_iter()
        .filter(|(l, _)| l == lang)
        .map(|(_, body)| body)
        .collect()
}

/// The program and first argument of each command in `line` (pieces of a pipeline or a list;
/// leading `VAR=value` assignments skipped).
fn commands(line: &str) -> Vec<(String, Option<String>)> {
    line.split(['|', ';', '&'])
        .filter_map(|piece| {
            let mut words = piece
                .split_whitespace()
                .skip_while(|w| w.contains('=') && !w.starts_with('-'));
            let program = words.next()?.to_string();
            Some((program, words.next().map(str::to_string)))
        })
        .collect()
}

/// Every command the README tells a reader to type: the lines of its `sh` blocks (comments
/// dropped) and its inline code.
fn commands_shown(text: &str) -> Vec<(String, Option<String>)> {
    let (blocks, prose) = split_fences(text);
    let mut shown = Vec::new();
    for (lang, body) in blocks {
        if lang == "sh" {
            for line in body.lines() {
                let line = line.split(" #").next().unwrap_or("");
                if !line.trim_start().starts_with('#') {
                    shown.extend(commands(line));
                }
            }
        }
    }
    // Inline code may wrap across lines, never across paragraphs.
    for paragraph in prose.split("\n\n") {
        for code in paragraph.split('`').skip(1).step_by(2) {
            shown.extend(commands(code));
        }
    }
    shown
}

/// The subcommands `grid --help` lists.
fn help_commands() -> Vec<String> {
    let help = help_of(&[]);
    let listed = commands_listed(&help);
    assert!(!listed.is_empty(), "no command list in:\n{help}");
    listed
}

/// Every `grid COMMAND` in the README is one `grid --help` lists, and no command line runs
/// `grid-node` or `grid-broker`, which the README's `cargo build -p grid-cli` does not build.
#[test]
fn every_command_the_readme_shows_exists() {
    let known = help_commands();
    let mut checked = 0;
    for (program, first) in commands_shown(&readme()) {
        if program == "grid" || program.ends_with("/grid") {
            let Some(command) = first
                .as_ref()
                .filter(|c| c.starts_with(|ch: char| ch.is_ascii_lowercase()))
            else {
                continue; // `grid --version`
            };
            assert!(
                known.contains(command),
                "the README shows `grid {command}`, which `grid --help` does not list: {known:?}"
            );
            checked += 1;
        }
        assert!(
            !(["grid-node", "grid-broker"].contains(&program.as_str()) && first.is_some()),
            "the README runs `{program}`, which `cargo build -p grid-cli` does not build: say `grid {}`",
            program.trim_start_matches("grid-")
        );
    }
    // The parser found the README's commands at all (it shows dozens).
    assert!(checked > 30, "only {checked} `grid` commands found");
    for command in ["up", "submit", "run", "doctor", "node", "broker", "tenant"] {
        assert!(known.contains(&command.to_string()), "{command}: {known:?}");
    }
}

/// "Writing a job": the `Cargo.toml` snippet names the guest SDK by its package name and a
/// path to it (for a crate beside a clone of this repository), the Rust job is the SDK's own
/// doc example, and the target to add is said there.
#[test]
fn the_readme_job_builds_against_the_guest_sdk_where_it_is() {
    let text = readme();
    let writing = section(&text, "## Writing a job");
    assert!(
        writing.contains("rustup target add wasm32-wasip1"),
        "{writing}"
    );

    let toml = blocks_of(writing, "toml");
    let dependency = toml
        .iter()
        .flat_map(|b| b.lines())
        .find(|l| l.contains("path = \""))
        .unwrap_or_else(|| panic!("no path dependency in {toml:?}"));
    let (name, rest) = dependency.split_once('=').unwrap();
    let path = rest.split('"').nth(1).unwrap();
    // `../<the clone>/<a folder of this repository>`.
    let mut components = Path::new(path).components();
    assert_eq!(components.next(), Some(Component::ParentDir), "{path}");
    assert!(
        matches!(components.next(), Some(Component::Normal(_))),
        "{path}"
    );
    let inside: PathBuf = components.collect();
    let manifest = std::fs::read_to_string(workspace_root().join(&inside).join("Cargo.toml"))
        .unwrap_or_else(|e| panic!("{path}: no Cargo.toml at {}: {e}", inside.display()));
    let package = manifest
        .split("[package]")
        .nth(1)
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("name = ")))
        .map(|n| n.trim().trim_matches('"'))
        .expect("a package name");
    assert_eq!(name.trim(), package, "the snippet's dependency name");
    assert!(
        toml.iter()
            .any(|b| b.contains("serde = { version = \"1\", features = [\"derive\"] }")),
        "{toml:?}"
    );

    let rust = blocks_of(writing, "rust");
    let shown = rust.first().expect("a Rust job");
    let sdk = std::fs::read_to_string(workspace_root().join(&inside).join("src/lib.rs")).unwrap();
    let example = sdk
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .skip_while(|l| *l != "```no_run")
        .skip(1)
        .take_while(|l| *l != "```")
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    assert_eq!(
        shown, &example,
        "the README's job and the SDK's doc example (which is compiled) differ"
    );
    assert!(shown.contains("task.params"), "{shown}");
}
