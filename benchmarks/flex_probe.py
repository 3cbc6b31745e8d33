"""Why FlexAttention is slower after it meets a second length: one process per mode, the same packed
mask (a rollout prefill's: PROMPTS documents of LEN tokens, positions restarting per document,
full causal and sliding 128), 20b's heads. A diagnosis tool, not a benchmark.

    python benchmarks/flex_probe.py static|auto|dynamic [--prompts 64] [--len 128]

static: compiled for this length only (dynamic=False, as FLEX_STATIC does, without padding);
auto: torch's default compile, first called at one prompt's length, then at the packed length
(dynamo recompiles it with symbolic lengths, as in generate.py's batch 1 then batch 64);
dynamic: compiled with dynamic=True from the first call. Prints ms a call (CUDA events, median of
20) and, per call, the mask's kv blocks (so a kernel that ignores the block sparsity shows as the
same time as a dense causal mask: the last row).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import median_ms  # noqa: E402
from ossrl.kernels import attention  # noqa: E402
from ossrl.kernels.attention import AttentionMask  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=("static", "auto", "dynamic"))
ap.add_argument("--prompts", type=int, default=64)
ap.add_argument("--len", type=int, default=128)
args = ap.parse_args()

Hq, Hk, D = 64, 8, 64
g = torch.Generator(device="cuda").manual_seed(0)


def packed_mask(prompts: int, length: int, window, docs: bool = True) -> AttentionMask:
    T = prompts * length
    pos = torch.arange(length).repeat(prompts)[None] if docs else torch.arange(T)[None]
    doc = torch.arange(prompts).repeat_interleave(length)[None] if docs else None
    host = AttentionMask(pos, pos, window, doc, doc)
    return AttentionMask(pos.cuda(), pos.cuda(), window, None if doc is None else doc.cuda(),
                         None if doc is None else doc.cuda(), host=host)


def call(T: int, mask: AttentionMask):
    q = torch.randn(1, T, Hq, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, T, Hk, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    sinks = torch.randn(Hq, device="cuda", generator=g)
    return lambda: attention._flex_sink_attention(q, k, v, sinks, mask, scale=D ** -0.5)


def ms(fn) -> float:
    with torch.no_grad():
        return median_ms(fn, 20, warmup=3)


if args.mode in ("static", "dynamic"):  # one compiled wrapper for every call
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=args.mode == "dynamic")
    attention._compiled_flex_attention = lambda static=False: compiled
if args.mode == "auto":  # the library's default compile, first at one prompt's length
    with torch.no_grad():
        call(args.len, packed_mask(1, args.len, None))()
        call(args.len, packed_mask(1, args.len, 128))()
T = args.prompts * args.len
for window in (None, 128):
    mask = packed_mask(args.prompts, args.len, window)
    bm = mask.block_mask()
    full = 0 if bm.full_kv_num_blocks is None else int(bm.full_kv_num_blocks.sum())
    print(f"{args.mode}: T {T}, window {window}: {ms(call(T, mask)):.3f} ms a call "
          f"(kv blocks {int(bm.kv_num_blocks.sum())}, full {full})", flush=True)
dense = packed_mask(1, T, None, docs=False)
print(f"{args.mode}: T {T}, one causal document: {ms(call(T, dense)):.3f} ms a call", flush=True)
