"""Sandbox behaviour for legitimate code: the API, the pool, timing, one-shot runs."""

import os
import time

import pytest

from ossrl.sandbox import (Policy, RemoteFunction, Sandbox, SandboxBadReturn, SandboxCrash,
                           SandboxError, SandboxForbidden, SandboxMemoryError, SandboxTimeout,
                           run_function)

POLICY = Policy(timeout_s=2.0, load_timeout_s=2.0)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(POLICY, prestart=2) as box:
        yield box


LEGIT = '''
import math, random, itertools, heapq, bisect, re, statistics, string, copy, functools
from collections import Counter, defaultdict, deque, namedtuple
from dataclasses import dataclass, field
from enum import Enum
from fractions import Fraction
from typing import List

Move = namedtuple("Move", "name score")

class Dir(Enum):
    LEFT = "left"
    RIGHT = "right"

@dataclass
class Stats:
    seen: List[int] = field(default_factory=list)

STATS = Stats()

@functools.lru_cache(maxsize=None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)

def depth(n):
    return 0 if n == 0 else 1 + depth(n - 1)

def strategy(board, bonus=0):
    flat = [v for row in board for v in row]
    STATS.seen.append(len(flat))
    best = max([Move(d.value, sum(flat) + i) for i, d in enumerate(Dir)], key=lambda m: m.score)
    heap = list(flat); heapq.heapify(heap)
    print("thinking about", best.name)
    return {
        "move": best.name,
        "fib": fib(60),
        "depth": depth(900),
        "sqrt": math.sqrt(16.0),
        "median": statistics.median(flat),
        "frac": str(Fraction(1, 3) + Fraction(1, 6)),
        "counts": dict(Counter(str(v) for v in flat)),
        "words": re.findall(r"[a-z]+", "up down"),
        "calls": len(STATS.seen),
        "board_type": type(board).__name__,
        "smallest": heap[0],
        "bonus": bonus,
        "perm": len(list(itertools.permutations(range(4)))),
        "letters": string.ascii_lowercase[:3],
        "copy": copy.deepcopy([[1], [2]]),
        "inf": math.inf,
    }
'''


def test_legitimate_code_runs_with_allowed_imports_recursion_and_prints(sandbox):
    board = ((2, 4), (8, 16))
    with sandbox.open(LEGIT, "strategy") as strategy:
        assert isinstance(strategy, RemoteFunction)
        result = strategy(board, bonus=3)
        assert result == {
            "move": "right", "fib": 1548008755920, "depth": 900, "sqrt": 4.0, "median": 6.0,
            "frac": "1/2", "counts": {"2": 1, "4": 1, "8": 1, "16": 1}, "words": ["up", "down"],
            "calls": 1, "board_type": "tuple", "smallest": 2, "bonus": 3, "perm": 24,
            "letters": "abc", "copy": [[1], [2]], "inf": float("inf"),
        }
        assert strategy(board)["calls"] == 2  # state persists across calls of one candidate
        assert strategy.output == "thinking about right\n" * 2
        assert strategy.calls == 2


def test_exception_in_code_is_sandbox_error_and_function_survives(sandbox):
    source = "def f(x):\n    if x < 0:\n        raise ValueError('negative: %d' % x)\n    return x * 2\n"
    with sandbox.open(source, "f") as f:
        with pytest.raises(SandboxError) as info:
            f(-1)
        assert info.value.exc_type == "ValueError" and info.value.message == "negative: -1"
        assert f(21) == 42 and f.alive


def test_bad_return_leaves_function_alive(sandbox):
    with sandbox.open("def f(x):\n    return {1: 2} if x else 'fine'\n", "f") as f:
        with pytest.raises(SandboxBadReturn):
            f(1)
        assert f(0) == "fine"


def test_missing_entry_is_an_error(sandbox):
    with pytest.raises(SandboxError, match="no function named 'g'"):
        sandbox.open("def f():\n    return 1\n", "g")


def test_static_violation_raises_forbidden_with_violations(sandbox):
    with pytest.raises(SandboxForbidden) as info:
        sandbox.open("import os\ndef f():\n    return os.getcwd()\n", "f")
    assert [v.kind for v in info.value.violations] == ["import"]


def test_timeout_kills_worker_within_twice_the_limit_and_function_is_dead(sandbox):
    with sandbox.open("def f(s):\n    while s:\n        pass\n    return 1\n", "f") as f:
        assert f(0) == 1
        start = time.monotonic()
        with pytest.raises(SandboxTimeout):
            f.call((1,), timeout=0.3)
        assert time.monotonic() - start < 0.6
        assert not f.alive
        with pytest.raises(SandboxTimeout, match="already stopped"):
            f(0)
        with pytest.raises(ProcessLookupError):
            os.kill(f.pid, 0)


def test_memory_error_maps_to_sandbox_memory_error():
    with Sandbox(Policy(memory_bytes=200 << 20), prestart=0) as box:
        with box.open("def f(n):\n    return len([0] * n)\n", "f") as f:
            assert f(1000) == 1000
            with pytest.raises(SandboxMemoryError):
                f(10 ** 9)
            assert not f.alive


def test_worker_killed_from_outside_is_a_crash_or_memory_error(sandbox):
    import signal
    with sandbox.open("import time\ndef f():\n    time.sleep(5)\n", "f") as f:
        os.kill(f.pid, signal.SIGSEGV)
        with pytest.raises(SandboxCrash, match="SIGSEGV"):
            f()


def test_cpu_time_is_measured_from_outside(sandbox):
    source = """
import time
def burn(n):
    x = 0
    for i in range(n):
        x += i
    return x
def nap(s):
    time.sleep(s)
"""
    with sandbox.open(source, "burn") as burn:
        burn(10)
        small = burn.last_cpu_ns
        value, big = burn.timed(3_000_000)
        assert value == sum(range(3_000_000))
        assert big > 20_000_000 and big > 10 * small
        assert burn.cpu_ns >= big + small
    with sandbox.open(source, "nap") as nap:
        start = time.monotonic()
        nap(0.2)
        assert time.monotonic() - start >= 0.2
        assert nap.last_cpu_ns < 50_000_000  # sleeping is not CPU time


def test_arguments_are_copies_and_plain_data_only(sandbox):
    board = [[0, 2], [4, 0]]
    with sandbox.open("def f(b):\n    b[0][0] = 99\n    return b\n", "f") as f:
        assert f(board) == [[99, 2], [4, 0]]
        assert board == [[0, 2], [4, 0]]
        with pytest.raises(TypeError, match="plain data"):
            f(object())


def test_pool_state_of_one_candidate_is_invisible_to_the_next(sandbox):
    writer = """
import random, functools
SEEN = []
def f():
    random.Random.leaked = "secret"        # class attribute on an allowed module's class
    functools.leaked = {"answer": 42}      # module attribute
    __builtins__["len"] = lambda x: -1     # (static checks refuse this line; see below)
    SEEN.append(1)
    return len(SEEN)
"""
    reader = """
import random, functools
def f():
    return [getattr(random.Random, "leaked", None), getattr(functools, "leaked", None), len([1, 2])]
"""
    runtime_only = Sandbox(Policy(static_checks=False), prestart=1)
    try:
        with runtime_only.open(writer, "f") as first:
            assert first() == -1  # its own builtins table was changed
            first_pid = first.pid
        with runtime_only.open(reader, "f") as second:
            assert second() == [None, None, 2]
            assert second.pid != first_pid
    finally:
        runtime_only.close()
    with sandbox.open(reader, "f") as third:
        assert third() == [None, None, 2]


def test_each_open_gets_a_fresh_worker(sandbox):
    source = "def f():\n    return 1\n"
    pids = set()
    for _ in range(4):
        with sandbox.open(source, "f") as f:
            assert f() == 1
            pids.add(f.pid)
    assert len(pids) == 4


def test_map_scores_candidates_in_parallel_with_errors_per_candidate(sandbox):
    good = "def strategy(board):\n    return 'left' if sum(board[0]) % 2 else 'up'\n"
    slow = "def strategy(board):\n    while True:\n        pass\n"
    cheat = "import os\ndef strategy(board):\n    return 'up'\n"
    crash = "def strategy(board):\n    return board[99]\n"

    def score(strategy):
        return sum(strategy([[i, 1], [0, 0]]) == "left" for i in range(50))

    fast = Sandbox(Policy(timeout_s=0.5), prestart=2)
    try:
        outcomes = fast.map(score, [good, slow, cheat, crash, good], "strategy")
    finally:
        fast.close()
    assert [o.value for o in outcomes] == [25, None, None, None, 25]
    assert [o.error.category if o.error else None for o in outcomes] == [
        None, "timeout", "forbidden", "error", None]
    assert outcomes[0].ok and outcomes[0].cpu_ns > 0


def test_map_throughput_many_candidates_many_calls(sandbox):
    source = """
def strategy(board):
    best, move = -1, "up"
    for name, row in zip(("up", "down", "left", "right"), board):
        if sum(row) > best:
            best, move = sum(row), name
    return move
"""
    board = [[2, 4, 8, 16], [0, 0, 2, 2], [4, 4, 4, 4], [0, 2, 0, 2]]

    def score(strategy):
        return sum(strategy(board) == "left" for _ in range(200))

    start = time.monotonic()
    outcomes = sandbox.map(score, [source] * 32, "strategy")
    elapsed = time.monotonic() - start
    assert [o.value for o in outcomes] == [0] * 32  # "up" row sums 30, the most
    assert elapsed < 15, f"32 candidates x 200 calls took {elapsed:.1f} s"


def test_run_function_one_shot_results_and_error():
    ok = run_function("def add(a, b):\n    return a + b\n", "add", [(1, 2), (3, 4)])
    assert ok.ok and ok.results == [3, 7] and len(ok.cpu_ns) == 2
    failed = run_function("def inv(x):\n    print('x =', x)\n    return 1 / x\n", "inv", [(2,), (0,), (5,)])
    assert failed.results == [0.5] and isinstance(failed.error, SandboxError)
    assert failed.output == "x = 2\nx = 0\n"
    refused = run_function("import socket\ndef f():\n    return 1\n", "f", [()])
    assert refused.results == [] and isinstance(refused.error, SandboxForbidden)


def test_policy_rejects_nonsense_limits():
    with pytest.raises(ValueError, match="timeout_s"):
        Policy(timeout_s=0)


def test_close_kills_the_prestarted_workers():
    box = Sandbox(POLICY, prestart=2)
    box.wait_ready()
    pids = [worker.pid for worker in box._idle]
    box.close()
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="closed"):
        box.open("def f():\n    return 1\n", "f")
