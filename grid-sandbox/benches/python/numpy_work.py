"""The numpy-heavy task of the Python benchmark: the same script in the sandbox and on the host's
CPython. It prints the seconds its numerical work took, measured inside (import excluded)."""

import time

import numpy as np

rng = np.random.default_rng(0)
started = time.perf_counter()
a = rng.standard_normal((300, 300))
b = rng.standard_normal((300, 300))
total = 0.0
for _ in range(5):
    total += float((a @ b).sum())
x = rng.standard_normal(1 << 20)
total += float(np.sort(x)[1000])
total += float(np.abs(np.fft.fft(x[: 1 << 18])).max())
total += float(np.cumsum(x).mean() + np.std(x))
print(f"{time.perf_counter() - started:.6f} {total:.3f}")
