"""One point of a parameter sweep: params {"x": X}; writes /out/point.csv with X, the sum of
the first X squares computed with numpy, and a seeded draw."""

import numpy as np

import grid

x = int(grid.params()["x"])
squares = int(np.sum(np.arange(x + 1, dtype=np.int64) ** 2))
draw = grid.rng().integers(0, 1_000_000)
with grid.output("point.csv") as f:
    f.write("x,squares,draw\n")
    f.write(f"{x},{squares},{draw}\n")
