"""End-to-end GRPO steps on a gpt-oss-20b-shaped model (random weights) on one GPU, timed by phase.

    python benchmarks/grpo_step.py [--steps 3] [--max-completion-length 1024]

8 prompts x 8 generations with the 2048 task prompt and the 2048 rewards (function_works,
no_cheating, strategy_succeeds), LoRA r=16 on attention and experts, dapo loss. Random weights
write no code, so every reward is the no-code penalty and advantages are zero: the step still runs
every phase (generation to the length limit, sandboxed scoring, the loss forward and backward),
which is what is timed. The tokenizer is a byte-level one with the harmony tokens (the real
o200k tokenizer is not available offline); ids above its vocabulary decode to nothing.
Writes benchmarks/results/grpo_step.json: seconds per step split by phase, generated tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_switches, apply_switches, device_info  # noqa: E402
from ossrl.envs.tasks import make_2048_dataset  # noqa: E402
from ossrl.model.config import GptOssConfig  # noqa: E402
from ossrl.model.tokenizer import write_byte_level_tokenizer  # noqa: E402
from ossrl.rl.config import GRPOConfig  # noqa: E402
from ossrl.rl.trainer import GRPOTrainer  # noqa: E402
from ossrl.testing import random_model_on_device  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-completion-length", type=int, default=1024)
    ap.add_argument("--micro-batches", type=int, default=8, help="gradient accumulation: 64 / this completions each")
    ap.add_argument("--no-sleep-mode", action="store_true", help="keep the engine's KV pool and graphs between phases")
    ap.add_argument("--checkpointing", default="auto", choices=("auto", "true"),
                    help="gradient_checkpointing: auto (the library default) or every layer recomputed")
    ap.add_argument("--profile-train", action="store_true",
                    help="profile the last step's training phase (left out of mean_steady): GPU busy time against "
                         "wall, the phases (grpo/forward, grpo/backward, grpo/optimizer_step), top kernels")
    ap.add_argument("--dense-experts-gb", type=float, default=0.0,
                    help="GRPOConfig.dense_experts_gb: kept bf16 copies of the MXFP4 experts (under \"auto\" "
                         "they take what the training step's activations leave, at most this)")
    add_switches(ap)
    ap.add_argument("--capture-training", action="store_true",
                    help="GRPOConfig.capture_training: micro-batches replayed from CUDA graphs (ossrl.train.graphed)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "grpo_step.json"))
    args = ap.parse_args()
    if args.profile_train and args.steps < 3:
        ap.error("--profile-train needs --steps 3 or more (step 1 compiles; the profiled last step is left out)")
    switches = apply_switches(args)
    work = Path(tempfile.mkdtemp())
    tokenizer = write_byte_level_tokenizer(work)
    model = random_model_on_device(GptOssConfig.gpt_oss_20b(), device="cuda", expert_format="mxfp4")
    config = GRPOConfig(output_dir=str(work / "run"), max_steps=args.steps, prompts_per_step=8, num_generations=8,
                        max_completion_length=args.max_completion_length, max_prompt_length=4096,
                        loss_type="dapo", learning_rate=1e-5, progress_bar=False,
                        gradient_checkpointing="auto" if args.checkpointing == "auto" else True,
                        gradient_accumulation_steps=args.micro_batches, enable_sleep_mode=not args.no_sleep_mode,
                        dense_experts_gb=args.dense_experts_gb, capture_training=args.capture_training,
                        reward_funcs=["2048.function_works", "2048.no_cheating", "2048.strategy_succeeds"])
    trainer = GRPOTrainer(model, train_dataset=make_2048_dataset(64, seed=0), config=config, tokenizer=tokenizer)
    if args.profile_train:
        profile_last_training_phase(trainer, args.steps)
    t0 = time.time()
    trainer.train()
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = ("time/step", "time/generate", "time/reward", "time/train", "tokens_per_second",
            "completions/mean_length", "peak_memory_gb", "checkpointed_layers")
    result = {"benchmark": "grpo_step", **device_info(), "shape": "8 prompts x 8 generations, 20b, MXFP4 experts",
              "max_completion_length": args.max_completion_length, "micro_batches": args.micro_batches,
              "enable_sleep_mode": not args.no_sleep_mode, "gradient_checkpointing": args.checkpointing,
              "dense_experts_gb": args.dense_experts_gb, "capture_training": args.capture_training,
              **switches,
              "steps": [{k: r.get(k) for k in ("step",) + keys} for r in rows],
              "seconds_total": round(time.time() - t0, 1)}
    if trainer.captured is not None:
        c = trainer.captured
        result["captured"] = {"replayed_micro_batches": c.replayed_calls, "eager_micro_batches": c.eager_calls,
                              "refused": list(c.refused.values())}
    steady = rows[1:] or rows  # the first step compiles kernels and captures graphs
    if args.profile_train and len(steady) > 1:
        steady = steady[:-1]  # the profiled step runs slower
    result["mean_steady"] = {k: sum(r[k] for r in steady) / len(steady) for k in keys}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["mean_steady"]))


def profile_last_training_phase(trainer, steps: int) -> None:
    """Wrap the trainer's optimisation phase so that the last step's runs under torch.profiler;
    prints where its wall time goes (a diagnosis, not a figure of the benchmark)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    original = trainer._optimise

    def profiled(rollouts, advantages):
        if trainer.step + 1 < steps:
            return original(rollouts, advantages)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = original(rollouts, advantages)
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e3
        print(f"training phase (profiled): wall {wall:.0f} ms; GPU busy {busy:.0f} ms in "
              f"{sum(e.count for e in kernels)} kernels ({100 * busy / wall:.0f}%)")
        for e in events:
            if e.key.startswith("grpo/") and e.device_type == DeviceType.CPU:
                print(f"  {e.key:22s} {e.count:3d}x  CPU {e.cpu_time_total / 1e3:8.1f} ms  "
                      f"GPU {e.device_time_total / 1e3:8.1f} ms")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]:
            print(f"{e.self_device_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key[:110]}")
        cpu_ops = [e for e in events if e.device_type == DeviceType.CPU and not e.key.startswith("grpo/")]
        print("top CPU ops by self CPU time:")
        for e in sorted(cpu_ops, key=lambda e: -e.self_cpu_time_total)[:15]:
            print(f"{e.self_cpu_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key[:110]}")
        return out

    trainer._optimise = profiled


if __name__ == "__main__":
    main()
