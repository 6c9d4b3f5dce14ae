//! What the broker takes of a result's outputs: its staged blobs must be what its files say,
//! and its digest what they give ([`results::staged_check`], [`results::digest_check`],
//! [`results::verify`]).

use super::*;
use grid_proto::{OutputFile, Staged};

fn file(path: &str, bytes: &[u8]) -> (OutputFile, Staged) {
    let sha256 = Sha256Hex::of(bytes);
    (
        OutputFile {
            path: path.into(),
            bytes: bytes.len() as u64,
            sha256,
        },
        Staged {
            sha256,
            bytes: bytes.len() as u64,
            chunks: vec![1],
            inline: Vec::new(),
        },
    )
}

/// A successful result of task 0 with files `files` (path, bytes), all staged, and its digest.
fn with_files(files: &[(&str, &[u8])]) -> ResultMsg {
    let mut r = ok("job", 0, 0, "n0");
    for (path, bytes) in files {
        let (f, s) = file(path, bytes);
        r.files.push(f);
        if !r.staged.iter().any(|x| x.sha256 == s.sha256) {
            r.staged.push(s);
        }
    }
    r.digest = grid_proto::result_digest(&r.outcome, &r.files);
    r
}

#[test]
fn a_result_whose_files_are_all_staged_passes() {
    let r = with_files(&[("a.csv", b"1,2\n"), ("b/c.txt", b"x"), ("same.txt", b"x")]);
    assert_eq!(results::staged_check(&r, Some(100)), None);
    assert_eq!(results::digest_check(&r), None);
    let mut checked = r.clone();
    results::verify(&mut checked, None);
    assert!(checked.staged.is_empty());
    assert_eq!((checked.files, checked.outcome), (r.files, r.outcome));
}

#[test]
fn a_blob_of_several_names_counts_once_against_the_output_limit() {
    // Hard links in `/out`: one file of 60 bytes under three names, within a limit of 100.
    let bytes = [7u8; 60];
    let r = with_files(&[("a", &bytes), ("b", &bytes), ("c/d", &bytes)]);
    assert_eq!(results::staged_check(&r, Some(100)), None);
    let r = with_files(&[("a", &bytes), ("b", &[8u8; 41])]);
    assert!(results::staged_check(&r, Some(100)).is_some());
}

#[test]
fn staged_blobs_that_are_not_what_the_files_say_are_refused() {
    let r = with_files(&[("a.csv", b"1,2\n")]);
    let mut unstaged = r.clone();
    unstaged.staged.clear();
    let mut other_size = r.clone();
    other_size.staged[0].bytes += 1;
    let mut over_limit = r.clone();
    over_limit.files[0].bytes = 1 << 40;
    over_limit.staged[0].bytes = 1 << 40;
    let mut twice = r.clone();
    twice.staged.push(twice.staged[0].clone());
    let mut padded = r.clone();
    for i in 0..3 {
        padded.staged.push(file("x", format!("{i}").as_bytes()).1);
    }
    let mut log_unstaged = r.clone();
    log_unstaged.stdout = Some(Sha256Hex::of(b"log"));
    let mut huge_log = r.clone();
    let (_, mut log) = file("log", b"log");
    log.bytes = results::MOST_LOG_BYTES + 1;
    huge_log.stdout = Some(log.sha256);
    huge_log.staged.push(log);
    let clashes = [
        with_files(&[("ok.txt", b"1"), ("ok.txt/inner", b"2")]),
        with_files(&[("../escape", b"1")]),
        with_files(&[("/etc/passwd", b"1")]),
        with_files(&[("a//b", b"1")]),
        with_files(&[("same", b"1"), ("same", b"2")]),
    ];
    for clash in &clashes {
        assert!(
            results::staged_check(clash, None).is_some(),
            "{:?}",
            clash.files
        );
    }
    for (name, forged) in [
        ("unstaged", unstaged),
        ("other size", other_size),
        ("over the limit", over_limit),
        ("staged twice", twice),
        ("padded", padded),
        ("log unstaged", log_unstaged),
        ("huge log", huge_log),
    ] {
        assert!(
            results::staged_check(&forged, Some(1 << 20)).is_some(),
            "{name} passed"
        );
    }
}

#[test]
fn a_digest_not_given_by_the_files_makes_the_result_lost() {
    let mut r = with_files(&[("a.csv", b"1,2\n")]);
    r.digest = Sha256Hex::of(b"the honest replica's digest");
    assert!(results::digest_check(&r).is_some());
    results::verify(&mut r, None);
    assert_eq!(r.outcome, Outcome::Failed(Reason::Lost));
    assert!(r.files.is_empty() && r.stdout.is_none() && r.staged.is_empty());
    assert_eq!(
        results::digest_check(&r),
        None,
        "a lost result's own digest"
    );
}

#[test]
fn a_lost_forgery_is_not_billed_and_runs_again() {
    let mut w = World::new(10);
    let job = w.submit(spec(1));
    w.fill();
    let mut forged = sealed(ok(&job, 0, 0, "n0"));
    results::verify(&mut forged, Some("chunks hash to something else".into()));
    assert_eq!(w.deliver_as_is("n0", vec![forged]), Settled::Acked);
    assert!(w.ledger.is_empty(), "nothing billed for a forgery");
    assert_eq!(w.state(&job).counts.succeeded, 0);
    assert_eq!(w.take(&job).last().map(|d| d.attempt), Some(1), "run again");
}
