"""Attention benchmark: ossrl sink attention against transformers' gpt-oss eager attention, same run.

(a) Training: forward + backward of one 20b-shaped attention layer core (64 query heads, 8 KV
    heads, head_dim 64, one sequence of T tokens, bf16) at T = 4K, 16K, 64K, 128K: time and peak
    memory above the inputs, for our FlexAttention path (full-causal and sliding-128 layers) and
    for `transformers.models.gpt_oss.modeling_gpt_oss.eager_attention_forward` (full causal;
    OOM recorded as such).
(b) Decode: the Triton decode kernel at batch 1, 8, 64 x context 1K, 8K, 32K (every sequence at
    the full context), timed as CUDA-graph replays, with achieved bandwidth (K and V bytes read
    once) as a fraction of the device's measured copy bandwidth; transformers' eager attention on
    the same cache as the baseline. A small sweep of kernel configurations at 64 x 8K comes first.

Run on a GPU from the repo root:  python benchmarks/attention.py --out benchmarks/results/attention.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's ossrl, without PYTHONPATH

from _common import median_ms as timed  # noqa: E402  (median ms over reps, one warm-up call)
from ossrl.kernels.attention import AttentionMask, sink_attention, sink_attention_reference  # noqa: E402
from ossrl.kernels.decode_attention import decode_attention, decode_attention_reference  # noqa: E402

HQ, HKV, D, SCALE = 64, 8, 64, 0.125
DEV = "cuda"
GiB = 2**30


def raise_recompile_limit(limit: int = 64) -> None:
    """One process here meets many shapes and mask kinds; a training run meets a few."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, limit)


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    x = torch.randn(GiB // 2, device=DEV, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def training_inputs(T: int, gen):
    q = torch.randn(1, T, HQ, D, device=DEV, generator=gen).bfloat16().requires_grad_()
    k = torch.randn(1, T, HKV, D, device=DEV, generator=gen).bfloat16().requires_grad_()
    v = torch.randn(1, T, HKV, D, device=DEV, generator=gen).bfloat16().requires_grad_()
    sinks = torch.randn(HQ, device=DEV, generator=gen).bfloat16().requires_grad_()
    grad = torch.randn(1, T, HQ, D, device=DEV, generator=gen).bfloat16()
    return q, k, v, sinks, grad


def bench_training(T: int, reps: int) -> dict:
    gen = torch.Generator(device=DEV).manual_seed(T)
    q, k, v, sinks, grad = training_inputs(T, gen)
    leaves = (q, k, v, sinks)
    row = {"tokens": T}
    pos = torch.arange(T, device=DEV).expand(1, T)
    flops = 3.5 * 4.0 * HQ * D * T * T / 2  # causal fwd (QK^T and PV) + bwd at 2.5x fwd

    for name, window in (("ossrl_full", None), ("ossrl_sliding128", 128)):
        mask = AttentionMask(pos, pos, window=window)
        torch.cuda.synchronize()
        build = timed(lambda: build_fresh(pos, window), 3)

        def step():
            for t in leaves:
                t.grad = None
            sink_attention(q, k, v, sinks, mask, scale=SCALE).backward(grad)

        try:
            ms = timed(step, reps)
            for t in leaves:
                t.grad = None
            row[name] = {"ms": ms, "peak_gib": peak_extra_bytes(step) / GiB, "block_mask_build_ms": build}
            if window is None:
                row[name]["tflops"] = flops / (ms * 1e-3) / 1e12
        except torch.cuda.OutOfMemoryError:
            row[name] = "OOM"
        for t in leaves:
            t.grad = None
        torch.cuda.empty_cache()

    row["hf_eager_full"] = bench_hf_eager_training(q, k, v, sinks, grad, T, reps)
    torch.cuda.empty_cache()
    return row


def build_fresh(pos, window):
    return AttentionMask(pos, pos, window=window).block_mask()


def hf_module(sinks):
    return SimpleNamespace(sinks=sinks, num_key_value_groups=HQ // HKV, training=True)


def bench_hf_eager_training(q, k, v, sinks, grad, T, reps):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    leaves = (q, k, v, sinks)
    module = hf_module(sinks)
    try:
        # transformers builds this additive causal mask once per forward, shared by all layers.
        mask = torch.full((T, T), torch.finfo(torch.bfloat16).min, device=DEV, dtype=torch.bfloat16).triu(1)[None, None]

        def step():
            for t in leaves:
                t.grad = None
            out, _ = eager_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             mask, scaling=SCALE, dropout=0.0)
            out.backward(grad)

        ms = timed(step, reps)
        for t in leaves:
            t.grad = None
        return {"ms": ms, "peak_gib": peak_extra_bytes(step) / GiB,
                "mask_gib": mask.numel() * 2 / GiB}
    except torch.cuda.OutOfMemoryError:
        return "OOM"
    finally:
        for t in leaves:
            t.grad = None


def accuracy_vs_twin() -> dict:
    """Relative error of the output and of every gradient against the fp32 twin (packed documents)."""
    lengths = [700, 555, 793]  # 2048 tokens, no document a multiple of 128
    pos = torch.cat([torch.arange(n) for n in lengths]).to(DEV).unsqueeze(0)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).to(DEV).unsqueeze(0)
    gen = torch.Generator(device=DEV).manual_seed(11)
    q, k, v, sinks, grad = training_inputs(pos.shape[1], gen)
    result = {}
    for name, window in (("packed_full", None), ("packed_sliding128", 128)):
        mask = AttentionMask(pos, pos, window=window, q_doc=doc, k_doc=doc)
        for t in (q, k, v, sinks):
            t.grad = None
        out = sink_attention(q, k, v, sinks, mask, scale=SCALE)
        out.backward(grad)
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v, sinks)]
        ref = sink_attention_reference(*leaves, mask.dense(), scale=SCALE)
        ref.backward(grad.float())
        rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
        result[name] = {"out": rel(out, ref), **{f"d{n}": rel(t.grad, r.grad)
                                                 for n, t, r in zip(("q", "k", "v", "sinks"), (q, k, v, sinks), leaves)}}
        del ref, leaves
        torch.cuda.empty_cache()
    return result


def decode_inputs(B: int, ctx: int, gen):
    k_cache = torch.randn(B, ctx, HKV, D, device=DEV, generator=gen).bfloat16()
    v_cache = torch.randn(B, ctx, HKV, D, device=DEV, generator=gen).bfloat16()
    q = torch.randn(B, HQ, D, device=DEV, generator=gen).bfloat16()
    sinks = torch.randn(HQ, device=DEV, generator=gen).bfloat16()
    slot_ids = torch.randperm(B, device=DEV, generator=gen).int()
    lengths = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
    return q, k_cache, v_cache, sinks, slot_ids, lengths


def graph_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def bench_decode(B: int, ctx: int, copy_bw: float, config: dict) -> dict:
    gen = torch.Generator(device=DEV).manual_seed(B * ctx)
    q, k_cache, v_cache, sinks, slot_ids, lengths = decode_inputs(B, ctx, gen)
    kv_bytes = 2 * B * ctx * HKV * D * 2
    ms = graph_ms(lambda: decode_attention(q, k_cache, v_cache, sinks, slot_ids, lengths, scale=SCALE, **config))
    plain_ms = triton.testing.do_bench(
        lambda: decode_attention(q, k_cache, v_cache, sinks, slot_ids, lengths, scale=SCALE, **config),
        return_mode="median")
    row = {"batch": B, "context": ctx, "kv_bytes": kv_bytes, "ms_graph": ms, "ms_launch": plain_ms,
           "gb_per_s": kv_bytes / (ms * 1e-3) / 1e9, "fraction_of_copy_bw": kv_bytes / (ms * 1e-3) / copy_bw}
    if B * ctx <= 8 * 8192:
        out = decode_attention(q, k_cache, v_cache, sinks, slot_ids, lengths, scale=SCALE, **config)
        ref = decode_attention_reference(q, k_cache, v_cache, sinks, slot_ids, lengths, scale=SCALE)
        row["rel_err_vs_twin"] = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    row["hf_eager"] = bench_hf_eager_decode(q, k_cache, v_cache, sinks, slot_ids)
    if isinstance(row["hf_eager"], dict):
        row["speedup_vs_hf_eager"] = row["hf_eager"]["ms"] / ms
    del k_cache, v_cache
    torch.cuda.empty_cache()
    return row


@torch.no_grad()
def bench_hf_eager_decode(q, k_cache, v_cache, sinks, slot_ids):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    module = hf_module(sinks)
    module.training = False
    try:
        # transformers keeps its cache as [B, Hkv, T, D] per layer, rows in batch order.
        k = k_cache[slot_ids.long()].transpose(1, 2).contiguous()
        v = v_cache[slot_ids.long()].transpose(1, 2).contiguous()
        qh = q[:, :, None]  # [B, Hq, 1, D]
        ms = triton.testing.do_bench(lambda: eager_attention_forward(module, qh, k, v, None, scaling=SCALE),
                                     return_mode="median")
        return {"ms": ms}
    except torch.cuda.OutOfMemoryError:
        return "OOM"


def sweep_decode(copy_bw: float) -> tuple[list, dict]:
    B, ctx = 64, 8192
    gen = torch.Generator(device=DEV).manual_seed(0)
    q, k_cache, v_cache, sinks, slot_ids, lengths = decode_inputs(B, ctx, gen)
    kv_bytes = 2 * B * ctx * HKV * D * 2
    configs = [dict(block_n=bn, num_warps=w, num_stages=s) for bn in (32, 64, 128) for w in (4,) for s in (2, 3, 4)]
    configs += [dict(block_n=64, num_warps=8, num_stages=3), dict(block_n=128, num_warps=8, num_stages=3)]
    results = []
    for cfg in configs:
        ms = graph_ms(lambda: decode_attention(q, k_cache, v_cache, sinks, slot_ids, lengths, scale=SCALE, **cfg))
        results.append({**cfg, "ms": ms, "fraction_of_copy_bw": kv_bytes / (ms * 1e-3) / copy_bw})
    best = min(results, key=lambda r: r["ms"])
    best_cfg = {k: best[k] for k in ("block_n", "num_warps", "num_stages")}
    for splits in (1, 2, 4, 8):
        cfg = {**best_cfg, "num_splits": splits}
        ms = graph_ms(lambda: decode_attention(q, k_cache, v_cache, sinks, slot_ids, lengths, scale=SCALE, **cfg))
        results.append({**cfg, "ms": ms, "fraction_of_copy_bw": kv_bytes / (ms * 1e-3) / copy_bw})
    return results, best_cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/attention.json")
    parser.add_argument("--tokens", type=int, nargs="*", default=[4096, 16384, 65536, 131072])
    parser.add_argument("--sections", nargs="*", default=["accuracy", "decode", "training"])
    args = parser.parse_args()
    raise_recompile_limit()

    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    print(f"{props.name}: copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)", flush=True)
    result = {
        "benchmark": "attention",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": props.name, "sm_count": props.multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "copy_bandwidth_gb_per_s": copy_bw / 1e9,
        "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": "bfloat16", "batch": 1},
    }

    if "accuracy" in args.sections:
        result["accuracy_vs_fp32_twin"] = accuracy_vs_twin()
        print("relative error vs fp32 twin:", json.dumps(result["accuracy_vs_fp32_twin"]), flush=True)

    result["decode"] = []
    if "decode" in args.sections:
        sweep, best = sweep_decode(copy_bw)
        result["decode_config_sweep_64x8K"] = sweep
        result["decode_config"] = best
        print("decode config sweep (64 x 8K):", flush=True)
        for r in sweep:
            print(f"  {r}", flush=True)
    for B in (1, 8, 64) if "decode" in args.sections else ():
        for ctx in (1024, 8192, 32768):
            row = bench_decode(B, ctx, copy_bw, best)
            result["decode"].append(row)
            print(f"decode B={B:3d} ctx={ctx:6d}: {row['ms_graph'] * 1e3:8.1f} us  {row['gb_per_s']:7.0f} GB/s  "
                  f"{row['fraction_of_copy_bw']:.0%} of copy  hf_eager={row['hf_eager']}", flush=True)

    result["training"] = []
    for T in args.tokens if "training" in args.sections else ():
        row = bench_training(T, reps=10 if T <= 16384 else 3)
        result["training"].append(row)
        print(f"train T={T}: {json.dumps(row)}", flush=True)

    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print_table(result)


def fmt(cell, key):
    return "OOM" if cell == "OOM" else f"{cell[key]:.1f}"


def print_table(result):
    print("\n| T | ossrl full ms | ossrl full GiB | ossrl sliding ms | ossrl sliding GiB | HF eager ms | HF eager GiB |")
    for r in result["training"]:
        print(f"| {r['tokens']} | {fmt(r['ossrl_full'], 'ms')} | {fmt(r['ossrl_full'], 'peak_gib')} | "
              f"{fmt(r['ossrl_sliding128'], 'ms')} | {fmt(r['ossrl_sliding128'], 'peak_gib')} | "
              f"{fmt(r['hf_eager_full'], 'ms')} | {fmt(r['hf_eager_full'], 'peak_gib')} |")
    print("\n| B | ctx | us (graph) | GB/s | of copy bw | HF eager us |")
    for r in result["decode"]:
        hf = "OOM" if r["hf_eager"] == "OOM" else f"{r['hf_eager']['ms'] * 1e3:.0f}"
        print(f"| {r['batch']} | {r['context']} | {r['ms_graph'] * 1e3:.1f} | {r['gb_per_s']:.0f} | "
              f"{r['fraction_of_copy_bw']:.0%} | {hf} |")


if __name__ == "__main__":
    main()
