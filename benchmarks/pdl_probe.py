"""Does programmatic dependent launch (PDL) pay in a batch-1 decode step? A probe, not a benchmark.

    python benchmarks/pdl_probe.py [--layers 24] [--out FILE]

A chain of weight-reading matrix-vector products shaped like the batch-1 MoE layer (gate_up: 4
experts' MXFP4 bytes, 34 MB; down: 17 MB; each product's input is the previous one's output),
captured in one CUDA graph and replayed, three ways:
  plain     - ordinary launches (what every ossrl kernel does today);
  pdl       - each kernel launched with PDL, waiting (`griddepcontrol.wait`) before it reads its
              input: its launch and set-up overlap the previous kernel's tail;
  prefetch  - as pdl, and each program first asks L2 for its own weight rows (`prefetch.global.L2`),
              which do not depend on the previous kernel, before it waits;
  ahead     - plain launches, and each gate_up's programs also ask L2 for its down's weights
              (known from the routing, before gate_up's result), so down reads them from L2;
  ahead_pdl - ahead and pdl together.
Prints microseconds per product and the bytes' share of the measured copy bandwidth, checks each
variant's output against the plain chain's, and writes JSON with --out.

Then (first; --only-mxfp4 alone) the same layer's real MXFP4 bytes through a CUDA-core GEMV
(`mxfp4_pairs` decode, fp32 FMAs; 16 to 32 rows a program, the whole K): does a GEMV keep the
bandwidth the byte chains reach once it decodes E2M1 (two values a byte)? Against the MoE kernels'
1-token tile, 0.052 ms a layer (33.7% of copy bandwidth, session 13).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ossrl.kernels.mxfp4_triton import mxfp4_pairs  # noqa: E402

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older Triton: no PDL
    gdc_wait = gdc_launch_dependents = None


@triton.jit
def _prefetch_l2(ptrs):
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gemv(w_ptr, x_ptr, y_ptr, N, next_ptr, next_lines, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          PDL: tl.constexpr, PREFETCH: tl.constexpr, AHEAD: tl.constexpr, LINES: tl.constexpr):
    """y[n] = sum_k (w[n, k] - 127.5) * x[k] / K (w: bytes, like MXFP4 blocks)."""
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    if AHEAD > 0:  # the next product's weights (which need no result of this one) to L2: AHEAD lines a program
        line = pid * AHEAD + tl.arange(0, AHEAD)
        _prefetch_l2(tl.where(line < next_lines, next_ptr + line.to(tl.int64) * 128, next_ptr))
    if PREFETCH:  # this program's rows, one 128-byte line each (K a multiple of 128)
        lines = tl.minimum(tl.arange(0, LINES), BN * (K // 128) - 1)  # LINES: a power of two at least that
        ptrs = w_ptr + (pid * BN + lines // (K // 128)).to(tl.int64) * K + (lines % (K // 128)) * 128
        _prefetch_l2(ptrs)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    acc = tl.zeros((BN,), tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=rows[:, None] < N, other=0)
        x = tl.load(x_ptr + cols)
        acc += tl.sum((w.to(tl.float32) - 127.5) * x[None, :].to(tl.float32), axis=1)
    tl.store(y_ptr + rows, (acc * (1.0 / K)).to(y_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _gemv_mxfp4(blocks_ptr, scales_ptr, x_ptr, y_ptr, N, out_scale, K: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr):
    """y[n] = out_scale * sum_k W[n, k] x[k], W MXFP4 ([N, K/32, 16] blocks as [N, K/2] bytes, [N, K/32]
    scales), decoded by `mxfp4_pairs` and contracted on the CUDA cores (fp32 FMAs, no tensor cores)."""
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    acc = tl.zeros((BN, BK // 2), tl.float32)
    for k0 in range(0, K, BK):
        lo, hi = mxfp4_pairs(blocks_ptr, scales_ptr, rows, rows < N, k0, K, K // 2, K // 32, BN, BK, PTX)
        cols = k0 + tl.arange(0, BK)
        xe, xo = tl.split(tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32).reshape(BK // 2, 2))
        acc += lo.to(tl.float32) * xe[None, :] + hi.to(tl.float32) * xo[None, :]
    tl.store(y_ptr + rows, (tl.sum(acc, axis=1) * out_scale).to(y_ptr.dtype.element_ty), mask=rows < N)


def mxfp4_chain(products, x, ys, BN: int, BK: int, pdl: bool):
    """The MXFP4 products in order, each reading the first K outputs of the previous one."""
    for (blocks, scales), y in zip(products, ys):
        N, K = blocks.shape[0], blocks.shape[1] * 32
        extra = dict(launch_pdl=True) if pdl else {}
        _gemv_mxfp4[(triton.cdiv(N, BN),)](blocks, scales, x, y, N, 1.0 / (3 * K ** 0.5), K, BN, BK, True, pdl,
                                           num_warps=4, **extra)
        x = y[:K]
    return ys[-1]


def graph_seconds(fn, repeats: int = 20) -> float:
    """Seconds per call of fn captured in a CUDA graph and replayed (after warm-up)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def mxfp4_section(layers: int, copy_bw: float, results: dict) -> None:
    """The batch-1 MoE's real bytes (gate_up 4 x 5760 rows, down 4 x 2880, K = 2880 MXFP4 values:
    1,440 code bytes and 90 scale bytes a row) through a CUDA-core GEMV with the PTX pair decode."""
    from ossrl.kernels.mxfp4 import dequantize_mxfp4

    dev = "cuda"
    products = []
    for rows in (4 * 5760, 4 * 2880) * layers:
        blocks = torch.randint(0, 256, (rows, 90, 16), dtype=torch.uint8, device=dev)
        scales = torch.full((rows, 90), 127, dtype=torch.uint8, device=dev)  # 2^0: values stay in range
        products.append((blocks, scales))
    total = sum(b.numel() + s.numel() for b, s in products)
    x = torch.randn(2880, device=dev, dtype=torch.bfloat16)
    # one product against the dequantized weights
    blocks, scales = products[0]
    y = torch.empty(blocks.shape[0], device=dev, dtype=torch.bfloat16)
    _gemv_mxfp4[(triton.cdiv(blocks.shape[0], 16),)](blocks, scales, x, y, blocks.shape[0], 1.0, 2880, 16, 512,
                                                      True, False, num_warps=4)
    ref = dequantize_mxfp4(blocks, scales, torch.float32) @ x.float()
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    print(f"mxfp4 GEMV: relative error against the dequantized product {rel:.2e}")
    results["mxfp4"] = {"bytes": total, "relative_error": rel, "rows": []}
    for BN, BK in ((16, 512), (16, 256), (32, 256), (8, 512)):
        for pdl in (False, True):
            ys = [torch.empty(b.shape[0], device=dev, dtype=torch.bfloat16) for b, _ in products]
            try:
                seconds = graph_seconds(lambda: mxfp4_chain(products, x, ys, BN, BK, pdl))
            except Exception as e:  # noqa: BLE001 - a probe reports what fails
                print(f"mxfp4 BN={BN} BK={BK} pdl={pdl}: {type(e).__name__}: {e}")
                results["mxfp4"]["rows"].append({"BN": BN, "BK": BK, "pdl": pdl, "error": f"{type(e).__name__}: {e}"})
                continue
            row = {"BN": BN, "BK": BK, "pdl": pdl, "us_per_layer": 2 * seconds / len(products) * 1e6,
                   "share_of_copy_bandwidth": total / seconds / copy_bw}
            results["mxfp4"]["rows"].append(row)
            print(f"mxfp4 BN={BN:3d} BK={BK:4d} pdl={pdl!s:5} {row['us_per_layer']:6.2f} us a layer (gate_up + down)  "
                  f"{100 * row['share_of_copy_bandwidth']:5.1f}% of copy bandwidth")


MODES = ("plain", "pdl", "prefetch", "ahead", "ahead_pdl")


def chain(ws, x, ys, mode: str, BN: int, BK: int):
    """The products in order; "ahead" modes: each gate_up (even index) prefetches its down's weights."""
    pdl = mode in ("pdl", "prefetch", "ahead_pdl")
    for i, (w, y) in enumerate(zip(ws, ys)):
        N, K = w.shape
        extra = dict(launch_pdl=True) if pdl else {}
        grid = triton.cdiv(N, BN)
        ahead, nxt, lines = 0, w, 0
        if mode.startswith("ahead") and i % 2 == 0:
            nxt = ws[i + 1]
            lines = nxt.numel() // 128
            ahead = triton.next_power_of_2(triton.cdiv(lines, grid))
        _gemv[(grid,)](w, x, y, N, nxt, lines, K, BN, BK, pdl, mode == "prefetch", ahead,
                       triton.next_power_of_2(BN * K // 128), num_warps=4, **extra)
        x = y[:K] if y.numel() >= K else y
    return ys[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--out")
    ap.add_argument("--only-mxfp4", action="store_true", help="only the MXFP4 GEMV section")
    args = ap.parse_args()
    if gdc_wait is None:
        print("this Triton has no griddepcontrol (PDL) support")
        return
    dev = "cuda"
    torch.manual_seed(0)
    # gate_up: 4 x 5760 rows x 1440 bytes (2880 MXFP4 values) = 33 MB; down: 4 x 2880 x 1440 = 17 MB.
    # Inputs chain: each product reads the first K entries of the previous output (N >= K here).
    shapes = [(4 * 5760, 1536), (4 * 2880, 1536)] * args.layers
    ws = [torch.randint(0, 255, s, dtype=torch.uint8, device=dev) for s in shapes]
    x = torch.randn(1536, device=dev, dtype=torch.bfloat16)
    total_bytes = sum(w.numel() for w in ws)
    big = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    copy_to = torch.empty_like(big)
    for _ in range(3):
        copy_to.copy_(big)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        copy_to.copy_(big)
    torch.cuda.synchronize()
    copy_bw = 2 * big.numel() * 10 / (time.perf_counter() - t)
    del big, copy_to
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "copy_bandwidth_GBps": copy_bw / 1e9, "products": len(ws), "bytes": total_bytes, "rows": []}
    mxfp4_section(args.layers, copy_bw, results)
    for BN, BK in (() if args.only_mxfp4 else ((16, 512), (32, 256), (64, 128))):
        reference = None  # the plain chain's output for these tiles (other tiles sum in another order)
        for mode in MODES:
            ys = [torch.empty(w.shape[0], device=dev, dtype=torch.bfloat16) for w in ws]
            try:
                for _ in range(2):
                    chain(ws, x, ys, mode, BN, BK)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    chain(ws, x, ys, mode, BN, BK)
                for _ in range(3):
                    graph.replay()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                seconds = start.elapsed_time(end) / 1e3 / 20
            except Exception as e:  # noqa: BLE001 - a probe reports what fails
                print(f"BN={BN} BK={BK} {mode}: {type(e).__name__}: {e}")
                results["rows"].append({"BN": BN, "BK": BK, "mode": mode, "error": f"{type(e).__name__}: {e}"})
                continue
            out = ys[-1].float()
            if mode == "plain" and reference is None:
                reference = out.clone()
            same = bool(torch.equal(out, reference)) if reference is not None else None
            row = {"BN": BN, "BK": BK, "mode": mode, "us_per_product": seconds / len(ws) * 1e6,
                   "share_of_copy_bandwidth": total_bytes / seconds / copy_bw, "same_as_plain": same}
            results["rows"].append(row)
            print(f"BN={BN:3d} BK={BK:5d} {mode:9s} {row['us_per_product']:7.2f} us/product  "
                  f"{100 * row['share_of_copy_bandwidth']:5.1f}% of copy bandwidth  same output: {same}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
