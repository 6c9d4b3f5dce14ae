"""What Grid's Python sandbox does not offer, said plainly when a program reaches for it.

The runtime's prelude calls `install()` before the program runs (grid-sandbox's `runtime.rs`,
`guest_argv`). It sets a `sys.excepthook` that prints an uncaught exception's traceback as
CPython does and, for the two surprises a newcomer meets first, ends it with one line that
starts with `grid: `:

- a module the runtime does not ship (`import torch`): CPython would blame a disabled `site`
  and a missing site-packages folder, which is wrong here (the runtime has no site-packages on
  purpose); the line says the package is not in the runtime, which ones are, and that
  `grid python packages` lists them;
- processes, threads and sockets (`multiprocessing`, `subprocess`, `threading`,
  `concurrent.futures`, `socket`): the sandbox has none, which CPython reports as "module 'os'
  has no attribute 'pipe'" or "can't start new thread".

It also makes `/out` the working directory: WASI has none of its own (CPython starts in `/`,
which the sandbox does not show), so `df.to_csv("res.csv")` would fail; it now writes the task's
output. A relative path that is not found is said to be relative to `/out`, inputs being under
`/in`.

Every other exception goes to the hook that was there before, untouched. Importing this module
costs each task next to nothing: the rest is imported only when a task fails.
"""

import sys

# Modules whose code reaches for what the sandbox lacks: a failure inside one of them (not one
# of the program's own bugs) is a missing process, thread or socket.
_NEEDS_THE_HOST = frozenset(
    {
        "multiprocessing",
        "concurrent",
        "subprocess",
        "threading",
        "socket",
        "ssl",
        "selectors",
        "urllib",
        "http",
        "ftplib",
        "smtplib",
    }
)
# How those failures look from inside the sandbox.
_HOST_ERRORS = (OSError, AttributeError, RuntimeError, NotImplementedError, ImportError)
# The packages a "not in the runtime" line names first, when the runtime has them.
_HEADLINERS = ("numpy", "pandas", "scipy", "scikit-learn", "matplotlib", "statsmodels")


def install():
    """Sets the hook and the working directory. Returns None, so that the prelude's `… or …`
    chain goes on."""
    import os

    try:
        os.chdir("/out")
    except OSError:
        pass
    previous = sys.excepthook

    def hook(kind, error, tb):
        try:
            line = _explain(kind, error, tb)
            if line is not None:
                _print_traceback(kind, error, tb)
                sys.stderr.write("grid: " + line + "\n")
                sys.stderr.flush()
                return
        except Exception:
            pass
        previous(kind, error, tb)

    sys.excepthook = hook


def _explain(kind, error, tb):
    """The line for `error`, or None when it is none of the surprises above."""
    module = _host_module(tb)
    if module is not None and isinstance(error, _HOST_ERRORS):
        return (
            "the sandbox has no processes, threads or sockets: "
            f"{module} is not available here (do the work in this process, or split it "
            "into more tasks of the job: `--tasks N`, `--params FILE`)"
        )
    if isinstance(error, FileNotFoundError) and _relative(error.filename):
        return (
            f"{error.filename} is relative to the working directory, /out (the task's output "
            "folder); inputs are under /in (`--input DIR`, `--shared DIR` at /in/shared)"
        )
    if isinstance(error, ModuleNotFoundError) and error.name:
        top = error.name.partition(".")[0]
        if top in sys.stdlib_module_names:
            return None  # CPython's own line says which standard module this build lacks
        return (
            f"{top} is not in Grid's Python runtime, which has {_shipped()} "
            "(`grid python packages` lists them all with their versions); packages with "
            "compiled code cannot be added, and pure-Python code travels with the job as a "
            "zip in `--shared` (see the README's Python jobs)"
        )
    return None


def _relative(path):
    """Whether `path` (an error's file name) is a relative path."""
    return isinstance(path, str) and path != "" and not path.startswith("/")


def _host_module(tb):
    """The outermost module of the traceback that needs the host, if any."""
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__") or ""
        top = name.partition(".")[0]
        if top in _NEEDS_THE_HOST:
            return name if top in ("concurrent", "urllib") else top
        tb = tb.tb_next
    return None


def _shipped():
    """A few of the runtime's packages with their versions, and how many more there are."""
    try:
        from importlib import metadata

        versions = {}
        for dist in metadata.distributions():
            name = dist.name
            if name:
                versions[name.lower()] = dist.version
        named = [f"{n} {versions[n]}" for n in _HEADLINERS if n in versions]
        more = len(versions) - len(named)
        return ", ".join(named) + (f" and {more} more" if more > 0 else "")
    except Exception:
        return "numpy, pandas, scipy, scikit-learn and more"


def _print_traceback(kind, error, tb):
    import traceback

    for chunk in traceback.TracebackException(kind, error, tb).format():
        # Without CPython's hint about a disabled `site` (see the module docs).
        head, hint, _ = chunk.partition(". Site initialization is disabled")
        sys.stderr.write(head + "\n" if hint else chunk)
