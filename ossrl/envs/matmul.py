"""Scoring a model-written pure-Python `matmul(A, B)`: correct on fresh inputs, and how fast.

    result = evaluate_kernel(source, sizes=(32, 64), seed=0, trials=7)   # -> KernelResult
    result.ok, result.error, result.correct, result.max_abs_err, result.speedup

The one thing to know: the harness owns the inputs and the clock. Every matrix is generated
here, fresh for every call (so nothing a candidate memoises helps it), and time is the worker
process's CPU time read from /proc by this process, so a candidate that patches
`time.perf_counter_ns` (refused anyway) or any other clock inside its worker changes nothing.
The baseline is a plain triple loop run the same way, in the same kind of worker, on the same
inputs, interleaved with the candidate trial by trial; speedup is the ratio of the fastest
trials' CPU times (geometric mean over sizes): interference (a busy sibling thread, a noisy
neighbour) only ever adds CPU time, and comes in bursts that a median of few trials does not
survive (docs/notes.md, session 5: sd of the FAST kernel's speedup 0.17 with medians, 0.10 with
minima, 9 trials). Correctness is the max absolute error against an exactly rounded
float64 reference (math.fsum) on shapes including 1-sized and non-square ones, and the timing
calls' outputs are checked against the baseline's too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import statistics
import time

from ossrl.envs.code import static_problem
from ossrl.sandbox import Sandbox, SandboxBadReturn, SandboxError, SandboxException

Shape = tuple[int, int, int]  # (n, k, m): A is n x k, B is k x m
CORRECTNESS_SHAPES: tuple[Shape, ...] = ((1, 1, 1), (1, 5, 3), (4, 1, 6), (3, 7, 1), (5, 6, 7), (16, 9, 12))
TOLERANCE_PER_TERM = 1e-9  # allowed |error| per term of a dot product (entries are in [-1, 1])

REFERENCE_KERNEL = '''
def matmul(A, B):
    n, k, m = len(A), len(B), len(B[0])
    C = [[0.0] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            s = 0.0
            for p in range(k):
                s += A[i][p] * B[p][j]
            C[i][j] = s
    return C
'''


@dataclasses.dataclass
class KernelResult:
    """`error` is (category, message) or None, with the categories of StrategyResult; a kernel
    that runs but answers wrongly (or not with an n x m grid of numbers) is ok with
    correct=False. `speedup` is None unless the kernel was correct everywhere and timed."""

    ok: bool = False
    error: tuple[str, str] | None = None
    loaded: bool = False
    correct: bool = False
    shapes_checked: int = 0
    shapes_correct: int = 0
    max_abs_err: float = math.inf
    speedup: float | None = None
    speedups: dict[str, float] = dataclasses.field(default_factory=dict)  # "n x k x m" -> ratio
    candidate_cpu_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # fastest trials
    reference_cpu_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    wall_s: float = 0.0


def random_matrix(rng: random.Random, rows: int, cols: int) -> list[list[float]]:
    return [[rng.uniform(-1.0, 1.0) for _ in range(cols)] for _ in range(rows)]


def reference_product(A, B) -> list[list[float]]:
    """A @ B with every entry exactly rounded (math.fsum): the float64 truth."""
    columns = list(zip(*B))
    return [[math.fsum(a * b for a, b in zip(row, col)) for col in columns] for row in A]


def max_abs_error(C, truth) -> float:
    """Largest |C - truth|, or inf when C is not an n x m grid of real numbers (NaN counts as inf)."""
    if type(C) not in (list, tuple) or len(C) != len(truth):
        return math.inf
    worst = 0.0
    for row, true_row in zip(C, truth):
        if type(row) not in (list, tuple) or len(row) != len(true_row):
            return math.inf
        for value, true_value in zip(row, true_row):
            if type(value) not in (int, float):
                return math.inf
            try:
                err = abs(value - true_value)
            except OverflowError:  # an int too large for a float
                return math.inf
            if not err <= worst:  # also catches NaN
                worst = err if err == err else math.inf
    return worst


def _shape(size) -> Shape:
    return (size, size, size) if isinstance(size, int) else tuple(size)


def evaluate_kernel(source: str | None, *, sizes=(32, 64), seed: int = 0, trials: int = 7,
                    shapes=CORRECTNESS_SHAPES, call_timeout_s: float = 2.0,
                    sandbox: Sandbox | None = None) -> KernelResult:
    """Check the candidate's `matmul` on `shapes`, then time it against REFERENCE_KERNEL on
    each of `sizes` (an int n means n x n x n). Never raises on bad candidates."""
    from ossrl.envs.pool import shared_sandbox

    start = time.perf_counter()
    result = KernelResult()
    sandbox = sandbox or shared_sandbox()
    problem = static_problem(source, sandbox.policy)
    if problem is not None:
        result.error = problem
    else:
        try:
            _evaluate(source, result, sandbox, [_shape(s) for s in sizes], seed, trials, shapes, call_timeout_s)
        except SandboxException as exc:
            category = exc.category
            if not result.loaded and category in ("error", "bad_return"):
                category = "load"
            result.error = (category, str(exc))
    result.correct = result.error is None and result.shapes_correct == result.shapes_checked > 0
    result.ok = result.error is None
    if not result.correct:
        result.speedup = None
    result.wall_s = time.perf_counter() - start
    return result


def _evaluate(source, result, sandbox, sizes, seed, trials, shapes, timeout) -> None:
    with sandbox.open(source, "matmul") as candidate:
        result.loaded = True
        rng = random.Random(f"ossrl-matmul:{seed}")
        worst = 0.0
        for n, k, m in shapes:
            A, B = random_matrix(rng, n, k), random_matrix(rng, k, m)
            try:
                err = max_abs_error(candidate.call((A, B), timeout=timeout), reference_product(A, B))
            except (SandboxError, SandboxBadReturn) as exc:  # the worker lives: try the other shapes
                err = math.inf
                result.error = result.error or (exc.category, str(exc))
            result.shapes_checked += 1
            result.shapes_correct += err <= TOLERANCE_PER_TERM * k
            worst = max(worst, err)
        result.max_abs_err = worst
        if result.shapes_correct < result.shapes_checked or result.error or not sizes:
            return
        with sandbox.open(REFERENCE_KERNEL, "matmul") as reference:
            pin_to_one_cpu(reference.pid, candidate.pid)
            warm = random_matrix(rng, 2, 2)
            reference.call((warm, warm), timeout=timeout)
            ratios = []
            for n, k, m in sizes:
                ref_ns, cand_ns = [], []
                for trial in range(trials):
                    A, B = random_matrix(rng, n, k), random_matrix(rng, k, m)
                    order = (reference, candidate) if trial % 2 == 0 else (candidate, reference)
                    outputs = {}
                    for fn in order:
                        outputs[fn is candidate] = fn.call((A, B), timeout=timeout)
                        (cand_ns if fn is candidate else ref_ns).append(fn.last_cpu_ns)
                    # The baseline's output stands in for the truth here (same float64 maths).
                    err = max_abs_error(outputs[True], outputs[False])
                    result.shapes_checked += 1
                    result.shapes_correct += err <= TOLERANCE_PER_TERM * k
                    result.max_abs_err = max(result.max_abs_err, err)
                name = f"{n}x{k}x{m}"
                ref_ms, cand_ms = min(ref_ns) / 1e6, min(cand_ns) / 1e6
                result.reference_cpu_ms[name], result.candidate_cpu_ms[name] = ref_ms, cand_ms
                # Both floored at 1 us: a CPU clock coarser than a fast call reads 0 (a fresh-clone
                # CI run on a busy machine got 0 for the baseline, and log(0) raised in the mean).
                result.speedups[name] = max(ref_ms, 1e-3) / max(cand_ms, 1e-3)
                ratios.append(result.speedups[name])
            if result.shapes_correct == result.shapes_checked:
                result.speedup = math.exp(statistics.fmean(math.log(r) for r in ratios))


def pin_to_one_cpu(*pids: int) -> None:
    """Run the timed workers on one and the same CPU, so that a CPU's load or clock (a busy
    neighbour, a sibling hyper-thread) weighs on both sides of the ratio alike. Best effort: where
    affinity cannot be set (not Linux, not permitted), the workers stay unpinned."""
    try:
        cpu = max(os.sched_getaffinity(0))
        for pid in pids:
            os.sched_setaffinity(pid, {cpu})
    except (AttributeError, OSError):
        pass


# ---------------------------------------------------------------- reference kernels
NAIVE_KERNEL = REFERENCE_KERNEL

# Transpose B once, then each entry is one C-level sum over a zip: typically 2-4x the naive loop.
FAST_KERNEL = '''
from operator import mul

def matmul(A, B):
    columns = list(zip(*B))
    return [[sum(map(mul, row, col)) for col in columns] for row in A]
'''

WRONG_KERNEL = '''
def matmul(A, B):
    n, k, m = len(A), len(B), len(B[0])
    return [[sum(A[i][p] * B[p][j] for p in range(k - 1)) for j in range(m)] for i in range(n)]
'''
