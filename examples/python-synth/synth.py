"""Synthetic tabular data with numpy and pandas: one CSV shard per task.

Params (stdin, one JSON line per task; all optional):
    {"rows": 1000, "correlation": 0.6}

Each task writes /out/data.csv (its shard): people with an age, an income that grows with age (by
`correlation`), a group and a score, drawn from the task's seed, so that the same job gives the
same bytes on any node. `grid results JOB -o DIR` puts the shards in DIR/<index>/data.csv;
`--concat data.csv` also joins them into one table, DIR/data.csv.
"""

import sys

import numpy as np
import pandas as pd

import grid

task = grid.task()
params = grid.params(default={})
rows = int(params.get("rows", 1000))
correlation = float(params.get("correlation", 0.6))
if rows < 1 or not -1.0 <= correlation <= 1.0:
    sys.exit(f"bad params {params}: rows must be >= 1 and correlation in [-1, 1]")

rng = grid.rng()
age = rng.integers(18, 80, size=rows)
noise = rng.standard_normal(rows)
z_age = (age - age.mean()) / (age.std() or 1.0)
income = 40_000 + 15_000 * (correlation * z_age + np.sqrt(1 - correlation**2) * noise)
frame = pd.DataFrame(
    {
        "id": np.arange(rows) + task.index * rows,
        "age": age,
        "income": income.round(2),
        "group": rng.choice(["a", "b", "c"], size=rows, p=[0.5, 0.3, 0.2]),
        "score": rng.beta(2.0, 5.0, size=rows).round(4),
    }
)
frame.to_csv(grid.output_dir() / "data.csv", index=False)
print(
    f"task {task.index}: {rows} rows, corr(age, income) = "
    f"{np.corrcoef(frame.age, frame.income)[0, 1]:.3f}"
)
