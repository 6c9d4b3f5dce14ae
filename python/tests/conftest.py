"""A real local grid for the package's tests: `grid up` (nats-server, a broker, a node) on a free
port with its own data dir, as the Rust tests' harness does; stopped at the end."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import grid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def local_grid(tmp_path_factory):
    data = tmp_path_factory.mktemp("grid-data")
    url = f"nats://127.0.0.1:{_free_port()}"
    binary = grid._cli.find_binary()
    log = open(data / "up.log", "wb")
    up = subprocess.Popen(
        [binary, "up", "--data-dir", str(data), "--nats", url, "--nodes", "1", "--no-gpu", "--no-dashboard"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    creds = data / "auth" / "creds" / "tenant-default.creds"
    deadline = time.monotonic() + 120
    client = None
    while client is None:
        assert up.poll() is None, (data / "up.log").read_text()
        assert time.monotonic() < deadline, "grid up did not come up: " + (data / "up.log").read_text()
        try:
            if creds.exists():
                candidate = grid.connect(url, creds)
                if len(candidate.nodes()) >= 1:
                    client = candidate
        except grid.GridError:
            pass
        time.sleep(0.5)
    yield client
    up.send_signal(signal.SIGINT)
    try:
        up.wait(timeout=30)
    except subprocess.TimeoutExpired:
        up.kill()
