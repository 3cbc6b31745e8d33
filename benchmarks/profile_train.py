"""Where a LoRA training step's time goes (20b shapes, MXFP4 experts, LoRA r=16 on attention and
experts, checkpointing): CUDA kernel time by name for one forward + backward at --tokens.

    python benchmarks/profile_train.py [--tokens 4096]   # a diagnosis tool, not a benchmark
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

from train import single_document  # noqa: E402
from ossrl.model.config import GptOssConfig  # noqa: E402
from ossrl.model.lora import LoRAConfig, apply_lora  # noqa: E402
from ossrl.testing import random_model_on_device  # noqa: E402
from ossrl.train.logprobs import sequence_logprobs  # noqa: E402
from ossrl.train.memory import configure_memory  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=4096)
ap.add_argument("--fused-log-softmax", action="store_true",
                help="the chunked log-probs through ossrl.kernels.log_softmax (FUSED_LOG_SOFTMAX)")
args = ap.parse_args()
if args.fused_log_softmax:
    import ossrl.train.logprobs

    ossrl.train.logprobs.FUSED_LOG_SOFTMAX = True
config = GptOssConfig.gpt_oss_20b()
model = random_model_on_device(config, device="cuda", expert_format="mxfp4", seed=0)
apply_lora(model, LoRAConfig(r=16, alpha=32))
configure_memory(model, gradient_checkpointing=True)
model.train()
batch = single_document(args.tokens, config.vocab_size, "cuda")


def step():
    lp, _ = sequence_logprobs(model, batch)
    (-lp.mean()).backward()
    model.zero_grad(set_to_none=True)


for _ in range(2):
    step()
torch.cuda.synchronize()
t = time.perf_counter()
step()
torch.cuda.synchronize()
wall = time.perf_counter() - t
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
events = prof.key_averages()
# Kernel rows only (operator rows repeat their kernels' time): is the step GPU- or launch-bound?
kernels = [e for e in events if e.device_type == DeviceType.CUDA]
busy = sum(e.self_device_time_total for e in kernels) / 1e3
print(f"{args.tokens} tokens: step {wall * 1e3:.1f} ms unprofiled; GPU busy {busy:.1f} ms in "
      f"{sum(e.count for e in kernels)} kernels ({100 * busy / (wall * 1e3):.0f}% of the step)")
for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]:
    print(f"{e.self_device_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key[:110]}")
