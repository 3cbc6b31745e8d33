"""Rollout generation on a gpt-oss-20b-shaped model: ossrl's engine vs transformers' generate.

    python benchmarks/generate.py [--out benchmarks/results/generate.json] [--quick]

Same random weights for both (built on the GPU; ossrl keeps MXFP4 experts, transformers gets them
dequantised to bf16 as it does offline; eager attention, its default for gpt-oss). Shapes:
batch 1, 8, 32, 64 of 128-token prompts; and GRPO's shape, 8 prompts x 8 samples with a
max_new_tokens per prompt drawn between 64 and 1,024. ossrl runs first, then its weights are
copied into transformers' model and freed. Random weights never emit a stop token, so every
sequence runs to its length. Time includes prefill; tokens/s counts generated tokens. ossrl is
timed on its second call of each shape (the first allocates the KV pool and captures the CUDA
graphs, as GRPO's first step does); transformers' generate has no such state.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_switches, apply_switches, copy_bandwidth_gbs, device_info, hf_from_ossrl  # noqa: E402
from ossrl.engine.engine import RolloutEngine  # noqa: E402
from ossrl.engine.sampling import SamplingParams  # noqa: E402
from ossrl.model import expert_copies  # noqa: E402
from ossrl.kernels import decode_attention  # noqa: E402
from ossrl.model.config import GptOssConfig  # noqa: E402
from ossrl.model.lora import LoRAConfig, apply_lora  # noqa: E402
from ossrl.testing import random_model_on_device  # noqa: E402


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = random.Random(seed)
    return [[g.randrange(vocab) for _ in range(length)] for _ in range(count)]


def decode_bytes_batch1(config: GptOssConfig) -> int:
    """Bytes one decode step must read at batch 1: attention + router + 4 routed MXFP4 experts per
    layer + norms + lm_head (the embedding row is negligible)."""
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attn = (H * (q + 2 * kv) + q * H) * 2
    router = config.num_local_experts * H * 2
    per_expert = (2 * I * H) // 2 + (2 * I * H) // 32 + (H * I) // 2 + (H * I) // 32 + (2 * I + H) * 2
    return L * (attn + router + config.num_experts_per_tok * per_expert) + config.vocab_size * H * 2


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def run_ossrl(model, shapes, vocab, repeats: int = 3, rows: list | None = None, done=None) -> list[dict]:
    """Each shape generated once untimed, then `repeats` timed times: the median (one timed run
    varied by up to 5% at batch 64 on an H100, session 17). Rows go into `rows`; `done()` follows each."""
    engine = RolloutEngine(model)
    rows = [] if rows is None else rows
    for shape in shapes:
        P, n, lengths = shape["prompts"], shape["n"], shape["max_new"]
        ps = prompts(P, shape["prompt_len"], vocab, seed=P)
        params = SamplingParams(temperature=1.0, max_new_tokens=lengths, seed=0)
        engine.generate(ps, n=n, params=params)  # allocates the pool, captures the graphs (steady state:
        # GRPO generates the same shape every step)
        torch.cuda.reset_peak_memory_stats()
        out = []
        runs = [timed(lambda: out.append(engine.generate(ps, n=n, params=params))) for _ in range(repeats)]
        seconds = statistics.median(runs)
        tokens = sum(len(c.token_ids) for g in out[0] for c in g)
        if any(sum(len(c.token_ids) for g in o for c in g) != tokens for o in out):
            raise RuntimeError(f"{shape['name']}: the timed runs generated different numbers of tokens")
        # the prefill's share: the same prompts with one new token each (the prefill samples it)
        first = SamplingParams(temperature=1.0, max_new_tokens=1, seed=0)
        prefill = timed(lambda: engine.generate(ps, n=n, params=first))
        rows.append({**shape, "system": "ossrl", "seconds": round(seconds, 3), "runs_seconds": [round(r, 3) for r in runs],
                     "generated_tokens": tokens,
                     "tokens_per_second": round(tokens / seconds, 1), "prefill_seconds": round(prefill, 4),
                     "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                     "graph_failures": engine._slots.graph_failures if engine._slots else []})
        print(json.dumps(rows[-1]), flush=True)
        if done is not None:
            done()
    engine.release()
    return rows


def run_hf(hf, shapes, vocab, rows: list | None = None, done=None) -> list[dict]:
    rows = [] if rows is None else rows
    for shape in shapes:
        P, n = shape["prompts"], shape["n"]
        ps = prompts(P, shape["prompt_len"], vocab, seed=P)
        new = max(shape["hf_max_new"])
        ids = torch.tensor([p for p in ps for _ in range(n)], device="cuda")
        kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                      pad_token_id=0, attention_mask=torch.ones_like(ids))
        hf.generate(ids[:, :16], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4,
                                    "attention_mask": torch.ones_like(ids[:, :16])})
        torch.cuda.reset_peak_memory_stats()
        try:
            seconds = timed(lambda: hf.generate(ids, **kwargs))
        except torch.OutOfMemoryError:
            rows.append({**shape, "system": "transformers", "status": "OOM"})
            if done is not None:
                done()
            continue
        # transformers pads every row of the batch to the longest: count only the tokens the
        # shape asks for, i.e. what a GRPO user gets out of the call.
        useful = sum(shape["hf_max_new"]) * n
        rows.append({**shape, "system": "transformers", "seconds": round(seconds, 3),
                     "generated_tokens": useful, "tokens_per_second": round(useful / seconds, 1),
                     "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
        print(json.dumps(rows[-1]), flush=True)
        if done is not None:
            done()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "generate.json"))
    ap.add_argument("--hf-new-tokens", type=int, default=64,
                    help="transformers generates this many tokens per batch shape (its speed per token is "
                         "flat in length; 256 x 4 shapes would take minutes of device time)")
    ap.add_argument("--one-split-max-capacity", type=int, default=None, metavar="ROWS",
                    help="decode attention: caches of at most ROWS rows a slot take one split where the rule asks "
                         "for two (decode_attention.ONE_SPLIT_MAX_CAPACITY; default: the library's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed ossrl runs per shape (the median is reported)")
    ap.add_argument("--skip-hf", action="store_true", help="ossrl only (a quick check, not a benchmark result)")
    ap.add_argument("--shapes", default="batch1,batch8,batch32,batch64,grpo_8x8")
    ap.add_argument("--lora", action="store_true", help="ossrl with LoRA r=16 on attention and experts (unmerged)")
    ap.add_argument("--dense-experts-gb", type=float, default=0.0,
                    help="GiB of bf16 copies of the MXFP4 experts kept for prefill-sized MoE calls "
                         "(expert_copies.dense_experts; the KV pool gets the rest); 0: none")
    add_switches(ap, ("share-prefixes", "tile-experts", "split-k-fixup", "defer-residual-add", "host-masks", "moe-gemv",
                      "rotary-append", "flex-static", "router-groups", "combine-parts"))
    ap.add_argument("--tiled-layout", default=None, metavar="ROWSxWORDS",
                    help="the experts' tile-contiguous copies in chunks of ROWS rows and WORDS 32-bit words "
                         "(expert_copies.TILED_LAYOUT; default: the library's)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    switches = apply_switches(args)
    if args.one_split_max_capacity is not None:
        decode_attention.ONE_SPLIT_MAX_CAPACITY = args.one_split_max_capacity
    switches["one_split_max_capacity"] = decode_attention.ONE_SPLIT_MAX_CAPACITY
    if args.tiled_layout:
        expert_copies.TILED_LAYOUT = tuple(int(v) for v in args.tiled_layout.split("x"))
    switches["tiled_layout"] = list(expert_copies.TILED_LAYOUT)
    config = GptOssConfig.gpt_oss_20b()
    g = random.Random(0)
    grpo_lengths = [g.randint(64, 1024) for _ in range(8)]
    shapes = [{"name": f"batch{b}", "prompts": b, "n": 1, "prompt_len": 128, "max_new": [256] * b,
               "hf_max_new": [args.hf_new_tokens] * b} for b in (1, 8, 32, 64)]
    shapes.append({"name": "grpo_8x8", "prompts": 8, "n": 8, "prompt_len": 128, "max_new": grpo_lengths,
                   "hf_max_new": grpo_lengths})
    shapes = [s for s in shapes if s["name"] in args.shapes.split(",")]
    t0 = time.time()
    info = {**device_info(), "copy_bandwidth_gbs": round(copy_bandwidth_gbs(), 1)}
    ours, theirs = [], []

    def write() -> dict:
        """The result so far, rewritten after every row (a run cut by its time limit keeps its rows)."""
        ratios = {}
        for a in ours:
            b = next((x for x in theirs if x["name"] == a["name"] and "tokens_per_second" in x), None)
            if b:
                ratios[a["name"]] = round(a["tokens_per_second"] / b["tokens_per_second"], 2)
        bytes_step = decode_bytes_batch1(config)
        b1 = next((a for a in ours if a["name"] == "batch1"), {"tokens_per_second": 0.0})
        steps_per_s = b1["tokens_per_second"]  # includes prefill: a lower bound on decode steps/s
        result = {"benchmark": "generate", **info, "lora": args.lora, **switches,
                  "dense_experts_gb": args.dense_experts_gb,
                  "model": "gpt-oss-20b shapes, random weights (ossrl MXFP4 experts; transformers dequantised bf16)",
                  "shapes": [s["name"] for s in shapes], "ossrl": ours, "transformers": theirs, "speedup": ratios,
                  "batch1_bytes_per_step": bytes_step,
                  "batch1_bandwidth_fraction": round(bytes_step * steps_per_s / (info["copy_bandwidth_gbs"] * 1e9), 3),
                  "complete": len(ours) == len(shapes) and (args.skip_hf or len(theirs) == len(shapes)),
                  "seconds_total": round(time.time() - t0, 1)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return result

    model = random_model_on_device(config, device="cuda", expert_format="mxfp4", seed=0)
    if args.lora:
        apply_lora(model, LoRAConfig(r=16, alpha=32))
    expert_copies.dense_experts(model, max_bytes=int(args.dense_experts_gb * 2**30))
    run_ossrl(model, shapes, config.vocab_size, args.repeats, rows=ours, done=write)
    if not args.skip_hf:
        expert_copies.dense_experts(model, max_bytes=0)
        hf = hf_from_ossrl(model, config, attn_implementation="eager").eval()
        del model
        gc.collect()
        torch.cuda.empty_cache()
        run_hf(hf, shapes, config.vocab_size, rows=theirs, done=write)
    result = write()
    print(json.dumps({"speedup": result["speedup"], "bw_fraction_b1": result["batch1_bandwidth_fraction"]}))


if __name__ == "__main__":
    main()
