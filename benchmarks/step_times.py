"""Every training step's time, one after another, over a sequence of lengths in one process: the
slow start session 19 met (H100: after a process's first compiles, 8K LoRA steps took 0.69 s for
seven steps in a row, then 0.51 s once another length had compiled; a slow step's profile showed
442 ms of GPU time in 0.68 s and the host's tiny block-table ops taking 3-8 ms each).

    python benchmarks/step_times.py [--lengths 8192,4096,8192] [--steps 7] [--threads N]
        [--compile-threads N] [--profile] [--host-profile]

gpt-oss-20b shapes, random weights, MXFP4 experts, LoRA r=16, no checkpointing, the library's
defaults. Each step: wall time, the caching allocator's device mallocs and frees during it, the SM
clock and power after it. --threads: torch.set_num_threads(N) first (is the slow start the host's
OpenMP pool? 1 rules its threads out). --compile-threads: inductor's compile workers
(torch._inductor.config.compile_threads; 1 compiles in this process, no worker pool that could
still hold the CPUs after a compile). --profile: the fourth step of each length profiled (top
kernels by GPU time, top host ops by CPU time) into the output. --host-profile: the fifth step of
each length under cProfile (the host's Python functions by own and by inclusive time; autograd's
backward thread folded into the main one for it) and the sixth under torch's sync debug mode (each
host-device synchronisation with the Python line that asked for it); neither is a timed row.
Every timed step also records where the host stood: `host_seconds` until the step's last call
returned (the GPU may still be working; waits inside the step count), `host_cpu_seconds` the
process's CPU time meanwhile (every thread: the autograd worker's backward, and spinning waits
and idle-spinning OpenMP threads too), `gpu_tail_seconds` the wait after it for the GPU to finish
(near 0: the host set the pace). Writes
benchmarks/results/step_times.json (or --out).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
import warnings
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


def cprofiled(step) -> dict:
    """One step under cProfile: the top Python functions by own and by inclusive time. Autograd's
    multithreading is off for it, so the backward (which torch runs on a worker thread for CUDA
    tensors, where cProfile does not look) runs on this thread and is profiled too."""
    profiler = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        profiler.enable()
        step()
        profiler.disable()

    def top(key, n):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(n)
        return text.getvalue().splitlines()

    total = sum(v[2] for v in pstats.Stats(profiler).stats.values())  # own time of every function
    return {"profiled_seconds": round(total, 4), "top_own": top("tottime", 40), "top_inclusive": top("cumulative", 40)}


def syncs_of(step) -> list[str]:
    """One step under torch's sync debug mode: each host-device synchronisation (a warning every
    time) with the Python line that asked for it. Those inside torch's own backward functions are
    reported at the `.backward()` line; the step's final `torch.cuda.synchronize` is the
    benchmark's own."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:160]}" for w in caught
            if "synchroniz" in str(w.message)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="8192,4096,8192")
    ap.add_argument("--steps", type=int, default=7, help="steps per length (the first compiles)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first")
    ap.add_argument("--compile-threads", type=int, default=None, help="torch._inductor.config.compile_threads")
    ap.add_argument("--profile", action="store_true", help="profile the fourth step of each length")
    ap.add_argument("--host-profile", action="store_true",
                    help="the fifth step of each length under cProfile, the sixth under torch's sync debug mode")
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
    rows, profiles, host_profiles = [], [], []
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
            if args.host_profile and i == 4:
                host_profiles.append({"phase": phase, "tokens": T, "step": i, **cprofiled(step)})
                continue
            if args.host_profile and i == 5:
                host_profiles[-1]["syncs"] = syncs_of(step)
                continue
            before = torch.cuda.memory_stats()
            t, cpu = time.perf_counter(), time.process_time()
            lora_step(model, batch)
            host, host_cpu = time.perf_counter() - t, time.process_time() - cpu
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            after = torch.cuda.memory_stats()
            row = {"phase": phase, "tokens": T, "step": i, "seconds": round(seconds, 4),
                   "host_seconds": round(host, 4), "host_cpu_seconds": round(host_cpu, 4),
                   "gpu_tail_seconds": round(seconds - host, 4),
                   "device_mallocs": after["num_device_alloc"] - before["num_device_alloc"],
                   "device_frees": after["num_device_free"] - before["num_device_free"],
                   "alloc_retries": after["num_alloc_retries"] - before["num_alloc_retries"], **device_readings()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    import torch._inductor.config as inductor_config

    result = {"benchmark": "step_times", **device_info(), **switches, "threads": torch.get_num_threads(),
              "compile_threads": inductor_config.compile_threads,
              "model": "gpt-oss-20b shapes, random weights, MXFP4 experts, LoRA r=16, no checkpointing",
              "rows": rows, "profiles": profiles, "host_profiles": host_profiles,
              "seconds_total": round(time.time() - t0, 1)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    for p in profiles:
        print(json.dumps({k: p[k] for k in ("phase", "tokens", "gpu_ms", "cpu_ms")}),
              json.dumps(p["top_cpu"][:6]), flush=True)
    for p in host_profiles:
        syncs = p.get("syncs", [])
        print(f"host profile, {p['tokens']} tokens ({p['profiled_seconds']} s of own time under cProfile); "
              f"{len(syncs)} syncs:", *syncs, *p["top_own"][:30], sep="\n", flush=True)


if __name__ == "__main__":
    main()
