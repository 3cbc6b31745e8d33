"""Run untrusted functions in separate worker processes: `Sandbox`, `RemoteFunction`,
`run_function`.

A `Sandbox` keeps a few workers pre-started (`worker.py`, one process each). `open(source,
entry)` checks the source statically, hands it to a fresh worker and returns a
`RemoteFunction`: calling it sends the arguments (copied, plain data) down a pipe and reads
the result back as JSON. Each worker serves exactly one candidate and is killed when the
`RemoteFunction` closes; a replacement starts in the background.

The one thing to know: every limit that matters is enforced from here, outside the untrusted
code. Timeouts are a deadline on the pipe followed by SIGKILL, and CPU time is read from
`/proc/<pid>/schedstat`, so nothing the code does (catching exceptions, patching clocks,
signal handlers) changes either.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import marshal
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, Sequence

from .errors import (SandboxBadReturn, SandboxCrash, SandboxError, SandboxException,
                     SandboxForbidden, SandboxMemoryError, SandboxTimeout)
from .policy import Policy
from .process import WorkerGone, WorkerProcess
from .static import check_source

_FAILURES = {"error": SandboxError, "bad_return": SandboxBadReturn, "memory": SandboxMemoryError,
             "forbidden": SandboxForbidden, "timeout": SandboxTimeout}


# ---------------------------------------------------------------- the function handle
class RemoteFunction:
    """A candidate's function, loaded in its own worker. Call it like the function.

    `last_cpu_ns` is the worker's CPU time for the latest call (read from /proc by this
    process; it includes decoding the arguments and encoding the result in the worker),
    `cpu_ns` the total over all calls. `output` holds what the code printed (capped).
    After a timeout, memory error, forbidden action or crash the worker is gone and every
    further call raises the same kind of error.
    """

    def __init__(self, worker: WorkerProcess, policy: Policy, entry: str):
        self._worker = worker
        self.policy = policy
        self.entry = entry
        self.pid = worker.pid
        self.info = dict(worker.info or {})
        self.network_isolated = bool(worker.argv[0] != sys.executable)
        self.calls = 0
        self.cpu_ns = 0
        self.last_cpu_ns = 0
        self.output = ""
        self._seq = 0
        self._clock = 0
        self._failure: SandboxException | None = None

    @property
    def alive(self) -> bool:
        return self._failure is None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(args, kwargs)

    def timed(self, *args: Any, **kwargs: Any) -> tuple[Any, int]:
        """(result, CPU nanoseconds of this call measured outside the worker)."""
        result = self.call(args, kwargs)
        return result, self.last_cpu_ns

    def call(self, args: Sequence = (), kwargs: dict | None = None, timeout: float | None = None) -> Any:
        if self._failure is not None:
            raise type(self._failure)(f"worker already stopped after: {self._failure.message}")
        self._seq += 1
        try:
            request = marshal.dumps(("call", self._seq, tuple(args), dict(kwargs or {})))
        except ValueError:
            raise TypeError("sandbox arguments must be plain data (None, bool, int, float, "
                            "str, bytes, list, tuple, dict, set)") from None
        return self._exchange(request, self._seq, self.policy.timeout_s if timeout is None else timeout)

    def _load(self, source: str, timeout: float) -> None:
        self._exchange(marshal.dumps(("load", source, self.entry)), 0, timeout)
        self.calls = self.cpu_ns = self.last_cpu_ns = 0

    def _exchange(self, request: bytes, seq: int, timeout: float) -> Any:
        worker = self._worker
        deadline = time.monotonic() + timeout
        try:
            worker.send(request)
            reply = worker.recv(deadline, self.policy.max_message_bytes + 1024)
            message = json.loads(reply)
        except TimeoutError:
            raise self._stop(SandboxTimeout(f"call exceeded its {timeout:g} s wall-clock limit"))
        except WorkerGone:
            reason = worker.death()
            if "SIGKILL" in reason:
                error: SandboxException = SandboxMemoryError(f"worker {reason} (memory limit?)")
            elif "SIGXCPU" in reason:
                error = SandboxTimeout(f"worker hit its {self.policy.cpu_seconds} s CPU limit")
            else:
                error = SandboxCrash(f"worker {reason}")
            raise self._stop(error)
        except (ValueError, RecursionError) as exc:  # garbage on the pipe: never trusted
            raise self._stop(SandboxCrash(f"worker broke the protocol: {exc}"))
        clock = worker.cpu_ns()
        self.last_cpu_ns, self._clock = clock - self._clock, clock
        self.cpu_ns += self.last_cpu_ns
        self.calls += seq > 0
        if not (isinstance(message, list) and len(message) in (4, 6)
                and message[0] in ("ok", "fail") and message[1] == seq and isinstance(message[-1], str)):
            raise self._stop(SandboxCrash("worker broke the protocol: malformed reply"))
        self._add_output(message[-1])
        if message[0] == "ok":
            return message[2]
        category, exc_type, text = message[2], str(message[3]), str(message[4])
        if category == "error":
            raise SandboxError(text, exc_type)
        if category == "bad_return":
            raise SandboxBadReturn(text)
        if category in _FAILURES:
            raise self._stop(_FAILURES[category](text))
        raise self._stop(SandboxCrash(f"worker broke the protocol: category {category!r}"))

    def _add_output(self, text: str) -> None:
        room = self.policy.max_output_chars - len(self.output)
        if room > 0 and text:
            self.output += text[:room]

    def _stop(self, error: SandboxException) -> SandboxException:
        self._failure = error
        self._worker.kill()
        return error

    def close(self) -> None:
        """Kill the worker. Idempotent; the pool never reuses it."""
        if self._failure is None:
            self._failure = SandboxCrash("function was closed")
        self._worker.kill()

    def __enter__(self) -> "RemoteFunction":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        worker = getattr(self, "_worker", None)
        if worker is not None and worker.proc.returncode is None:
            worker.kill()


# ---------------------------------------------------------------- the pool
@dataclasses.dataclass
class Outcome:
    """What `Sandbox.map` got for one candidate: `value` from the scorer, or `error`."""

    value: Any = None
    error: SandboxException | None = None
    cpu_ns: int = 0
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


class Sandbox:
    """A policy plus a pool of pre-started, single-use workers. Thread-safe.

    `prestart` workers are kept warm (default: one per CPU). Use as a context manager, or
    call `close()`, to kill the idle ones.
    """

    def __init__(self, policy: Policy | None = None, *, prestart: int | None = None,
                 start_timeout_s: float = 30.0):
        self.policy = policy or Policy()
        self.prestart = (os.cpu_count() or 1) if prestart is None else prestart
        self.start_timeout_s = start_timeout_s
        self._idle: collections.deque[WorkerProcess] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self._refill()

    def _refill(self) -> None:
        with self._lock:
            while not self._closed and len(self._idle) < self.prestart:
                self._idle.append(WorkerProcess(self.policy))

    def _take(self) -> WorkerProcess:
        with self._lock:
            if self._closed:
                raise RuntimeError("Sandbox is closed")
            worker = self._idle.popleft() if self._idle else None
        if worker is None:
            worker = WorkerProcess(self.policy)
        self._refill()  # launching is cheap (fork+exec); the child warms up on its own
        return worker

    def wait_ready(self) -> None:
        """Block until every pre-started worker is up (before timing something, say)."""
        with self._lock:
            idle = list(self._idle)
        for worker in idle:
            worker.wait_ready(time.monotonic() + self.start_timeout_s)

    def open(self, source: str, entry: str) -> RemoteFunction:
        """Load `entry` from `source` in a fresh worker. Raises SandboxForbidden when the
        static checks refuse the source, and any SandboxException the module body causes."""
        if not entry.isidentifier():
            raise ValueError(f"entry must be a function name, got {entry!r}")
        if self.policy.static_checks:
            violations = check_source(source, self.policy)
            if violations:
                summary = "; ".join(str(v) for v in violations[:5])
                raise SandboxForbidden(f"source refused: {summary}", violations)
        worker = self._take()
        try:
            worker.wait_ready(time.monotonic() + self.start_timeout_s)
            function = RemoteFunction(worker, self.policy, entry)
            function._load(source, self.policy.load_timeout_s)
        except BaseException:
            worker.kill()
            raise
        return function

    def map(self, score: Callable[[RemoteFunction], Any], sources: Iterable[str], entry: str,
            *, parallel: int | None = None) -> list[Outcome]:
        """For each source: open it, return `score(function)`; in parallel threads.

        A SandboxException (from open or from a call inside `score`) becomes that
        candidate's `Outcome.error`; any other exception is a harness bug and propagates.
        """
        def one(source: str) -> Outcome:
            function = None
            try:
                function = self.open(source, entry)
                value = score(function)
                return Outcome(value, None, function.cpu_ns, function.output)
            except SandboxException as exc:
                return Outcome(None, exc, function.cpu_ns if function else 0,
                               function.output if function else "")
            finally:
                if function is not None:
                    function.close()

        sources = list(sources)
        workers = max(1, min(parallel or os.cpu_count() or 1, len(sources) or 1))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(one, sources))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle), collections.deque()
        for worker in idle:
            worker.kill()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()


# ---------------------------------------------------------------- one-shot
@dataclasses.dataclass
class RunResult:
    """`results[i]` for each call that completed; `error` stops the run at the first failure."""

    results: list = dataclasses.field(default_factory=list)
    error: SandboxException | None = None
    cpu_ns: list[int] = dataclasses.field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def run_function(source: str, entry: str, calls: Iterable[Sequence], policy: Policy | None = None) -> RunResult:
    """Load `entry` from `source` in a fresh worker and call it once per argument tuple."""
    result = RunResult()
    with Sandbox(policy, prestart=0) as sandbox:
        try:
            with sandbox.open(source, entry) as function:
                try:
                    for args in calls:
                        result.results.append(function.call(args))
                        result.cpu_ns.append(function.last_cpu_ns)
                finally:
                    result.output = function.output
        except SandboxException as exc:
            result.error = exc
    return result
