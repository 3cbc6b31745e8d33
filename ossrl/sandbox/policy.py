"""What untrusted code may do: the `Policy` dataclass and the name lists both layers share.

The same lists drive the static checker (`static.py`, in the caller's process) and the
runtime guards (`worker.py`, inside the worker, which receives them in its start message),
so the two layers cannot drift apart. Standard library only.
"""

from __future__ import annotations

import dataclasses

# Pure, side-effect-free standard library modules. Everything else (os, sys, io, time-free
# clocks, threading, subprocess, socket, ctypes, importlib, gc, inspect, ...) is refused.
DEFAULT_ALLOWED_MODULES = frozenset({
    "abc", "array", "bisect", "cmath", "collections", "collections.abc", "copy",
    "dataclasses", "decimal", "enum", "fractions", "functools", "heapq", "itertools",
    "math", "numbers", "operator", "random", "re", "statistics", "string", "time",
    "typing",
})

# Builtins that are replaced by a stub which records a violation and raises.
# (`__import__` is replaced by the import guard; getattr/setattr/delattr/hasattr by wrappers
# that refuse the attribute names below.)
FORBIDDEN_BUILTINS = frozenset({
    "breakpoint", "compile", "copyright", "credits", "eval", "exec", "exit", "globals",
    "help", "input", "license", "locals", "open", "quit", "vars",
})

# Names the static checker refuses wherever they appear (plus any dunder name other than
# __name__ and __doc__, see static.py).
FORBIDDEN_NAMES = FORBIDDEN_BUILTINS | {"__import__", "importlib"}

# Dunder attributes that are plain data-model hooks: reading them cannot reach a class,
# a module, globals, code or a frame. Every other dunder attribute is refused.
_OPS = ("add sub mul matmul truediv floordiv mod divmod pow lshift rshift and xor or "
        "neg pos abs invert").split()
SAFE_DUNDER_ATTRIBUTES = frozenset(
    {f"__{op}__" for op in _OPS}
    | {f"__r{op}__" for op in _OPS}
    | {f"__i{op}__" for op in _OPS}
    | {f"__{n}__" for n in (
        "init new post_init call repr str format bool hash len length_hint iter next "
        "reversed contains getitem setitem delitem missing eq ne lt le gt ge enter exit "
        "int float complex index round trunc floor ceil name qualname doc copy deepcopy "
        "aenter aexit aiter anext await").split()}
)

# Non-dunder attributes of frames, generators, coroutines, tracebacks and code objects.
INTERNAL_ATTRIBUTES = frozenset({
    "gi_frame", "gi_code", "gi_yieldfrom", "gi_running", "gi_suspended",
    "cr_frame", "cr_code", "cr_await", "cr_origin", "cr_running",
    "ag_frame", "ag_code", "ag_await", "ag_running",
    "f_back", "f_builtins", "f_code", "f_globals", "f_locals", "f_trace", "f_lasti",
    "tb_frame", "tb_next", "tb_lasti",
    "co_code", "co_consts", "co_names", "co_varnames", "co_filename",
    "func_globals", "func_code", "func_closure", "cell_contents", "mro",
})


def is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def is_forbidden_attribute(name: str) -> bool:
    """True for attribute names untrusted code may not read, write or delete."""
    if name in INTERNAL_ATTRIBUTES:
        return True
    return is_dunder(name) and name not in SAFE_DUNDER_ATTRIBUTES


@dataclasses.dataclass(frozen=True)
class Policy:
    """Limits for one candidate's worker. Times in seconds, sizes in bytes."""

    allowed_modules: frozenset[str] = DEFAULT_ALLOWED_MODULES
    timeout_s: float = 2.0          # wall time per call, enforced by the parent (SIGKILL)
    load_timeout_s: float = 5.0     # wall time to run the module body and find the entry
    cpu_seconds: int = 60           # RLIMIT_CPU over the worker's whole life
    memory_bytes: int = 512 << 20   # RLIMIT_AS: the interpreter itself takes ~30 MB of it
    max_output_chars: int = 64 << 10    # captured print() output kept per worker
    max_message_bytes: int = 64 << 20   # largest encoded argument list or result
    max_source_bytes: int = 1 << 20
    recursion_limit: int = 3000
    isolate_network: bool = True    # empty network namespace where the OS allows it
    drop_privileges: bool = True    # run the worker as `nobody` when started as root
    static_checks: bool = True      # off only to test the runtime layers on their own

    def __post_init__(self):
        object.__setattr__(self, "allowed_modules", frozenset(self.allowed_modules))
        for field in ("timeout_s", "load_timeout_s", "cpu_seconds", "memory_bytes",
                      "max_output_chars", "max_message_bytes", "recursion_limit"):
            if getattr(self, field) <= 0:
                raise ValueError(f"Policy.{field} must be positive, got {getattr(self, field)!r}")

    def worker_config(self) -> dict:
        """The JSON-able start message a worker receives (lists instead of sets)."""
        return {
            "allowed_modules": sorted(self.allowed_modules),
            "forbidden_builtins": sorted(FORBIDDEN_BUILTINS),
            "safe_dunders": sorted(SAFE_DUNDER_ATTRIBUTES),
            "internal_attributes": sorted(INTERNAL_ATTRIBUTES),
            "cpu_seconds": self.cpu_seconds,
            "memory_bytes": self.memory_bytes,
            "max_output_chars": self.max_output_chars,
            "max_message_bytes": self.max_message_bytes,
            "recursion_limit": self.recursion_limit,
            "isolate_network": self.isolate_network,
            "drop_privileges": self.drop_privileges,
        }
