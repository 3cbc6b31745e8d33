"""Every training step's time, one after another, over a sequence of lengths in one process: the
slow start session 19 met (H100: after a process's first compiles, 8K LoRA steps took 0.69 s for
seven steps in a row, then 0.51 s once another length had compiled; a slow step's profile showed
442 ms of GPU time in 0.68 s and the host's tiny block-table ops taking 3-8 ms each).

    python benchmarks/step_times.py [--lengths 8192,4096,8192] [--steps 7] [--threads N]
        [--compile-threads N] [--profile]

gpt-oss-20b shapes, random weights, MXFP4 experts, LoRA r=16, no checkpointing, the library's
defaults. Each step: wall time, the caching allocator's device mallocs and frees during it, the SM
clock and power after it. --threads: torch.set_num_threads(N) first (is the slow start the host's
OpenMP pool? 1 rules its threads out). --compile-threads: inductor's compile workers
(torch._inductor.config.compile_threads; 1 compiles in this process, no worker pool that could
still hold the CPUs after a compile). --profile: the fourth step of each length profiled (top
kernels by GPU time, top host ops by CPU time) into the output. Writes
benchmarks/results/step_times.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_switches, apply_switches, device_info  # noqa: E402
from train import lora_model_on_gpu, lora_step, single_document  # noqa: E402
from ossrl.model.config import GptOssConfig  # noqa: E402
from ossrl.train.memory import configure_memory  # noqa: E402


def device_readings() -> dict:
    """SM clock (MHz) and power (W) now, where torch can read them (pynvml)."""
    try:
        return {"sm_mhz": torch.cuda.clock_rate(), "watts": round(torch.cuda.power_draw() / 1000, 1)}
    except Exception as e:  # (no pynvml, or a GPU that does not report)
        return {"readings": f"unavailable: {type(e).__name__}"}


def profiled(step) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
    events = prof.key_averages(group_by_input_shape=True)

    def top(key, n):
        rows = sorted(events, key=lambda e: -getattr(e, key))[:n]
        return [{"name": e.key, "shapes": str(e.input_shapes)[:120], "calls": e.count,
                 "ms": round(getattr(e, key) / 1e3, 2)} for e in rows]

    return {"gpu_ms": round(sum(e.self_device_time_total for e in events) / 1e3, 1),
            "cpu_ms": round(sum(e.self_cpu_time_total for e in events) / 1e3, 1),
            "top_gpu": top("self_device_time_total", 12), "top_cpu": top("self_cpu_time_total", 12)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="8192,4096,8192")
    ap.add_argument("--steps", type=int, default=7, help="steps per length (the first compiles)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    ap.add_argument("--compile-threads", type=int, default=None, help="torch._inductor.config.compile_threads")
    ap.add_argument("--profile", action="store_true", help="profile the fourth step of each length")
    ap.add_argument("--out", default=None)
    add_switches(ap, ("eager-logprob-grad", "fused-training-qkv", "flex-static"))
    args = ap.parse_args()
    switches = apply_switches(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile_threads:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = args.compile_threads
    out = args.out or os.path.join(os.environ.get("OUT", "benchmarks/results"), "step_times.json")
    config = GptOssConfig.gpt_oss_20b()
    model, _ = lora_model_on_gpu(config)
    configure_memory(model, gradient_checkpointing=False)
    rows, profiles = [], []
    t0 = time.time()
    for phase, T in enumerate(int(t) for t in args.lengths.split(",")):
        batch = single_document(T, config.vocab_size, "cuda")

        def step():
            lora_step(model, batch)
            torch.cuda.synchronize()

        for i in range(args.steps):
            if args.profile and i == 3:
                profiles.append({"phase": phase, "tokens": T, "step": i, **profiled(step)})
                continue
            before = torch.cuda.memory_stats()
            t = time.perf_counter()
            step()
            seconds = time.perf_counter() - t
            after = torch.cuda.memory_stats()
            row = {"phase": phase, "tokens": T, "step": i, "seconds": round(seconds, 4),
                   "device_mallocs": after["num_device_alloc"] - before["num_device_alloc"],
                   "device_frees": after["num_device_free"] - before["num_device_free"],
                   "alloc_retries": after["num_alloc_retries"] - before["num_alloc_retries"], **device_readings()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    import torch._inductor.config as inductor_config

    result = {"benchmark": "step_times", **device_info(), **switches, "threads": torch.get_num_threads(),
              "compile_threads": inductor_config.compile_threads,
              "model": "gpt-oss-20b shapes, random weights, MXFP4 experts, LoRA r=16, no checkpointing",
              "rows": rows, "profiles": profiles, "seconds_total": round(time.time() - t0, 1)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    for p in profiles:
        print(json.dumps({k: p[k] for k in ("phase", "tokens", "gpu_ms", "cpu_ms")}),
              json.dumps(p["top_cpu"][:6]), flush=True)


if __name__ == "__main__":
    main()
