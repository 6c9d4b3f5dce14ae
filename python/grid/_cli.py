"""The `grid` command, run for the package: every call is one `grid … --json`.

The package drives Grid through the command users type rather than a second client: the CLI's
JSON lines are a tested contract, and everything the CLI knows (credentials, uploads shared by
content, job names and id prefixes, bounded reads of what a tenant stored) comes with it. A call
costs a process start (milliseconds), nothing next to a task. Errors come back as the CLI's own
one-line messages, raised as `GridError` subclasses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator, Sequence


class GridError(Exception):
    """Something Grid refused or could not do; the message is the `grid` command's line."""


class Unreachable(GridError):
    """No grid answered at the address (start one with `grid up`)."""


class PermissionDenied(GridError):
    """The grid answered and refused: credentials missing or not allowed this."""


class Refused(GridError):
    """The grid refused the job (a limit over every node's, a bad module, …)."""


class JobFailed(GridError):
    """A job that was waited for ended failed or cancelled; `.job` is its `Job`."""

    def __init__(self, message: str, job: Any = None):
        super().__init__(message)
        self.job = job


def find_binary() -> str:
    """The `grid` command: `GRID_BIN`, else on `PATH`, else this repository's build."""
    named = os.environ.get("GRID_BIN")
    if named:
        return named
    on_path = shutil.which("grid")
    if on_path:
        return on_path
    # This repository's build, the newest of its profiles.
    repo = Path(__file__).resolve().parents[2]
    built = [p for p in (repo / "target" / "release" / "grid", repo / "target" / "debug" / "grid") if p.is_file()]
    if built:
        return str(max(built, key=lambda p: p.stat().st_mtime))
    raise GridError(
        "the `grid` command is not installed: `cargo install --locked --path grid-cli` in "
        "Grid's repository (see its README), or set GRID_BIN to it"
    )


def _error(line: str, code: int) -> GridError:
    """The exception for the CLI's error line `line` and exit status `code`."""
    text = line.removeprefix("grid: ")
    lowered = text.lower()
    if "cannot reach the grid" in lowered or "nothing listens" in lowered:
        return Unreachable(text)
    if "permission denied" in lowered or "answered but refused" in lowered or "refused the credentials" in lowered:
        return PermissionDenied(text)
    if code == 1 and ("refused" in lowered or "invalid:" in lowered):
        return Refused(text)
    return GridError(text)


class Cli:
    """How to reach one grid: the address and credentials every call passes."""

    def __init__(self, nats: str | None = None, creds: str | os.PathLike | None = None):
        self.binary = find_binary()
        self.nats = nats
        self.creds = str(creds) if creds is not None else None

    def _command(self, args: Sequence[str], conn: bool) -> list[str]:
        args = [str(a) for a in args]
        # The connection flags go right after the subcommand: anything after `--` is the task's.
        head, tail = args[:1], args[1:]
        flags: list[str] = []
        if conn and self.nats:
            flags += ["--nats", self.nats]
        if conn and self.creds:
            flags += ["--creds", self.creds]
        return [self.binary, *head, *flags, *tail]

    def run(
        self,
        args: Sequence[str],
        *,
        ok: Sequence[int] = (0,),
        conn: bool = True,
        stdin: bytes | None = None,
    ) -> subprocess.CompletedProcess:
        """Runs `grid ARGS`; an exit status not in `ok` raises the CLI's error line."""
        done = subprocess.run(
            self._command(args, conn),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        if done.returncode not in ok:
            stderr = done.stderr.decode("utf-8", "replace")
            # The CLI's own line (`grid: …`), or its argument parser's (`error: …`).
            said = [l for l in stderr.splitlines() if l.startswith("grid: ")]
            said = said or [l for l in stderr.splitlines() if l.startswith("error: ")]
            line = said[-1] if said else (stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            raise _error(line, done.returncode)
        return done

    def json(self, args: Sequence[str], *, ok: Sequence[int] = (0,)) -> Any:
        """`grid ARGS --json`: its last JSON line."""
        lines = list(self.json_lines(args, ok=ok))
        if not lines:
            raise GridError(f"`grid {args[0]}` printed no JSON")
        return lines[-1]

    def json_lines(self, args: Sequence[str], *, ok: Sequence[int] = (0,)) -> Iterator[Any]:
        """`grid ARGS --json`: each of its JSON lines."""
        args = list(args)
        split = args.index("--") if "--" in args else len(args)
        args.insert(split, "--json")
        out = self.run(args, ok=ok).stdout.decode("utf-8", "replace")
        for line in out.splitlines():
            if line.strip():
                yield json.loads(line)

    def stream(self, args: Sequence[str]) -> subprocess.Popen:
        """`grid ARGS --json` running, its JSON lines readable as they come (`--watch`)."""
        return subprocess.Popen(
            self._command([*args, "--json"], True),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "NO_COLOR": "1"},
        )
