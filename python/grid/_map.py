"""A Python function as a Grid job: its source, and only what it names, as a program.

`Client.map(fn, rows)` runs `fn(**row)` once per row, each in the sandbox a `grid submit
job.py` task gets. Nothing of the notebook's interpreter travels: no pickles (the sandbox's
CPython is another version, and a pickle is code). What travels is text:

- the function's source;
- for each global name it uses: an `import` for a module (`np` → `import numpy as np`), the
  source of a plain function defined beside it (and what *that* names, in turn), a JSON
  literal for a number, string, list or dict; anything else is refused with a line that names
  it and says to pass it as a parameter.

Each task writes `/out/result.json`: `{"params": row, "result": fn(**row)}`. A return value that
JSON cannot hold (after NumPy scalars and arrays become numbers and lists) fails the task with a
line that says so; an exception fails it with its traceback, as any Python task.
"""

from __future__ import annotations

import builtins
import dis
import inspect
import json
import textwrap
import types
from typing import Any, Callable

from ._cli import GridError

RESULT_FILE = "result.json"


def program(fn: Callable) -> str:
    """The program that runs `fn` on each task's params line."""
    if not isinstance(fn, types.FunctionType):
        raise GridError(f"map takes a plain Python function, not {type(fn).__name__}")
    if fn.__name__ == "<lambda>":
        raise GridError("map takes a function defined with `def` (a lambda's source cannot travel)")
    if fn.__closure__:
        names = ", ".join(fn.__code__.co_freevars)
        raise GridError(
            f"{fn.__name__} uses variables of an enclosing function ({names}): define it at the "
            "top level and pass them as parameters"
        )
    preamble: list[str] = []
    functions: list[str] = []
    _gather(fn, preamble, functions, seen=set())
    return "\n".join(
        [
            "# Made by grid.Client.map: runs the function below on this task's params line.",
            "import json as _json",
            "import sys as _sys",
            "import grid as _grid",
            *preamble,
            "",
            *functions,
            _RUNNER.format(name=fn.__name__, result=RESULT_FILE),
        ]
    )


def _gather(fn: types.FunctionType, preamble: list[str], functions: list[str], seen: set) -> None:
    """Adds `fn`'s source, and what its global names need, to the program."""
    if fn.__name__ in seen:
        return
    seen.add(fn.__name__)
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as e:
        raise GridError(f"the source of {fn.__name__} cannot be read ({e}): define it in a cell or a file") from e
    for name in sorted(_global_names(fn.__code__)):
        if name in fn.__globals__:
            value = fn.__globals__[name]
        elif hasattr(builtins, name):
            continue
        else:
            continue  # a NameError in the task says so, as it would here
        if isinstance(value, types.ModuleType):
            module = value.__name__
            # `grid` here is this package; in the task it is the sandbox's own helper (its
            # params, seed, folders), which has the same calls.
            line = f"import {module}" if module == name else f"import {module} as {name}"
            if line not in preamble:
                preamble.append(line)
        elif isinstance(value, types.FunctionType) and value.__module__ == fn.__module__:
            _gather(value, preamble, functions, seen)
        elif _is_json_literal(value):
            line = f"{name} = _json.loads({json.dumps(json.dumps(value))})"
            if line not in preamble:
                preamble.append(line)
        elif callable(value) and getattr(value, "__module__", None):
            module = value.__module__
            line = f"from {module} import {value.__name__}" + (
                "" if value.__name__ == name else f" as {name}"
            )
            if line not in preamble:
                preamble.append(line)
        else:
            raise GridError(
                f"{fn.__name__} uses {name} (a {type(value).__name__}), which cannot travel to "
                "the grid: pass it as a parameter, or build it inside the function"
            )
    functions.append(source)


def _global_names(code: types.CodeType) -> set[str]:
    """The global names `code` and the code nested in it load (not attribute names: `x.mean`
    names no global `mean`)."""
    names = {
        i.argval
        for i in dis.get_instructions(code)
        if i.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(i.argval, str)
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _is_json_literal(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_json_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_literal(v) for k, v in value.items())
    return False


def jsonable(value: Any) -> Any:
    """`value` as JSON can hold it: NumPy scalars and arrays, pandas rows, as numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON")


_RUNNER = '''
def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"{{type(value).__name__}} is not JSON")


_params = _grid.params()
_result = {name}(**_params) if isinstance(_params, dict) else {name}(_params)
try:
    _text = _json.dumps({{"params": _params, "result": _result}}, default=_jsonable, allow_nan=True)
except (TypeError, ValueError) as _e:
    print(
        f"grid: the value {name} returned cannot travel back as JSON ({{_e}}): return numbers, "
        "strings, lists and dicts, or write files to /out",
        file=_sys.stderr,
    )
    _sys.exit(3)
with open("/out/{result}", "w") as _f:
    _f.write(_text)
'''
