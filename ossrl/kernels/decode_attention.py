"""Decode attention with sinks: one new query token per active sequence, over a slot-indexed KV cache.

For the rollout engine: B active sequences, each in its own cache slot with its own length, one
query token each. A Triton kernel on CUDA (split-K "flash-decoding" plus a combine step that adds
the sink), and `decode_attention_reference`, its plain-PyTorch twin (the CPU path and the oracle).

Cache layout (one pair of tensors per layer; the engine owns them):

    k_cache, v_cache  [slots, S, Hkv, D]   rotated keys and values, S = capacity of a slot
    lengths           [slots] int32        tokens written to each slot, the current one included
    slot_ids          [B] int32            the slot of each active row (rows may be any subset)

    prefix_slot, prefix_len  [slots] int32 (optional) GRPO's n samples of one prompt share its KV:
                             a slot's rows below prefix_len are read from prefix_slot's

A slot sees entries 0 .. min(length, S) - 1. For a full-attention layer S is the maximum sequence
length and token p lives at row p. For a sliding layer S = 128 = the window and token p lives at
row p % 128 (a ring): once a sequence is longer than 128, the ring holds exactly the 128 keys the
window allows (the current one included), and attention is order-free, so no positions are needed.
`append_kv` writes one token per row in either layout. Everything stays on the device (lengths
and slot ids are tensors, the grid depends only on shapes): no host sync, CUDA-graph friendly.

The kernel: grid (B, Hkv, splits). A program loads the G = Hq/Hkv query heads that share one KV
head ([G, D], padded to 16 rows for tl.dot), streams its share of that head's keys once (K/V read
once for all G heads) with an online softmax, and writes an unnormalised partial (acc, max, sum).
The split size is computed in the kernel from the slot's real length, so every split has work
however short the sequence is against S. The combine kernel (grid (B, Hq)) merges the splits and
the sink logit: out = sum_s acc_s e^{m_s - m} / (sum_s l_s e^{m_s - m} + e^{sink - m}).

Shared prefixes (full-attention layers only: a ring overwrites its rows): the n sample slots of a
prompt read the prompt's keys and values from one slot, so a layer's step reads each prompt's KV
once from DRAM and the other n - 1 times from L2 (the programs of a group's slots run side by
side: the grid's fastest index is the row) instead of n copies from DRAM. The arithmetic is the
same, on the same values, so the outputs are the same bits with or without it.
"""

from __future__ import annotations

import functools
import math

import torch

from ossrl.kernels.attention import sink_attention_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the twin is used
    triton = None

LOG2E = math.log2(math.e)


def decode_attention_reference(q, k_cache, v_cache, sinks, slot_ids, lengths, *, scale: float,
                               prefix_slot=None, prefix_len=None) -> torch.Tensor:
    """The twin: q [B, Hq, D]; caches [slots, S, Hkv, D]; slot_ids [B]; lengths [slots]; optional
    prefix_slot, prefix_len [slots] (rows below prefix_len from prefix_slot). -> [B, Hq, D]."""
    S = k_cache.shape[1]
    slot_ids = slot_ids.long()
    k, v = k_cache[slot_ids], v_cache[slot_ids]  # [B, S, Hkv, D]
    rows = torch.arange(S, device=q.device)
    if prefix_slot is not None:
        shared = (rows < prefix_len.long()[slot_ids][:, None])[:, :, None, None]  # [B, S, 1, 1]
        source = prefix_slot.long()[slot_ids]
        k, v = torch.where(shared, k_cache[source], k), torch.where(shared, v_cache[source], v)
    visible = lengths.long()[slot_ids].clamp(max=S)  # [B]
    allowed = rows < visible[:, None]  # [B, S]
    # Rows past the length were never written (any bits, NaN too): zero them, as the kernel never reads them.
    k = k.masked_fill(~allowed[:, :, None, None], 0)
    v = v.masked_fill(~allowed[:, :, None, None], 0)
    return sink_attention_reference(q[:, None], k, v, sinks, allowed[:, None, :], scale=scale)[:, 0]


def append_kv(k_cache, v_cache, k, v, slot_ids, positions) -> None:
    """Write one token per row: k, v [B, Hkv, D] at position positions [B] of slot slot_ids [B].

    Row positions % S, so a cache with S = window is a ring. Does not touch `lengths`. CUDA: one
    Triton launch (`ossrl.kernels.fused.append_kv`); elsewhere the reference.
    """
    if k_cache.is_cuda and triton is not None:
        from ossrl.kernels.fused import append_kv as append_kv_triton

        return append_kv_triton(k_cache, v_cache, k, v, slot_ids, positions)
    return append_kv_reference(k_cache, v_cache, k, v, slot_ids, positions)


def append_kv_reference(k_cache, v_cache, k, v, slot_ids, positions) -> None:
    """`append_kv` in PyTorch (indexing), the oracle of the kernel."""
    S = k_cache.shape[1]
    rows = positions.long() % S
    k_cache[slot_ids.long(), rows] = k
    v_cache[slot_ids.long(), rows] = v


if triton is not None:

    @triton.jit
    def _decode_partial_kernel(
        Q, K, V, SlotIds, Lengths, PrefixSlot, PrefixLen, Acc, Max, Sum, Sinks, Out,
        stride_qb, stride_qh, stride_ob, stride_oh,
        stride_ks, stride_kn, stride_kh,
        stride_vs, stride_vn, stride_vh,
        S, qk_scale,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, SHARED_PREFIX: tl.constexpr = False,
        FINISH: tl.constexpr = False,
    ):
        """One split of one KV head's keys for its G query heads: the unnormalised partial (acc, max,
        sum) for `_decode_combine_kernel`, or with FINISH (one split) the output itself, the sink
        added as the combine adds it (no second launch)."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        Hq = tl.num_programs(1) * G
        slot = tl.load(SlotIds + b).to(tl.int64)
        n = tl.minimum(tl.load(Lengths + slot), S)
        if SHARED_PREFIX:
            prefix_slot = tl.load(PrefixSlot + slot).to(tl.int64)
            prefix_len = tl.load(PrefixLen + slot)
        per_split = tl.cdiv(tl.cdiv(n, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, n)

        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        head = kvh * G + g
        q = tl.load(Q + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + d[None, :],
                    mask=(g < G)[:, None], other=0.0)  # [G_PAD, D]
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        offs = tl.arange(0, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            idx = start + offs
            valid = idx < hi
            if SHARED_PREFIX:  # the prefix's rows from its slot
                source = tl.where(idx < prefix_len, prefix_slot, slot)[:, None]  # [BLOCK_N, 1]
            else:
                source = slot
            k = tl.load(K + source * stride_ks + kvh * stride_kh + idx[:, None] * stride_kn + d[None, :],
                        mask=valid[:, None], other=0.0)
            v = tl.load(V + source * stride_vs + kvh * stride_vh + idx[:, None] * stride_vn + d[None, :],
                        mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # [G_PAD, BLOCK_N], log2 units
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        live = g < G
        if FINISH:  # the combine's arithmetic for a single split, per query head
            sink = tl.load(Sinks + head, mask=live, other=0.0).to(tl.float32) * 1.4426950408889634  # log2(e)
            m_all = tl.maximum(m_i, sink)
            w = tl.exp2(m_i - m_all)  # an empty sequence: exp2(-inf) = 0
            denom = l_i * w + tl.exp2(sink - m_all)
            out = acc * w[:, None] / denom[:, None]
            tl.store(Out + b.to(tl.int64) * stride_ob + head[:, None] * stride_oh + d[None, :],
                     out.to(Out.dtype.element_ty), mask=live[:, None])
        else:
            row = (b * Hq + head) * NUM_SPLITS + split  # [G_PAD]; partials are [B, Hq, NUM_SPLITS, (D)]
            tl.store(Max + row, m_i, mask=live)
            tl.store(Sum + row, l_i, mask=live)
            tl.store(Acc + row[:, None] * D + d[None, :], acc, mask=live[:, None])

    @triton.jit
    def _decode_combine_kernel(
        Acc, Max, Sum, Sinks, Out, stride_ob, stride_oh,
        D: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        Hq = tl.num_programs(1)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, D)
        live = s < NUM_SPLITS
        row = (b * Hq + h) * NUM_SPLITS + s
        m = tl.load(Max + row, mask=live, other=float("-inf"))
        l = tl.load(Sum + row, mask=live, other=0.0)
        acc = tl.load(Acc + row[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        sink = tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634  # log2(e)
        m_all = tl.maximum(tl.max(m, 0), sink)
        w = tl.exp2(m - m_all)  # empty splits: exp2(-inf) = 0
        denom = tl.sum(l * w, 0) + tl.exp2(sink - m_all)
        out = tl.sum(acc * w[:, None], 0) / denom
        tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Caches of at most this many rows a slot take one split where the rule below asks for two: the
# programs then finish the output themselves (no combine launch; at batch 64 the combine is 3.9 us a
# layer, session 13's profile), at the price of each program reading twice the keys. 0: off. 2048 since
# session 19 (H100, with COMBINE_PARTS, benchmarks/results/profile_decode_launches_s19_h100.txt): a
# batch-64 decode step's graph replays in 7.24 ms against 7.33 with COMBINE_PARTS alone and 7.36
# without either (359 kernels against 383 and 407); batch 1 2.74 against 2.75 and 2.77 ms. Longer
# caches keep two splits (at 64 x 8K one split read at 88% of copy bandwidth against 98% with two).
ONE_SPLIT_MAX_CAPACITY = 2048


def default_num_splits(batch: int, kv_heads: int, capacity: int, block_n: int, device) -> int:
    """Enough (B x Hkv x splits) programs to cover the GPU about four times over (shape-only); one
    where that asks for two and the cache holds at most ONE_SPLIT_MAX_CAPACITY rows a slot."""
    want = -(-4 * _sm_count(torch.device(device).index or 0) // (batch * kv_heads))
    if want == 2 and capacity <= ONE_SPLIT_MAX_CAPACITY:
        want = 1
    return max(1, min(want, -(-capacity // block_n), 128))


def _decode_triton(q, k_cache, v_cache, sinks, slot_ids, lengths, *, scale, prefix_slot=None, prefix_len=None,
                   num_splits=None, block_n=32, num_warps=4, num_stages=2):  # best of a sweep on H100 (benchmarks/attention.py)
    B, Hq, D = q.shape
    slots, S, Hkv, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape or Hq % Hkv:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)} (want [B, Hq, D] and [slots, S, Hkv, D], Hq % Hkv == 0)")
    if D & (D - 1) or D < 16:
        raise ValueError(f"decode_attention: head_dim must be a power of two >= 16, got {D}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: q and the caches need a contiguous last dimension")
    G = Hq // Hkv
    splits = num_splits or default_num_splits(B, Hkv, S, block_n, q.device)
    finish = splits == 1  # one split: its programs write the output (no partials, no combine launch)
    out = torch.empty_like(q)
    if finish:
        acc = mx = sm = out  # (not read or written)
    else:
        acc = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
        mx = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
        sm = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
    shared = prefix_slot is not None
    _decode_partial_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, slot_ids, lengths, prefix_slot if shared else lengths, prefix_len if shared else lengths,
        acc, mx, sm, sinks, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        S, scale * LOG2E,
        G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=block_n, NUM_SPLITS=splits,
        SHARED_PREFIX=shared, FINISH=finish, num_warps=num_warps, num_stages=num_stages,
    )
    if not finish:
        _decode_combine_kernel[(B, Hq)](
            acc, mx, sm, sinks, out, out.stride(0), out.stride(1),
            D=D, NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), num_warps=1,
        )
    return out


def decode_attention(q, k_cache, v_cache, sinks, slot_ids, lengths, *, scale: float, prefix_slot=None,
                     prefix_len=None, **kernel_options) -> torch.Tensor:
    """Sink attention of one query token per row over its slot (layout: module docstring).

    q [B, Hq, D]; k_cache, v_cache [slots, S, Hkv, D]; sinks [Hq]; slot_ids [B] int32; lengths
    [slots] int32; prefix_slot, prefix_len [slots] int32 or None (shared prefixes: only for a cache
    that is not a ring, whose prompt rows no later token overwrites; the caller's to know, as
    `KVPool.shares`). Returns [B, Hq, D] in q's dtype. CUDA: the Triton kernel (kernel_options:
    num_splits, block_n, num_warps, num_stages); elsewhere the twin.
    """
    if (prefix_slot is None) != (prefix_len is None):
        raise ValueError("decode_attention: give prefix_slot and prefix_len together")
    if q.is_cuda and triton is not None:
        return _decode_triton(q, k_cache, v_cache, sinks, slot_ids, lengths, scale=scale, prefix_slot=prefix_slot,
                              prefix_len=prefix_len, **kernel_options)
    return decode_attention_reference(q, k_cache, v_cache, sinks, slot_ids, lengths, scale=scale,
                                      prefix_slot=prefix_slot, prefix_len=prefix_len)
