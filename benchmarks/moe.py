"""One gpt-oss-20b-shaped MoE layer (32 experts, top-4, H = I = 2880): ossrl's routed Triton kernels
(MXFP4 and bf16 experts) against transformers' own `GptOssExperts` forward, a dense all-experts bmm
and `torch._grouped_mm` (bf16), all on the same weights in the same run.

Run on a GPU from the repo root:  python benchmarks/moe.py --out benchmarks/results/moe.json
(--sweep also times several tile configurations of the ossrl kernels; --decode-sweep, --train-sweep
and --read-roofline run one study alone.)

Figures per token count: forward and forward+backward (input and routing-weight gradients; the
base is frozen) median times; bytes moved per forward (routed expert weights + x + out) and the
achieved fraction of the measured copy bandwidth; TFLOP/s and the fraction of the measured bf16
matmul throughput. `ossrl_*_graph` is the whole forward (routing, grouping, kernels) replayed in a
CUDA graph; `ossrl_*_kernels` is the two matmul kernels alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's ossrl, without PYTHONPATH

from ossrl.kernels.moe import ExpertWeights, clamped_swiglu, group_by_expert, route  # noqa: E402
from ossrl.kernels.mxfp4 import dequantize_mxfp4  # noqa: E402
from ossrl.kernels import moe_triton  # noqa: E402

E, K_TOP, H, I = 32, 4, 2880, 2880
LIMIT, ALPHA = 7.0, 1.702
TOKENS = [1, 8, 64, 256, 4096, 32768]


def bench(fn, rep=100):
    return do_bench(fn, warmup=20, rep=rep, return_mode="median")  # ms, L2 flushed between runs


def hardware_ceilings():
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = 2 * n / (bench(lambda: dst.copy_(src)) * 1e-3)  # bytes read + written per second
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = 2 * 8192 ** 3 / (bench(lambda: a @ b) * 1e-3)
    del src, dst, a, b
    return copy_bw, mm


def make_layer(gen):
    blocks1 = torch.randint(0, 256, (E, 2 * I, H // 32, 16), generator=gen, device="cuda", dtype=torch.uint8)
    scales1 = torch.randint(119, 122, (E, 2 * I, H // 32), generator=gen, device="cuda", dtype=torch.uint8)
    blocks2 = torch.randint(0, 256, (E, H, I // 32, 16), generator=gen, device="cuda", dtype=torch.uint8)
    scales2 = torch.randint(119, 122, (E, H, I // 32), generator=gen, device="cuda", dtype=torch.uint8)
    b1 = (torch.randn(E, 2 * I, generator=gen, device="cuda") * 0.1).bfloat16()
    b2 = (torch.randn(E, H, generator=gen, device="cuda") * 0.1).bfloat16()
    # scales 119..121, all <= 128: the decode sweep also times the word decode with 2^126 folded
    # into them (as the engine's rollouts run since session 9); the table runs the kernels' default (no fold)
    mx = ExpertWeights(blocks1, b1, blocks2, b2, scales1, scales2, limit=LIMIT, alpha=ALPHA)
    w1 = dequantize_mxfp4(blocks1, scales1, torch.bfloat16).transpose(1, 2).contiguous()  # [E, H, 2I]
    w2 = dequantize_mxfp4(blocks2, scales2, torch.bfloat16).transpose(1, 2).contiguous()  # [E, I, H]
    dense = ExpertWeights(w1, b1, w2, b2, limit=LIMIT, alpha=ALPHA)
    return mx, dense


def hf_experts(dense: ExpertWeights):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(num_local_experts=E, hidden_size=H, intermediate_size=I, num_experts_per_tok=K_TOP)
    m = GptOssExperts(cfg).to(device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    m.gate_up_proj.data, m.gate_up_proj_bias.data = dense.gate_up, dense.gate_up_bias
    m.down_proj.data, m.down_proj_bias.data = dense.down, dense.down_bias
    return lambda x, w, ids: m(x, router_indices=ids, routing_weights=w)


def dense_bmm(d: ExpertWeights):
    def fn(x, w, ids):  # every expert on every token, then the routing mask
        N = x.shape[0]
        z = torch.bmm(x.expand(E, N, H), d.gate_up) + d.gate_up_bias[:, None]
        y = torch.bmm(clamped_swiglu(z, limit=LIMIT, alpha=ALPHA), d.down) + d.down_bias[:, None]
        dense_w = torch.zeros(N, E, device=x.device, dtype=w.dtype).scatter(1, ids, w)
        return torch.einsum("ne,enh->nh", dense_w, y)
    return fn


def grouped_mm(d: ExpertWeights):
    def fn(x, w, ids):
        N = x.shape[0]
        g = group_by_expert(ids, E)
        offs = g.offsets[1:].to(torch.int32)
        z = torch._grouped_mm(x[g.token], d.gate_up, offs=offs) + d.gate_up_bias[g.expert]
        y = torch._grouped_mm(clamped_swiglu(z, limit=LIMIT, alpha=ALPHA), d.down, offs=offs) + d.down_bias[g.expert]
        y = y * w.reshape(-1)[g.order, None]
        slots = torch.zeros(N * K_TOP, H, device=x.device, dtype=y.dtype).index_copy(0, g.order, y)
        return slots.view(N, K_TOP, H).sum(1)
    return fn


def ossrl_fn(ex, config=None):
    return lambda x, w, ids: moe_triton.routed_experts_triton(x, w, ids, ex, config=config)


def weight_bytes_per_expert(fmt):
    n1, n2 = 2 * I * H, H * I
    w = (n1 + n2) * 2 if fmt == "bf16" else (n1 + n2) // 2 + (n1 + n2) // 32
    return w + (2 * I + H) * 2  # + biases


def time_fwd_bwd(fn, x, w, ids, dout):
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def step():
        xg.grad = wg.grad = None
        fn(xg, wg, ids).backward(dout)
    return bench(step)


def graph_time(fn, x, w, ids):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(x, w, ids)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(x, w, ids)
    return bench(g.replay)


def plan_kernels(ex, x, ids, config=None):
    """The two matmul kernels alone, planned once: a function of (x, w, ids) as `graph_time` takes."""
    groups = group_by_expert(ids, E)
    cfg = config or moe_triton.choose_config(groups.order.numel(), ex)
    plan = moe_triton._Plan(groups, ex, x.shape[0], cfg)
    plan.tiles(cfg.BM)
    return lambda x, w, ids: moe_triton.down_forward(plan, moe_triton.gate_up_forward(plan, x), w)


def kernels_time(ex, x, w, ids, config=None):
    fn = plan_kernels(ex, x, ids, config)
    return bench(lambda: fn(x, w, ids))


def attempt(fn):
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    except Exception as exc:  # recorded, not hidden
        torch.cuda.empty_cache()
        return f"error: {type(exc).__name__}: {str(exc)[:200]}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/moe.json")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--decode-sweep", action="store_true", help="only the MXFP4 decode-size tile sweep")
    parser.add_argument("--decode-grid", default="full", choices=("full", "words", "wide"),
                        help="words: only the folded word tiles, with the scales one and two K tiles ahead")
    parser.add_argument("--train-sweep", action="store_true", help="only the MXFP4 training-size sweep")
    parser.add_argument("--dense-train-sweep", action="store_true",
                        help="only the bf16 experts' tiles at --dense-train-tokens (what training runs on the "
                             "kept bf16 copies): forward kernels and forward + backward")
    parser.add_argument("--dense-train-tokens", default="4096,8192")
    parser.add_argument("--launch-times", action="store_true",
                        help="only each training launch of the bf16 experts timed alone per tile, at --dense-train-tokens")
    parser.add_argument("--tiled", action="store_true",
                        help="only the decode sizes' word tiles with the blocks as published and tile-contiguous")
    parser.add_argument("--tiled-tokens", default="1,8,64", help="--tiled: the token counts (comma-separated)")
    parser.add_argument("--gemv", action="store_true",
                        help="only the MXFP4 layer at --gemv-tokens as CUDA-core GEMVs (ossrl.kernels.moe_gemv) "
                             "against the tile the engine picks, on the rollouts' tile-contiguous copies")
    parser.add_argument("--gemv-tokens", default="1,2")
    parser.add_argument("--read-roofline", action="store_true",
                        help="only the decode sizes' read ceiling: the routed experts' bytes read with no "
                             "arithmetic, as the decode's tiles and as contiguous spans (benchmarks/moe_read.py)")
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_bw, mm_flops = hardware_ceilings()
    mx, dense = make_layer(gen)
    router = (torch.randn(H, E, generator=gen, device="cuda") * 0.05).bfloat16()
    methods = {
        "ossrl_mxfp4": ossrl_fn(mx), "ossrl_bf16": ossrl_fn(dense), "hf_GptOssExperts_bf16": hf_experts(dense),
        "dense_bmm_bf16": dense_bmm(dense), "grouped_mm_bf16": grouped_mm(dense),
    }
    fmt_of = {"ossrl_mxfp4": "mxfp4"}
    result = {
        "benchmark": "moe", "layer": dict(experts=E, top_k=K_TOP, hidden=H, intermediate=I),
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "copy_bandwidth_GBps": copy_bw / 1e9, "bf16_matmul_TFLOPs": mm_flops / 1e12, "rows": [],
    }
    try:
        import transformers
        result["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(f"{result['device']}: copy {copy_bw / 1e9:.0f} GB/s, bf16 matmul {mm_flops / 1e12:.0f} TFLOP/s", flush=True)

    if (args.decode_sweep or args.train_sweep or args.read_roofline or args.tiled or args.gemv or args.dense_train_sweep
            or args.launch_times):
        if args.launch_times:  # (it puts its rows into result as they come)
            launch_times(dense, router, gen, mm_flops, [int(t) for t in args.dense_train_tokens.split(",")],
                         args.out, result)
        if args.dense_train_sweep:  # (it puts its rows into result as they come)
            dense_train_sweep(dense, router, gen, mm_flops, [int(t) for t in args.dense_train_tokens.split(",")],
                              args.out, result)
        if args.gemv:
            result["gemv"] = gemv_compare(mx, router, gen, copy_bw, [int(t) for t in args.gemv_tokens.split(",")])
        if args.tiled:
            result["tiled"] = tiled_sweep(mx, router, gen, copy_bw, [int(t) for t in args.tiled_tokens.split(",")])
        if args.read_roofline:
            result["read_roofline"] = read_roofline(mx, router, gen, copy_bw)
        if args.decode_sweep:
            result["decode_sweep"] = decode_sweep(mx, router, gen, copy_bw, args.decode_grid)
        if args.train_sweep:
            result["train_sweep"] = train_sweep(mx, router, gen, mm_flops)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return

    for N in map(int, args.tokens.split(",")):
        x, w, ids, dout = layer_inputs(gen, router, N)
        hit = int(torch.unique(ids).numel())
        S = N * K_TOP
        flops = 2 * S * H * 2 * I + 2 * S * I * H
        with torch.no_grad():
            ref = moe_triton.routed_experts_triton(x, w, ids, dense).float()
        for name, fn in methods.items():
            fmt = fmt_of.get(name, "bf16")
            routed = hit if name != "dense_bmm_bf16" else E
            nbytes = routed * weight_bytes_per_expert(fmt) + 2 * N * H * 2
            row = dict(tokens=N, method=name, experts_hit=hit, bytes_per_forward=nbytes, forward_flops=flops)
            with torch.no_grad():
                out = attempt(lambda: fn(x, w, ids))
                if isinstance(out, torch.Tensor):
                    row["rel_diff_vs_ossrl_bf16"] = ((out.float() - ref).norm() / ref.norm()).item()
                    del out
                row["fwd_ms"] = attempt(lambda: bench(lambda: fn(x, w, ids)))
                if name.startswith("ossrl") or name == "grouped_mm_bf16":
                    row["fwd_graph_ms"] = attempt(lambda: graph_time(fn, x, w, ids))
                if name.startswith("ossrl"):
                    row["fwd_kernels_ms"] = attempt(lambda: kernels_time(mx if fmt == "mxfp4" else dense, x, w, ids))
            row["fwd_bwd_ms"] = attempt(lambda: time_fwd_bwd(fn, x, w, ids, dout))
            for key in ("fwd_ms", "fwd_graph_ms", "fwd_kernels_ms"):
                if isinstance(row.get(key), float):
                    stem = key[:-3]
                    row[stem + "_bandwidth_fraction"] = nbytes / (row[key] * 1e-3) / copy_bw
                    row[stem + "_TFLOPs"] = flops / (row[key] * 1e-3) / 1e12
                    row[stem + "_matmul_fraction"] = row[stem + "_TFLOPs"] * 1e12 / mm_flops
            if isinstance(row["fwd_bwd_ms"], float):
                row["fwd_bwd_TFLOPs"] = 2 * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
                row["fwd_bwd_matmul_fraction"] = row["fwd_bwd_TFLOPs"] * 1e12 / mm_flops
            result["rows"].append(row)
            show = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
                    if k.endswith(("_ms", "_fraction")) or k == "rel_diff_vs_ossrl_bf16"}
            print(N, name, show, flush=True)
            torch.cuda.empty_cache()

    if args.sweep:
        result["sweep"] = sweep(mx, dense, router, gen)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


SWEEP = [(16, 64, 128, 4, 4), (16, 32, 256, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4), (64, 128, 64, 4, 3),
         (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3)]


def decode_sweep(mx, router, gen, copy_bw, grid: str = "full"):
    """MXFP4 forward at decode sizes: the current defaults against C^T = W a^T tiles (swap_ab).
    grid "words": the folded word tiles only (the defaults' family, and 8-warp 128-column tiles),
    each with its scales loaded one K tile ahead (as before) and two (`TileConfig.scales_ahead`),
    and each with the activations permuted in registers (as before) and copied in the decode's
    order before the kernel (`TileConfig.permuted_input`)."""
    reference = moe_triton.TileConfig(16, 32, 256, 4, 3, dot_scaled=False, packed=False)
    if grid == "wide":  # word tiles 256 columns of K deep (session 12: read as 64x256 tiles, the routed
        # bytes came at 76-80% of copy bandwidth at 8 / 64 tokens against 65-69% as the defaults' 64x128)
        configs = [reference] + [
            moe_triton.TileConfig(16, bn, bk, warps, stages, dot_scaled=False, swap_ab=True, split_k=sk, words=True)
            for bn, bk, warps, splits, depths in ((64, 64, 4, (2,), (3,)), (64, 128, 4, (1,), (4,)),
                                                  (64, 256, 4, (1, 2, 4), (2, 3, 4)), (128, 256, 8, (1, 2), (3,)))
            for sk in splits for stages in depths]
        return _sweep_rows(configs, [(cfg, True) for cfg in configs if cfg.words], mx, router, gen, copy_bw)
    if grid == "words":
        configs = [reference] + [
            moe_triton.TileConfig(16, bn, bk, warps, stages, dot_scaled=False, swap_ab=True, split_k=sk, words=True,
                                  scales_ahead=ahead, permuted_input=permuted)
            for bn, bk, warps, splits, depths in ((64, 128, 4, (1,), (3, 4)), (64, 64, 4, (1, 2, 4), (3,)),
                                                  (128, 128, 8, (1,), (3, 4)))
            for sk in splits for stages in depths for ahead in (1, 2) for permuted in (False, True)]
        return _sweep_rows(configs, [(cfg, True) for cfg in configs if cfg.words], mx, router, gen, copy_bw)
    configs = [reference, moe_triton.TileConfig(16, 64, 128, 4, 4)]  # the reference output; tl.dot_scaled
    # C^T = W a^T with the packed decode (the defaults are among these; moe_decode_sweep_packed.json
    # has the wider grid of session 3)
    configs += [moe_triton.TileConfig(16, bn, bk, 4, 3, dot_scaled=False, swap_ab=True)
                for bn in (32, 64) for bk in (64, 128)]
    # K cut in parts (fp32 partials + an epilogue kernel): more, shorter programs at decode sizes
    configs += [moe_triton.TileConfig(16, bn, bk, 4, 3, dot_scaled=False, swap_ab=True, split_k=sk)
                for bn, bk in ((32, 128), (64, 128)) for sk in (2, 4, 8)]
    # codes read as 32-bit words, K permuted in 32-blocks (`mxfp4_words`, session 8): tiles, K parts,
    # pipeline depths (session 7's warp/stage rows for the pair decode: moe_decode_sweep_split.json)
    configs += [moe_triton.TileConfig(16, bn, bk, 4, stages, dot_scaled=False, swap_ab=True, split_k=sk, words=True)
                for bn, bk in ((64, 128), (64, 64), (128, 128)) for sk in (1, 2, 4) for stages in (3, 4)]
    # the word tiles again with 2^126 folded into the scales (one multiply a pair; every scale here
    # is <= 128): rows with "fold": true. K masks are dropped wherever K is a whole number of tiles
    # (`EVEN_K`, automatic: BK = 64 at gpt-oss's 2880)
    runs = [(cfg, False) for cfg in configs] + [(cfg, True) for cfg in configs if cfg.words]
    return _sweep_rows(configs, runs, mx, router, gen, copy_bw)


def _sweep_rows(configs, runs, mx, router, gen, copy_bw):
    """runs: (config, fold) pairs, timed at 1, 8 and 64 tokens against configs[0]'s output."""
    rows = []
    plain, folded = dataclasses.replace(mx, scales_fold=False), dataclasses.replace(mx, scales_fold=True)
    for N in (1, 8, 64):
        x = torch.randn(N, H, generator=gen, device="cuda").bfloat16()
        w, ids = route(x @ router, K_TOP)
        hit = int(torch.unique(ids).numel())
        nbytes = hit * weight_bytes_per_expert("mxfp4") + 2 * N * H * 2
        with torch.no_grad():
            ref = moe_triton.routed_experts_triton(x, w, ids, plain, config=configs[0]).float()
        for cfg, fold in runs:
            ex = folded if fold else plain
            r = dict(tokens=N, config=[cfg.BM, cfg.BN, cfg.BK, cfg.num_warps, cfg.num_stages], dot_scaled=cfg.dot_scaled,
                     swap_ab=cfg.swap_ab, packed=cfg.packed, split_k=cfg.split_k, words=cfg.words, fold=fold,
                     scales_ahead=cfg.scales_ahead, permuted_input=cfg.permuted_input)
            with torch.no_grad():
                out = attempt(lambda: moe_triton.routed_experts_triton(x, w, ids, ex, config=cfg))
                if isinstance(out, torch.Tensor):
                    r["rel_diff"] = ((out.float() - ref).norm() / ref.norm()).item()
                r["fwd_kernels_ms"] = attempt(lambda: kernels_time(ex, x, w, ids, cfg))
                # replayed from a CUDA graph, as the engine's decode runs it: no Python launch gaps
                # between the kernels (at 1 token these dominate eager timings)
                r["fwd_graph_ms"] = attempt(lambda: graph_time(plan_kernels(ex, x, ids, cfg), x, w, ids))
            if isinstance(r["fwd_kernels_ms"], float):
                r["bandwidth_fraction"] = nbytes / (r["fwd_kernels_ms"] * 1e-3) / copy_bw
            if isinstance(r["fwd_graph_ms"], float):
                r["graph_bandwidth_fraction"] = nbytes / (r["fwd_graph_ms"] * 1e-3) / copy_bw
            rows.append(r)
            print("decode_sweep", {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    return rows


def read_roofline(mx, router, gen, copy_bw, contiguous_rows: int = 1 << 25):
    """At 1, 8 and 64 tokens: the decode's kernels (default tiles, folded scales, as the engine
    runs them) against reading the same routed experts' codes and scales with nothing else to do,
    through the decode's tile shapes (its split-K too) and others, and as contiguous spans in as
    many programs as the decode's or 8 an expert (`moe_read`), each replayed from a
    CUDA graph; and a contiguous read of 544 MiB (the read ceiling of this kind of kernel).
    Fractions are of the copy bandwidth (bytes read + written), as in the sweeps, on the routed
    experts' codes and scales (the sweeps also count biases and activations: under 1% more)."""
    from moe_read import parts_fit, read_flat, read_tiles, tiles_fit

    rows, device = [], mx.gate_up.device
    # contiguous_rows blocks of 16 bytes: 512 MiB of codes and 32 MiB of scales by default
    huge = torch.randint(0, 256, (1, contiguous_rows, 1, 16), generator=gen, device=device, dtype=torch.uint8)
    huge_scales = torch.zeros(1, contiguous_rows, 1, device=device, dtype=torch.uint8)
    one = torch.zeros(1, dtype=torch.int32, device=device)
    parts = max(1, contiguous_rows >> 13)
    ms = attempt(lambda: graph_time(
        lambda *_: read_flat(huge, huge_scales, one, parts=parts, block_words=2048, block_scales=512), None, None, None))
    big = {"what": f"contiguous read, {huge.numel() >> 20} MiB codes + {huge_scales.numel() >> 20} MiB scales", "ms": ms}
    if isinstance(ms, float):
        big["fraction_of_copy_bandwidth"] = (huge.numel() + huge_scales.numel()) / (ms * 1e-3) / copy_bw
    print("read_roofline", big, flush=True)
    rows.append(big)
    del huge, huge_scales
    folded = dataclasses.replace(mx, scales_fold=True)
    weights = ((mx.gate_up, mx.gate_up_scales), (mx.down, mx.down_scales))
    for N in (1, 8, 64):
        x = torch.randn(N, router.shape[0], generator=gen, device=device).to(router.dtype)
        w, ids = route(x @ router, K_TOP)
        experts = torch.unique(ids).to(torch.int32)
        nbytes = sum(experts.numel() * (b[0].numel() + s[0].numel()) for b, s in weights)
        cfg = moe_triton.choose_config(N * K_TOP, folded)
        timed = {"decode kernels (default tiles, folded)": graph_time(plan_kernels(folded, x, ids, cfg), x, w, ids)}
        # the default's tile first (its split-K too), then others whose rows cut both weights (2,880 rows:
        # not 128-row tiles)
        tiles = [(cfg.BN, cfg.BK, cfg.split_k, cfg.num_stages), (64, 64, 1, 3), (64, 64, 4, 3), (64, 128, 1, 4),
                 (64, 256, 1, 3), (32, 128, 1, 4)]
        tiles = [t for i, t in enumerate(tiles) if t not in tiles[:i] and all(tiles_fit(b, t[0], t[1]) for b, _ in weights)]
        for bn, bk, sk, stages in tiles:
            timed[f"read as {bn}x{bk} tiles, split-K {sk}, {stages} stages"] = attempt(lambda bn=bn, bk=bk, sk=sk, st=stages: graph_time(
                lambda *_: [read_tiles(b, s, experts, bn=bn, bk=bk, split_k=sk, stages=st) for b, s in weights],
                None, None, None))
        # contiguous spans: as many programs as the decode's tiles and K parts (where they cut evenly), and 8
        tile_parts = [b.shape[1] // cfg.BN * cfg.split_k for b, _ in weights]
        if all(parts_fit(b, s, p) for (b, s), p in zip(weights, tile_parts)):
            timed["read contiguous, a program per decode program"] = attempt(lambda: graph_time(
                lambda *_: [read_flat(b, s, experts, parts=p) for (b, s), p in zip(weights, tile_parts)],
                None, None, None))
        timed["read contiguous, 8 programs an expert"] = attempt(lambda: graph_time(
            lambda *_: [read_flat(b, s, experts, parts=8) for b, s in weights], None, None, None))
        for what, t in timed.items():
            r = {"tokens": N, "experts_hit": experts.numel(), "bytes": nbytes, "what": what, "ms": t}
            if isinstance(t, float):
                r["fraction_of_copy_bandwidth"] = nbytes / (t * 1e-3) / copy_bw
            print("read_roofline", r, flush=True)
            rows.append(r)
    return rows


TILED_CONFIGS = [(64, 64, 4, 3, 2), (64, 128, 4, 4, 1), (64, 64, 4, 4, 2), (64, 64, 4, 3, 4), (64, 128, 4, 3, 1)]
# (BN, BK, warps, stages, split-K), word tiles: the defaults first. Session 12 measured the first two and the
# last two with layouts None, (64, 16), (64, 32) (moe_tiled.json); (64, 8) makes a 64-column tile one span
TILED_LAYOUTS = [None, (64, 8), (64, 16)]  # `tile_blocks` (rows, words); None: as published


def tiled_sweep(mx, router, gen, copy_bw, tokens=(1, 8, 64)):
    """The word decode at 1, 8 and 64 tokens with both projections' MXFP4 blocks as published and
    tile-contiguous (`ExpertWeights.tiled`; session 12: the decode's 64x128 tiles read the routed
    bytes at 65-69% of copy bandwidth, contiguous spans at 84-88%), each layout with the word tiles
    around the defaults, replayed from a CUDA graph; outputs compared bit for bit with the
    published layout's under the same tiles. Scales folded, as the engine runs them."""
    from ossrl.kernels.mxfp4_triton import tile_blocks

    folded = dataclasses.replace(mx, scales_fold=True)
    forced = moe_triton.SPLIT_K_FIXUP
    layouts = {None: folded}
    for lay in TILED_LAYOUTS[1:]:
        layouts[lay] = dataclasses.replace(folded, gate_up_tiled=tile_blocks(mx.gate_up, *lay),
                                           down_tiled=tile_blocks(mx.down, *lay), tiled=lay)
    rows = []
    for N in tokens:
        x = torch.randn(N, H, generator=gen, device="cuda").bfloat16()
        w, ids = route(x @ router, K_TOP)
        hit = int(torch.unique(ids).numel())
        nbytes = hit * weight_bytes_per_expert("mxfp4") + 2 * N * H * 2
        for bn, bk, warps, stages, sk in TILED_CONFIGS:
            cfg = moe_triton.TileConfig(16, bn, bk, warps, stages, dot_scaled=False, swap_ab=True, split_k=sk, words=True)
            with torch.no_grad():
                ref = moe_triton.routed_experts_triton(x, w, ids, folded, config=cfg)
            for lay, ex in layouts.items():
                if lay is not None and lay[1] % (bk // 8):
                    continue
                default = moe_triton.choose_config(N * K_TOP, ex)  # the engine's pick on this layout
                # split-K tiles finishing in their last part (session 13) and in a second launch
                for fixup in (True, False) if sk > 1 else (None,):
                    moe_triton.SPLIT_K_FIXUP = fixup
                    r = dict(tokens=N, config=[bn, bk, warps, stages], split_k=sk, layout=lay, fixup=fixup,
                             default=cfg == dataclasses.replace(default, fixup=False)
                             and fixup in (None, default.fixup))
                    with torch.no_grad():
                        out = attempt(lambda: moe_triton.routed_experts_triton(x, w, ids, ex, config=cfg))
                    r["equal"] = bool(torch.equal(out, ref)) if isinstance(out, torch.Tensor) else out
                    r["fwd_graph_ms"] = attempt(lambda: graph_time(plan_kernels(ex, x, ids, cfg), x, w, ids))
                    if isinstance(r["fwd_graph_ms"], float):
                        r["graph_bandwidth_fraction"] = nbytes / (r["fwd_graph_ms"] * 1e-3) / copy_bw
                    rows.append(r)
                    print("tiled", {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
                moe_triton.SPLIT_K_FIXUP = forced
    return rows


GEMV_TILES = [(16, 512), (16, 256), (32, 256), (8, 512), (32, 512)]


def gemv_compare(mx, router, gen, copy_bw, tokens=(1, 2)):
    """The whole MoE layer (routing given) at decode's smallest sizes, replayed from a CUDA graph:
    the tile `choose_config` picks on the rollouts' tile-contiguous copies (grouping, two matmuls,
    combine), then `ossrl.kernels.moe_gemv` (two GEMV launches and the combine) with each of
    GEMV_TILES; outputs compared with the tile's (relative difference: the sums' order)."""
    from ossrl.kernels import moe_gemv
    from ossrl.kernels.mxfp4_triton import tile_blocks
    from ossrl.model.expert_copies import TILED_LAYOUT

    ex = dataclasses.replace(mx, scales_fold=True, gate_up_tiled=tile_blocks(mx.gate_up, *TILED_LAYOUT),
                             down_tiled=tile_blocks(mx.down, *TILED_LAYOUT), tiled=TILED_LAYOUT)
    switch, tile, max_tokens = moe_gemv.GEMV, moe_gemv.GEMV_TILE, moe_gemv.GEMV_MAX_TOKENS
    rows = []
    try:
        for N in tokens:
            moe_gemv.GEMV_MAX_TOKENS = max(moe_gemv.GEMV_MAX_TOKENS, N)
            x = torch.randn(N, H, generator=gen, device="cuda").bfloat16()
            w, ids = route(x @ router, K_TOP)
            hit = int(torch.unique(ids).numel())
            nbytes = hit * weight_bytes_per_expert("mxfp4") + 2 * N * H * 2
            fn = ossrl_fn(ex)
            moe_gemv.GEMV = False
            with torch.no_grad():
                ref = fn(x, w, ids).float()
            for gemv_tile in [None] + GEMV_TILES:
                moe_gemv.GEMV = gemv_tile is not None
                moe_gemv.GEMV_TILE = gemv_tile or tile
                r = dict(tokens=N, method="gemv" if gemv_tile else "tile", gemv_tile=gemv_tile,
                         routed_bytes=nbytes)
                with torch.no_grad():
                    out = attempt(lambda: fn(x, w, ids))
                    if isinstance(out, torch.Tensor):
                        r["rel_diff_vs_tile"] = ((out.float() - ref).norm() / ref.norm()).item()
                    r["fwd_graph_ms"] = attempt(lambda: graph_time(fn, x, w, ids))
                if isinstance(r["fwd_graph_ms"], float):
                    r["graph_bandwidth_fraction"] = nbytes / (r["fwd_graph_ms"] * 1e-3) / copy_bw
                rows.append(r)
                print("gemv", {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    finally:
        moe_gemv.GEMV, moe_gemv.GEMV_TILE, moe_gemv.GEMV_MAX_TOKENS = switch, tile, max_tokens
    return rows


def layer_inputs(gen, router, N: int):
    """N random tokens for the layer: x [N, H], their routing (weights, ids [N, k]) and an output gradient."""
    x = torch.randn(N, H, generator=gen, device="cuda").bfloat16()
    w, ids = route(x @ router, K_TOP)
    return x, w, ids, torch.randn(N, H, generator=gen, device="cuda").bfloat16()


def time_tile(r: dict, ex, cfg, x, w, ids, dout, ref, seconds_at_peak: float) -> dict:
    """Row r with the tile `cfg`'s difference from `ref`, its forward kernels' and forward +
    backward times, and the forward's fraction of the matmul rate (`seconds_at_peak`: the forward's
    FLOPs over the measured rate)."""
    with torch.no_grad():
        out = attempt(lambda: moe_triton.routed_experts_triton(x, w, ids, ex, config=cfg))
        if isinstance(out, torch.Tensor):
            r["rel_diff"] = ((out.float() - ref).norm() / ref.norm()).item()
        r["fwd_kernels_ms"] = attempt(lambda: kernels_time(ex, x, w, ids, cfg))
    r["fwd_bwd_ms"] = attempt(lambda: time_fwd_bwd(ossrl_fn(ex, cfg), x, w, ids, dout))
    if isinstance(r["fwd_kernels_ms"], float):
        r["fwd_matmul_fraction"] = seconds_at_peak / (r["fwd_kernels_ms"] * 1e-3)
    return r


def train_sweep(mx, router, gen, mm_flops):
    """MXFP4 at training sizes: tl.dot_scaled, the packed own decode, and a transient bf16 copy
    (dequant) feeding the dense kernel; forward and forward+backward."""
    configs = [moe_triton.TileConfig(128, 128, 64, 4, 4), moe_triton.TileConfig(128, 128, 64, 4, 4, dot_scaled=False),
               moe_triton.TileConfig(64, 128, 64, 4, 3, dot_scaled=False),
               moe_triton.TileConfig(64, 128, 64, 4, 3, dot_scaled=False, packed=False),
               moe_triton.TileConfig(128, 256, 64, 8, 3, dequant=True), moe_triton.TileConfig(128, 128, 64, 4, 4, dequant=True),
               moe_triton.TileConfig(64, 128, 64, 4, 3, dequant=True)]
    # the word decode at training sizes (session 8, not yet run): C^T = W a^T with BM tokens as the
    # wgmma's N (up to 256) and the decoded weights straight from registers, the backward through
    # the bf16 copy. Offline (sm_90 SASS, per k-iteration): 128x128x64 on 8 warps 207 instructions
    # per thread, 159 registers; 256x128x64 258 instructions, 246 registers, no spills
    configs += [moe_triton.TileConfig(bm, bn, bk, warps, 3, dot_scaled=False, swap_ab=True, words=True, dequant=True)
                for bm, bn, bk, warps in ((128, 128, 64, 8), (256, 128, 64, 8), (128, 64, 64, 4), (64, 128, 64, 4),
                                          (128, 128, 128, 8))]
    rows = []
    for N in (256, 512, 1024, 2048, 4096, 32768):
        x, w, ids, dout = layer_inputs(gen, router, N)
        flops = 2 * N * K_TOP * (2 * I * H + H * I)
        with torch.no_grad():
            ref = moe_triton.routed_experts_triton(x, w, ids, mx, config=configs[4]).float()  # the bf16 copy
        for cfg in configs:
            r = dict(tokens=N, config=[cfg.BM, cfg.BN, cfg.BK, cfg.num_warps, cfg.num_stages], dot_scaled=cfg.dot_scaled,
                     packed=cfg.packed, dequant=cfg.dequant, swap_ab=cfg.swap_ab, words=cfg.words)
            rows.append(time_tile(r, mx, cfg, x, w, ids, dout, ref, flops / mm_flops))
            print("train_sweep", {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    return rows


def dense_train_sweep(dense, router, gen, mm_flops, tokens, out, result):
    """bf16 experts at training sizes (the kept bf16 copies' path; session 22's 4K profile put the
    MoE matmuls at 66% of the measured bf16 rate, 83% at 32K): tile shapes, warps, stages and the
    grouped launch order around the default 128x256x64 (8 warps, 3 stages, GROUP_M 8), the
    forward's two kernels and forward + backward (the backward's launches take the same tile). JSON
    is rewritten after every row (a run cut short keeps its rows)."""
    T = moe_triton.TileConfig
    configs = [T(128, 256, 64, 8, 3), T(128, 256, 64, 8, 4), T(128, 256, 64, 8, 3, GROUP_M=4),
               T(128, 256, 64, 8, 3, GROUP_M=16), T(128, 256, 64, 8, 3, GROUP_M=32), T(128, 128, 64, 4, 4),
               T(128, 128, 64, 8, 4), T(128, 128, 128, 8, 3), T(256, 128, 64, 8, 3), T(64, 256, 64, 4, 3),
               T(64, 128, 64, 4, 4), T(128, 256, 32, 8, 5)]
    rows = []
    result["dense_train_sweep"] = rows
    for N in tokens:
        x, w, ids, dout = layer_inputs(gen, router, N)
        flops = 2 * N * K_TOP * (2 * I * H + H * I)
        with torch.no_grad():
            ref = moe_triton.routed_experts_triton(x, w, ids, dense, config=configs[0]).float()
        for cfg in configs:
            r = dict(tokens=N, config=[cfg.BM, cfg.BN, cfg.BK, cfg.num_warps, cfg.num_stages], GROUP_M=cfg.GROUP_M)
            r = time_tile(r, dense, cfg, x, w, ids, dout, ref, flops / mm_flops)
            if isinstance(r["fwd_bwd_ms"], float):  # (input gradients only: twice the forward's products)
                r["fwd_bwd_matmul_fraction"] = 2 * flops / mm_flops / (r["fwd_bwd_ms"] * 1e-3)
            rows.append(r)
            print("dense_train_sweep", {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()},
                  flush=True)
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
    return rows


def launch_times(dense, router, gen, mm_flops, tokens, out, result):
    """Each of a training step's four expert matmul launches on the bf16 experts, timed alone per
    tile (session 24: at 4K tokens the forward's two ran at 70% of the measured matmul rate and the
    backward's at about 51%): gate_up forward (gather, bias, SwiGLU, z stored), down forward (bias,
    weight, scatter), down backward (gathered dout @ W2^T with the routing weights' gradient in the
    epilogue) and gate_up backward (dz @ W1^T, scattered). JSON rewritten after every row."""
    from ossrl.kernels.moe_triton import _down_base_backward, _gate_up_input_grad, _Plan, down_forward, \
        gate_up_forward

    T = moe_triton.TileConfig
    configs = [T(128, 256, 64, 8, 3), T(128, 256, 64, 8, 4), T(128, 128, 64, 8, 4), T(256, 128, 64, 8, 3),
               T(128, 256, 32, 8, 4), T(64, 256, 64, 4, 4), T(128, 128, 128, 8, 3), T(256, 128, 32, 8, 4)]
    rows = []
    result["launch_times"] = rows
    for N in tokens:
        x, w, ids, dout = layer_inputs(gen, router, N)
        S = N * K_TOP
        groups = group_by_expert(ids, E)
        dz = torch.randn(S, 2 * I, generator=gen, device="cuda").bfloat16()
        flops = {"gate_up_fwd": 2 * S * H * 2 * I, "down_fwd": 2 * S * I * H, "down_bwd": 2 * S * H * I,
                 "gate_up_bwd": 2 * S * 2 * I * H}
        for cfg in configs:
            plan = _Plan(groups, dense, N, cfg)
            z = torch.empty(S, 2 * I, device="cuda", dtype=torch.bfloat16)
            a = gate_up_forward(plan, x, z=z)
            launches = {"gate_up_fwd": lambda: gate_up_forward(plan, x, z=z),
                        "down_fwd": lambda: down_forward(plan, a, w),
                        "down_bwd": lambda: _down_base_backward(plan, dout, a, w, True),
                        "gate_up_bwd": lambda: _gate_up_input_grad(plan, dz)}
            r = dict(tokens=N, config=[cfg.BM, cfg.BN, cfg.BK, cfg.num_warps, cfg.num_stages])
            for name, fn in launches.items():
                ms = attempt(lambda: bench(fn))
                r[name + "_ms"] = ms
                if isinstance(ms, float):
                    r[name + "_matmul_fraction"] = round(flops[name] / (ms * 1e-3) / mm_flops, 4)
            rows.append(r)
            print("launch_times", {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
    return rows


def sweep(mx, dense, router, gen):
    rows = []
    for N in (1, 64, 256, 4096, 32768):
        x, w, ids, dout = layer_inputs(gen, router, N)
        for fmt, ex in (("mxfp4", mx), ("bf16", dense)):
            for c in [c + (d,) for c in SWEEP for d in ((True, False) if fmt == "mxfp4" else (True,))]:
                if (N <= 64 and c[0] > 32) or (N >= 4096 and c[0] < 64) or (N == 256 and c[0] == 128):
                    continue
                cfg = moe_triton.TileConfig(*c[:5], dot_scaled=c[5])
                r = dict(tokens=N, format=fmt, config=c)
                with torch.no_grad():
                    r["fwd_kernels_ms"] = attempt(lambda: kernels_time(ex, x, w, ids, cfg))
                if N >= 4096:
                    r["fwd_bwd_ms"] = attempt(lambda: time_fwd_bwd(ossrl_fn(ex, cfg), x, w, ids, dout))
                rows.append(r)
                print("sweep", r, flush=True)
    return rows


if __name__ == "__main__":
    main()
