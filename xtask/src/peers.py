"""Grid's peers on the figures of `cargo xtask bench grid`, with 2 worker slots each.

`cargo xtask bench peers` runs this in Grid's venv (where it installs Ray and Dask on demand)
right after Grid's own run, so that the table compares one machine at one time:

- trivial tasks per second: `TRIVIAL` calls of a function that does nothing, submitted at once
  and gathered, after a warm-up round;
- ~100 ms tasks: `COMPUTE` calls of a pure-Python loop calibrated here to take ~100 ms when
  called directly in this process; the ratio is the wall time over `COMPUTE` x direct / slots,
  as Grid's row is over its task run directly in the sandbox.

Prints one JSON object per peer on stdout; progress goes to stderr.
"""

import json
import statistics
import sys
import time

SLOTS = 2
TRIVIAL = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
COMPUTE = int(sys.argv[2]) if len(sys.argv) > 2 else 120


def nop(_i=None):
    return None


def busy(n):
    x = 0
    for i in range(n):
        x += i * i % 7
    return x


def time_of(n):
    started = time.perf_counter()
    busy(n)
    return time.perf_counter() - started


def calibrate(target=0.1):
    """The loop count that takes `target` seconds here, and the median of 5 direct calls."""
    n = 100_000
    while (t := time_of(n)) < 0.02:
        n *= 2
    n = int(n * target / t)
    return n, statistics.median(time_of(n) for _ in range(5))


def say(line):
    print(f"peers: {line}", file=sys.stderr, flush=True)


def ray_figures(n, direct_s):
    import ray

    ray.init(num_cpus=SLOTS, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    remote_nop = ray.remote(nop)
    remote_busy = ray.remote(busy)
    ray.get([remote_nop.remote() for _ in range(1_000)])  # workers started and warm
    started = time.perf_counter()
    ray.get([remote_nop.remote() for _ in range(TRIVIAL)])
    trivial_s = time.perf_counter() - started
    ray.get([remote_busy.remote(n) for _ in range(SLOTS)])
    started = time.perf_counter()
    ray.get([remote_busy.remote(n) for _ in range(COMPUTE)])
    compute_s = time.perf_counter() - started
    ray.shutdown()
    return ray.__version__, trivial_s, compute_s


def dask_figures(n, direct_s):
    import dask
    from dask.distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=SLOTS, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, Client(cluster) as client:
        client.gather(client.map(nop, range(1_000), pure=False))
        started = time.perf_counter()
        client.gather(client.map(nop, range(TRIVIAL), pure=False))
        trivial_s = time.perf_counter() - started
        client.gather(client.map(busy, [n] * SLOTS, pure=False))
        started = time.perf_counter()
        client.gather(client.map(busy, [n] * COMPUTE, pure=False))
        compute_s = time.perf_counter() - started
    return dask.__version__, trivial_s, compute_s


def main():
    n, direct_s = calibrate()
    say(f"a ~100 ms task is busy({n}): {direct_s * 1e3:.1f} ms called directly")
    for name, figures in (("ray", ray_figures), ("dask", dask_figures)):
        say(f"{name}: {TRIVIAL} trivial tasks, then {COMPUTE} ~100 ms tasks on {SLOTS} slots")
        version, trivial_s, compute_s = figures(n, direct_s)
        ideal_s = COMPUTE * direct_s / SLOTS
        print(
            json.dumps(
                {
                    "peer": name,
                    "version": version,
                    "slots": SLOTS,
                    "trivial_tasks": TRIVIAL,
                    "trivial_per_s": TRIVIAL / trivial_s,
                    "compute_tasks": COMPUTE,
                    "compute_direct_s": direct_s,
                    "compute_s": compute_s,
                    "compute_ideal_s": ideal_s,
                    "compute_ratio": compute_s / ideal_s,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
