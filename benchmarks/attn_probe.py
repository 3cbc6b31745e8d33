"""The training step's sink attention two ways: FlexAttention (the library's general path) against
FlashAttention-2's varlen kernels with the sinks folded in (`ossrl.kernels.varlen_attention`, the
training default since session 23). A probe (does the second path agree, and is it faster?), not
a benchmark against a baseline. Each call is timed with CUDA events around the Python call, so a
case whose kernels are short (sliding layers) may time the host's launches as much as the GPU.

    python benchmarks/attn_probe.py [--tokens 4096,8192] [--out attn_probe.json]

20b's attention shape (64 query and 8 key heads of 64, bf16), documents packed end to end in one
row, full causal and sliding 128. Per case: forward and forward + backward (CUDA events, median
of 10), and the varlen path's output and q/k/v/sink gradients against FlexAttention's, as the
largest difference over the largest value (both bf16). Plus, for one document without sinks,
SDPA's cuDNN and flash backends (forward + backward), as the hardware's yardstick.
"""

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import device_info, median_ms  # noqa: E402
from ossrl.kernels import attention  # noqa: E402
from ossrl.kernels.attention import AttentionMask  # noqa: E402
from ossrl.kernels.varlen_attention import Segments, varlen_available, varlen_sink_attention  # noqa: E402


def flops(T: int, docs: int, window, Hq: int, D: int) -> float:
    """Forward FLOPs (two matmuls) of causal attention over `docs` equal documents."""
    L = T // docs
    pairs = docs * (L * (L + 1) // 2 if window is None else sum(min(i + 1, window) for i in range(L)))
    return 4 * pairs * Hq * D


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def kernel_table(fn) -> list:
    """[(kernel name, calls, GPU microseconds)] of one call of fn, the longest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(e.key[:90], e.count, round(e.self_device_time_total, 1)) for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r[2])[:12]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096,8192")
    ap.add_argument("--out", default="benchmarks/results/attn_probe.json")
    ap.add_argument("--profile", action="store_true",
                    help="also list each path's kernels (torch profiler) for one forward + backward per case")
    args = ap.parse_args()
    Hq, Hk, D, scale = 64, 8, 64, 0.125
    result = dict(device_info(), varlen_available=None, cases=[])
    g = torch.Generator(device="cuda").manual_seed(0)
    for T in (int(t) for t in args.tokens.split(",")):
        q = torch.randn(T, Hq, D, device="cuda", generator=g, dtype=torch.bfloat16)
        k, v = (torch.randn(T, Hk, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
        sinks = torch.randn(Hq, device="cuda", generator=g)
        grad = torch.randn(T, Hq, D, device="cuda", generator=g, dtype=torch.bfloat16)
        result["varlen_available"] = varlen_available(q)
        for docs in (1, 4):
            L = T // docs
            cu = torch.arange(0, T + 1, L, device="cuda", dtype=torch.int32)
            segments = Segments(cu, cu, L, L)
            pos = torch.arange(L).repeat(docs)[None]
            doc = torch.arange(docs).repeat_interleave(L)[None]
            for window in (None, 128):
                host = AttentionMask(pos, pos, window, doc, doc) if docs > 1 else AttentionMask(pos, pos, window)
                dev = AttentionMask(*(t.cuda() if isinstance(t, torch.Tensor) else t for t in
                                      (host.q_pos, host.k_pos, host.window, host.q_doc, host.k_doc)), host=host)
                case = dict(tokens=T, docs=docs, window=window, fwd_gflop=flops(T, docs, window, Hq, D) / 1e9)

                def leaves():
                    return [t.clone().requires_grad_() for t in (q, k, v, sinks)]

                def flex(ql, kl, vl, sl):
                    return attention._flex_sink_attention(ql[None], kl[None], vl[None], sl, dev, scale=scale)[0]

                def varlen(ql, kl, vl, sl):
                    return varlen_sink_attention(ql, kl, vl, sl, segments, window=window, scale=scale)

                outs = {}
                for name, fn in (("flex", flex), ("varlen", varlen)):
                    try:
                        xs = leaves()
                        out = fn(*xs)
                        out.backward(grad)
                        outs[name] = [out.detach()] + [x.grad for x in xs]
                        case[f"{name}_fwd_ms"] = median_ms(lambda: fn(*xs), 10)  # (grad mode: flex's static kernel)
                        case[f"{name}_fwd_bwd_ms"] = median_ms(lambda: fn(*xs).backward(grad), 10)
                        case[f"{name}_fwd_bwd_TFLOPs"] = 3.5 * case["fwd_gflop"] / case[f"{name}_fwd_bwd_ms"]
                        if args.profile:
                            case[f"{name}_kernels"] = kernel_table(lambda: fn(*xs).backward(grad))
                    except Exception as exc:  # a probe: record and go on
                        case[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:800]
                        traceback.print_exc()
                if len(outs) == 2:
                    case["varlen_vs_flex"] = {n: rel(a, b) for n, a, b in
                                              zip(("out", "dq", "dk", "dv", "dsinks"), outs["varlen"], outs["flex"])}
                result["cases"].append(case)
                print(json.dumps(case), flush=True)
                Path(args.out).write_text(json.dumps(result, indent=1))
        # the yardstick: one document, no sinks, SDPA backends (B, H, T, D layout)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qs, ks, vs = (x.transpose(0, 1)[None].clone().requires_grad_() for x in (q, k, v))
        gs = grad.transpose(0, 1)[None]
        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            row = dict(tokens=T, docs=1, window=None, backend=name, fwd_gflop=flops(T, 1, None, Hq, D) / 1e9)
            try:
                with sdpa_kernel(backend):
                    def run():
                        return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                                                enable_gqa=True)
                    run().backward(gs)
                    with torch.no_grad():
                        row["fwd_ms"] = median_ms(run, 10)
                    row["fwd_bwd_ms"] = median_ms(lambda: run().backward(gs), 10)
                    row["fwd_bwd_TFLOPs"] = 3.5 * row["fwd_gflop"] / row["fwd_bwd_ms"]
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:800]
            result["cases"].append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
