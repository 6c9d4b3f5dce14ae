"""Grid from Python and Jupyter: submit jobs, map a function over a DataFrame, watch it run in a
sandbox on the grid, and get a DataFrame back.

```python
import grid
g = grid.connect()                    # GRID_NATS_URL / GRID_CREDS / the local `grid up`

def simulate(mu: float, sigma: float, n: int) -> dict:
    import numpy as np
    x = grid.rng().normal(mu, sigma, n)   # the task's seeded generator
    return {"mean": x.mean(), "p99": np.quantile(x, 0.99)}

job = g.map(simulate, params_df, memory="256MiB", timeout="2min")
df = job.wait().to_pandas()           # one row per task: params, state, and what it returned
```

The package drives the `grid` command (see `_cli`): install Grid first (its README). Inside a
task, `import grid` is the sandbox's own helper (task, params, rng, folders); here the same
calls work too — job `local`, task 0, seed 0 — so a mapped function can be tried as it is.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from . import _map
from ._cli import Cli, GridError, JobFailed, PermissionDenied, Refused, Unreachable
from ._job import Job, _limit_flags
from ._task import Task, input_dir, input_files, output, output_dir, params, rng, task

__all__ = [
    "Client",
    "Job",
    "connect",
    "task_seed",
    "GridError",
    "Unreachable",
    "PermissionDenied",
    "Refused",
    "JobFailed",
    "Task",
    "task",
    "params",
    "rng",
    "input_dir",
    "output_dir",
    "input_files",
    "output",
]


def task_seed(job_seed: int, index: int) -> int:
    """The seed task `index` of a job seeded `job_seed` draws from (its GRID_SEED), derived as
    Grid derives it (`grid_proto::task_seed`): to run a task's function here with its numbers."""
    import hashlib
    import struct

    digest = hashlib.sha256(
        b"grid-seed-v1" + struct.pack("<Q", job_seed) + struct.pack("<Q", index)
    ).digest()
    return struct.unpack("<Q", digest[:8])[0]


def connect(nats: str | None = None, creds: str | os.PathLike | None = None) -> "Client":
    """A client of the grid at `nats` with `creds`, found as the `grid` command finds them
    (`GRID_NATS_URL`, `GRID_CREDS`, else the local `grid up`). Checks that the grid answers and
    accepts the credentials: raises `Unreachable` or `PermissionDenied` with the CLI's line."""
    client = Client(nats, creds)
    client._cli.run(["jobs", "--json"])
    return client


class Client:
    """One grid and one tenant's credentials."""

    def __init__(self, nats: str | None = None, creds: str | os.PathLike | None = None):
        self._cli = Cli(nats, creds)

    def __repr__(self) -> str:
        return f"<grid.Client {self._cli.nats or os.environ.get('GRID_NATS_URL') or 'local grid'}>"

    def submit(
        self,
        program: str | os.PathLike,
        *,
        params: Any = None,
        tasks: int | None = None,
        input: str | os.PathLike | None = None,
        shared: str | os.PathLike | None = None,
        replicas: int | None = None,
        quorum: int | None = None,
        seed: int | None = None,
        name: str | None = None,
        retries: int | None = None,
        env: dict | None = None,
        args: Iterable[str] = (),
        runtime: str | None = None,
        **limits: Any,
    ) -> Job:
        """Submits `program` (a `.wasm` module or a `.py` program), as `grid submit` does.
        `params` is a JSONL file, a list of dicts or a DataFrame (one task per row); limits as
        keywords: `memory="256MiB"`, `timeout="2min"`, `max_output=…`, `gpu_memory=…`,
        `gpu_time=…`."""
        with tempfile.TemporaryDirectory(prefix="grid-submit-") as tmp:
            flags: list[str] = []
            if params is not None:
                flags += ["--params", str(_params_file(params, Path(tmp)))]
            for flag, value in (
                ("--tasks", tasks),
                ("--input", input),
                ("--shared", shared),
                ("--replicas", replicas),
                ("--quorum", quorum),
                ("--seed", seed),
                ("--name", name),
                ("--retries", retries),
                ("--runtime", runtime),
            ):
                if value is not None:
                    flags += [flag, str(value)]
            for key, value in (env or {}).items():
                flags += ["--env", f"{key}={value}"]
            flags += _limit_flags(limits)
            args = list(args)
            submitted = self._cli.json(
                ["submit", str(program), *flags, *(["--", *args] if args else [])]
            )
        return Job(self, submitted["job_id"])

    def map(
        self,
        fn: Callable,
        rows: Any,
        *,
        name: str | None = None,
        seed: int | None = None,
        retries: int | None = None,
        **limits: Any,
    ) -> Job:
        """Runs `fn(**row)` for each row of `rows` (a DataFrame, or a list of dicts), one task
        each, in the sandbox, and returns the job (see `_map` for what travels). Each task's
        result comes back with `job.to_pandas()`."""
        source = _map.program(fn)
        with tempfile.TemporaryDirectory(prefix="grid-map-") as tmp:
            path = Path(tmp) / f"{fn.__name__}.py"
            path.write_text(source)
            return self.submit(
                path,
                params=rows,
                name=name or _job_name(fn.__name__),
                seed=seed,
                retries=retries,
                **limits,
            )

    async def submit_async(self, program: str | os.PathLike, **options: Any) -> Job:
        """`submit` for asyncio."""
        import asyncio

        return await asyncio.to_thread(lambda: self.submit(program, **options))

    async def map_async(self, fn: Callable, rows: Any, **options: Any) -> Job:
        """`map` for asyncio."""
        import asyncio

        return await asyncio.to_thread(lambda: self.map(fn, rows, **options))

    def jobs(self):
        """The tenant's jobs, one row each (a DataFrame when pandas is installed)."""
        return _frame(list(self._cli.json_lines(["jobs"])))

    def nodes(self):
        """The nodes online, one row each."""
        return _frame(list(self._cli.json_lines(["nodes"])))

    def usage(self, job: str | None = None):
        """What the tenant's tasks used, per job (or one job's), from the usage ledger."""
        usage = self._cli.json(["usage", *(["--job", job] if job else [])])
        return _frame(usage.get("jobs", [usage.get("total", {})]))


def _job_name(name: str) -> str:
    """A function's name as a job name (letters, digits, - _ ., starting with a letter)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    return cleaned if cleaned[:1].isalpha() else f"map-{cleaned}"[:64]


def _params_file(params: Any, folder: Path) -> Path:
    """`params` as a JSONL file: a path as it is; a DataFrame's rows or a list of dicts, one
    JSON object a line."""
    if isinstance(params, (str, os.PathLike)):
        return Path(params)
    if hasattr(params, "to_dict"):
        rows = params.to_dict(orient="records")
    else:
        rows = list(params)
    path = folder / "params.jsonl"
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=_map.jsonable, allow_nan=True) + "\n")
    return path


def _frame(rows: list):
    try:
        import pandas as pd

        return pd.json_normalize(rows) if rows else pd.DataFrame()
    except ImportError:
        return rows
