"""One worker process seen from the parent: start it, talk to it, read its clock, kill it.

`WorkerProcess` launches `worker.py` with `python -I -S`, an empty environment, cwd `/`, no
inherited descriptors but its pipes, in a new session, and (where `unshare` works) in an
empty network namespace. It speaks the length-prefixed protocol described in worker.py.
The one thing to know: every wait here has a deadline, and CPU time comes from /proc, so
the untrusted code inside has no say in either.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .errors import SandboxCrash
from .policy import Policy

_WORKER_SCRIPT = str(Path(__file__).with_name("worker.py"))
# Native libraries that start thread pools at import read these; the worker may not thread.
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class WorkerGone(Exception):
    """The worker closed its pipe (exited or was killed)."""


_netns_lock = threading.Lock()
_netns_prefix_cache: dict[bool, list[str]] = {}


def _network_prefix(isolate: bool) -> list[str]:
    """`unshare --net` (root) or `unshare --user --net` if it works here, else nothing:
    the worker's audit hook denies sockets either way."""
    if not isolate or not sys.platform.startswith("linux"):
        return []
    with _netns_lock:
        if isolate not in _netns_prefix_cache:
            prefix: list[str] = []
            tool = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
            if tool:
                flags = ["--net"] if os.geteuid() == 0 else ["--user", "--net"]
                try:
                    probe = subprocess.run([tool, *flags, "true"], capture_output=True, timeout=10)
                    if probe.returncode == 0:
                        prefix = [tool, *flags]
                except (OSError, subprocess.SubprocessError):
                    pass
            _netns_prefix_cache[isolate] = prefix
        return _netns_prefix_cache[isolate]


class WorkerProcess:
    """Parent-side handle of one worker process: its pipes, its clock, its death."""

    def __init__(self, policy: Policy):
        config = policy.worker_config()
        if any(m.split(".")[0] not in sys.stdlib_module_names for m in policy.allowed_modules):
            config["extra_paths"] = [p for p in sys.path if p and os.path.isdir(p)]
        self.argv = [*_network_prefix(policy.isolate_network), sys.executable, "-I", "-S", _WORKER_SCRIPT]
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_WORKER_ENV, cwd="/", close_fds=True, start_new_session=True, bufsize=0)
        self.pid = self.proc.pid
        self.wfd, self.rfd = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        self.poller = select.poll()
        self.poller.register(self.rfd, select.POLLIN)
        self.buffer = bytearray()
        self.killed = False
        self.info: dict | None = None
        self.ready_lock = threading.Lock()  # Sandbox.wait_ready may race with open()
        self.send(json.dumps(config).encode())
        try:
            self.clock = os.open(f"/proc/{self.pid}/schedstat", os.O_RDONLY)
            self.clock_in_ticks = False
        except OSError:  # kernels without schedstat: utime+stime in clock ticks
            self.clock = os.open(f"/proc/{self.pid}/stat", os.O_RDONLY)
            self.clock_in_ticks = True

    def send(self, payload: bytes) -> None:
        data = memoryview(len(payload).to_bytes(4, "big") + payload)
        try:
            while data:
                data = data[os.write(self.wfd, data):]
        except BrokenPipeError:
            raise WorkerGone() from None

    def recv(self, deadline: float, limit: int) -> bytes:
        """One message, or TimeoutError at `deadline` (time.monotonic), or WorkerGone."""
        buf = self.buffer
        while True:
            if len(buf) >= 4:
                size = int.from_bytes(buf[:4], "big")
                if size > limit:
                    raise ValueError(f"message of {size} bytes is over the {limit}-byte limit")
                if len(buf) >= 4 + size:
                    message = bytes(buf[4:4 + size])
                    del buf[:4 + size]
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.poller.poll(math.ceil(remaining * 1000)):
                if time.monotonic() >= deadline:
                    raise TimeoutError()
                continue
            chunk = os.read(self.rfd, 1 << 20)
            if not chunk:
                raise WorkerGone()
            buf += chunk

    def cpu_ns(self) -> int:
        """CPU time the worker has used, read from outside it (/proc)."""
        try:
            raw = os.pread(self.clock, 512, 0)
        except OSError:
            return -1
        if not self.clock_in_ticks:
            return int(raw.split(None, 1)[0])
        fields = raw[raw.rindex(b")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")

    def wait_ready(self, deadline: float) -> None:
        with self.ready_lock:
            if self.info is None:
                self._wait_ready(deadline)

    def _wait_ready(self, deadline: float) -> None:
        try:
            message = json.loads(self.recv(deadline, 1 << 16))
        except TimeoutError:
            self.kill()
            raise SandboxCrash("worker did not start in time") from None
        except (WorkerGone, ValueError):
            raise SandboxCrash(f"worker failed to start: {self.death()}") from None
        if not (isinstance(message, list) and message[:1] == ["ready"]):
            self.kill()
            raise SandboxCrash(f"worker sent {message!r} instead of ready")
        self.info = message[1]

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.killed = True
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        if self.clock >= 0:
            os.close(self.clock)
            self.clock = -1

    def death(self) -> str:
        """Reap a worker that closed its pipe and say why it died."""
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.returncode
        stderr = b""
        try:
            stderr = self.proc.stderr.read(4000) if self.proc.stderr else b""
        except (OSError, ValueError):
            pass
        self.kill()
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:]
        return f"exited with status {code}" + (f" ({tail[0]})" if tail else "")
