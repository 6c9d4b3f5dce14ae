"""Prints what `import grid` sees: the task, its params (stdin), env and folders."""

import json
import os
import sys

import grid

t = grid.task()
p = grid.params(default={})
with grid.output("nested/hello.txt") as f:
    f.write(f"task {t.index} of {t.count}\n")
print(
    json.dumps(
        {
            "index": t.index,
            "count": t.count,
            "seed": t.seed,
            "job": t.job_id,
            "params": p,
            "argv": sys.argv,
            "inputs": grid.input_files(),
            "custom": os.environ.get("CUSTOM"),
            "secret": os.environ.get("GRID_TEST_HOST_SECRET"),
            "platform": sys.platform,
        }
    )
)
