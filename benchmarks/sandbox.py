"""Sandbox overhead: per-call round trip against the same function called in-process.

    .venv/bin/python benchmarks/sandbox.py            # writes benchmarks/results/sandbox.json

Measures, on CPU: (1) a 2048-style `strategy(board)` call in-process vs. through a
RemoteFunction (pipe + marshal + JSON + /proc CPU read), (2) the same for a 64x64 `matmul`
whose arguments and result cross the boundary, (3) opening a candidate from the warm pool
and from a cold start, (4) one GRPO step's worth of scoring: 64 candidates x 200 calls
through `Sandbox.map`. Every figure is the median of several repeats.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ossrl.sandbox import Policy, Sandbox  # noqa: E402

STRATEGY = """
def strategy(board):
    best, move = -1, "up"
    for name, row in zip(("up", "down", "left", "right"), board):
        s = sum(row)
        if s > best:
            best, move = s, name
    return move
"""
MATMUL = """
def matmul(A, B):
    Bt = list(zip(*B))
    return [[sum(a * b for a, b in zip(row, col)) for col in Bt] for row in A]
"""
BOARD = ((2, 4, 8, 16), (0, 0, 2, 2), (4, 4, 4, 4), (0, 2, 0, 2))


def in_process(source: str, entry: str):
    namespace: dict = {}
    exec(source, namespace)  # trusted benchmark code, the baseline only
    return namespace[entry]


def per_call_s(fn, args, calls: int, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    results: dict = {}
    with Sandbox(Policy(), prestart=2) as sandbox:
        sandbox.wait_ready()
        for name, source, entry, args, calls in [
            ("strategy_4x4", STRATEGY, "strategy", (BOARD,), 5000),
            ("matmul_64x64", MATMUL, "matmul",
             ([[float(i + j) for j in range(64)] for i in range(64)],) * 2, 20),
        ]:
            local = per_call_s(in_process(source, entry), args, calls)
            with sandbox.open(source, entry) as remote:
                sandboxed = per_call_s(remote, args, calls)
                worker_cpu = remote.cpu_ns / remote.calls / 1e9
            results[name] = {
                "in_process_us": round(local * 1e6, 2),
                "sandboxed_us": round(sandboxed * 1e6, 2),
                "overhead_us": round((sandboxed - local) * 1e6, 2),
                "ratio": round(sandboxed / local, 2),
                "worker_cpu_per_call_us": round(worker_cpu * 1e6, 2),
            }
            print(name, results[name])

        warm = []
        for _ in range(10):
            sandbox.wait_ready()
            start = time.perf_counter()
            sandbox.open(STRATEGY, "strategy").close()
            warm.append(time.perf_counter() - start)
        cold = []
        with Sandbox(Policy(), prestart=0) as cold_box:
            for _ in range(5):
                start = time.perf_counter()
                cold_box.open(STRATEGY, "strategy").close()
                cold.append(time.perf_counter() - start)
        results["open_warm_ms"] = round(statistics.median(warm) * 1e3, 2)
        results["open_cold_ms"] = round(statistics.median(cold) * 1e3, 2)
        print("open warm/cold ms", results["open_warm_ms"], results["open_cold_ms"])

        def score(strategy):
            return sum(strategy(BOARD) == "up" for _ in range(200))

        steps = []
        for _ in range(3):
            start = time.perf_counter()
            outcomes = sandbox.map(score, [STRATEGY] * 64, "strategy")
            steps.append(time.perf_counter() - start)
            assert all(o.value == 200 for o in outcomes)
        results["grpo_step_64x200_s"] = round(statistics.median(steps), 3)
        results["grpo_step_calls_per_s"] = round(64 * 200 / statistics.median(steps))
        print("GRPO step 64 candidates x 200 calls:", results["grpo_step_64x200_s"], "s")

    report = {
        "benchmark": "sandbox",
        "device": cpu_model(),
        "cpus": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "figures": results,
    }
    out = Path(__file__).resolve().parent / "results" / "sandbox.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
