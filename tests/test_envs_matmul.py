"""The matmul environment: correctness on fresh inputs, speed measured from outside the candidate."""

import math
import random

import pytest

from ossrl.envs.matmul import (CORRECTNESS_SHAPES, FAST_KERNEL, NAIVE_KERNEL, WRONG_KERNEL, evaluate_kernel,
                               max_abs_error, random_matrix, reference_product)


@pytest.fixture(scope="module")
def naive():
    return evaluate_kernel(NAIVE_KERNEL, sizes=(48,), trials=5)


def test_naive_kernel_is_correct_with_speedup_near_one(naive):
    assert naive.ok and naive.correct and naive.error is None
    assert naive.max_abs_err < 1e-12
    assert naive.shapes_checked == naive.shapes_correct == len(CORRECTNESS_SHAPES) + 5
    # Timed, like the test below, so a wide band rather than a speed threshold: a fresh-clone CI
    # run read 0.68x once; up to two more measurements, one of the three must land in it.
    speedups = [naive.speedup]
    while not 0.6 < speedups[-1] < 1.67 and len(speedups) < 3:
        speedups.append(evaluate_kernel(NAIVE_KERNEL, sizes=(48,), trials=5).speedup)
    assert 0.6 < speedups[-1] < 1.67, speedups


def test_transposing_kernel_is_faster():
    # CPU time read from /proc still wobbles when another process loads the 2 cores (one CI run
    # measured 0.99x once, where a quiet machine reads 2-4x): no threshold, only the order, and
    # up to three measurements, the best of which must show it.
    results = []
    for _ in range(3):
        fast = evaluate_kernel(FAST_KERNEL, sizes=(64,), trials=5)
        assert fast.correct
        results.append(fast)
        if fast.speedup > 1.0:
            break
    assert max(r.speedup for r in results) > 1.0, [(r.speedups, r.candidate_cpu_ms, r.reference_cpu_ms) for r in results]


def test_wrong_kernel_is_incorrect_and_gets_no_speedup():
    wrong = evaluate_kernel(WRONG_KERNEL, sizes=(16,), trials=1)
    assert wrong.ok and not wrong.correct and wrong.speedup is None
    assert wrong.max_abs_err > 0.01
    assert wrong.shapes_correct == 0  # even k == 1: the sum skips the only term


def test_square_only_kernel_fails_non_square_and_1_sized_shapes():
    square_only = """
def matmul(A, B):
    n = len(A)
    return [[sum(A[i][p] * B[p][j] for p in range(n)) for j in range(n)] for i in range(n)]
"""
    result = evaluate_kernel(square_only, sizes=(8,), trials=1)
    assert not result.correct and result.speedup is None and result.error[0] == "error"  # IndexError
    assert result.shapes_correct == 1 and result.shapes_checked == len(CORRECTNESS_SHAPES)  # only 1x1x1


def test_kernel_right_on_small_shapes_but_wrong_on_timed_sizes_is_incorrect():
    sloppy = """
def matmul(A, B):
    columns = list(zip(*B))
    C = [[sum(a * b for a, b in zip(row, col)) for col in columns] for row in A]
    if len(A) > 20:
        C[-1][-1] += 0.5
    return C
"""
    result = evaluate_kernel(sloppy, sizes=(24,), trials=2)
    assert not result.correct and result.speedup is None
    assert result.shapes_correct == len(CORRECTNESS_SHAPES)


def test_patching_timers_is_refused_or_has_no_effect(naive):
    direct = "import time\ntime.perf_counter_ns = lambda: 0\n" + NAIVE_KERNEL
    refused = evaluate_kernel(direct, sizes=(16,), trials=1)
    assert refused.error[0] == "forbidden" and not refused.correct and refused.speedup is None
    # An alias slips past the static check; the clock that counts is /proc, outside the worker.
    sneaky = """
import time
clock = time
def fake():
    return 0
clock.perf_counter_ns = fake
clock.perf_counter = fake
clock.process_time = fake
clock.process_time_ns = fake
clock.thread_time_ns = fake
""" + NAIVE_KERNEL
    result = evaluate_kernel(sneaky, sizes=(48,), trials=5)
    if result.ok:
        assert result.correct and result.speedup < 1.33, result.speedups
    else:
        assert result.error[0] == "forbidden"


def test_slow_kernel_has_speedup_below_one():
    slow = "def matmul(A, B):\n    for _ in range(3):\n        C = _naive(A, B)\n    return C\n" + \
        NAIVE_KERNEL.replace("def matmul", "def _naive")
    # 3x the naive work: about 0.33x. Timing on a shared 2-core CI machine is noisy (one fresh-clone
    # run read 0.69x, the reference's timing inflated): up to three measurements, the lowest counts.
    speedups = []
    for _ in range(3):
        result = evaluate_kernel(slow, sizes=(32,), trials=3)
        assert result.correct
        speedups.append(result.speedup)
        if result.speedup < 0.5:
            break
    assert min(speedups) < 0.5, speedups


@pytest.mark.parametrize("source,category", [
    (None, "no_code"),
    ("def matmul(A, B)\n    return A\n", "syntax"),
    ("import numpy\ndef matmul(A, B):\n    return numpy.dot(A, B)\n", "forbidden"),
    ("def matmul(A, B):\n    while True:\n        pass\n", "timeout"),
    ("def matmul(A, B):\n    raise ZeroDivisionError('x')\n", "error"),
    ("def matmul(A, B):\n    return [bytearray(10 ** 9)]\n", "memory"),
    ("def mm(A, B):\n    return A\n", "load"),
])
def test_broken_kernels_are_reported_not_raised(source, category):
    result = evaluate_kernel(source, sizes=(8,), trials=1, call_timeout_s=0.5)
    assert not result.ok and not result.correct and result.error[0] == category, result.error


@pytest.mark.parametrize("answer", ["None", "[[float('nan')] * len(B[0]) for _ in A]",
                                    "[[1e400] * len(B[0]) for _ in A]",
                                    "[['1'] * len(B[0]) for _ in A]", "[[True] * len(B[0]) for _ in A]",
                                    "[[10 ** 400] * len(B[0]) for _ in A]", "A", "'x' * 1000000", "[]"])
def test_garbage_results_are_incorrect(answer):
    result = evaluate_kernel(f"def matmul(A, B):\n    return {answer}\n", sizes=(4,), trials=1)
    assert result.ok and not result.correct and result.max_abs_err == math.inf


def test_max_abs_error_and_reference_product():
    rng = random.Random(0)
    A, B = random_matrix(rng, 3, 4), random_matrix(rng, 4, 2)
    truth = reference_product(A, B)
    assert len(truth) == 3 and len(truth[0]) == 2
    assert truth[1][1] == math.fsum(A[1][p] * B[p][1] for p in range(4))
    assert max_abs_error(truth, truth) == 0.0
    shifted = [row[:] for row in truth]
    shifted[2][0] += 0.25
    assert max_abs_error(shifted, truth) == pytest.approx(0.25)
    assert max_abs_error([row[:1] for row in truth], truth) == math.inf


def test_calls_faster_than_the_cpu_clock_give_a_finite_speedup(monkeypatch):
    """CPU time read from /proc can come back 0 for a call shorter than its tick (a busy fresh-clone
    CI run got 0 for the baseline, and log(0) raised in the speedup's geometric mean, failing the
    reward function): both sides are floored alike, so equal zero readings give a ratio of 1."""
    from ossrl.sandbox.sandbox import RemoteFunction

    call = RemoteFunction.call

    def zero_clock(self, *args, **kwargs):
        result = call(self, *args, **kwargs)
        self.last_cpu_ns = 0
        return result

    monkeypatch.setattr(RemoteFunction, "call", zero_clock)
    result = evaluate_kernel(NAIVE_KERNEL, sizes=(16,), trials=2)
    assert result.correct and result.speedup == 1.0 and set(result.speedups.values()) == {1.0}
