"""The example notebook (examples/notebook/sweep.ipynb), run headless in a real IPython kernel
against the test grid: every cell runs, and what it shows is checked."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "notebook" / "sweep.ipynb"


def test_the_example_notebook_runs_end_to_end(local_grid, monkeypatch):
    # The kernel finds the grid as a user's would: GRID_NATS_URL and GRID_CREDS.
    monkeypatch.setenv("GRID_NATS_URL", local_grid._cli.nats)
    monkeypatch.setenv("GRID_CREDS", local_grid._cli.creds)
    monkeypatch.setenv("GRID_BIN", local_grid._cli.binary)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = {c["id"]: c.get("outputs", []) for c in nb.cells if c.cell_type == "code"}
    for cell_id, outs in outputs.items():
        assert not [o for o in outs if o.get("output_type") == "error"], (cell_id, outs)
    # The results table: six rows, every task succeeded.
    table = outputs["cell-4"][0]["data"]["text/plain"]
    assert table.count("succeeded") == 6, table
    # The plot was drawn.
    assert any("image/png" in o.get("data", {}) for o in outputs["cell-5"]), outputs["cell-5"]
    # The local rerun of task 0 gives the grid's numbers.
    local = outputs["cell-6"][0]["data"]["text/plain"]
    assert "'mean'" in local and "'p99'" in local, local
