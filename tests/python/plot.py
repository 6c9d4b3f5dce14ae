"""A matplotlib figure written to /out, and a temporary file through `tempfile`."""

import tempfile

import matplotlib.pyplot as plt
import numpy as np

with tempfile.TemporaryFile() as scratch:
    scratch.write(b"scratch")
    scratch.seek(0)
    assert scratch.read() == b"scratch"

x = np.linspace(0, 2 * np.pi, 200)
fig, ax = plt.subplots()
ax.plot(x, np.sin(x))
ax.set_title("sine")
fig.savefig("/out/sine.png")
print("saved")
