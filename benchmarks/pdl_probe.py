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

The real MXFP4 layer as such GEMVs is `ossrl.kernels.moe_gemv`, timed by `benchmarks/moe.py --gemv`.
"""

import argparse
import json
import time
from pathlib import Path

import torch
import triton
import triton.language as tl


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
    for BN, BK in ((16, 512), (32, 256), (64, 128)):
        reference = None  # the plain chain's output for these tiles (other tiles sum in another order)
        for mode in MODES:
            ys = [torch.empty(w.shape[0], device=dev, dtype=torch.bfloat16) for w in ws]
            try:
                seconds = graph_seconds(lambda: chain(ws, x, ys, mode, BN, BK))
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
