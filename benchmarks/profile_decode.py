"""Where a decode step's time goes (20b shapes): CUDA kernel time by name, eager, batch 1 and 64.

    python benchmarks/profile_decode.py   # prints the top kernels; a diagnosis tool, not a benchmark
    python benchmarks/profile_decode.py --moe-sweep moe_decode_sweep.json   # with that sweep's best tiles
    python benchmarks/profile_decode.py --lora   # LoRA r=16 on attention and experts (GRPO rollouts),
                                                 # with rollout copies and with a cast per forward
    python benchmarks/profile_decode.py --lora --lora-a-tiles grouped,16x16x128x8
        # and again with the expert LoRA A products by torch._grouped_mm ("grouped") or on
        # _moe_matmul's dense path with other tiles (BMxBNxBKxSPLIT_K), in the same process
        # (moe_triton.LORA_A_TILES; the default is 16x16x128x4)
    python benchmarks/profile_decode.py --lora --maxnreg 80   # and again with the MoE decode tiles'
        # registers capped (with LoRA in their epilogues the word tile takes 93 registers against 80,
        # 5 CTAs an SM against 6; capped at 80, ptxas spills 16 bytes outside the loop)
    python benchmarks/profile_decode.py --no-split-k-fixup   # every split-K MoE tile finishes in a
        # second launch (`_split_k_epilogue`); --split-k-fixup: every one in its last part
        # (moe_triton.SPLIT_K_FIXUP; unset: each tile's TileConfig.fixup)
    python benchmarks/profile_decode.py --no-defer-residual-add   # each layer's MLP output added to
        # the residual stream in its own launch, not by the next layer's norm (gptoss.DEFER_RESIDUAL_ADD)
    python benchmarks/profile_decode.py --rotary-append   # rotary and the KV-cache append in one
        # launch (gptoss.ROTARY_APPEND); --moe-gemv: the 1-token MoE as CUDA-core GEMVs (moe_gemv.GEMV);
        # --router-groups: the router's top-k kernel groups the slots too (fused.ROUTER_GROUPS);
        # --combine-parts: split-K down partials summed by the k-sum (moe_triton.COMBINE_PARTS);
        # --one-split-max-capacity ROWS: decode attention in one split, no combine, for short caches
    python benchmarks/profile_decode.py --launch-ab   # each batch also without one-split decode
        # attention, then without it and COMBINE_PARTS (both on by default), in the same process
    python benchmarks/profile_decode.py --no-fold   # the MoE word decode with two multiplies a pair
        # instead of 2^126 folded into the scales (the engine's default, RolloutEngine(fold_scales=True);
        # the random scales are <= 128)
"""

import contextlib
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ossrl.engine.engine import RolloutEngine  # noqa: E402
from ossrl.engine.sampling import SamplingParams  # noqa: E402
from ossrl.model.config import GptOssConfig  # noqa: E402
from ossrl.model.gptoss import inference_kernels  # noqa: E402
from ossrl.model.lora import rollout_copies  # noqa: E402
from ossrl.testing import random_model_on_device  # noqa: E402

if "--moe-sweep" in sys.argv:  # decode tiles: the fastest per size in a `benchmarks/moe.py --decode-sweep` result
    import dataclasses
    import json

    from ossrl.kernels import moe_triton

    rows = json.loads(Path(sys.argv[sys.argv.index("--moe-sweep") + 1]).read_text())["decode_sweep"]

    def best(tokens):  # by CUDA-graph time where the sweep has it (the engine replays graphs)
        key = "fwd_graph_ms" if any("fwd_graph_ms" in r for r in rows) else "fwd_kernels_ms"
        r = min((r for r in rows if r["tokens"] == tokens and isinstance(r.get(key), float)), key=lambda r: r[key])
        bm, bn, bk, warps, stages = r["config"]
        return moe_triton.TileConfig(bm, bn, bk, warps, stages, dot_scaled=r["dot_scaled"], swap_ab=r["swap_ab"],
                                     packed=r.get("packed", True), split_k=r.get("split_k", 1),
                                     words=r.get("words", False))

    picks = {1: best(1), 8: best(8), 64: best(64)}
    print("MoE decode tiles:", {k: dataclasses.astuple(v) for k, v in picks.items()}, flush=True)
    default = moe_triton.default_config

    def picked(slots, num_experts, mxfp4):
        per_expert = slots / num_experts
        if not mxfp4 or per_expert > 16:
            return default(slots, num_experts, mxfp4)
        return picks[1] if per_expert <= 0.25 else picks[8] if per_expert <= 2 else picks[64]

    moe_triton.default_config = picked

if "--no-defer-residual-add" in sys.argv:  # each layer's MLP output added in its own launch
    from ossrl.model import gptoss

    gptoss.DEFER_RESIDUAL_ADD = False
if "--rotary-append" in sys.argv or "--no-rotary-append" in sys.argv:  # rotary and the KV append in one launch
    from ossrl.model import gptoss

    gptoss.ROTARY_APPEND = "--rotary-append" in sys.argv
if "--router-groups" in sys.argv or "--no-router-groups" in sys.argv:  # the router's kernel groups the slots
    from ossrl.kernels import fused

    fused.ROUTER_GROUPS = "--router-groups" in sys.argv
if "--moe-gemv" in sys.argv or "--no-moe-gemv" in sys.argv:  # 1-token MoE as CUDA-core GEMVs
    from ossrl.kernels import moe_gemv

    moe_gemv.GEMV = "--moe-gemv" in sys.argv
if "--combine-parts" in sys.argv or "--no-combine-parts" in sys.argv:  # split-K down partials to the k-sum
    from ossrl.kernels import moe_triton

    moe_triton.COMBINE_PARTS = "--combine-parts" in sys.argv
if "--one-split-max-capacity" in sys.argv:  # decode attention: one split (no combine) for short caches
    from ossrl.kernels import decode_attention

    decode_attention.ONE_SPLIT_MAX_CAPACITY = int(sys.argv[sys.argv.index("--one-split-max-capacity") + 1])
if "--no-split-k-fixup" in sys.argv or "--split-k-fixup" in sys.argv:
    from ossrl.kernels import moe_triton

    moe_triton.SPLIT_K_FIXUP = "--split-k-fixup" in sys.argv
model = random_model_on_device(GptOssConfig.gpt_oss_20b(), device="cuda", expert_format="mxfp4")
if "--lora" in sys.argv:  # as GRPO rollouts run: r=16 on attention and experts, unmerged
    from ossrl.model.lora import LoRAConfig, apply_lora

    apply_lora(model, LoRAConfig(r=16, alpha=32))
    print("LoRA r=16 on attention and experts", flush=True)
kernels = inference_kernels()  # as the engine's generate runs the step: the fused glue kernels
kernels.__enter__()


def run(batch, copies, note=""):
    """Profile eager steps, then time graph replays, of one decode batch."""
    engine = RolloutEngine(model, cuda_graphs=False, fold_scales="--no-fold" not in sys.argv)
    prompts = [[(7 * i + j) % 1000 for j in range(128)] for i in range(batch)]
    params = SamplingParams(max_new_tokens=8, seed=0)
    engine.generate(prompts, params=params)
    dec = engine._slots
    ids = torch.arange(batch, device="cuda")
    label = f"batch {batch}" + ("" if not lora else ", LoRA copies" if copies else ", LoRA cast per forward") + note
    # generate() enters rollout_copies itself; these direct steps enter it as generate does
    with rollout_copies(model) if copies else contextlib.nullcontext():
        for _ in range(3):
            dec._step(ids, params)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                dec._step(ids, params)
            torch.cuda.synchronize()
        events = prof.key_averages()
        total = sum(e.device_time_total for e in events if e.device_time_total > 0)
        print(f"{label}: CUDA time per step {total / 5 / 1000:.2f} ms, kernels per step "
              f"{sum(e.count for e in events if e.device_time_total > 0) // 5}")
        print(events.table(sort_by="device_time_total", row_limit=18, max_name_column_width=60))
        dec.cuda_graphs = True  # the same step replayed from a CUDA graph: kernel time plus launch gaps
        graph, static_ids = dec._runner(batch, params)
        static_ids.copy_(ids)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        print(f"{label}: graph replay {start.elapsed_time(end) / 20:.2f} ms per step", flush=True)
    engine.release()


lora = "--lora" in sys.argv
a_tiles = []
if "--lora-a-tiles" in sys.argv:
    from ossrl.kernels import moe_triton

    for spec in sys.argv[sys.argv.index("--lora-a-tiles") + 1].split(","):
        if spec == "grouped":  # torch._grouped_mm (moe_triton.LORA_A_TILES = None)
            a_tiles.append(None)
            continue
        bm, bn, bk, split = (int(v) for v in spec.split("x"))
        a_tiles.append(moe_triton.TileConfig(bm, bn, bk, 4, 3, split_k=split))
# --launch-ab: (note, {(module, attribute): value}) run after the defaults of each batch (both cuts on
# since session 19): without the one-split rule, then without either
variants = [(", without the one-split rule", {("ossrl.kernels.decode_attention", "ONE_SPLIT_MAX_CAPACITY"): 0}),
            (", without COMBINE_PARTS or the one-split rule", {("ossrl.kernels.moe_triton", "COMBINE_PARTS"): False,
             ("ossrl.kernels.decode_attention", "ONE_SPLIT_MAX_CAPACITY"): 0})] \
    if "--launch-ab" in sys.argv else []
torch.set_grad_enabled(False)  # as generate runs (rollout copies serve forwards without autograd only)
for batch in (1, 64):
    for copies in ((True, False) if lora else (True,)):
        run(batch, copies)
    for note, values in variants:
        import importlib

        saved = {key: getattr(importlib.import_module(key[0]), key[1]) for key in values}
        for (module, attribute), value in values.items():
            setattr(importlib.import_module(module), attribute, value)
        try:
            run(batch, True, note=note)
        finally:
            for (module, attribute), value in saved.items():
                setattr(importlib.import_module(module), attribute, value)
    if "--maxnreg" in sys.argv:  # the MoE decode tiles with a register cap, in the same process
        import dataclasses

        from ossrl.kernels import moe_triton

        cap = int(sys.argv[sys.argv.index("--maxnreg") + 1])
        uncapped = moe_triton.default_config
        def capped(*args):
            cfg = uncapped(*args)
            return dataclasses.replace(cfg, maxnreg=cap) if cfg.words else cfg

        moe_triton.default_config = capped
        run(batch, True, note=f", MoE decode tiles capped at {cap} registers")
        moe_triton.default_config = uncapped
    for cfg in a_tiles:  # the expert LoRA A products: other tiles, or grouped_mm, in the same process
        default, moe_triton.LORA_A_TILES = moe_triton.LORA_A_TILES, cfg
        run(batch, True, note=", LoRA A by torch._grouped_mm" if cfg is None else
            f", LoRA A by _moe_matmul {cfg.BM}x{cfg.BN}x{cfg.BK} split {cfg.split_k}")
        moe_triton.LORA_A_TILES = default
