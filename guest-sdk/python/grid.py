"""Grid's helper for Python jobs: `import grid`.

The same contract as the Rust SDK (`grid-guest`). Each task of a job runs the program once, in
a sandbox, and sees:

| what | where | here |
|---|---|---|
| which task it is | env GRID_JOB_ID, GRID_TASK_INDEX, GRID_TASK_COUNT, GRID_SEED, GRID_ATTEMPT | `task()` |
| its parameters | stdin: one line of the job's params file (JSON) | `params()` |
| its inputs | /in, read-only (the job's shared inputs in /in/shared) | `input_files()`, `input_dir()` |
| its outputs | /out, quota-limited; what is there at exit is the result | `output_dir()`, `output()` |
| randomness | seeded from GRID_SEED: the same task gives the same bytes on any node | `rng()`, `task().seed` |

No network, no threads, no subprocesses, no host files. Exit non-zero (or raise) to fail the
task; Grid reports `exit: N` and retries if the job allows it.

Outside Grid (plain CPython on a laptop) the same calls work: job `local`, task 0 of 1, seed 0,
and /in and /out are read from GRID_IN_DIR and GRID_OUT_DIR when set.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Task", "task", "params", "rng", "input_dir", "output_dir", "input_files", "output"]


@dataclass(frozen=True)
class Task:
    """Who this task is."""

    job_id: str
    index: int  # 0-based index of this task in its job
    count: int  # number of tasks in the job
    seed: int  # this task's seed, derived by Grid from the job seed and the index
    attempt: int  # 0 the first try, 1 the first retry, ... (results should not depend on it)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def task() -> Task:
    """The task as Grid described it in the environment."""
    return Task(
        job_id=os.environ.get("GRID_JOB_ID", "local"),
        index=_env_int("GRID_TASK_INDEX", 0),
        count=_env_int("GRID_TASK_COUNT", 1),
        seed=_env_int("GRID_SEED", 0),
        attempt=_env_int("GRID_ATTEMPT", 0),
    )


_params_read = False
_params_value = None


def params(default=None):
    """The task's parameters: stdin parsed as JSON, read once; `default` when stdin is empty."""
    global _params_read, _params_value
    if not _params_read:
        text = sys.stdin.read()
        _params_value = json.loads(text) if text.strip() else None
        _params_read = True
    return default if _params_value is None else _params_value


def rng():
    """A numpy Generator (PCG64) seeded with this task's seed: the same numbers on every node."""
    import numpy as np

    return np.random.default_rng(task().seed)


def _dir(var: str, sandbox: str) -> Path:
    if sys.platform == "wasi":
        return Path(sandbox)
    return Path(os.environ.get(var, sandbox))


def input_dir() -> Path:
    """/in: the task's inputs (and the job's shared inputs under /in/shared), read-only."""
    return _dir("GRID_IN_DIR", "/in")


def output_dir() -> Path:
    """/out: what is here when the task exits is its result."""
    return _dir("GRID_OUT_DIR", "/out")


def input_files() -> list[str]:
    """The names of the files in /in (not /in/shared), in byte order, so that a task gives the
    same bytes on every node whatever order the provider's filesystem lists them in."""
    d = input_dir()
    return sorted((p.name for p in d.iterdir() if p.is_file()), key=lambda n: n.encode())


def output(name: str, mode: str = "w"):
    """Opens /out/NAME for writing (creating its folders)."""
    path = output_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, mode)
