//! The example jobs produce what they promise: content, schema, distribution, reproducibility.

use crate::support::*;

fn synth(params: &str, index: &str, seed: &str) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap().keep();
    let (v, code) = grid_run_json(
        &[
            guest("synth-data").to_str().unwrap(),
            "--output",
            dir.to_str().unwrap(),
            "--task-index",
            index,
            "--seed",
            seed,
        ],
        params.as_bytes(),
    );
    assert_eq!(code, 0, "{v}");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    let text = std::fs::read_to_string(files.pop().unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (text, v)
}

fn pearson(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let cov: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let vx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    let vy: f64 = ys.iter().map(|y| (y - my).powi(2)).sum();
    cov / (vx * vy).sqrt()
}

#[test]
fn synth_data_writes_the_promised_rows_schema_and_correlation() {
    let (csv, v) = synth(r#"{"rows": 5000, "rho": 0.7}"#, "2", "11");
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("id,group,age,income,score,label"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 5000);
    assert_eq!(v["stdout"], "wrote 5000 rows to part-00002.csv\n");
    let (mut ages, mut log_incomes, mut groups) = (Vec::new(), Vec::new(), [0usize; 3]);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.len(), 6);
        assert_eq!(
            row[0].parse::<u64>().unwrap(),
            2 * 5000 + i as u64,
            "ids continue across shards"
        );
        groups[["A", "B", "C"]
            .iter()
            .position(|g| *g == row[1])
            .expect("group is A, B or C")] += 1;
        let age: f64 = row[2].parse().unwrap();
        assert!((18.0..=90.0).contains(&age));
        let income: f64 = row[3].parse().unwrap();
        assert!(income > 0.0);
        row[4].parse::<f64>().unwrap();
        assert!(row[5] == "0" || row[5] == "1");
        ages.push(age);
        log_incomes.push(income.ln());
    }
    let r = pearson(&ages, &log_incomes);
    assert!(
        (r - 0.7).abs() < 0.05,
        "corr(age, log income) = {r}, want about 0.7"
    );
    assert!(
        (groups[0] as f64 / 5000.0 - 0.5).abs() < 0.03,
        "group A share: {groups:?}"
    );
}

#[test]
fn synth_data_is_reproducible_by_seed_and_differs_across_tasks() {
    let (a, _) = synth(r#"{"rows": 300}"#, "0", "5");
    let (b, _) = synth(r#"{"rows": 300}"#, "0", "5");
    let (c, _) = synth(r#"{"rows": 300}"#, "1", "5");
    let (d, _) = synth(r#"{"rows": 300}"#, "0", "6");
    assert_eq!(a, b, "same seed and index, same bytes");
    assert_ne!(a.lines().nth(1), c.lines().nth(1));
    assert_ne!(a, d);
}

#[test]
fn synth_data_writes_jsonl_on_request() {
    let (text, _) = synth(r#"{"rows": 50, "format": "jsonl"}"#, "0", "0");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 50);
    let keys: Vec<&String> = records[0].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["age", "group", "id", "income", "label", "score"]);
}

#[test]
fn synth_data_rejects_bad_params_with_a_clear_message() {
    let (v, code) = grid_run_json(
        &[guest("synth-data").to_str().unwrap()],
        br#"{"rows": 5, "rho": 3}"#,
    );
    assert_eq!(code, 1);
    assert_eq!(v["reason"], "exit: 1");
    assert!(
        v["stderr"]
            .as_str()
            .unwrap()
            .contains("rho must be within [-1, 1]")
    );
    let (v, _) = grid_run_json(&[guest("synth-data").to_str().unwrap()], br#"{"rowz": 5}"#);
    assert!(
        v["stderr"]
            .as_str()
            .unwrap()
            .contains("unknown field `rowz`")
    );
}

#[test]
fn monte_carlo_pi_estimates_pi() {
    let (v, code) = grid_run_json(
        &[guest("monte-carlo-pi").to_str().unwrap()],
        br#"{"samples": 400000}"#,
    );
    assert_eq!(code, 0);
    let dir = v["output_dir"].as_str().unwrap();
    let est: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/estimate.json")).unwrap())
            .unwrap();
    assert_eq!(est["samples"], 400000);
    assert!(
        (est["pi"].as_f64().unwrap() - std::f64::consts::PI).abs() < 0.02,
        "{est}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Runs gpu-noise with `params` (and `--gpu` when asked) and returns its JSON line and files.
fn gpu_noise(params: &str, gpu: bool) -> (serde_json::Value, Vec<(String, Vec<u8>)>) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        guest("gpu-noise").to_str().unwrap().to_string(),
        "--output".into(),
        dir.path().to_str().unwrap().into(),
        "--seed".into(),
        "11".into(),
        "--task-index".into(),
        "3".into(),
    ];
    if gpu {
        args.push("--gpu".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (v, _code) = grid_run_json(&args, params.as_bytes());
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    (v, files)
}

#[test]
fn gpu_noise_on_the_gpu_matches_the_cpu_reference_exactly() {
    let params = r#"{"images": 3, "size": 200, "octaves": 6, "cell": 50}"#;
    let (v, on_gpu) = gpu_noise(params, true);
    assert_eq!(v["status"], "succeeded", "{v}");
    assert!(v["stdout"].as_str().unwrap().contains("on the GPU"), "{v}");
    // The reference, computed natively from the same seed the task got.
    let seed = grid_proto::task_seed(11, 3);
    let noise = gpu_noise::Noise {
        size: 200,
        octaves: 6,
        cell: 50,
        seed: (seed ^ (seed >> 32)) as u32,
    };
    let expected: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| {
            (
                format!("noise-00003-{i:02}.pgm"),
                gpu_noise::pgm(200, &gpu_noise::cpu_image(&noise, i)),
            )
        })
        .collect();
    assert!(
        on_gpu == expected,
        "GPU images differ from the CPU reference"
    );
    // Without a GPU the same module falls back to the CPU and writes the same bytes.
    let (v, on_cpu) = gpu_noise(params, false);
    assert!(v["stdout"].as_str().unwrap().contains("on the CPU"), "{v}");
    assert!(on_cpu == expected, "the CPU fallback differs");
}

#[test]
fn gpu_noise_can_refuse_to_fall_back_and_checks_its_params() {
    let (v, files) = gpu_noise(r#"{"images": 1, "require_gpu": true}"#, false);
    assert_eq!(v["reason"], "exit: 1", "{v}");
    assert!(
        v["stderr"].as_str().unwrap().contains("submit with --gpu"),
        "{v}"
    );
    assert!(files.is_empty());
    let (v, _) = gpu_noise(r#"{"size": 0}"#, true);
    assert_eq!(
        v["stderr"], "gpu-noise: size must be 1..=2048, got 0\n",
        "{v}"
    );
}
