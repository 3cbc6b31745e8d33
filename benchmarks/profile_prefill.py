"""Where a rollout prefill's time goes (20b shapes, MXFP4 experts): CUDA kernel time by name.

    python benchmarks/profile_prefill.py                    # 64 prompts x 128 tokens (generate.py's batch 64)
    python benchmarks/profile_prefill.py --prompts 8 --len 128
    python benchmarks/profile_prefill.py --prompts 1 64 --ab     # also timed with host masks off, then on

A diagnosis tool, not a benchmark: it times `engine.generate(..., max_new_tokens=1)` (the prefill
and its one sampled token) after a warm-up call, then profiles one more such call.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ossrl.engine import slots  # noqa: E402
from ossrl.engine.engine import RolloutEngine  # noqa: E402
from ossrl.engine.sampling import SamplingParams  # noqa: E402
from ossrl.model.config import GptOssConfig  # noqa: E402
from ossrl.testing import random_model_on_device  # noqa: E402
from _common import add_switches, apply_switches  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--prompts", type=int, nargs="+", default=[64])
ap.add_argument("--len", type=int, default=128)
ap.add_argument("--ab", action="store_true",
                help="also time the prefill with the masks' tables built by GPU kernels and on the host")
add_switches(ap, ("host-masks", "defer-residual-add", "flex-static"))
args = ap.parse_args()
print(apply_switches(args))

model = random_model_on_device(GptOssConfig.gpt_oss_20b(), device="cuda", expert_format="mxfp4")
engine = RolloutEngine(model)
params = SamplingParams(max_new_tokens=1, seed=0)


def wall_ms(prompts) -> float:
    for _ in range(2):
        engine.generate(prompts, params=params)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        engine.generate(prompts, params=params)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 3 * 1e3


for count in args.prompts:
    prompts = [[(7 * i + j) % 1000 for j in range(args.len)] for i in range(count)]
    if args.ab:
        chosen = slots.HOST_MASKS
        for host in (False, True):
            slots.HOST_MASKS = host
            print(f"prefill of {count} x {args.len} tokens, host masks {host}: {wall_ms(prompts):.1f} ms wall")
        slots.HOST_MASKS = chosen
    ms = wall_ms(prompts)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts, params=params)
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # (CPU ops carry their
    total = sum(e.self_device_time_total for e in kernels)                            # kernels' time too)
    print(f"prefill of {count} x {args.len} tokens: {ms:.1f} ms wall, {total / 1e3:.1f} ms CUDA time, "
          f"{sum(e.count for e in kernels)} kernels")
    print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70))
    # Session 13: 173.8 ms wall against 114.5 ms of kernels at 64 x 128 on an H100, so the
    # host side is the question: the operators by their own CPU time (launch-bound where it adds up)
    print(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
