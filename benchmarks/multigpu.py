"""Several GPUs (#12): data-parallel GRPO step time and FSDP2 training memory per GPU, under torchrun.

    torchrun --nproc-per-node N benchmarks/multigpu.py grpo --out $OUT/grpo_N.json          # N = 1, 2, 4
    torchrun --nproc-per-node N benchmarks/multigpu.py fsdp --model 120b --experts bf16 \\
        --tokens 1024,16384 --out $OUT/fsdp_N.json
    python benchmarks/multigpu.py merge $OUT/*.json --out benchmarks/results/multigpu.json

grpo: the grpo_step benchmark's shape (8 prompts x 8 generations, up to 1,024 new tokens, the 2048
rewards, LoRA r=16 on attention and experts, MXFP4 experts) with the prompts split over the ranks;
every rank builds the same random 20b-shaped weights on its GPU (same seed), so the global batch and
the update are those of one GPU. `merge` computes the scaling efficiency t_1 / (N * t_N) per phase.
fsdp: the model built on the meta device with LoRA r=16, sharded over the ranks (ossrl.train.sharding)
and materialised shard by shard with random values (no rank ever holds the whole model), then one
LoRA training step (forward and backward of the chunked log-probs, every layer checkpointed) per
size on each rank; the largest per-rank peak and the step time.
`--model tiny --device cpu` runs either on CPU processes under gloo (tests/test_fsdp.py smoke-tests it).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1: set by ossrl).
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
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ossrl.model.config import GptOssConfig  # noqa: E402
from ossrl.model.lora import LoRAConfig, apply_lora  # noqa: E402
from ossrl.train.distributed import exit_distributed_process, init_distributed  # noqa: E402
from ossrl.testing import random_model_on_device, tiny_config  # noqa: E402
from ossrl.train.logprobs import PackedBatch, sequence_logprobs  # noqa: E402
from ossrl.train.memory import configure_memory  # noqa: E402
from ossrl.train.sharding import shard_model  # noqa: E402

PHASES = ("time/step", "time/generate", "time/reward", "time/train")


def model_config(name: str) -> GptOssConfig:
    return {"20b": GptOssConfig.gpt_oss_20b, "120b": GptOssConfig.gpt_oss_120b, "tiny": tiny_config}[name]()


def facts(device: str, world: int) -> dict:
    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "gpus": world}
    info["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return info


def peak_gib(device: str) -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else 0.0


def run_grpo(args, ctx) -> dict:
    from ossrl.envs.tasks import make_2048_dataset
    from ossrl.model.tokenizer import write_byte_level_tokenizer
    from ossrl.rl.config import GRPOConfig
    from ossrl.rl.trainer import GRPOTrainer

    device = f"cuda:{ctx.local_rank}" if args.device == "cuda" else "cpu"
    work = Path(tempfile.mkdtemp())
    tokenizer = write_byte_level_tokenizer(work)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = random_model_on_device(model_config(args.model), device=device, dtype=dtype, expert_format="mxfp4")
    config = GRPOConfig(output_dir=str(work / "run"), max_steps=args.steps, prompts_per_step=8, num_generations=8,
                        max_completion_length=args.max_completion_length, max_prompt_length=4096, loss_type="dapo",
                        learning_rate=1e-5, progress_bar=False, gradient_accumulation_steps=max(1, 8 // ctx.world_size),
                        reward_funcs=["2048.function_works", "2048.no_cheating", "2048.strategy_succeeds"])
    GRPOTrainer(model, train_dataset=make_2048_dataset(64, seed=0), config=config, tokenizer=tokenizer).train()
    if not ctx.is_main:
        return {}
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows  # the first step compiles kernels and captures graphs
    return {"mode": "grpo", "model": args.model, "shape": "8 prompts x 8 generations, MXFP4 experts",
            "max_completion_length": args.max_completion_length,
            "steps": [{k: r.get(k) for k in ("step", *PHASES, "tokens_per_second", "peak_memory_gb")} for r in rows],
            "mean_steady": {k: sum(r[k] for r in steady) / len(steady) for k in (*PHASES, "tokens_per_second")}}


def run_fsdp(args, ctx) -> dict:
    device = f"cuda:{ctx.local_rank}" if args.device == "cuda" else "cpu"
    config = model_config(args.model)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    def prepare(model):
        apply_lora(model, LoRAConfig(r=16, alpha=32))
        shard_model(model)

    model = random_model_on_device(config, device=device, dtype=dtype, expert_format=args.experts, prepare=prepare)
    configure_memory(model, gradient_checkpointing=True)
    model.train()
    resident = torch.cuda.memory_allocated() / 2**30 if args.device == "cuda" else 0.0
    rows = []
    for T in [int(t) for t in args.tokens.split(",")]:
        g = torch.Generator().manual_seed(T + ctx.rank)
        ids = torch.randint(0, config.vocab_size, (1, T), generator=g).to(device)
        target = torch.ones(1, T, dtype=torch.bool, device=device)
        target[:, -1] = False
        batch = PackedBatch(ids, torch.arange(T, device=device)[None], torch.zeros_like(ids), target,
                            torch.where(target, 0, -1), 1)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(2):  # the first compiles
            start = time.perf_counter()
            lp, _ = sequence_logprobs(model, batch)
            (-lp.mean()).backward()
            model.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = torch.tensor([peak_gib(args.device), times[-1]], dtype=torch.float64,
                            device=device if args.device == "cuda" else "cpu")
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        rows.append({"tokens_per_rank": T, "peak_gib_max_rank": round(float(peak[0]), 2),
                     "seconds_slowest_rank": round(float(peak[1]), 3)})
    return {"mode": "fsdp", "model": args.model, "experts": args.experts, "lora": "r=16, attention and experts",
            "gradient_checkpointing": True, "resident_gib_rank0": round(resident, 2), "rows": rows}


def merge(files: list[str], out: str) -> None:
    runs = [json.loads(Path(f).read_text()) for f in files]
    grpo = sorted((r for r in runs if r["mode"] == "grpo"), key=lambda r: r["gpus"])
    result = {"benchmark": "multigpu", "grpo": grpo, "fsdp": [r for r in runs if r["mode"] == "fsdp"]}
    one = next((r for r in grpo if r["gpus"] == 1), None)
    if one is not None:
        result["grpo_scaling_efficiency"] = {
            str(r["gpus"]): {k: round(one["mean_steady"][k] / (r["gpus"] * r["mean_steady"][k]), 3)
                             for k in ("time/step", "time/generate", "time/train")} for r in grpo}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result.get("grpo_scaling_efficiency", {})))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("grpo", "fsdp", "merge"))
    ap.add_argument("files", nargs="*", help="merge: the per-run JSON files")
    ap.add_argument("--model", default="20b", choices=("20b", "120b", "tiny"))
    ap.add_argument("--experts", default="bf16", choices=("bf16", "mxfp4"), help="fsdp: the experts' format")
    ap.add_argument("--tokens", default="1024,16384", help="fsdp: tokens per rank per step")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-completion-length", type=int, default=1024)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.mode == "merge":
        return merge(args.files, args.out)
    ctx = init_distributed()
    if args.mode == "fsdp" and not ctx.enabled:
        raise SystemExit("fsdp needs several processes: torchrun --nproc-per-node N benchmarks/multigpu.py fsdp ...")
    result = (run_grpo if args.mode == "grpo" else run_fsdp)(args, ctx)
    if ctx.is_main:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**facts(args.device, ctx.world_size), **result}, indent=2) + "\n")
        print(json.dumps(result.get("mean_steady", result.get("rows"))), flush=True)
    exit_distributed_process()  # under torchrun (a gloo rank can abort at interpreter teardown)


if __name__ == "__main__":
    main()
