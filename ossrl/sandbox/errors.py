"""The typed errors a caller of the sandbox can get, one class per failure category.

Every error is a `SandboxException`; its `category` string is what reward functions log.
Only `SandboxError` and `SandboxBadReturn` leave the worker alive: after any other error the
worker has been killed and the `RemoteFunction` refuses further calls.
"""

from __future__ import annotations


class SandboxException(Exception):
    """Base class of everything the sandbox raises about untrusted code."""

    category = "sandbox"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class SandboxError(SandboxException):
    """The untrusted code raised an exception; `exc_type` is its class name."""

    category = "error"

    def __init__(self, message: str, exc_type: str = "Exception", lineno: int | None = None):
        super().__init__(message)
        self.exc_type = exc_type
        self.lineno = lineno

    def __str__(self) -> str:
        where = f" (line {self.lineno})" if self.lineno else ""
        return f"{self.exc_type}: {self.message}{where}"


class SandboxBadReturn(SandboxException):
    """The code returned something that is not plain data (None/bool/int/float/str/list/
    tuple/dict with str keys, exact types only) or too large to send."""

    category = "bad_return"


class SandboxTimeout(SandboxException):
    """A call ran past its wall-clock limit (or the worker hit its CPU limit)."""

    category = "timeout"


class SandboxMemoryError(SandboxException):
    """The code ran out of its memory limit (MemoryError, or the worker was killed for it)."""

    category = "memory"


class SandboxForbidden(SandboxException):
    """The code did, or tried to do, something the policy refuses. `violations` lists the
    static findings when the refusal came from `check_source`."""

    category = "forbidden"

    def __init__(self, message: str, violations: list | None = None):
        super().__init__(message)
        self.violations = list(violations or [])


class SandboxCrash(SandboxException):
    """The worker died or broke the protocol (signal, exit, garbage on the pipe)."""

    category = "crash"
