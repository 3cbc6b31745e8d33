"""One LoRA training step (forward + backward) on a gpt-oss-20b-shaped model: ossrl vs transformers + PEFT.

    python benchmarks/train.py [--tokens 1024,4096,...] [--out benchmarks/results/train.json]

Both sides get the same random weights, built directly on the GPU (ossrl keeps the experts
MXFP4; transformers gets them dequantised to bf16, as it does offline). ossrl: LoRA r=16 on
q/k/v/o and every expert, gradient checkpointing "auto" (the library default: only the layers
whose activations do not fit in free memory are recomputed; `checkpointed_layers` in each row),
chunked log-probs, FlexAttention with sinks; plus rows with every layer checkpointed (the lean
mode a 16 GB GPU gets) at --full-checkpoint-tokens. `--optimizer adamw|offloaded` adds an AdamW
step over the LoRA parameters to every ossrl step (offloaded: its states in pinned CPU memory,
ossrl.train.offloaded_adamw), so the peak is a whole training step's (the 120b memory goal).
transformers + PEFT: LoRA r=16 on q/k/v/o, gradient checkpointing, flex attention (its best
path), the standard causal-LM loss. Each size: one warm-up step (compilation), then the median
of `--repeats` timed steps; peak memory from torch.cuda.max_memory_allocated; OOM is recorded.
ossrl runs first; its model is freed before transformers' is built (memory demands).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_switches, apply_switches, device_info, hf_from_ossrl  # noqa: E402
from ossrl.kernels import attention  # noqa: E402
from ossrl.model.config import GptOssConfig  # noqa: E402
from ossrl.model.expert_copies import dense_bytes_kept, dense_experts  # noqa: E402
from ossrl.model.lora import LoRAConfig, apply_lora  # noqa: E402
from ossrl.testing import random_model_on_device  # noqa: E402
from ossrl.train.graphed import CapturedLogprobs  # noqa: E402
from ossrl.train.memory import configure_memory  # noqa: E402
from ossrl.train.logprobs import PackedBatch, sequence_logprobs  # noqa: E402
from ossrl.train.optim import make_optimizer  # noqa: E402


def gib(n: float) -> float:
    return round(n / 2**30, 2)


# Untimed steps before the timed ones: the first compiles flex and the kernels for the shape, and
# steps after a process's first compiles can run slow for a while (session 19, H100: 8K steps
# took 0.69 s for seven steps in a row, then 0.51 s after another shape had compiled, the host's
# tiny block-table ops taking ms each; cause not found: results/train_first_shape_profile_s19_h100.txt).
# A mitigation, not a cure: `--interleave` times configurations in turn. Steps over 5 s end the
# warm-up early.
WARMUP_STEPS = 3


def timed_steps(step, repeats: int) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(WARMUP_STEPS):
            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            if i > 0 and time.perf_counter() - t > 5.0:  # (the first step compiles: its time says little)
                break
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            if times[-1] > 5.0:  # long steps: one timed run is enough (and device time is scarce)
                break
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return {"status": "OOM", "peak_gib": gib(torch.cuda.max_memory_allocated())}
    return {"status": "ok", "seconds": round(statistics.median(times), 4), "timed_runs": len(times),
            "all_seconds": [round(t, 4) for t in times], "peak_gib": gib(torch.cuda.max_memory_allocated())}


def lora_model_on_gpu(config):
    """The benchmarks' model: random weights built on the GPU, MXFP4 experts, LoRA r=16 on q/k/v/o and
    every expert, in training mode; (model, trainable parameter counts)."""
    model = random_model_on_device(config, device="cuda", expert_format="mxfp4", seed=0)
    counts = apply_lora(model, LoRAConfig(r=16, alpha=32))
    model.train()
    return model, counts


def lora_step(model, batch: PackedBatch, opt=None, captured=None) -> None:
    """One training step: the sequences' log-probs, their mean's gradient, `opt` (if any), grads cleared.
    captured: an `ossrl.train.graphed.CapturedLogprobs` of the model (the step replayed from CUDA graphs)."""
    if captured is not None:
        captured.zero_grad()
    lp, _ = (captured or partial(sequence_logprobs, model))(batch)
    (-lp.mean()).backward()
    if opt is not None:
        opt.step()
    if captured is None:
        model.zero_grad(set_to_none=True)


def interleaved_steps(config, sizes, configurations, repeats: int, dense_experts_gb: float = 0.0,
                      captured: bool = False) -> list:
    """Each size: every configuration (a tuple of switch flags, "NAME" turned on and "no-NAME" off,
    over the switches as the command line left them) warmed up, then `repeats` rounds of one timed
    step per configuration in turn, so that drift in the device's speed reaches each alike; one
    model (LoRA r=16, no checkpointing, `dense_experts_gb` of kept bf16 expert copies). `captured`:
    every step through one CapturedLogprobs (each configuration whose forward differs in what the
    graphs read, e.g. varlen attention's segments, gets a bucket of its own; four warm-up steps, so
    that each is captured and replayed before the timed ones; a switch the bucket's key does not
    see would replay the other configuration's graphs, so the rows record the buckets made)."""
    from _common import SWITCHES
    import importlib

    modules = {flag: (importlib.import_module(m), attribute) for flag, m, attribute, _ in SWITCHES}
    base = {flag: getattr(module, attribute) for flag, (module, attribute) in modules.items()}

    def switch(configuration):
        for flag, (module, attribute) in modules.items():
            value = True if flag in configuration else False if "no-" + flag in configuration else base[flag]
            setattr(module, attribute, value)

    model, _ = lora_model_on_gpu(config)
    configure_memory(model, gradient_checkpointing=False, dense_experts_gb=dense_experts_gb)
    graphs = None
    if captured:
        from ossrl.train.graphed import CapturedLogprobs

        graphs = CapturedLogprobs(model, max_tokens=1 << 30, max_buckets=len(configurations) * len(sizes))
    rows = []
    for T in sizes:
        batch = single_document(T, config.vocab_size, "cuda")

        def step():
            lora_step(model, batch, captured=graphs)
            torch.cuda.synchronize()

        times = {on: [] for on in configurations}
        for _ in range(4 if captured else 2):  # (WARMUP_STEPS' note; captured: eager, capture, replays)
            for on in configurations:
                switch(on)
                step()
        for _ in range(repeats):
            for on in configurations:
                switch(on)
                t = time.perf_counter()
                step()
                times[on].append(time.perf_counter() - t)
        switch(())
        for on in configurations:
            r = {"tokens": T, "configuration": list(on), "seconds": round(statistics.median(times[on]), 4),
                 "min_seconds": round(min(times[on]), 4), "all_seconds": [round(t, 4) for t in times[on]]}
            if graphs is not None:
                r.update(captured=True, buckets=graphs.bucket_count, replayed_steps=graphs.replayed_calls,
                         eager_steps=graphs.eager_calls, capture_refused=list(graphs.refused.values()))
            print(json.dumps(r), flush=True)
            rows.append(r)
    return rows


def single_document(T: int, vocab: int, device) -> PackedBatch:
    ids = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(T))
    target = torch.ones(1, T, dtype=torch.bool)
    target[:, -1] = False
    # built on the host and moved as `pack_sequences(...).to(device)` moves a batch: positions and
    # documents stay there (the model builds its masks' tables from them), the targets' index and
    # range are computed there (no read-back from the device in the step)
    return PackedBatch(ids, torch.arange(T)[None], torch.zeros(1, T, dtype=torch.long), target,
                       torch.where(target, 0, -1), 1).to(device)


def bench_ossrl(config, runs, repeats, offload: bool, offload_embeddings: bool = False,
                optimizer: str = "none", dense_experts_gb: float = 0.0) -> tuple[list, object]:
    """runs: (tokens, gradient_checkpointing[, dense_experts_gb]) tuples. optimizer: none, adamw or
    offloaded. dense_experts_gb: GiB of kept bf16 expert copies (`configure_memory`) for runs that
    give none of their own."""
    model, counts = lora_model_on_gpu(config)
    opt = None
    if optimizer != "none":  # lr tiny: the weights stay what they were, so every row sees the same model
        opt = make_optimizer(model.parameters(), lr=1e-12, offload=optimizer == "offloaded")
    rows = []
    for T, checkpointing, *extra in runs:  # (then: this run's dense_experts_gb, whether it replays graphs)
        gb = extra[0] if extra and extra[0] is not None else dense_experts_gb
        # (every size captured: the library's default leaves steps over 4K tokens eager)
        captured = CapturedLogprobs(model, max_tokens=1 << 30) if len(extra) > 1 and extra[1] else None
        configure_memory(model, gradient_checkpointing=checkpointing, offload_activations=offload,
                         offload_embeddings=offload_embeddings, dense_experts_gb=gb)
        dense_gib = dense_bytes_kept(model) / 2**30
        resident = torch.cuda.memory_allocated() / 2**30  # weights + LoRA masters (+ dense copies), before the step
        batch = single_document(T, config.vocab_size, "cuda")

        def step():
            lora_step(model, batch, opt, captured)

        r = timed_steps(step, repeats)
        if captured is not None:  # (the first step runs eagerly, the second captures, the rest replay)
            r.update(captured=True, replayed_steps=captured.replayed_calls, eager_steps=captured.eager_calls,
                     capture_refused=list(captured.refused.values()))
            captured.release()
            model.zero_grad(set_to_none=True)
            del captured
            gc.collect()
            torch.cuda.empty_cache()
        # "auto" refits the copies to what the step's activations leave (ossrl.train.memory)
        r["dense_experts_gib_after_step"] = round(dense_bytes_kept(model) / 2**30, 2)
        r.update(tokens=T, system="ossrl", optimizer=optimizer, gradient_checkpointing=checkpointing,
                 checkpointed_layers=model.model.checkpointed_layers, offload=offload,
                 offload_embeddings=offload_embeddings, resident_gib_before_step=round(resident, 2),
                 dense_experts_gib=round(dense_gib, 2))
        if r["status"] == "ok":
            r["tokens_per_second"] = round(T / r["seconds"], 1)
        print(json.dumps(r), flush=True)
        rows.append(r)
    return rows, model, counts


def bench_hf(hf, sizes, repeats) -> list:
    from peft import LoraConfig, get_peft_model

    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.enable_input_require_grads()
    peft_model = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    peft_model.train()
    rows = []
    for T in sizes:
        batch = single_document(T, hf.config.vocab_size, "cuda")

        def step():
            out = peft_model(input_ids=batch.input_ids, labels=batch.input_ids)
            out.loss.backward()
            peft_model.zero_grad(set_to_none=True)

        r = timed_steps(step, repeats)
        r.update(tokens=T, system="transformers+peft")
        if r["status"] == "ok":
            r["tokens_per_second"] = round(T / r["seconds"], 1)
        print(json.dumps(r), flush=True)
        rows.append(r)
        if r["status"] == "OOM":  # larger sizes would OOM too
            rows += [{"tokens": t, "system": "transformers+peft", "status": "OOM (not run: smaller size OOM)"}
                     for t in sizes if t > T]
            break
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1024,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--hf-tokens", default="1024,4096,8192,16384")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--checkpointing", default="auto", choices=("auto", "true"),
                    help="ossrl's gradient checkpointing for the --tokens rows")
    ap.add_argument("--full-checkpoint-tokens", default="1024,4096",
                    help="extra ossrl rows with every layer checkpointed (the memory-lean mode)")
    ap.add_argument("--captured-tokens", default="",
                    help="extra ossrl rows replayed from CUDA graphs (ossrl.train.graphed.CapturedLogprobs)")
    ap.add_argument("--offload", action="store_true", help="activation checkpoints in pinned CPU memory")
    ap.add_argument("--offload-embeddings", action="store_true", help="the embedding table on the CPU")
    ap.add_argument("--optimizer", default="none", choices=("none", "adamw", "offloaded"),
                    help="an AdamW step in each ossrl step (offloaded: its states in CPU memory)")
    ap.add_argument("--dense-experts-gb", type=float, default=0.0,
                    help="GiB of bf16 copies of the frozen MXFP4 experts kept for the MoE calls (layers in order; "
                         "ossrl.train.memory); 0: none, each call decodes its own")
    ap.add_argument("--dense-ab", action="store_true",
                    help="time each size without the dense copies, then with --dense-experts-gb, on one model")
    ap.add_argument("--skip-hf", action="store_true", help="ossrl only (a memory check, not a comparison)")
    ap.add_argument("--model", default="20b", choices=("20b", "120b"),
                    help="120b: ossrl only (transformers would need its 234 GB of bf16 experts)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/train.json (train_120b.json for 120b)")
    ap.add_argument("--flex-kernel-options", default=None, metavar="JSON",
                    help='FlexAttention tile options (attention.FLEX_KERNEL_OPTIONS), e.g. '
                         '\'{"bwd_BLOCK_M1": 64}\' (benchmarks/flex_tune.py times candidates)')
    add_switches(ap, ("fused-log-softmax", "eager-logprob-grad", "fused-training-qkv", "sink-kernels", "flex-static",
                      "varlen-attention",
                      "training-lora-epilogue", "fused-swiglu-backward", "fused-residual-backward",
                      "fused-lora-backward", "dw-in-swiglu-backward",
                      "down-lora-by-token"))
    ap.add_argument("--interleave", default=None, metavar="A,no-B;C",
                    help="A/B in one process: configurations (switches by name, e.g. eager-logprob-grad "
                         "on, no-eager-logprob-grad off, comma-separated; configurations separated by ';', "
                         "an empty one = the switches as given) timed in turn, --repeats rounds per size; "
                         "ossrl only, no checkpointing")
    ap.add_argument("--interleave-captured", action="store_true",
                    help="--interleave with every step replayed from CUDA graphs (one CapturedLogprobs)")
    args = ap.parse_args()
    if args.interleave_captured and args.interleave is None:
        ap.error("--interleave-captured needs --interleave")
    switches = apply_switches(args)
    if args.flex_kernel_options:
        attention.FLEX_KERNEL_OPTIONS = json.loads(args.flex_kernel_options)
    switches["flex_kernel_options"] = attention.FLEX_KERNEL_OPTIONS
    if args.out is None:
        name = "train.json" if args.model == "20b" else f"train_{args.model}.json"
        args.out = os.path.join(os.environ.get("OUT", "benchmarks/results"), name)
    config = GptOssConfig.gpt_oss_20b() if args.model == "20b" else GptOssConfig.gpt_oss_120b()
    if args.model == "120b":
        args.skip_hf = True
    sizes = [int(t) for t in args.tokens.split(",")]
    t0 = time.time()
    mode = True if args.checkpointing == "true" else "auto"
    if args.interleave is not None:
        from _common import SWITCHES

        configurations = [tuple(f for f in c.split(",") if f) for c in args.interleave.split(";")]
        names = {flag for flag, *_ in SWITCHES}
        for c in configurations:
            if unknown := [f for f in c if f.removeprefix("no-") not in names]:
                ap.error(f"--interleave: unknown switch {unknown[0]!r} (known: {', '.join(sorted(names))})")
        if len(set(configurations)) < len(configurations):
            ap.error("--interleave: a configuration is given twice")
        rows = interleaved_steps(config, sizes, configurations, args.repeats, args.dense_experts_gb,
                                 captured=args.interleave_captured)
        result = {"benchmark": "train_step_interleaved", **device_info(), **switches,
                  "dense_experts_gb": args.dense_experts_gb,
                  "model": f"gpt-oss-{args.model} shapes, random weights, MXFP4 experts, LoRA r=16 (ossrl only)",
                  "rows": rows, "seconds_total": round(time.time() - t0, 1)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return
    runs = [(T, mode) for T in sizes]
    if mode == "auto" and args.full_checkpoint_tokens:
        runs += [(int(t), True) for t in args.full_checkpoint_tokens.split(",")]
    if args.dense_ab:  # each run without the copies, then with them, in this process
        runs = [(*r, 0.0) for r in runs] + [(*r, args.dense_experts_gb) for r in runs]
    if args.captured_tokens:
        runs += [(int(t), mode, None, True) for t in args.captured_tokens.split(",")]
    ours, model, counts = bench_ossrl(config, runs, args.repeats, args.offload, args.offload_embeddings,
                                      args.optimizer, args.dense_experts_gb)
    theirs = []
    if args.hf_tokens and not args.skip_hf:
        dense_experts(model, max_bytes=0)  # (transformers gets its own bf16 experts)
        hf = hf_from_ossrl(model, config)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        theirs = bench_hf(hf, [int(t) for t in args.hf_tokens.split(",")], args.repeats)
    ratios = {}
    for r in ours:
        match = next((x for x in theirs if x["tokens"] == r["tokens"] and x.get("status") == "ok"), None)
        if match and r.get("status") == "ok" and r["gradient_checkpointing"] == mode:
            key = str(r["tokens"]) + ("_dense" if r["dense_experts_gib"] else "") + \
                ("_captured" if r.get("captured") else "")
            ratios[key] = {"speedup": round(match["seconds"] / r["seconds"], 2),
                           "memory_ratio": round(r["peak_gib"] / match["peak_gib"], 3)}
    result = {
        "benchmark": "train_step",
        **device_info(),
        "model": f"gpt-oss-{args.model} shapes, random weights (ossrl: MXFP4 experts; transformers: dequantised bf16)",
        "note": ("peak is one forward+backward with LoRA gradients; an AdamW optimizer adds two fp32 states per "
                 "trainable parameter (8 bytes each) on top" if args.optimizer == "none" else
                 f"peak is one forward+backward with LoRA gradients and an AdamW step ({args.optimizer})"),
        "lora_trainable_params": counts, **switches, "dense_experts_gb": args.dense_experts_gb,
        "ossrl": ours, "transformers_peft": theirs, "ratios": ratios,
        "seconds_total": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
