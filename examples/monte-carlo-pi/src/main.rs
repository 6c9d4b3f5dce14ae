//! monte-carlo-pi: estimate π by sampling points in the unit square; one estimate per task.
//!
//! Writes `/out/estimate.json` (`{"samples","inside","pi"}`) and prints the estimate. Averaging
//! many tasks' `inside / samples` gives a better estimate; each task is seeded differently.
//!
//! Run one task:   `grid run target/wasm32-wasip1/release/monte-carlo-pi.wasm <<< '{"samples": 1000000}'`

use grid_guest::Task;
use grid_guest::rand::RngExt;
use std::io::Write;

#[derive(serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Params {
    samples: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self { samples: 1_000_000 }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let task = Task::current();
    let p: Params = task.params_or_default()?;
    let mut rng = task.rng();
    let mut inside = 0u64;
    for _ in 0..p.samples {
        let (x, y): (f64, f64) = (rng.random(), rng.random());
        inside += u64::from(x * x + y * y <= 1.0);
    }
    let pi = 4.0 * inside as f64 / p.samples.max(1) as f64;
    let mut out = grid_guest::create_output("estimate.json")?;
    writeln!(
        out,
        r#"{{"samples":{},"inside":{inside},"pi":{pi}}}"#,
        p.samples
    )?;
    out.flush()?;
    println!(
        "pi ≈ {pi:.6} from {} samples (task {})",
        p.samples, task.index
    );
    Ok(())
}
