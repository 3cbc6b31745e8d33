"""Copies of the MXFP4 experts' frozen blocks that the kernels read instead of the published ones.

- `tile_experts` (rollouts): the blocks in the word decode's tile-contiguous layout, as large as
  the blocks; read by decode-sized MoE calls inside `inference_kernels`.
- `dense_experts` (training steps and long prefills): both projections decoded to bf16 once, read
  by the compute-bound MoE calls (`TileConfig.dequant`) that otherwise decode a transient bf16 copy
  of each projection on every call (forward, and again in backward): four decodes a layer a
  training step, 0.36 ms each for 20b on an H100 (34 ms of a 4K-token step). The price is memory:
  1.59 GB a 20b layer (38 GB for all 24), so layers get them in order within a byte budget.

Both are stamped with what they were made from (`blocks_stamp`: device, shape, address, version
counter of the blocks) and read only while the stamp matches, so a write to the blocks that bumps
the version counter (any in-place op torch sees) is never computed with stale copies; stale dense
copies are freed at the next forward (with a warning: `dense_experts` remakes them).
"""

from __future__ import annotations

import torch
from torch import nn

from ossrl.model.checkpointing import device_memory, headroom


def mxfp4_experts(model: nn.Module) -> list:
    """The model's MXFP4 experts modules (the ones that may keep copies), in module order."""
    from ossrl.model.gptoss import Experts

    return [m for m in model.modules() if isinstance(m, Experts) and m.format == "mxfp4"]


def _copyable(model: nn.Module, m, stamp) -> bool:
    """Whether an MXFP4 experts module may get copies (either kind): a bf16 module on a GPU, of a
    model that is not sharded, with blocks that keep a version counter (`stamp` not None)."""
    return (not getattr(model, "sharded", False) and stamp is not None and m.gate_up_proj_blocks.is_cuda
            and m.gate_up_proj_bias.dtype == torch.bfloat16)


# The tile-contiguous layout of the rollouts' expert copies (`tile_experts`): runs of 64 rows (the
# word decode's BN) and chunks of 8 words (BK = 64 columns: a decode program's K tile is one 2 KB
# span). Against chunks of 16 words (H100, results/moe_tiled_fixup.json, MoE matmuls, graph replay):
# 1 / 8 / 64 tokens 0.0529 / 0.1511 / 0.2212 -> 0.0521 / 0.1454 / 0.2165 ms; rollouts (generate.py,
# same call) batch 1 / 64 / GRPO 8x8 321 / 7,761 / 5,776 -> 327 / 7,877 / 5,907 tok/s. BK = 128
# tiles do not read these copies (the chunk is narrower than their K tile).
TILED_LAYOUT = (64, 8)
_TILED_EPOCH = [0]  # bumped whenever any module's copies are made or freed (captured graphs key on it)


def tiled_epoch() -> int:
    """A counter of `tile_experts`' allocations and frees: CUDA graphs captured under one value may
    read copies that a later value no longer has (the slot engine keys its graphs on it)."""
    return _TILED_EPOCH[0]


def blocks_stamp(m) -> tuple | None:
    """What copies (tiled, dense) are made from: each projection's blocks (device, shape, address,
    version counter; an in-place write through autograd-visible ops bumps the version). None for
    inference-mode tensors, which keep no version counter: their in-place writes would go unseen."""
    stamp = []
    for t in (m.gate_up_proj_blocks, m.down_proj_blocks):
        try:
            version = t._version
        except RuntimeError:  # an inference tensor
            return None
        stamp.append((t.device, tuple(t.shape), t.data_ptr(), version))
    return tuple(stamp)


def _rollout_reserve(m, total: int, prefill_tokens: int, top_k: int, transient: bool = True) -> int:
    """Memory a rollout still needs after its KV pool: the device's headroom (`checkpointing.headroom`:
    graph pools, small buffers), plus a packed prefill of `prefill_tokens` (each token's top-k slots
    through gate_up, the SwiGLU and down) and, with `transient`, the bf16 copy of gate_up that
    prefill-sized MoE calls decode into (none where every layer keeps fresh dense copies, which they
    read instead: `_all_dense_kept`)."""
    from ossrl.kernels.moe_triton import _dense_copy_bytes

    rows, groups = m.gate_up_proj_blocks.shape[1:3]  # rows = 2I, groups * 32 = H
    H, I, elem = groups * 32, rows // 2, m.gate_up_proj_bias.element_size()
    prefill = prefill_tokens * (top_k * (2 * 2 * I + I + H) + 8 * H) * elem
    return headroom(total) + prefill + (_dense_copy_bytes(m.expert_weights()) if transient else 0)


def _all_dense_kept(model: nn.Module) -> bool:
    """Whether every MXFP4 experts module keeps fresh dense copies (no prefill decodes a transient)."""
    return all(m.dense is not None and m.dense["stamp"] == blocks_stamp(m) for m in mxfp4_experts(model))


@torch.no_grad()
def tile_experts(model: nn.Module, enabled: bool = True, reserve_bytes: int | None = None,
                 prefill_tokens: int = 0, refresh: bool = False) -> int:
    """Give each MXFP4 experts module of a bf16 model on a GPU copies of its blocks in the word
    decode's tile-contiguous layout (`TILED_LAYOUT`, `ossrl.kernels.mxfp4_triton.tile_blocks`), which
    its rollout forwards (inside `inference_kernels`) read: each K tile of a decode program is then
    one contiguous span instead of 64 pieces 1,440 bytes apart (the word decode runs on bf16 only).

    The copies cost as much memory as the blocks (9.6 GB for 20b), so layers get them in order
    while the free memory (`checkpointing.device_memory`: the allocator's unused cache counts)
    stays above `reserve_bytes` (default `_rollout_reserve` for `prefill_tokens`). Copies whose
    blocks were written since (a new version counter or address) are refreshed in place, their
    addresses, which captured graphs read, kept; a write the version counter does not see (through
    `.data`, DLPack, a collective) needs `refresh=True`. Blocks moved to another device or shape get
    new copies; inference-mode blocks (no version counter) and sharded models get none.
    `enabled=False` frees them. The slots backend calls it after each KV pool is allocated (before
    graphs are captured) and frees the copies with the pool. Returns the number of modules whose
    copies were made or freed (each bumps `tiled_epoch`)."""
    from ossrl.kernels.mxfp4_triton import tile_blocks

    changed = 0
    top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", 4)
    transient = not _all_dense_kept(model)  # a layer without dense copies decodes one in the prefill
    for m in mxfp4_experts(model):
        stamp = blocks_stamp(m)
        rows = (m.gate_up_proj_blocks.shape[1], m.down_proj_blocks.shape[1])
        eligible = enabled and _copyable(model, m, stamp) and all(r % TILED_LAYOUT[0] == 0 for r in rows)
        if m.tiled is not None and (not eligible or [s[:2] for s in m.tiled["stamp"]] != [s[:2] for s in stamp]
                                    or m.tiled["layout"] != TILED_LAYOUT):
            m.tiled = None  # not wanted, the blocks moved to another device or shape, or another layout
            changed += 1
        if not eligible:
            continue
        if m.tiled is not None:
            if refresh or m.tiled["stamp"] != stamp:  # written since: the same buffers, new values
                for name in ("gate_up", "down"):
                    m.tiled[name].copy_(tile_blocks(getattr(m, f"{name}_proj_blocks"), *TILED_LAYOUT))
                m.tiled["stamp"] = stamp
            continue
        free, total = device_memory(m.gate_up_proj_blocks.device)
        reserve = _rollout_reserve(m, total, prefill_tokens, top_k, transient) if reserve_bytes is None \
            else reserve_bytes
        need = 2 * (m.gate_up_proj_blocks.numel() + m.down_proj_blocks.numel())  # the copies and a transient
        if free - need < reserve:
            continue
        with torch.inference_mode(False):
            m.tiled = dict(gate_up=tile_blocks(m.gate_up_proj_blocks, *TILED_LAYOUT),
                           down=tile_blocks(m.down_proj_blocks, *TILED_LAYOUT), layout=TILED_LAYOUT, stamp=stamp)
        changed += 1
    _TILED_EPOCH[0] += changed
    return changed


@torch.no_grad()
def dense_experts(model: nn.Module, max_bytes: int | None = None, reserve_bytes: int | None = None,
                  refresh: bool = False) -> int:
    """Give MXFP4 experts modules of a bf16 model on a GPU bf16 copies of both projections (dense
    [E, in, out], `ossrl.kernels.mxfp4_triton.dequantize_experts`: the values the per-call decode
    gives, bit for bit), which their compute-bound MoE calls read instead of decoding a transient
    copy per call. Layers get them in order while the copies total at most `max_bytes` (None: no
    limit; 0 frees them all) and the free memory (`checkpointing.device_memory`) stays above
    `reserve_bytes` (default `checkpointing.headroom`). Copies made from blocks written since (a new
    version counter or address) are remade; a write the version counter does not see (through
    `.data`, DLPack, a collective) needs `refresh=True`. Sharded models, inference-mode blocks (no
    version counter) and modules off the GPU get none. Returns the number of modules whose copies
    were made, remade or freed.

    Training activations come first: under gradient checkpointing "auto", `configure_memory` hands
    the budget to the model, whose every training forward refits the copies to the memory its kept
    activations leave (`fit_dense_copies`); called directly, the copies' memory is memory the kept
    activations do not get."""
    from ossrl.kernels.mxfp4_triton import dequantize_experts

    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"dense_experts: max_bytes must be >= 0, got {max_bytes}")
    changed, used = 0, 0
    for m in mxfp4_experts(model):
        stamp = blocks_stamp(m)
        need = dense_bytes(m)
        wanted = _copyable(model, m, stamp) and (max_bytes is None or used + need <= max_bytes)
        had = m.dense is not None
        if had and (refresh or not wanted or m.dense["stamp"] != stamp):
            m.dense = None  # not wanted, or made from blocks written since: freed before any remake
        if wanted and m.dense is None:
            free, total = device_memory(m.gate_up_proj_blocks.device)
            if free - need >= (headroom(total) if reserve_bytes is None else reserve_bytes):
                with torch.inference_mode(False):
                    m.dense = dict(gate_up=dequantize_experts(m.gate_up_proj_blocks, m.gate_up_proj_scales,
                                                              torch.bfloat16),
                                   down=dequantize_experts(m.down_proj_blocks, m.down_proj_scales, torch.bfloat16),
                                   stamp=stamp)
                changed += 1  # made or remade
            else:
                changed += had  # freed
        elif had and m.dense is None:
            changed += 1  # freed
        used += need if m.dense is not None else 0
    return changed


def dense_copy_addresses(modules: list) -> tuple:
    """Where each of these MXFP4 experts modules (`mxfp4_experts`) keeps its bf16 copies (None: it
    keeps none): what a CUDA graph that read them depends on (`ossrl.train.graphed`)."""
    return tuple(None if m.dense is None else (m.dense["gate_up"].data_ptr(), m.dense["down"].data_ptr())
                 for m in modules)


def dense_bytes_kept(model: nn.Module) -> int:
    """Bytes of the dense copies `model`'s MXFP4 experts modules hold now."""
    return sum(dense_bytes(m) for m in mxfp4_experts(model) if m.dense is not None)


def fit_dense_copies(model: nn.Module, max_bytes: int) -> int:
    """`dense_experts(model, max_bytes)` where it would change something: copies beyond `max_bytes`
    to free, or room for the next layer's (a module that may get copies and has none). Called by
    every training forward under checkpointing "auto" (`GptOssModel._layers_that_fit`), so a
    budget that changes nothing makes no `dense_experts` call. It walks the modules in the order
    `dense_experts` gives copies (layers in order). Returns `dense_experts`' count (0 if not run)."""
    used, missing = 0, None
    for m in mxfp4_experts(model):
        if m.dense is not None:
            used += dense_bytes(m)
        elif missing is None and _copyable(model, m, blocks_stamp(m)):
            missing = dense_bytes(m)
    if used > max_bytes or (missing is not None and used + missing <= max_bytes):
        return dense_experts(model, max_bytes=max_bytes)
    return 0


def dense_bytes(m) -> int:
    """Bytes of an MXFP4 experts module's bf16 copies: 32 values a 16-byte block, 2 bytes each."""
    return 4 * (m.gate_up_proj_blocks.numel() + m.down_proj_blocks.numel())
