"""FlexAttention BlockMasks for `ossrl.kernels.attention.AttentionMask`: which 128-blocks of keys
each block of queries must visit (partial: mask_mod decides; full: every pair visible, mask_mod
skipped), and mask_mod itself.

The layout is computed from the runs of each 128-block (spans of one document and branch with
consecutive positions: their minima/maxima decide exactly), so building it costs O((T/128)^2),
never O(T^2). Tables are built where the mask's tensors live: on the host for a mask with a host
twin (then copied once without waiting for the device), else on the device.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ossrl.kernels.transfer import host_to_device

if TYPE_CHECKING:
    from ossrl.kernels.attention import AttentionMask

BLOCK = 128  # FlexAttention's sparse block size (queries and keys)
_FAR = 2**30  # position given to padded keys: never visible


def _shared_across_batch(*tensors: torch.Tensor | None) -> bool:
    """True when every row of each [B, T] tensor is the same view (batch size 1 or stride 0)."""
    return all(t is None or t.shape[0] == 1 or t.stride(0) == 0 for t in tensors)


def _pad_to_blocks(x: torch.Tensor, value: int) -> torch.Tensor:
    """[R, T] -> int32 [R, ceil(T/128)*128], padded at the end with `value`."""
    pad = -x.shape[1] % BLOCK
    return F.pad(x.to(torch.int32), (0, pad), value=value)


def _block_min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, nb*128] -> per-block min and max, each [R, nb]."""
    x = x.view(x.shape[0], -1, BLOCK)
    return x.amin(-1), x.amax(-1)


def block_layout(mask: AttentionMask) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Block classification [R, nq, nk] (partial, full) and the padded [R, Tpad] int32 tensors for
    mask_mod (None where the mask has no such ids).

    `full` blocks have every (query, key) pair visible, so FlexAttention skips mask_mod there;
    `partial` blocks may have some (a superset is fine: mask_mod decides exactly); the rest have
    none and are skipped. R is 1 when all batch rows share their positions (broadcast), else B.
    Padded queries get position -1 and padded keys position 2^30: they see / are seen by nothing,
    and no block that contains padding is ever `full`.
    """
    m = mask
    rows = 1 if _shared_across_batch(m.q_pos, m.k_pos, m.q_doc, m.k_doc, m.q_branch, m.k_branch) else m.q_pos.shape[0]
    qp = _pad_to_blocks(m.q_pos[:rows], -1)
    kp = _pad_to_blocks(m.k_pos[:rows], _FAR)
    qlo, qhi = (t[:, :, None] for t in _block_min_max(qp))  # [R, nq, 1]
    klo, khi = (t[:, None, :] for t in _block_min_max(kp))  # [R, 1, nk]
    any_visible = klo <= qhi
    full = khi <= qlo
    if m.window is not None:
        any_visible &= khi > qlo - m.window
        full &= klo > qhi - m.window
    qd = kd = None
    if m.q_doc is not None:
        qd = _pad_to_blocks(m.q_doc[:rows], -1)
        kd = _pad_to_blocks(m.k_doc[:rows], -1)
        qdlo, qdhi = (t[:, :, None] for t in _block_min_max(qd))
        kdlo, kdhi = (t[:, None, :] for t in _block_min_max(kd))
        any_visible &= (kdlo <= qdhi) & (qdlo <= kdhi)
        full &= (qdlo == qdhi) & (kdlo == kdhi) & (qdlo == kdlo)
    qb = kb = None
    if m.q_branch is not None:  # padding gets branch -1: never branch 0, and its positions hide it anyway
        qb = _pad_to_blocks(m.q_branch[:rows], -1)
        kb = _pad_to_blocks(m.k_branch[:rows], -1)
        qblo, qbhi = (t[:, :, None] for t in _block_min_max(qb))
        kblo, kbhi = (t[:, None, :] for t in _block_min_max(kb))
        any_visible &= ((kblo <= 0) & (kbhi >= 0)) | ((kblo <= qbhi) & (qblo <= kbhi))
        full &= ((kblo == 0) & (kbhi == 0)) | ((qblo == qbhi) & (kblo == kbhi) & (qblo == kblo))
    # The min/max test above is exact for a block holding one run of consecutive positions of one
    # document and branch, and a loose superset where a block straddles runs: a block holding the
    # end of one branch and the start of the next spans the positions of both (and both branches),
    # so it looked visible to nearly every block of the document. Blocks of at most RUNS runs are
    # classified exactly, run by run (a GRPO micro-batch of 8 completions of 1,016 tokens after a
    # 300-token prompt, 66 x 66 blocks: sliding-window layers 474 -> 152 visible blocks, full ones
    # 752 -> 530; each visible block is a block of FlexAttention's work).
    def first_rows(*tensors):
        return [None if t is None else t[:rows] for t in tensors]
    q_runs = _block_runs(*first_rows(m.q_pos, m.q_doc, m.q_branch))
    self_attention = m.k_pos is m.q_pos and m.k_doc is m.q_doc and m.k_branch is m.q_branch  # (no cache)
    k_runs = q_runs if self_attention else _block_runs(*first_rows(m.k_pos, m.k_doc, m.k_branch))
    # Where both blocks hold one run and no padding, the min/max test above is exact already: runs
    # are compared only for pairs with a block of several runs (or a padded one) on either side -
    # the mixed query blocks against every key block, the others against the mixed key blocks - so
    # one document costs no [R, nq, nk, RUNS, RUNS] comparison at all, and no mask costs more than
    # comparing every pair (which a device does: picking blocks there would wait for it).
    def exact(q: dict, k: dict):
        a, f = _runs_visibility(q, k, m.window)
        return a, f & q["whole"][:, :, None] & k["whole"][:, None, :]

    def blocks(runs: dict, index: torch.Tensor) -> dict:
        return {name: None if t is None else t[:, index] for name, t in runs.items()}

    qi, ki = _mixed_blocks(q_runs), _mixed_blocks(k_runs)
    if isinstance(qi, slice) or len(qi) == q_runs["mixed"].shape[1]:
        exact_any, exact_full = exact(q_runs, k_runs)
    else:
        exact_any, exact_full = any_visible.clone(), full.clone()
        if len(qi):
            exact_any[:, qi], exact_full[:, qi] = exact(blocks(q_runs, qi), k_runs)
        if len(ki):
            qn = (~q_runs["mixed"].any(0)).nonzero().squeeze(1)  # (not empty: not every block is mixed)
            a, f = exact(blocks(q_runs, qn), blocks(k_runs, ki))
            exact_any[:, qn[:, None], ki], exact_full[:, qn[:, None], ki] = a, f
    crowded = q_runs["crowded"][:, :, None] | k_runs["crowded"][:, None, :]
    any_visible = torch.where(crowded, any_visible, exact_any)
    full = torch.where(crowded, full, exact_full)
    padded = dict(q_pos=qp, k_pos=kp, q_doc=qd, k_doc=kd, q_branch=qb, k_branch=kb)
    return any_visible & ~full, full, padded


RUNS = 3  # runs per block classified exactly (more: the block keeps the min/max superset)


def _mixed_blocks(runs: dict) -> torch.Tensor | slice:
    """The blocks (indices) whose runs `block_layout` must compare: `mixed` in some row. On a device,
    every block (a slice): picking them there would wait for the device."""
    if runs["mixed"].device.type != "cpu":
        return slice(None)
    return runs["mixed"].any(0).nonzero().squeeze(1)


def _block_runs(pos: torch.Tensor, doc: torch.Tensor | None, branch: torch.Tensor | None) -> dict:
    """Each 128-block of [R, T] tokens as its first RUNS runs (maximal spans of one document and
    branch with consecutive positions, cut at block edges): lo/hi positions, doc, branch, valid,
    each [R, nb, RUNS]; crowded [R, nb] (more runs than RUNS); whole [R, nb] (no padding); mixed
    [R, nb] (more than one run, or padding: where the blocks' minima/maxima may not be exact)."""
    R, T = pos.shape
    nb = -(-T // BLOCK)
    dev = pos.device
    t = torch.arange(T, device=dev)
    start = (t % BLOCK == 0).expand(R, T).clone()
    start[:, 1:] |= pos[:, 1:] != pos[:, :-1] + 1
    for ids in (doc, branch):
        if ids is not None:
            start[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    run = start.cumsum(1) - 1  # [R, T]: the run of each token, counted along its row (< T)
    pos = pos.long()
    lo = torch.zeros((R, T), device=dev, dtype=torch.long).scatter_reduce(1, run, pos, "amin", include_self=False)
    hi = torch.zeros((R, T), device=dev, dtype=torch.long).scatter_reduce(1, run, pos, "amax", include_self=False)
    first = run[:, ::BLOCK]  # [R, nb]
    last = run[:, (torch.arange(nb, device=dev) * BLOCK + BLOCK - 1).clamp(max=T - 1)]
    count = last - first + 1
    slot = first[..., None] + torch.arange(RUNS, device=dev)  # [R, nb, RUNS]
    valid = torch.arange(RUNS, device=dev) < count[..., None]
    index = slot.clamp(max=T - 1).view(R, -1)

    def per_run(values: torch.Tensor) -> torch.Tensor:
        return values.gather(1, index).view(R, nb, RUNS)

    def of_run(ids: torch.Tensor | None) -> torch.Tensor | None:  # every token of a run has the same id
        if ids is None:
            return None
        return torch.zeros((R, T), device=dev, dtype=torch.long).scatter(1, run, ids.long())

    whole = (torch.arange(nb, device=dev) + 1) * BLOCK <= T
    whole = whole.expand(R, nb)
    return dict(lo=per_run(lo), hi=per_run(hi), doc=None if doc is None else per_run(of_run(doc)),
                branch=None if branch is None else per_run(of_run(branch)), valid=valid,
                crowded=count > RUNS, whole=whole, mixed=(count > 1) | ~whole)


def _runs_visibility(q: dict, k: dict, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block pair [R, nq, nk]: whether some (query, key) pair is visible, and whether all are,
    from the blocks' runs (exact: within a run positions are consecutive, doc and branch fixed)."""
    def as_q(x):  # [R, nq, RUNS] -> [R, nq, 1, RUNS, 1]
        return x[:, :, None, :, None]

    def as_k(x):  # [R, nk, RUNS] -> [R, 1, nk, 1, RUNS]
        return x[:, None, :, None, :]

    qlo, qhi, klo, khi = as_q(q["lo"]), as_q(q["hi"]), as_k(k["lo"]), as_k(k["hi"])
    both = as_q(q["valid"]) & as_k(k["valid"])
    some = klo <= qhi
    every = khi <= qlo
    if window is not None:
        some = some & (khi > qlo - window)
        every = every & (klo > qhi - window)
    same = both
    if q["doc"] is not None:
        same = same & (as_q(q["doc"]) == as_k(k["doc"]))
    if q["branch"] is not None:
        kb = as_k(k["branch"])
        same = same & ((kb == 0) | (kb == as_q(q["branch"])))
    return (some & same).any((-2, -1)), (every & same | ~both).all(-1).all(-1)


def _make_mask_mod(q_pos, k_pos, window, q_doc, k_doc, q_branch=None, k_branch=None):
    """mask_mod(b, h, q, kv) over padded [B, Tpad] int32 tensors (rows may be stride-0 views)."""

    def mask_mod(b, h, q_idx, kv_idx):
        qp = q_pos[b, q_idx]
        kp = k_pos[b, kv_idx]
        visible = kp <= qp
        if window is not None:
            visible = visible & (qp - kp < window)
        if q_doc is not None:
            visible = visible & (q_doc[b, q_idx] == k_doc[b, kv_idx])
        if q_branch is not None:
            kb = k_branch[b, kv_idx]
            visible = visible & ((kb == 0) | (kb == q_branch[b, q_idx]))
        return visible

    return mask_mod


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [R, nq, nk] -> (count [R, 1, nq], indices [R, 1, nq, nk]) with the True blocks first."""
    count = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count.unsqueeze(1), order.unsqueeze(1)


def build_block_mask(mask: AttentionMask):
    """The FlexAttention BlockMask of `mask` on its positions' device: tables built from `mask.host`
    on the host when it is given (then copied without waiting), else on the device."""
    from torch.nn.attention.flex_attention import BlockMask

    source = mask if mask.host is None else mask.host
    partial, full, padded = block_layout(source)
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    device, B = mask.q_pos.device, mask.q_pos.shape[0]
    padded = {name: None if t is None else host_to_device(t, device).expand(B, -1) for name, t in padded.items()}
    block_mask = BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK,
        mask_mod=_make_mask_mod(padded["q_pos"], padded["k_pos"], mask.window, padded["q_doc"], padded["k_doc"],
                                padded["q_branch"], padded["k_branch"]),
        seq_lengths=(mask.q_pos.shape[1], mask.k_pos.shape[1]),
    )
    if mask.host is not None:  # (BlockMask.to copies from pageable memory: it would wait for the device)
        block_mask = copy.copy(block_mask)
        for name in BlockMask._TENSOR_ATTRS:
            t = getattr(block_mask, name, None)
            if isinstance(t, torch.Tensor):
                setattr(block_mask, name, host_to_device(t, device))
    return block_mask
