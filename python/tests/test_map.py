"""`Client.map` against a real local grid: results, failures, cancel, retry, reconnecting."""

import os

import pandas as pd
import pytest

import grid


def simulate(mu: float, sigma: float, n: int) -> dict:
    import numpy as np

    x = grid.rng().normal(mu, sigma, n)
    return {"mean": x.mean(), "p99": np.quantile(x, 0.99)}


def test_map_over_a_dataframe_gives_what_the_function_gives_here(local_grid):
    rows = pd.DataFrame({"mu": [0.0, 1.0, 2.0, 3.0], "sigma": [1.0, 1.0, 2.0, 0.5], "n": [1000] * 4})
    job = local_grid.map(simulate, rows, memory="256MiB", timeout="2min", seed=7)
    df = job.wait(progress=False).to_pandas().sort_values("index")
    assert list(df["state"]) == ["succeeded"] * 4
    assert list(df["mu"]) == [0.0, 1.0, 2.0, 3.0]
    # The same function here, with each task's seed, gives the same numbers.
    for i, row in df.iterrows():
        os.environ["GRID_SEED"] = str(grid.task_seed(7, int(row["index"])))
        try:
            here = simulate(row["mu"], row["sigma"], int(row["n"]))
        finally:
            del os.environ["GRID_SEED"]
        assert row["mean"] == pytest.approx(here["mean"], rel=1e-12)
        assert row["p99"] == pytest.approx(here["p99"], rel=1e-12)


def fails_on_odd(k: int) -> dict:
    if k % 2:
        raise ValueError(f"odd k: {k}")
    return {"k": k}


def test_failures_come_back_with_why_and_a_retry_can_fix_nothing_deterministic(local_grid):
    job = local_grid.map(fails_on_odd, [{"k": k} for k in range(4)])
    with pytest.raises(grid.JobFailed) as failed:
        job.wait(progress=False)
    assert failed.value.job is job
    bad = job.failed()
    assert sorted(bad["index"]) == [1, 3]
    assert all(bad["detail"].str.startswith("ValueError: odd k"))
    assert all(bad["log_tail"].str.contains("Traceback"))
    # Picked up again from its id, in what could be a new kernel.
    again = grid.Job(local_grid, job.id)
    assert again.status()["tasks"]["failed"] == 2


class Opaque:
    pass


def test_what_cannot_travel_is_said_before_anything_is_sent(local_grid):
    thing = Opaque()

    def uses_it(k: int):
        return thing

    with pytest.raises(grid.GridError, match="uses variables of an enclosing function"):
        local_grid.map(uses_it, [{"k": 1}])


def returns_a_set(k: int):
    return {k}


def imports_torch(k: int):
    import torch

    return k


def test_a_value_json_cannot_hold_or_a_missing_module_fails_with_a_line_that_says_so(local_grid):
    job = local_grid.map(returns_a_set, [{"k": 1}])
    with pytest.raises(grid.JobFailed):
        job.wait(progress=False)
    assert "cannot travel back as JSON" in job.failed()["detail"][0]
    job = local_grid.map(imports_torch, [{"k": 1}])
    with pytest.raises(grid.JobFailed):
        job.wait(progress=False)
    assert "torch is not in Grid's Python runtime" in job.failed()["detail"][0]


def naps(seconds: float):
    import time

    # Long on its first try only: the retry below is quick.
    if grid.task().attempt == 0:
        time.sleep(seconds)
    return {"slept": seconds}


def test_cancel_then_retry_runs_the_rest(local_grid):
    job = local_grid.map(naps, [{"seconds": 60.0}] * 3)
    job.cancel()
    assert job.status()["state"] == "cancelled"
    with pytest.raises(grid.JobFailed, match="cancelled"):
        job.wait(progress=False)
    df = job.retry_failed().wait(progress=False).to_pandas()
    assert list(df["state"]) == ["succeeded"] * 3
    assert list(df["slept"]) == [60.0] * 3


def test_an_unreachable_grid_is_an_exception_with_the_cli_line():
    with pytest.raises(grid.Unreachable):
        grid.connect("nats://127.0.0.1:1")


def test_a_grid_that_refuses_is_permission_denied_with_the_cli_line(local_grid, monkeypatch):
    monkeypatch.delenv("GRID_CREDS", raising=False)
    with pytest.raises(grid.PermissionDenied, match="refused"):
        grid.connect(local_grid._cli.nats)


def writes_a_table(k: int) -> dict:
    import pandas as pd

    table = pd.DataFrame({"k": [k, k * 10]})
    table.to_csv(f"part-{k}.csv", index=False)
    table.to_json(f"rows-{k}.jsonl", orient="records", lines=True)
    return {"k": k}


def test_a_job_is_picked_up_from_a_new_process_and_its_tables_read_as_one(local_grid):
    job = local_grid.map(writes_a_table, [{"k": k} for k in range(3)], name="tables")
    job.wait(progress=False)
    # Another Python process, as a new kernel would be: the job by its name.
    script = (
        "import grid, sys; "
        "g = grid.Client(sys.argv[1], sys.argv[2]); "
        "print(grid.Job(g, 'tables').wait(progress=False).status()['job_id'])"
    )
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", script, local_grid._cli.nats, local_grid._cli.creds],
        capture_output=True,
        text=True,
        env={**os.environ, "GRID_BIN": local_grid._cli.binary, "PYTHONPATH": os.path.dirname(os.path.dirname(grid.__file__))},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == job.id
    table = job.read_csv("part-*.csv").sort_values(["task", "k"])
    assert list(table["task"]) == [0, 0, 1, 1, 2, 2]
    assert list(table["k"]) == [0, 0, 1, 10, 2, 20]
    # Any format, by its extension or a reader of one's own.
    rows = job.concat("rows-*.jsonl").sort_values(["task", "k"])
    assert list(rows["task"]) == [0, 0, 1, 1, 2, 2]
    assert list(rows["k"]) == [0, 0, 1, 10, 2, 20]
    import pandas as pd

    firsts = job.concat("part-*.csv", reader=lambda path: pd.read_csv(path).head(1))
    assert sorted(firsts["k"]) == [0, 1, 2]
    with pytest.raises(grid.GridError, match="matching 'nothing-\\*'"):
        job.concat("nothing-*")


def test_async_callers_wait_without_blocking_their_loop(local_grid):
    import asyncio

    async def main():
        job = await local_grid.map_async(fails_on_odd, [{"k": 0}, {"k": 2}])
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.05)

        ticker = asyncio.create_task(tick())
        await job.wait_async()
        ticker.cancel()
        return job, ticks

    job, ticks = asyncio.run(main())
    assert job.status()["state"] == "done"
    assert ticks > 1, "the loop ran while the job did"
