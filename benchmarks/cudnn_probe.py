"""Can cuDNN's attention serve the training step's full (unwindowed) layers, sinks included? A probe
(session 24), not a benchmark against a baseline.

attn_probe (session 23) found cuDNN's SDPA 1.6x faster than FlashAttention-2 on one document's
full causal layer, forward + backward. ossrl folds the sinks in as y = out * w, w = sigmoid(lse -
sink), and calls the kernel's backward with y in place of out (`ossrl.kernels.varlen_attention`):
that needs the kernel's logsumexp in FlashAttention's units, packed documents (cu_seqlens) with
grouped heads, and a backward callable with a given `out`. This probe checks each on the device:

- torch's `_cudnn_attention_forward` / `_cudnn_attention_backward` (varlen: [tokens, heads, dim]
  with cumulative offsets), with 64 query and 8 key heads, and with the keys expanded to 64 heads
  when grouped heads are refused;
- its output, logsumexp and q/k/v gradients against FlashAttention-2 varlen on the same inputs,
  with the backward given another `out` (what the sink identity does) on both;
- the same with empty segments after the last (the fixed buffers of a captured step);
- forward and backward times of both, each over 20 calls between CUDA events (not host-bound).

    python benchmarks/cudnn_probe.py [--tokens 4096,8192] [--out cudnn_probe.json]
"""

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import device_info  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def loop_ms(fn, calls: int = 20) -> float:
    """Milliseconds per call of fn over `calls` calls between two CUDA events (after one warm call)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def flash(q, k, v, cu, L, scale):
    res = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, L, L, 0.0, True, False, scale=scale,
                                                  window_size_left=-1, window_size_right=0)
    return res[0], res[1], res[2], res[3]


def flash_backward(dout, q, k, v, out, lse, cu, L, rng, unused, scale):
    return torch.ops.aten._flash_attention_backward(dout, q, k, v, out, lse, cu, cu, L, L, 0.0, True, rng, unused,
                                                    scale=scale, window_size_left=-1, window_size_right=0)


def cudnn(q, k, v, cu, L, scale):
    res = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, L, L, True, 0.0, True, False, scale=scale)
    return res[0], res[1], res[6], res[7]


def cudnn_backward(dout, q, k, v, out, lse, cu, L, seed, offset, scale):
    return torch.ops.aten._cudnn_attention_backward(dout, q, k, v, out, lse, seed, offset, None, cu, cu, L, L, 0.0,
                                                    True, scale=scale)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096,8192")
    ap.add_argument("--out", default="benchmarks/results/cudnn_probe.json")
    args = ap.parse_args()
    Hq, Hk, D, scale = 64, 8, 64, 0.125
    result = dict(device_info(), cudnn_version=torch.backends.cudnn.version(), schemas={}, cases=[])
    for name in ("_cudnn_attention_forward", "_cudnn_attention_backward"):
        op = getattr(torch.ops.aten, name, None)
        result["schemas"][name] = str(op.default._schema) if op is not None else None
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}, indent=1), flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for T in (int(t) for t in args.tokens.split(",")):
        q = torch.randn(T, Hq, D, device="cuda", generator=g, dtype=torch.bfloat16)
        k, v = (torch.randn(T, Hk, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
        dout = torch.randn(T, Hq, D, device="cuda", generator=g, dtype=torch.bfloat16)
        for docs, empty in ((1, 0), (4, 0), (4, 4)):
            L = T // docs
            # empty: segments of no tokens after the last (a CUDA graph's fixed buffers end with them)
            cu = torch.arange(0, T + 1, L, device="cuda", dtype=torch.int32)
            cu = torch.cat((cu, cu[-1:].repeat(empty)))
            case = dict(tokens=T, docs=docs, empty_segments=empty)
            fo, flse, rng, unused = flash(q, k, v, cu, L, scale)
            # the backward given another out (y = 0.7 out, as the sinks' identity passes y)
            other = (fo.float() * 0.7).to(fo.dtype)
            ref = flash_backward(dout, q, k, v, other, flse, cu, L, rng, unused, scale)
            case["flash_fwd_ms"] = loop_ms(lambda: flash(q, k, v, cu, L, scale))
            case["flash_bwd_ms"] = loop_ms(lambda: flash_backward(dout, q, k, v, other, flse, cu, L, rng, unused, scale))
            case["flash_lse_shape"] = list(flse.shape)
            for heads in ("grouped", "expanded"):
                kk, vv = (k, v) if heads == "grouped" else (x.repeat_interleave(Hq // Hk, 1) for x in (k, v))
                tag = f"cudnn_{heads}"
                try:
                    co, clse, seed, offset = cudnn(q, kk, vv, cu, L, scale)
                    case[f"{tag}_lse_shape"] = list(clse.shape)
                    case[f"{tag}_out_vs_flash"] = rel(co, fo)
                    lse_cmp = clse.reshape(flse.shape) if clse.numel() == flse.numel() else None
                    if lse_cmp is not None:
                        case[f"{tag}_lse_max_abs_diff"] = (lse_cmp.float() - flse).abs().max().item()
                        case[f"{tag}_lse_transposed_max_abs_diff"] = (
                            clse.reshape(flse.shape[::-1]).T.float() - flse).abs().max().item()
                    grads = cudnn_backward(dout, q, kk, vv, other, clse, cu, L, seed, offset, scale)
                    dq, dk, dv = grads
                    if heads == "expanded":  # sum each group's gradients back onto its key head
                        dk, dv = (x.float().view(T, Hk, Hq // Hk, D).sum(2) for x in (dk, dv))
                    case[f"{tag}_grads_vs_flash"] = {n: rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), ref)}
                    case[f"{tag}_fwd_ms"] = loop_ms(lambda: cudnn(q, kk, vv, cu, L, scale))
                    case[f"{tag}_bwd_ms"] = loop_ms(
                        lambda: cudnn_backward(dout, q, kk, vv, other, clse, cu, L, seed, offset, scale))
                except Exception as exc:  # a probe: record and go on
                    case[f"{tag}_error"] = f"{type(exc).__name__}: {exc}"[:600]
                    traceback.print_exc()
            result["cases"].append(case)
            print(json.dumps(case), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
