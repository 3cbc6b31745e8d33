"""ossrl.sandbox: run untrusted model-written Python in separate, limited processes (stdlib only).

    from ossrl.sandbox import Sandbox, Policy
    with Sandbox(Policy(timeout_s=1.0)) as sandbox:
        with sandbox.open(source, "strategy") as strategy:
            move = strategy(board)              # runs in a worker process
            cpu = strategy.last_cpu_ns          # measured from outside the worker

Layers: `check_source` (static, in this process) -> worker process (rlimits, no network,
`nobody`) -> restricted builtins and import guard -> audit hook. See docs/sandbox.md.
"""

from .errors import (SandboxBadReturn, SandboxCrash, SandboxError, SandboxException,
                     SandboxForbidden, SandboxMemoryError, SandboxTimeout)
from .policy import DEFAULT_ALLOWED_MODULES, Policy
from .sandbox import Outcome, RemoteFunction, RunResult, Sandbox, run_function
from .static import Violation, check_source

__all__ = [
    "DEFAULT_ALLOWED_MODULES", "Outcome", "Policy", "RemoteFunction", "RunResult", "Sandbox",
    "SandboxBadReturn", "SandboxCrash", "SandboxError", "SandboxException", "SandboxForbidden",
    "SandboxMemoryError", "SandboxTimeout", "Violation", "check_source", "run_function",
]
