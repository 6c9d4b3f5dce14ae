"""A job on the grid, seen from Python: its status, progress, results and failures."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._cli import GridError, JobFailed

if TYPE_CHECKING:
    from . import Client

# `grid status` says how a job ended with one of these.
ENDED = ("done", "failed", "cancelled")


class Job:
    """A job of the grid: `client.submit(…)` and `client.map(…)` return one, and
    `grid.Job(client, "01a2…")` (an id, a unique prefix of one, or a `--name`) picks one up again
    in a new kernel. Reading it asks the grid; nothing is cached but its id."""

    def __init__(self, client: "Client", job: str):
        self._client = client
        self.id = job

    def __repr__(self) -> str:
        s = self.status()
        t = s["tasks"]
        return (
            f"<grid.Job {self.id} {s['state']}: {t['succeeded']} of {t['total']} succeeded, "
            f"{t['failed']} failed, {t['running']} running>"
        )

    def _repr_html_(self) -> str:
        s = self.status()
        t = s["tasks"]
        total = max(t["total"], 1)
        done = 100 * (t["succeeded"] + t["failed"]) / total
        reason = f"<br><small>{_escape(s['reason'])}</small>" if s.get("reason") else ""
        return (
            f"<b>job {_escape(self.id)}</b> {_escape(s['state'])}: {t['succeeded']} of "
            f"{t['total']} succeeded, {t['failed']} failed, {t['running']} running"
            f'<div style="background:#eee;width:20em;height:.6em"><div style="background:#4a4;'
            f'width:{done:.0f}%;height:.6em"></div></div>{reason}'
        )

    def _ipython_display_(self) -> None:
        """Shown in Jupyter: a job still running is watched with a progress widget until it
        ends (interrupt the cell to stop watching; the job goes on), then summed up."""
        from IPython.display import HTML, display

        try:
            if self.status()["state"] not in ENDED:
                self.wait(progress=True)
        except JobFailed:
            pass
        display(HTML(self._repr_html_()))

    @property
    def _cli(self):
        return self._client._cli

    def status(self) -> dict:
        """What `grid status JOB --json` says: state, reason, seed and task counts."""
        status = self._cli.json(["status", self.id])
        self.id = status["job_id"]
        return status

    def wait(self, progress: bool | None = None, cancel_on_interrupt: bool = False) -> "Job":
        """Waits for the job to end, with progress (a widget in Jupyter, a bar on a terminal,
        nothing in a pipe: `progress` forces it on or off). Raises `JobFailed` if it failed or
        was cancelled. Interrupted (Ctrl-C, a notebook's stop button), it leaves the job running
        and says how to pick it up, or cancels it when `cancel_on_interrupt`."""
        status = self.status()
        bar = _bar(status["tasks"]["total"], progress)
        preparing, asked = None, 0.0
        try:
            while status["state"] not in ENDED:
                if bar is not None:
                    # Nothing runs yet: say what the nodes are doing (a first Python job waits
                    # for the runtime's compile, a minute or more), asked every few seconds.
                    if status["tasks"].get("running", 0) == 0:
                        if time.monotonic() - asked > 3:
                            preparing, asked = self._preparing(), time.monotonic()
                    else:
                        preparing = None
                    bar.show(status, preparing)
                time.sleep(0.5)
                status = self.status()
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            if cancel_on_interrupt:
                self.cancel()
                print(f"grid: job {self.id} cancelled", file=sys.stderr)
            else:
                print(
                    f"grid: stopped waiting; job {self.id} keeps running: "
                    f'grid.Job(client, "{self.id}").wait() follows it again, .cancel() stops it',
                    file=sys.stderr,
                )
            raise
        if bar is not None:
            bar.show(status)
            bar.close()
        if status["state"] != "done":
            raise JobFailed(
                f"job {self.id} {status['state']}: {status.get('reason') or ''}".rstrip(": "),
                job=self,
            )
        return self

    def _preparing(self) -> str | None:
        """What delays the nodes' tasks now (`grid nodes`' "preparing"), as one phrase."""
        try:
            nodes = list(self._cli.json_lines(["nodes"]))
        except GridError:
            return None
        now_ms = time.time() * 1000
        for node in nodes:
            p = node.get("preparing")
            if not p:
                continue
            left = (p.get("started_unix_ms", now_ms) + p.get("estimate_ms", 0) - now_ms) / 1000
            about = f", about {left:.0f} s left" if p.get("estimate_ms") and left > 0 else ""
            return f"node {node['id']}: {p.get('what', 'preparing')}{about}"
        return None

    async def wait_async(self, cancel_on_interrupt: bool = False) -> "Job":
        """`wait` for asyncio: the event loop goes on while the job runs (no progress bar)."""
        import asyncio

        return await asyncio.to_thread(self.wait, False, cancel_on_interrupt)

    async def status_async(self) -> dict:
        """`status` for asyncio."""
        import asyncio

        return await asyncio.to_thread(self.status)

    def cancel(self) -> dict:
        """Cancels the job: its running tasks stop, the rest never start."""
        return self._cli.json(["cancel", self.id])

    def retry_failed(self, **limits: Any) -> "Job":
        """Runs the tasks that did not succeed again, in the same job, with new limits if given
        (`memory="1GiB"`, `timeout="1h"`, `max_output=…`, `gpu_memory=…`, `gpu_time=…`)."""
        self._cli.json(["retry", self.id, "--failed", *_limit_flags(limits)])
        return self

    def logs(self, index: int) -> str:
        """Task `index`'s stdout and stderr, as it wrote them."""
        out = self._cli.run(["logs", self.id, "--task", str(index), "--raw"])
        return out.stdout.decode("utf-8", "replace") + out.stderr.decode("utf-8", "replace")

    def results(self, directory: str | os.PathLike) -> Path:
        """Downloads the job's outputs: DIR/<index>/… and DIR/manifest.jsonl."""
        directory = Path(directory)
        self._cli.run(["results", self.id, "-o", str(directory)])
        return directory

    def tasks(self) -> list[dict]:
        """One dict per task: index, state, reason, detail, attempts, node, times, and — for a
        `map` job — its params and the fields of what the function returned."""
        with tempfile.TemporaryDirectory(prefix="grid-results-") as tmp:
            self.results(tmp)
            rows = []
            for line in Path(tmp, "manifest.jsonl").read_text().splitlines():
                task = json.loads(line)
                row = {
                    k: task.get(k)
                    for k in ("index", "state", "reason", "detail", "attempts", "node", "wall_seconds")
                }
                result = Path(tmp, str(task["index"]), "result.json")
                if result.is_file():
                    ran = json.loads(result.read_text())
                    params, value = ran.get("params"), ran.get("result")
                    if isinstance(params, dict):
                        row.update(params)
                    if isinstance(value, dict):
                        row.update(value)
                    else:
                        row["result"] = value
                rows.append(row)
            return rows

    def to_pandas(self):
        """`tasks()` as a DataFrame, one row per task."""
        import pandas as pd

        return pd.DataFrame(self.tasks())

    def to_polars(self):
        """`tasks()` as a polars DataFrame (polars must be installed)."""
        import polars as pl

        return pl.DataFrame(self.tasks())

    def failed(self):
        """The tasks that did not succeed, with why and the end of their logs."""
        rows = [t for t in self.tasks() if t["state"] not in ("succeeded", "pending")]
        for row in rows:
            row["log_tail"] = self.logs(row["index"])[-2000:]
        try:
            import pandas as pd

            return pd.DataFrame(rows)
        except ImportError:
            return rows

    def read_csv(self, pattern: str = "*.csv", engine: str = "pandas", **read_csv_args: Any):
        """Every task's CSV files matching `pattern` in one DataFrame: `concat` with the CSV
        reader of `engine` ("pandas" or "polars"), `read_csv_args` passed to it."""
        if engine == "polars":
            import polars as pl

            return self.concat(pattern, lambda path: pl.read_csv(path, **read_csv_args), engine)
        import pandas as pd

        return self.concat(pattern, lambda path: pd.read_csv(path, **read_csv_args), engine)

    def concat(self, pattern: str, reader: Any = None, engine: str = "pandas"):
        """Every task's files matching `pattern` (a glob, as `grid results --concat`) read into
        one DataFrame, with a `task` column first saying which task each row came from.

        `reader(path)` reads one file into a DataFrame of `engine` ("pandas" or "polars");
        without one, the file's extension picks the engine's reader: `.csv`, `.tsv`,
        `.jsonl`/`.ndjson` (a JSON value per line), `.json`, `.parquet`."""
        import glob

        if engine not in ("pandas", "polars"):
            raise GridError(f"unknown engine {engine!r}: use \"pandas\" or \"polars\"")
        with tempfile.TemporaryDirectory(prefix="grid-results-") as tmp:
            self.results(tmp)
            frames = []
            for line in Path(tmp, "manifest.jsonl").read_text().splitlines():
                index = json.loads(line)["index"]
                for path in sorted(glob.glob(os.path.join(tmp, str(index), pattern), recursive=True)):
                    frame = (reader or _reader_for(path, engine))(path)
                    if engine == "polars":
                        import polars as pl

                        frame = frame.insert_column(0, pl.lit(index).alias("task"))
                    else:
                        frame.insert(0, "task", index)
                    frames.append(frame)
            if not frames:
                raise GridError(f"no task of job {self.id} wrote a file matching {pattern!r}")
            if engine == "polars":
                import polars as pl

                return pl.concat(frames, how="diagonal")
            import pandas as pd

            return pd.concat(frames, ignore_index=True)


def _reader_for(path: str, engine: str):
    """The reader of `engine` for a file with `path`'s extension."""
    suffix = Path(path).suffix.lower()
    if engine == "polars":
        import polars as pl

        readers = {
            ".csv": pl.read_csv,
            ".tsv": lambda p: pl.read_csv(p, separator="\t"),
            ".jsonl": pl.read_ndjson,
            ".ndjson": pl.read_ndjson,
            ".json": pl.read_json,
            ".parquet": pl.read_parquet,
        }
    else:
        import pandas as pd

        readers = {
            ".csv": pd.read_csv,
            ".tsv": lambda p: pd.read_csv(p, sep="\t"),
            ".jsonl": lambda p: pd.read_json(p, lines=True),
            ".ndjson": lambda p: pd.read_json(p, lines=True),
            ".json": pd.read_json,
            ".parquet": pd.read_parquet,
        }
    if suffix not in readers:
        raise GridError(
            f"no reader for {suffix or 'files without an extension'} ({Path(path).name}): "
            f"pass one, e.g. job.concat({Path(path).name!r}, reader=my_reader)"
        )
    return readers[suffix]


def _escape(text: Any) -> str:
    import html

    return html.escape(str(text))


def _limit_flags(limits: dict) -> list[str]:
    """`memory="1GiB"` as `--memory 1GiB`, for every limit the CLI takes."""
    known = ("memory", "timeout", "max_output", "gpu_memory", "gpu_time")
    flags = []
    for key, value in limits.items():
        if key not in known:
            raise GridError(f"unknown limit {key!r}: the limits are {', '.join(known)}")
        if value is not None:
            flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and shell.get_ipython() is not None and "IPKernelApp" in shell.get_ipython().config
    except Exception:
        return False


class _Bar:
    """Progress of a job: tqdm's (a widget in Jupyter) when installed, else a line redrawn on
    a terminal."""

    def __init__(self, total: int):
        self.total = total
        self.tqdm = None
        try:
            from tqdm.auto import tqdm

            self.tqdm = tqdm(total=total, unit="task", desc="grid")
        except ImportError:
            pass

    def show(self, status: dict, preparing: str | None = None) -> None:
        t = status["tasks"]
        done = t["succeeded"] + t["failed"] + t.get("disputed", 0) + t.get("cancelled", 0)
        note = preparing or f"{t['running']} running, {t['failed']} failed"
        if self.tqdm is not None:
            self.tqdm.n = done
            self.tqdm.set_postfix_str(note, refresh=False)
            self.tqdm.refresh()
            return
        width = 30
        filled = width * done // max(self.total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {note}  ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
        else:
            sys.stderr.write("\n")


def _bar(total: int, progress: bool | None) -> _Bar | None:
    if progress is None:
        progress = _in_notebook() or sys.stderr.isatty()
    return _Bar(total) if progress else None
