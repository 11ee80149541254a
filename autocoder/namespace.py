"""What the model is told about a namespace: the user's names and their short types.

The magic reads the user's own shell directly; a session's kernel is sandboxed in another
process, so `probe_code()` sends this very module's source there and runs it in a throwaway
namespace: one implementation, read in both places. Only the standard library is used here,
so the module runs unchanged inside any kernel.
"""

from __future__ import annotations

import types
from typing import Any

MAX_NAMES = 60
PROBE_MARK = "\x1eautocoder-names:"
_HIDDEN_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython"})


def short_type(value: object) -> str:
    """A type a model can read (`pandas.DataFrame`, `list`), with a size where that is cheap."""
    if isinstance(value, type):
        return "class"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return "function"
    cls = type(value)
    package = (getattr(cls, "__module__", None) or "").split(".")[0]
    name = cls.__qualname__ if package == "builtins" else f"{package}.{cls.__qualname__}"
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return f"{name}, {len(value)} items"
    if package in {"numpy", "pandas", "polars", "xarray", "torch"}:
        try:
            shape = value.shape  # type: ignore[attr-defined]
        except Exception:
            shape = None
        if isinstance(shape, tuple) and all(isinstance(n, int) for n in shape):
            return f"{name}, shape {shape}"
    return name


def user_names(user_ns: dict[str, Any], hidden: dict[str, Any]) -> list[tuple[str, str]]:
    """The user's own names and short types, as `%who` sees them, modules left out."""
    missing = object()
    names = [
        (name, short_type(value))
        for name, value in list(user_ns.items())
        if not name.startswith("_")
        and name not in _HIDDEN_NAMES
        and value is not hidden.get(name, missing)
        and not isinstance(value, types.ModuleType)
    ]
    return names[-MAX_NAMES:]


def task_with_names(prompt: str, names: list[tuple[str, str]]) -> str:
    """The task as the model gets it: the names that exist (never their values), then the prompt."""
    if not names:
        return prompt
    listing = "\n".join(f"- {name}: {kind}" for name, kind in names)
    return (
        "These names already exist in the user's session (name: type):\n"
        f"{listing}\n\nTask:\n{prompt}"
    )


def probe_code() -> str:
    """Code for a kernel that prints its `user_names` as one marked JSON line (see
    `parse_probe`). It runs in a namespace of its own, so it leaves no name behind."""
    import inspect
    import sys

    source = inspect.getsource(sys.modules[__name__])
    body = (
        f"{source}\n"
        "import json as _json\n"
        "_ip = get_ipython()\n"
        "print(PROBE_MARK + _json.dumps(user_names(_ip.user_ns, _ip.user_ns_hidden)))\n"
    )
    return f"exec({body!r}, {{'get_ipython': get_ipython, '__name__': 'autocoder_names'}})"


def parse_probe(stdout: str) -> list[tuple[str, str]] | None:
    """The names `probe_code` printed, or None if it printed none (it failed)."""
    import json

    for line in reversed(stdout.split("\n")):  # splitlines() would split at the mark
        if line.startswith(PROBE_MARK):
            try:
                found = json.loads(line[len(PROBE_MARK) :])
            except ValueError:
                return None
            return [(str(n), str(t)) for n, t in found]
    return None
