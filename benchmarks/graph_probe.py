"""Probe: can a whole LoRA training step (forward and backward) be captured in one CUDA graph, and
what does replaying it save against the eager step?

Session 20 found the training step host-bound below 8K (H100, 1K tokens: 215.7 ms a step, the GPU
busy 93.0 ms; 8K: 476.6 ms, busy 335.9 ms). A replayed graph costs the host next to nothing, so its
time is about the GPU's. This probe says whether the step captures as written and how far that
would go; it is not how the trainer runs (its batches change shape, and the masks' block tables
change with them: a real path would keep them in fixed buffers).

For each length: a single document of T tokens, every token but the last a target. The eager step
(sequence_logprobs' model and token_logprobs, no boolean indexing: targets are the shifted inputs)
timed a few times; then the same step captured (after warm-up on a side stream, as torch's docs
do it) and replayed. Two ways with the attention masks: "device", positions and document ids
given as device tensors, so the model builds the masks' block tables on the device, inside the
graph (no syncs there: what a real path would do, the inputs copied into fixed buffers); and, only
if that fails, "reused", the masks built in the warm-up and reused by the capture. Checks: the
replayed step's LoRA gradients against the eager step's, beside two eager steps' against each
other. gpt-oss-20b shapes, random weights, MXFP4 experts, LoRA r=16 on attention and experts, no
checkpointing.

    python benchmarks/graph_probe.py [--lengths 1024,4096,8192] [--dense-experts-gb GB] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import device_info  # noqa: E402
from train import lora_model_on_gpu  # noqa: E402
import ossrl.model.gptoss as gptoss  # noqa: E402
from ossrl.model.config import GptOssConfig  # noqa: E402
from ossrl.train.logprobs import token_logprobs  # noqa: E402
from ossrl.train.memory import configure_memory  # noqa: E402


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def max_rel_diff(params, reference) -> float:
    """The largest |grad - reference| of any parameter, relative to that reference's largest value."""
    return max(((p.grad.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
               for p, ref in zip(params, reference))


def probe_length(model, T: int, vocab: int, repeats: int, device_masks: bool) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device="cuda").manual_seed(T)
    ids = torch.randint(0, vocab, (1, T), device="cuda", generator=g)
    targets = ids[0, 1:].contiguous()
    positions = torch.arange(T, device="cuda")[None] if device_masks else None
    doc_ids = torch.zeros(1, T, dtype=torch.long, device="cuda") if device_masks else None

    def forward_backward():
        hidden = model.model(ids, positions=positions, doc_ids=doc_ids)
        lp, _ = token_logprobs(hidden[0, :-1], model.lm_head.weight, targets)
        (-lp.mean()).backward()

    def clear():
        for p in params:
            p.grad = None

    def timed(fn) -> tuple[float, float]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        host = time.perf_counter() - t
        torch.cuda.synchronize()
        return time.perf_counter() - t, host

    row = {"tokens": T, "masks": "device" if device_masks else "reused"}
    eager, eager_host = [], []
    torch.cuda.reset_peak_memory_stats()
    for i in range(2 + repeats):
        clear()
        seconds, host = timed(forward_backward)
        if i >= 2:
            eager.append(seconds)
            eager_host.append(host)
    reference = [p.grad.float().clone() for p in params]
    clear()
    forward_backward()  # once more: how far two eager steps differ (atomic accumulations), the replay's yardstick
    row["eager_grad_max_rel_diff"] = float(f"{max_rel_diff(params, reference):.3g}")
    row.update(eager_seconds=round(statistics.median(eager), 4), eager_all=[round(t, 4) for t in eager],
               eager_host_seconds=round(statistics.median(eager_host), 4),
               eager_peak_gib=gib(torch.cuda.max_memory_allocated()))
    print(json.dumps(row), flush=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            clear()
            forward_backward()
    torch.cuda.current_stream().wait_stream(side)
    clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    graph = torch.cuda.CUDAGraph()
    t = time.perf_counter()
    with torch.cuda.graph(graph):
        forward_backward()
    torch.cuda.synchronize()
    row["capture_seconds"] = round(time.perf_counter() - t, 2)
    replay, replay_host = [], []
    for i in range(2 + repeats):
        seconds, host = timed(graph.replay)
        if i >= 2:
            replay.append(seconds)
            replay_host.append(host)
    worst = max_rel_diff(params, reference)
    row.update(replay_seconds=round(statistics.median(replay), 4), replay_all=[round(t, 4) for t in replay],
               replay_host_seconds=round(statistics.median(replay_host), 5),
               graph_peak_gib=gib(torch.cuda.max_memory_allocated()),
               speedup=round(statistics.median(eager) / statistics.median(replay), 3),
               grad_max_rel_diff=float(f"{worst:.3g}"))
    del graph
    clear()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,4096,8192")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dense-experts-gb", type=float, default=0.0, help="kept bf16 expert copies (configure_memory)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = args.out or os.path.join(os.environ.get("OUT", "benchmarks/results"), "graph_probe.json")
    config = GptOssConfig.gpt_oss_20b()
    model, _ = lora_model_on_gpu(config)
    configure_memory(model, gradient_checkpointing=False, dense_experts_gb=args.dense_experts_gb)
    built = gptoss.AttentionMask
    rows = []
    for T in (int(t) for t in args.lengths.split(",")):
        masks = {}

        def reused(*a, window=None, **kw):  # one mask per window for this length, built once
            if window not in masks:
                masks[window] = built(*a, window=window, **kw)
            return masks[window]

        for device_masks in (True, False):
            gptoss.AttentionMask = built if device_masks else reused
            try:
                row = probe_length(model, T, config.vocab_size, args.repeats, device_masks)
            except Exception as e:  # a probe: say what failed, go on
                row = {"tokens": T, "masks": "device" if device_masks else "reused",
                       "error": f"{type(e).__name__}: {str(e)[:600]}",
                       "traceback": traceback.format_exc().splitlines()[-12:]}
            finally:
                gptoss.AttentionMask = built
            if "error" not in row:
                break
            print(json.dumps(row), flush=True)
            rows.append(row)
            gc.collect()
            torch.cuda.empty_cache()
        if "error" not in row:
            print(json.dumps(row), flush=True)
            rows.append(row)
        gc.collect()
        torch.cuda.empty_cache()
    result = {"benchmark": "graph_probe", **device_info(), "dense_experts_gb": args.dense_experts_gb,
              "model": "gpt-oss-20b shapes, random weights, MXFP4 experts, LoRA r=16 (attention and experts), "
                       "no checkpointing; one document per step",
              "rows": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
