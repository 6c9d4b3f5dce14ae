//! synth-data: a seeded generator of synthetic tabular data, one shard per task.
//!
//! Each task writes `/out/part-<index>.csv` (or `.jsonl`) with `rows` records of a made-up
//! population: `id, group, age, income, score, label`. `age` and `log(income)` are bivariate normal
//! with correlation `rho`; `score` depends linearly on both plus noise; `label` is drawn from a
//! logistic model of `score`. The same seed and index give the same bytes everywhere.
//!
//! Run one task:   `grid run target/wasm32-wasip1/release/synth-data.wasm <<< '{"rows": 1000}'`
//! Build:          `cargo xtask build-examples`

use grid_guest::rand::RngExt;
use grid_guest::{Task, itoa};
use rand_distr::{Distribution, StandardNormal};
use std::io::Write;

#[derive(serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Params {
    /// Records in this task's shard.
    rows: u64,
    /// Correlation of age and log(income), in [-1, 1].
    rho: f64,
    /// "csv" or "jsonl".
    format: String,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            rows: 10_000,
            rho: 0.6,
            format: "csv".into(),
        }
    }
}

const GROUPS: [(&str, f64); 3] = [("A", 0.5), ("B", 0.3), ("C", 0.2)];

/// What a record's fields are wrapped in: its start, what comes before each field, its end.
type Keys = [&'static [u8]; 8];
const CSV_KEYS: Keys = [b"", b"", b",", b",", b",", b",", b",", b"\n"];
const JSON_KEYS: Keys = [
    b"{",
    b"\"id\":",
    b",\"group\":\"",
    b"\",\"age\":",
    b",\"income\":",
    b",\"score\":",
    b",\"label\":",
    b"}\n",
];

fn main() {
    if let Err(e) = run() {
        eprintln!("synth-data: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let task = Task::current();
    let p: Params = task.params_or_default()?;
    if !(-1.0..=1.0).contains(&p.rho) {
        return Err(format!("rho must be within [-1, 1], got {}", p.rho).into());
    }
    let jsonl = match p.format.as_str() {
        "csv" => false,
        "jsonl" => true,
        other => return Err(format!("format must be csv or jsonl, got {other}").into()),
    };
    let mut rng = task.rng();
    let name = format!(
        "part-{:05}.{}",
        task.index,
        if jsonl { "jsonl" } else { "csv" }
    );
    let mut out = grid_guest::create_output(&name)?;
    if !jsonl {
        writeln!(out, "id,group,age,income,score,label")?;
    }
    let ortho = (1.0 - p.rho * p.rho).sqrt();
    let mut digits = itoa::Buffer::new();
    for row in 0..p.rows {
        let id = task.index * p.rows + row;
        let pick: f64 = rng.random();
        let mut acc = 0.0;
        let group = GROUPS
            .iter()
            .find(|(_, w)| {
                acc += w;
                pick < acc
            })
            .map_or("C", |g| g.0);
        let z1: f64 = StandardNormal.sample(&mut rng);
        let z2: f64 = StandardNormal.sample(&mut rng);
        let age = (45.0 + 12.0 * z1).clamp(18.0, 90.0).round();
        let income = (10.5 + 0.5 * (p.rho * z1 + ortho * z2)).exp();
        let noise: f64 = StandardNormal.sample(&mut rng);
        let score = 0.03 * (age - 45.0) + 0.8 * (income.ln() - 10.5) + 0.3 * noise;
        let label = u8::from(rng.random::<f64>() < 1.0 / (1.0 + (-2.0 * score).exp()));
        // What `{id},{group},{age},{income:.2},{score:.6},{label}` writes, without `core::fmt`
        // (see `grid_guest::write_fixed`): this loop is most of the job's time.
        let (id, age, label) = (digits.format(id), age as u64, [b'0' + label]);
        let [
            open,
            id_key,
            group_key,
            age_key,
            income_key,
            score_key,
            label_key,
            close,
        ] = if jsonl { JSON_KEYS } else { CSV_KEYS };
        out.write_all(open)?;
        out.write_all(id_key)?;
        out.write_all(id.as_bytes())?;
        out.write_all(group_key)?;
        out.write_all(group.as_bytes())?;
        out.write_all(age_key)?;
        out.write_all(itoa::Buffer::new().format(age).as_bytes())?;
        out.write_all(income_key)?;
        grid_guest::write_fixed(&mut out, income, 2)?;
        out.write_all(score_key)?;
        grid_guest::write_fixed(&mut out, score, 6)?;
        out.write_all(label_key)?;
        out.write_all(&label)?;
        out.write_all(close)?;
    }
    out.flush()?;
    println!("wrote {} rows to {name}", p.rows);
    Ok(())
}
