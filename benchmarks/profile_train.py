"""Where a LoRA training step's time goes (20b shapes, MXFP4 experts, LoRA r=16 on attention and
experts): CUDA kernel time by name for one forward + backward at --tokens, then the same GPU time
by where it was launched: forward (and checkpoint recompute) by module class, backward by autograd
node.

    python benchmarks/profile_train.py [--tokens 4096] [--checkpointing auto|true] [--dense-experts-gb GB] [--top 25]
        [--captured]
    # a diagnosis tool, not a benchmark

--captured profiles a step replayed from CUDA graphs (ossrl.train.graphed.CapturedLogprobs): the
kernels only, since a replay runs no Python (the module and autograd tables stay empty).

--checkpointing auto (the default, as benchmarks/train.py's main rows) recomputes only the layers
whose activations do not fit; true recomputes every layer (the lean mode).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_switches, apply_switches  # noqa: E402
from train import single_document  # noqa: E402
from ossrl.model.config import GptOssConfig  # noqa: E402
from ossrl.model.lora import LoRAConfig, apply_lora  # noqa: E402
from ossrl.testing import random_model_on_device  # noqa: E402
from ossrl.train.logprobs import sequence_logprobs  # noqa: E402
from ossrl.train.memory import configure_memory  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=4096)
ap.add_argument("--checkpointing", default="auto", choices=("auto", "true"))
ap.add_argument("--dense-experts-gb", type=float, default=0.0, help="kept bf16 expert copies (configure_memory)")
ap.add_argument("--top", type=int, default=25, help="kernels listed")
ap.add_argument("--captured", action="store_true",
                help="profile a step replayed from CUDA graphs (CapturedLogprobs; kernels only: no module ranges)")
add_switches(ap, ("fused-log-softmax", "eager-logprob-grad", "fused-training-qkv", "sink-kernels", "varlen-attention",
                  "training-lora-epilogue", "fused-swiglu-backward", "fused-residual-backward",
                  "fused-lora-backward", "dw-in-swiglu-backward", "down-lora-by-token"))
args = ap.parse_args()
print(apply_switches(args))
config = GptOssConfig.gpt_oss_20b()
model = random_model_on_device(config, device="cuda", expert_format="mxfp4", seed=0)
apply_lora(model, LoRAConfig(r=16, alpha=32))
configure_memory(model, gradient_checkpointing=True if args.checkpointing == "true" else "auto",
                 dense_experts_gb=args.dense_experts_gb)
model.train()
batch = single_document(args.tokens, config.vocab_size, "cuda")


captured = None
if args.captured:
    from ossrl.train.graphed import CapturedLogprobs

    captured = CapturedLogprobs(model, max_tokens=1 << 30)


def step():
    if captured is not None:
        captured.zero_grad()
    lp, _ = captured(batch) if captured is not None else sequence_logprobs(model, batch)
    (-lp.mean()).backward()
    if captured is None:
        model.zero_grad(set_to_none=True)


for _ in range(3 if captured else 2):  # (captured: the first runs eagerly, the second captures)
    step()
if captured is not None:
    print(f"captured: {captured.replayed_calls} replayed, {captured.eager_calls} eager, refused {captured.refused}")
torch.cuda.synchronize()
t = time.perf_counter()
step()
torch.cuda.synchronize()
wall = time.perf_counter() - t
# Forward scopes: one profiler range per module call, named by class (nested: an Attention's range
# holds its LoRALinear ones). Hooks only while profiling; the timed step above ran without them.
SCOPED = ("Attention", "MLP", "Router", "Experts", "LoRALinear", "ExpertLoRA", "RMSNorm", "Embedding")


def enter(module, args):
    module._profile_range = torch.profiler.record_function(f"fwd/{type(module).__name__}")
    module._profile_range.__enter__()


def leave(module, args, out):
    module._profile_range.__exit__(None, None, None)


hooks = []
for m in model.modules():
    if type(m).__name__ in SCOPED:
        hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
for h in hooks:
    h.remove()
events = prof.key_averages()
# Kernel rows only (operator rows repeat their kernels' time): is the step GPU- or launch-bound?
# (the profiler also lists each record_function range as a GPU-side annotation spanning its
# kernels, under the range's own name: those are left out, else their time counts twice)
ranges_named = {e.key for e in events if e.device_type != DeviceType.CUDA}
kernels = [e for e in events if e.device_type == DeviceType.CUDA and e.key not in ranges_named]
busy = sum(e.self_device_time_total for e in kernels) / 1e3
print(f"{args.tokens} tokens: step {wall * 1e3:.1f} ms unprofiled; GPU busy {busy:.1f} ms in "
      f"{sum(e.count for e in kernels)} kernels ({100 * busy / (wall * 1e3):.0f}% of the step)")
for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:args.top]:
    print(f"{e.self_device_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key[:110]}")
# GPU time of the kernels launched inside each range (inclusive of nested ranges), and of each
# backward node's kernels (autograd's "evaluate_function" ranges).
ranges = [e for e in events if e.device_type != DeviceType.CUDA and e.device_time_total > 0]
print(f"forward by module (GPU ms, inclusive; {args.checkpointing!r} checkpointing recomputes some in backward):")
for e in sorted((e for e in ranges if e.key.startswith("fwd/")), key=lambda e: -e.device_time_total):
    print(f"{e.device_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key}")
print("backward by autograd node (GPU ms):")
prefix = "autograd::engine::evaluate_function: "
for e in sorted((e for e in ranges if e.key.startswith(prefix)), key=lambda e: -e.device_time_total)[:20]:
    print(f"{e.device_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key[len(prefix):][:100]}")
