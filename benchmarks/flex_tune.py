"""FlexAttention tile options on the training step's attention: which `kernel_options` make the
forward and the backward of a 20b layer fastest? A tuning tool (it times one kernel's variants
against torch's defaults in one process), not a benchmark of ossrl against a baseline.

    python benchmarks/flex_tune.py [--tokens 4096] [--out flex_tune.json]

One document of T tokens (as benchmarks/train.py packs it), 64 query and 8 key heads of 64, bf16,
through the library's own call (`attention._flex_sink_attention`, sinks and all) with
`attention.FLEX_KERNEL_OPTIONS` set per candidate. For each: the forward alone and forward +
backward (CUDA events, median of 10), full causal and sliding 128; "layers_ms" is what 12 layers
of each (20b's mix) take. The forward candidates keep torch's backward and the reverse, so each
line changes one kernel. JSON is rewritten after every candidate (a run cut short keeps its lines).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import device_info, median_ms  # noqa: E402
from ossrl.kernels import attention  # noqa: E402
from ossrl.kernels.attention import AttentionMask  # noqa: E402

# (block_m, block_n, stages, warps) forward; (m1, n1, m2, n2, stages, warps) backward. torch 2.11-2.13
# defaults on sm_90, bf16, head 64: forward 128x128, 3 stages, 4 warps; backward 64/128/128/64, 3, 8.
FWD = [(128, 64, 3, 4), (128, 128, 2, 8), (64, 128, 3, 4), (64, 64, 3, 4), (128, 128, 4, 4)]
BWD = [(64, 64, 64, 64, 3, 4), (32, 128, 128, 32, 3, 4), (64, 128, 128, 64, 3, 4),
       (64, 128, 128, 64, 2, 8), (32, 64, 64, 32, 3, 4), (128, 128, 128, 128, 2, 8)]


def candidates():
    yield "default", {}
    yield "tma", {"USE_TMA": True}
    for m, n, s, w in FWD:
        yield f"fwd {m}x{n} s{s} w{w}", {"fwd_BLOCK_M": m, "fwd_BLOCK_N": n, "fwd_num_stages": s,
                                        "fwd_num_warps": w}
    for m1, n1, m2, n2, s, w in BWD:
        yield f"bwd {m1}/{n1}/{m2}/{n2} s{s} w{w}", {
            "bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1, "bwd_BLOCK_M2": m2, "bwd_BLOCK_N2": n2,
            "bwd_num_stages": s, "bwd_num_warps": w}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/results/flex_tune.json")
    args = ap.parse_args()
    T, Hq, Hk, D = args.tokens, 64, 8, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, T, Hq, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    k, v = (torch.randn(1, T, Hk, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
            for _ in range(2))
    sinks = torch.randn(Hq, device="cuda", generator=g).requires_grad_()
    grad = torch.randn(1, T, Hq, D, device="cuda", generator=g, dtype=torch.bfloat16)
    pos = torch.arange(T)[None]
    masks = {window: AttentionMask(pos.cuda(), pos.cuda(), window, host=AttentionMask(pos, pos, window))
             for window in (None, 128)}
    result = {**device_info(), "tokens": T, "heads": [Hq, Hk, D], "library_tuned": str(attention.FLEX_TUNED),
              "candidates": []}
    attention.FLEX_TUNED = {}  # "default" is torch's own choice
    for name, options in candidates():
        attention.FLEX_KERNEL_OPTIONS = options
        attention._compiled_flex_attention.cache_clear()
        torch._dynamo.reset()
        line = {"name": name, "options": options}
        try:
            for window, mask in masks.items():
                def fwd():
                    return attention._flex_sink_attention(q, k, v, sinks, mask, scale=D ** -0.5)

                def fwd_bwd():
                    fwd().backward(grad)
                    for t in (q, k, v, sinks):
                        t.grad = None  # (no accumulation into the last call's gradients)

                key = "full" if window is None else f"sliding_{window}"
                line[f"{key}_fwd_ms"] = round(median_ms(fwd, 10, warmup=2), 4)
                line[f"{key}_fwd_bwd_ms"] = round(median_ms(fwd_bwd, 10, warmup=2), 4)
            line["layers_ms"] = round(12 * (line["full_fwd_bwd_ms"] + line["sliding_128_fwd_bwd_ms"]), 2)
        except Exception as error:  # a tile that does not fit (shared memory) or does not compile
            line["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        result["candidates"].append(line)
        print(json.dumps(line), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    timed = [c for c in result["candidates"] if "layers_ms" in c]
    if timed:
        # the forward and backward kernels are separate: the best of each (12 layers of each mask)
        def fwd(c):
            return 12 * (c["full_fwd_ms"] + c["sliding_128_fwd_ms"])

        def bwd(c):
            return c["layers_ms"] - fwd(c)

        best_f = min((c for c in timed if not any(k.startswith("bwd_") for k in c["options"])), key=fwd)
        best_b = min((c for c in timed if not any(k.startswith("fwd_") for k in c["options"])), key=bwd)
        options = {**{k: v for k, v in best_f["options"].items() if not k.startswith("bwd_")},
                   **{k: v for k, v in best_b["options"].items() if not k.startswith("fwd_")}}
        result["best"] = {"forward": best_f["name"], "backward": best_b["name"], "options": options,
                          "estimated_layers_ms": round(fwd(best_f) + bwd(best_b), 2)}
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"fastest: forward {best_f['name']}, backward {best_b['name']}: "
              f"{result['best']['estimated_layers_ms']} ms for 24 layers against "
              f"{timed[0]['layers_ms'] if timed[0]['name'] == 'default' else '?'} (default); "
              f"options {json.dumps(options)}")


if __name__ == "__main__":
    main()
