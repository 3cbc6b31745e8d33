"""What the environments share: one sandbox pool per process, a bounded result cache, and a
parallel map over distinct candidates.

The one thing to know: the reward functions of one GRPO step (function_works, no_cheating,
strategy_succeeds, ...) all ask for the same evaluations. `evaluate_cached` runs each distinct
key once, in parallel threads (each thread drives its own sandbox worker process; the threads
only wait on pipes and run the cheap trusted harness), and keeps results in an LRU cache, so the
second and third reward functions of a step read what the first computed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
import threading
from typing import Callable, Hashable, Sequence

from ossrl.sandbox import Policy, Sandbox

# Limits every environment shares. Per-call wall-clock limits are passed per call
# (RemoteFunction.call(timeout=...)); the harnesses bound the total time of an evaluation.
ENV_POLICY = Policy(
    timeout_s=2.0,
    load_timeout_s=5.0,
    cpu_seconds=600,
    memory_bytes=512 << 20,
    max_output_chars=16 << 10,
    max_message_bytes=8 << 20,
    max_source_bytes=64 << 10,
)


@functools.cache
def shared_sandbox() -> Sandbox:
    """The process-wide pool the environments use (created on first use, one warm worker per
    CPU; workers exit on their own when this process does)."""
    return Sandbox(ENV_POLICY, prestart=min(os.cpu_count() or 1, 16))


class LRUCache:
    """A thread-safe mapping that forgets its least recently used entries past `maxsize`."""

    def __init__(self, maxsize: int = 4096):
        self.maxsize = maxsize
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key, default=None):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return default

    def put(self, key, value) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


RESULTS = LRUCache(4096)


def parallel_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


def evaluate_cached(keys: Sequence[Hashable], evaluate: Callable[[Hashable], object],
                    cache: LRUCache = RESULTS) -> list:
    """[evaluate(key) for key in keys], each distinct key computed once (here or earlier),
    the missing ones in parallel threads."""
    results = {}
    missing = []
    for key in keys:
        if key in results:
            continue
        hit = cache.get(key)
        if hit is not None:
            results[key] = hit
        else:
            results[key] = None
            missing.append(key)
    if missing:
        workers = min(parallel_workers(), len(missing))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ossrl-env") as pool:
            for key, value in zip(missing, pool.map(evaluate, missing)):
                results[key] = value
                cache.put(key, value)
    return [results[key] for key in keys]
