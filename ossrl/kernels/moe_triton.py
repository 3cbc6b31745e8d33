"""Triton grouped expert matmuls for routed MoE: bf16 or native MXFP4 weights, forward and input gradient.

Imported only on CUDA (through `ossrl.kernels.moe.routed_experts`); its twin and oracle is
`ossrl.kernels.moe.routed_experts_twin`. One kernel, `_moe_matmul`, does every grouped product
C[rows of expert e] = A[rows] @ B_e over the slots sorted by expert:

    forward   gate_up: a = swiglu(x[token] @ W1_e + b1_e + lora_z)   (gather, bias, SwiGLU fused)
              down:    buf[slot] = w_slot * (a @ W2_e + b2_e + lora_y) (bias, weight, scatter fused)
    backward  down:    dA = dout[token] @ W2_e^T                       (gather fused)
              gate_up: dxs[slot] = dz @ W1_e^T                         (scatter fused)

Each program owns one tile of BM sorted rows of a single expert (a device-side tile table,
built without host syncs) and BN output columns, so a routed expert's weights are read once per
row tile and unrouted experts are never read. MXFP4 tiles are decoded in registers (E2M1 codes
by bit arithmetic, packed PTX on sm_90; E8M0 scale by exponent bits); the forward reads W[out, in]
rows (blocks run along the contraction), the backward reads the same bytes as W^T (blocks run
along the output columns). At decode sizes the forward reads the codes as 32-bit words and
permutes K inside 32-blocks so that they decode straight into the wgmma's register operand
(`mxfp4_words`, `TileConfig.words`). At training sizes each projection is instead decoded once per call to
a transient bf16 copy (`dequantize_experts`) that the dense path reads. The k-sum per token is a deterministic reduction
of the [N, k, H] slot buffer (no atomics).

The base weights and biases get no gradients (frozen). LoRA's B products run in the epilogues
from the rank-r intermediate u and B_e, with no [slots, out] delta written and read back: in
training (`TRAINING_LORA_EPILOGUE`; `_GateUpLoRA` / `_DownLoRA` return du and dB from dz and
w*dout) and in rollouts (`_routed_experts_lora_epilogue`, without autograd). With the switch off,
training adds precomputed `lora_z` / `lora_y` deltas as an extra epilogue input instead.
`FUSED_SWIGLU_BACKWARD` (off until measured) folds the down LoRA A path's input gradient into the
SwiGLU's backward kernel (`_DownLoRAToZ`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import torch
import triton
import triton.language as tl

from ossrl.kernels.fused import SMALL_GROUP_MAX_SLOTS, SlotGrouping, group_small
from ossrl.kernels.moe import (
    TOKEN_LORA_MAX_COLUMNS, ExpertGroups, ExpertWeights, all_experts_A, group_by_expert, grouped_lora_delta,
    grouped_product, grouped_weight_grad, lora_input, scaled, token_lora_delta,
)
from ossrl.kernels.moe_gemv import gemv_ok, routed_experts_gemv
from ossrl.kernels.moe_tiles import TileConfig, default_config  # noqa: F401 (default_config: swapped by benchmarks)
from ossrl.kernels.mxfp4_triton import (
    dequantize_experts, mxfp4_pairs, mxfp4_tile, mxfp4_words, permute_k32, permute_k32_rows, ptx_decode,
    word_asm_pairs_halves,
)


@triton.jit
def _moe_matmul(
    a_ptr, a_rows_ptr, stride_am,
    b_ptr, scales_ptr, stride_be, stride_b1, stride_b2, stride_se, stride_srow,
    bias_ptr, stride_bias, extra_ptr, stride_xm,
    route_w_ptr, slot_ptr, c_ptr, stride_cm, z_ptr, stride_zm, dw_ptr,
    lu_ptr, stride_lu, lu_col_e, lb_ptr, stride_lbe, stride_lbr,
    tile_expert_ptr, tile_start_ptr, offsets_ptr,
    parts_ptr, stride_part, stride_prow, counter_ptr,
    num_tiles, N, K, limit, alpha,
    MXFP4: tl.constexpr, B_ROWS_ARE_N: tl.constexpr, GATHER_A: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_EXTRA: tl.constexpr, SWIGLU: tl.constexpr, STORE_Z: tl.constexpr,
    ROUTE_WEIGHT: tl.constexpr, SCATTER_C: tl.constexpr, DW_EPILOGUE: tl.constexpr, DOT_SCALED: tl.constexpr,
    SWAP_AB: tl.constexpr, PACKED: tl.constexpr, PTX: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    LORA_R: tl.constexpr = 0, LORA_RP: tl.constexpr = 16, LORA_BY_TOKEN: tl.constexpr = False,
    WORDS: tl.constexpr = False, EVEN_K: tl.constexpr = False, FOLD: tl.constexpr = False,
    SCALES_AHEAD: tl.constexpr = 1, A_PERMUTED: tl.constexpr = False, TILE_R: tl.constexpr = 0,
    TILE_W: tl.constexpr = 0, FIXUP: tl.constexpr = False,
):
    # Grouped launch order: GROUP_M row tiles (mostly one expert) sweep the N tiles together;
    # with SPLIT_K > 1 the K range is cut in SPLIT_K parts (adjacent programs), each storing its fp32
    # partial product to parts[part, pos] (decode: more programs, shorter loops). Their sum and the
    # epilogue then run in `_split_k_epilogue`, or (FIXUP) in the tile's last part to finish: each
    # part counts itself in counter[tile] once its partial is stored, and the one that counts last
    # sums the SPLIT_K partials in part order (the same bits as `_split_k_epilogue`) and resets the
    # counter for the next launch (a CUDA graph replays with the counters as they were left: zero).
    pid = tl.program_id(0)
    part = pid % SPLIT_K
    pid = pid // SPLIT_K
    num_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:  # the tile table is sized for the worst case; spare tiles exit
        return
    start = tl.load(tile_start_ptr + pid_m)
    end = tl.load(offsets_ptr + e + 1)
    pos = start + tl.arange(0, BM)  # sorted positions
    m_mask = pos < end
    if GATHER_A:
        a_rows = tl.load(a_rows_ptr + pos, mask=m_mask, other=0)
    else:
        a_rows = pos
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BK)
    e64 = e.to(tl.int64)
    a_base = a_ptr + a_rows[:, None].to(tl.int64) * stride_am
    b_base = b_ptr + e64 * stride_be
    if SWAP_AB:  # C^T = W a^T: the decoded weights are the MMA's first operand, kept in registers
        acc_t = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_tiles = tl.cdiv(K, BK)
    per_part = tl.cdiv(k_tiles, SPLIT_K)
    if SWAP_AB and WORDS:
        # The scales tile is a plain load (Triton's pipeliner stages only the words and the
        # activations), so it is loaded ahead of its use by hand, else its latency would be
        # exposed every iteration: one iteration ahead (s_next), or two (SCALES_AHEAD = 2: a ring
        # [BN, BK/32, 2] of the next two tiles, one value carried through the loop, which keeps
        # the loop pipelined where two carried tiles handed from one to the other did not).
        groups = tl.arange(0, BK // 32)
        s_rows = scales_ptr + e64 * stride_se + offs_n[:, None] * stride_srow
        s_next = _scales_tile(s_rows, part * per_part, groups, n_mask, K, BK)
        if SCALES_AHEAD == 2:
            s_next = tl.join(s_next, _scales_tile(s_rows, part * per_part + 1, groups, n_mask, K, BK))
    for kt in range(part * per_part, tl.minimum(k_tiles, (part + 1) * per_part)):
        k0 = kt * BK
        kk = k0 + offs_k
        k_mask = kk < K
        if SWAP_AB and WORDS:  # MXFP4 forward, codes as 32-bit words, K permuted inside 32-blocks alike
            if SCALES_AHEAD == 2:
                sc, later = tl.split(s_next)
                s_next = tl.join(later, _scales_tile(s_rows, kt + 2, groups, n_mask, K, BK))
            else:
                sc = s_next
                s_next = _scales_tile(s_rows, kt + 1, groups, n_mask, K, BK)
            if EVEN_K:
                a = tl.load(a_base + kk[None, :], mask=m_mask[:, None], other=0.0)
            else:
                a = tl.load(a_base + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = mxfp4_words(b_base, offs_n, n_mask, k0, K, stride_b1, sc, BN, BK, PTX, EVEN_K, FOLD, TILE_R, TILE_W)
            if A_PERMUTED:  # a's columns are in the decode's order already: the staged tile feeds the MMA
                acc_t = tl.dot(w.to(a.dtype), tl.trans(a), acc_t)
            else:
                acc_t = tl.dot(w.to(a.dtype), tl.trans(permute_k32(a, BM, BK)), acc_t)
        elif SWAP_AB and PACKED:  # MXFP4 forward, own packed decode: even and odd input columns apart
            a = tl.load(a_base + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            a_even, a_odd = tl.split(a.reshape(BM, BK // 2, 2))
            w_lo, w_hi = mxfp4_pairs(b_base, scales_ptr + e64 * stride_se, offs_n, n_mask, k0, K,
                                      stride_b1, stride_srow, BN, BK, PTX)
            acc_t = tl.dot(w_lo.to(a.dtype), tl.trans(a_even), acc_t)
            acc_t = tl.dot(w_hi.to(a.dtype), tl.trans(a_odd), acc_t)
        elif SWAP_AB:  # MXFP4 forward with our own decode, a [BK, BM] loaded transposed
            at = tl.load(a_ptr + a_rows[None, :].to(tl.int64) * stride_am + kk[:, None],
                         mask=m_mask[None, :] & k_mask[:, None], other=0.0)
            w = mxfp4_tile(b_base, scales_ptr + e64 * stride_se, offs_n, n_mask, k0, K,
                            stride_b1, stride_srow, BN, BK)
            acc_t = tl.dot(w.to(at.dtype), at, acc_t)
        else:
            a = tl.load(a_base + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if MXFP4 and DOT_SCALED:  # forward only: Triton's own e2m1 upcast, scales along K
                bcols = k0 // 2 + tl.arange(0, BK // 2)
                wq = tl.load(b_base + offs_n[:, None] * stride_b1 + bcols[None, :],
                             mask=n_mask[:, None] & (bcols[None, :] < K // 2), other=0)  # [BN, BK/2] uint8
                groups = k0 // 32 + tl.arange(0, BK // 32)
                ws = tl.load(scales_ptr + e64 * stride_se + offs_n[:, None] * stride_srow + groups[None, :],
                             mask=n_mask[:, None] & (groups[None, :] < K // 32), other=0)  # [BN, BK/32]
                acc = tl.dot_scaled(a, None, "bf16", tl.trans(wq), ws, "e2m1", acc)
            elif MXFP4 and B_ROWS_ARE_N and PACKED:  # forward, packed decode: even and odd input columns apart
                a_even, a_odd = tl.split(a.reshape(BM, BK // 2, 2))
                w_lo, w_hi = mxfp4_pairs(b_base, scales_ptr + e64 * stride_se, offs_n, n_mask, k0, K,
                                          stride_b1, stride_srow, BN, BK, PTX)
                acc = tl.dot(a_even, tl.trans(w_lo.to(a.dtype)), acc)
                acc = tl.dot(a_odd, tl.trans(w_hi.to(a.dtype)), acc)
            else:
                if not MXFP4:
                    w = tl.load(b_base + kk[:, None] * stride_b1 + offs_n[None, :] * stride_b2,
                                mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                elif B_ROWS_ARE_N:  # forward: stored [N (out), K (in)], decode [BN, BK] then transpose
                    w = mxfp4_tile(b_base, scales_ptr + e64 * stride_se, offs_n, n_mask, k0, K,
                                    stride_b1, stride_srow, BN, BK)
                    w = tl.trans(w.to(a.dtype))
                else:  # backward: stored [K (out), N (in)], decode [BK, BN] directly
                    w = mxfp4_tile(b_base, scales_ptr + e64 * stride_se, kk, k_mask, pid_n * BN, N,
                                    stride_b1, stride_srow, BK, BN).to(a.dtype)
                acc = tl.dot(a, w, acc)
    if SWAP_AB:
        acc = tl.trans(acc_t)
    lu_rows = a_rows if LORA_BY_TOKEN else pos
    if SPLIT_K > 1:  # the fp32 partials [SPLIT_K, sorted rows, N]
        mn_mask = m_mask[:, None] & n_mask[None, :]
        ptrs = parts_ptr + pos[:, None].to(tl.int64) * stride_prow + offs_n[None, :]
        tl.store(ptrs + part.to(tl.int64) * stride_part, acc, mask=mn_mask)
        if FIXUP:
            tl.debug_barrier()  # every thread's partial stored before the count releases them
            arrived = tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                tl.store(counter_ptr + pid, 0)
                acc = _sum_parts(ptrs, mn_mask, stride_part, SPLIT_K, ".cg")  # from L2: other SMs' stores
                _epilogue(acc, e64, pos, m_mask, offs_n, n_mask, pid_n, N, bias_ptr, stride_bias, extra_ptr,
                          stride_xm, route_w_ptr, slot_ptr, c_ptr, stride_cm, z_ptr, stride_zm, dw_ptr, limit,
                          alpha, lu_ptr, lu_rows, stride_lu, lu_col_e, lb_ptr, stride_lbe, stride_lbr,
                          HAS_BIAS, HAS_EXTRA, SWIGLU, STORE_Z, ROUTE_WEIGHT, SCATTER_C, False, BM, BN,
                          LORA_R, LORA_RP)
    else:
        _epilogue(acc, e64, pos, m_mask, offs_n, n_mask, pid_n, N, bias_ptr, stride_bias, extra_ptr, stride_xm,
                  route_w_ptr, slot_ptr, c_ptr, stride_cm, z_ptr, stride_zm, dw_ptr, limit, alpha,
                  lu_ptr, lu_rows, stride_lu, lu_col_e, lb_ptr, stride_lbe, stride_lbr,
                  HAS_BIAS, HAS_EXTRA, SWIGLU, STORE_Z, ROUTE_WEIGHT, SCATTER_C, DW_EPILOGUE, BM, BN,
                  LORA_R, LORA_RP)


@triton.jit
def _sum_parts(ptrs, mask, stride_part, SPLIT_K: tl.constexpr, MODIFIER: tl.constexpr):
    """The SPLIT_K fp32 partials at ptrs + part * stride_part summed in part order (fixed: the same
    bits on every run, in either place the sum runs), by a running 64-bit pointer (part * stride_part
    may pass 2^31)."""
    acc = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=MODIFIER)
    for _ in range(1, SPLIT_K):
        ptrs += stride_part
        acc += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=MODIFIER)
    return acc


@triton.jit
def _scales_tile(s_rows, kt, groups, n_mask, K, BK: tl.constexpr):
    """The [BN, BK/32] E8M0 scales of K tile `kt` (zeros past K: the tiles after the last)."""
    g = kt * (BK // 32) + groups
    return tl.load(s_rows + g[None, :], mask=n_mask[:, None] & (g[None, :] < K // 32), other=0)


@triton.jit
def _split_k_epilogue(
    parts_ptr, stride_part, stride_prow, bias_ptr, stride_bias, extra_ptr, stride_xm,
    route_w_ptr, slot_ptr, c_ptr, stride_cm, z_ptr, stride_zm,
    lu_ptr, lora_rows_ptr, stride_lu, lu_col_e, lb_ptr, stride_lbe, stride_lbr,
    tile_expert_ptr, tile_start_ptr, offsets_ptr, N, limit, alpha,
    HAS_BIAS: tl.constexpr, HAS_EXTRA: tl.constexpr, SWIGLU: tl.constexpr, STORE_Z: tl.constexpr,
    ROUTE_WEIGHT: tl.constexpr, SCATTER_C: tl.constexpr, SPLIT_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    LORA_R: tl.constexpr = 0, LORA_RP: tl.constexpr = 16, LORA_BY_TOKEN: tl.constexpr = False,
):
    """The sum of `_moe_matmul`'s SPLIT_K fp32 partials (in a fixed order: deterministic), then its epilogue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:
        return
    start = tl.load(tile_start_ptr + pid_m)
    end = tl.load(offsets_ptr + e + 1)
    pos = start + tl.arange(0, BM)
    m_mask = pos < end
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    ptrs = parts_ptr + pos[:, None].to(tl.int64) * stride_prow + offs_n[None, :]
    mn_mask = m_mask[:, None] & n_mask[None, :]
    acc = _sum_parts(ptrs, mn_mask, stride_part, SPLIT_K, "")
    if LORA_BY_TOKEN:
        lu_rows = tl.load(lora_rows_ptr + pos, mask=m_mask, other=0)
    else:
        lu_rows = pos
    _epilogue(acc, e.to(tl.int64), pos, m_mask, offs_n, n_mask, pid_n, N, bias_ptr, stride_bias, extra_ptr,
              stride_xm, route_w_ptr, slot_ptr, c_ptr, stride_cm, z_ptr, stride_zm, c_ptr, limit, alpha,
              lu_ptr, lu_rows, stride_lu, lu_col_e, lb_ptr, stride_lbe, stride_lbr,
              HAS_BIAS, HAS_EXTRA, SWIGLU, STORE_Z, ROUTE_WEIGHT, SCATTER_C, False, BM, BN, LORA_R, LORA_RP)


@triton.jit
def _epilogue(acc, e64, pos, m_mask, offs_n, n_mask, pid_n, N, bias_ptr, stride_bias, extra_ptr, stride_xm,
              route_w_ptr, slot_ptr, c_ptr, stride_cm, z_ptr, stride_zm, dw_ptr, limit, alpha,
              lu_ptr, lu_rows, stride_lu, lu_col_e, lb_ptr, stride_lbe, stride_lbr,
              HAS_BIAS: tl.constexpr, HAS_EXTRA: tl.constexpr, SWIGLU: tl.constexpr, STORE_Z: tl.constexpr,
              ROUTE_WEIGHT: tl.constexpr, SCATTER_C: tl.constexpr, DW_EPILOGUE: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, LORA_R: tl.constexpr, LORA_RP: tl.constexpr):
    """Bias, LoRA term, z store, SwiGLU, routing weight and scatter of one fp32 [BM, BN] tile.

    The LoRA term is either a precomputed [rows, N] delta (HAS_EXTRA: training with
    TRAINING_LORA_EPILOGUE off) or, with LORA_R > 0 (training and rollouts), computed here from the
    rank-r intermediate u (row lu_rows, columns from e * lu_col_e) and expert e's B [r, N]: no
    [rows, N] delta is written or read, and no launch computes it."""
    mn_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e64 * stride_bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_EXTRA:
        acc += tl.load(extra_ptr + pos[:, None].to(tl.int64) * stride_xm + offs_n[None, :],
                       mask=mn_mask, other=0.0).to(tl.float32)
    if LORA_R > 0:  # ranks below 16 are zero-padded to the MMA's smallest K
        rr = tl.arange(0, LORA_RP)
        r_mask = rr < LORA_R
        u = tl.load(lu_ptr + lu_rows[:, None].to(tl.int64) * stride_lu + e64 * lu_col_e + rr[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        lb = tl.load(lb_ptr + e64 * stride_lbe + rr[:, None] * stride_lbr + offs_n[None, :],
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(u, lb.to(u.dtype))
    if STORE_Z:
        tl.store(z_ptr + pos[:, None].to(tl.int64) * stride_zm + offs_n[None, :],
                 acc.to(z_ptr.dtype.element_ty), mask=mn_mask)
    if SWIGLU:  # columns interleave (gate, up); output column j = pair j
        gate, up = tl.split(acc.reshape(BM, BN // 2, 2))
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        out = gate * tl.sigmoid(gate * alpha) * (up + 1.0)
        offs_o = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        tl.store(c_ptr + pos[:, None].to(tl.int64) * stride_cm + offs_o[None, :],
                 out.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_o[None, :] < N // 2))
    else:
        rows = pos
        if ROUTE_WEIGHT or SCATTER_C:
            slot = tl.load(slot_ptr + pos, mask=m_mask, other=0)
            if SCATTER_C:
                rows = slot
            if DW_EPILOGUE:  # d w_slot += <a_slot, acc> over this tile's columns (extra_ptr holds a)
                a_t = tl.load(extra_ptr + pos[:, None].to(tl.int64) * stride_xm + offs_n[None, :],
                              mask=mn_mask, other=0.0).to(tl.float32)
                tl.atomic_add(dw_ptr + pos, tl.sum(a_t * acc, axis=1), mask=m_mask)
            if ROUTE_WEIGHT:
                acc = acc * tl.load(route_w_ptr + slot, mask=m_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(c_ptr + rows[:, None].to(tl.int64) * stride_cm + offs_n[None, :],
                 acc.to(c_ptr.dtype.element_ty), mask=mn_mask)


@dataclass
class _Plan:
    """Everything both autograd functions need about one call (not tensors autograd tracks)."""

    groups: ExpertGroups
    experts: ExpertWeights
    num_tokens: int
    config: TileConfig
    tables: dict = field(default_factory=dict)  # BM -> (tile_expert, tile_start, num_tiles)

    def tiles(self, BM: int):
        """Row tiles of BM sorted slots, each inside one expert: [T] expert (-1 spare), [T] start."""
        if BM not in self.tables:
            g = self.groups
            E, S = self.experts.num_experts, g.order.numel()
            counts = g.counts
            per = (counts + BM - 1) // BM
            ends = torch.cumsum(per, 0)
            num_tiles = triton.cdiv(S, BM) + min(E, S)  # upper bound, no host sync
            t = torch.arange(num_tiles, device=counts.device)
            e = torch.searchsorted(ends, t, right=True)
            ec = e.clamp(max=E - 1)
            start = g.offsets[ec] + (t - (ends - per)[ec]) * BM
            expert = torch.where(e < E, ec, -1).to(torch.int32)
            self.tables[BM] = (expert, start.to(torch.int32), num_tiles)
        return self.tables[BM]


@dataclass(frozen=True)
class _LoRATerm:
    """A LoRA term the epilogue computes: u @ B[e] for a row, u [rows, *] (the row's token when
    `by_token`, else its sorted position; expert e's r columns from e * col_e) and B [E, r, N]."""

    u: torch.Tensor
    B: torch.Tensor
    by_token: bool
    col_e: int


# Split-K tiles finish in their last part (`_moe_matmul`'s FIXUP) or in a second launch
# (`_split_k_epilogue`): None takes each tile's `TileConfig.fixup`; True / False force one way for
# every split tile (benchmarks/moe.py --tiled and the benchmarks' --split-k-fixup switch time both).
# The counters are one buffer per device: split MoE launches finishing in their last part must not
# run on two streams of one device at once (nothing in ossrl does; the rollout engine uses one).
SPLIT_K_FIXUP: bool | None = None
_COUNTERS: dict = {}  # device -> [int32 arrival counters], zero between launches (each launch leaves them so)


def _split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters for `tiles` output tiles on `device`: the device's newest buffer,
    or a larger one when a launch needs more. Buffers are never freed (captured CUDA graphs keep
    the address they were captured with, and their counters stay consistent: zero after each
    launch). Allocated outside graph capture in practice: the engine's warm-up steps run each
    bucket's launches first, and the first buffer holds 64K tiles (a 20b gate_up at 64 tokens
    needs 4,320)."""
    buffers = _COUNTERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < tiles:
        buffers.append(torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device))
    return buffers[-1]


def _launch(plan: _Plan, a, b, scales, N, K, c, *, b_rows_are_n, a_rows=None, bias=None, extra=None,
            route_w=None, scatter=False, z=None, swiglu=False, dw=None, lora: _LoRATerm | None = None,
            config: TileConfig | None = None, b_tiled=None, b_dense=None, keep_parts: bool = False):
    """c = epilogue(a[rows] @ B_e) over every row tile; see `_moe_matmul` for the flags. b_tiled: b
    in the experts' tile-contiguous layout (`ExpertWeights.tiled`), which the word decode reads;
    b_dense: b decoded once (`ExpertWeights.gate_up_dense`), read where a tile would decode a copy.
    keep_parts: where the tile splits K and would finish in a second launch, return the fp32
    partials [split, sorted rows, N] instead (the caller runs the epilogue: `_combine_parts`)."""
    cfg = config or plan.config
    tile_expert, tile_start, num_tiles = plan.tiles(cfg.BM)
    words = scales is not None and b_rows_are_n and cfg.swap_ab and cfg.words and _word_layout_ok(cfg, a)
    a_in, b_in, scales_in = a, b, scales  # as called (a rerun with the pair decode starts from them)
    a_permuted = words and cfg.permuted_input and K % 32 == 0 and a.shape[-1] == K
    if a_permuted:  # [rows, K] with each 32-block in the decode's order: position 8m + 2q + h <- 8q + m + 4h
        a = permute_k32_rows(a)
    if scales is not None and cfg.dequant and not words:  # compute-bound sizes: the decode once, not per
        # row tile (a word forward decodes in registers), or none where the experts keep a copy
        b = b_dense if b_dense is not None and b_dense.dtype == a.dtype else dequantize_experts(b, scales, a.dtype)
        scales = None
    mxfp4 = scales is not None
    # the tile-contiguous copy (rollouts), where the word decode's K tile divides its chunks
    tiled = plan.experts.tiled if words and b_tiled is not None and plan.experts.tiled[1] % (cfg.BK // 8) == 0 \
        else None
    if tiled:
        b = b_tiled
    if words:  # [E, out, in/32, 16] bytes as [E, out, in/8] int32 words (strides in words)
        if b.stride(-1) != 1 or b.stride(1) % 16:
            raise ValueError(f"MXFP4 blocks must be contiguous rows of 16-byte blocks, got strides {b.stride()}")
        b = b.view(torch.int32)
    if mxfp4:
        stride_b1, stride_b2 = b.stride(1), 0
        stride_se, stride_srow = scales.stride(0), scales.stride(1)
    else:  # dense [E, in, out]: forward walks (in, out), backward (out, in)
        stride_b1, stride_b2 = (b.stride(1), b.stride(2)) if b_rows_are_n else (b.stride(2), b.stride(1))
        stride_se = stride_srow = 0
    dummy = c
    limit, alpha = float(plan.experts.limit), float(plan.experts.alpha)
    split = cfg.split_k if dw is None else 1  # the d(routing weight) epilogue needs whole sums
    epilogue = dict(HAS_BIAS=bias is not None, HAS_EXTRA=extra is not None and dw is None, SWIGLU=swiglu,
                    STORE_Z=z is not None, ROUTE_WEIGHT=route_w is not None, SCATTER_C=scatter)
    r = lora.B.shape[1] if lora is not None else 0
    no_lora = (dummy, 0, 0, dummy, 0, 0)
    lora_args = (lora.u, lora.u.stride(0), lora.col_e, lora.B, lora.B.stride(0), lora.B.stride(1)) \
        if lora is not None else no_lora
    lora_flags = dict(LORA_R=r, LORA_RP=max(16, triton.next_power_of_2(r)) if r else 16,
                      LORA_BY_TOKEN=lora is not None and lora.by_token)
    tiles = num_tiles * triton.cdiv(N, cfg.BN)
    parts, counters = dummy, dummy
    fixup = split > 1 and (cfg.fixup if SPLIT_K_FIXUP is None else SPLIT_K_FIXUP)
    if split > 1:  # fp32 partials [split, sorted rows, N], summed by the last part (fixup) or `_split_k_epilogue`
        parts = torch.empty(split, plan.groups.order.numel(), N, device=a.device, dtype=torch.float32)
        if fixup:
            counters = _split_counters(a.device, tiles)
    grid = (tiles * split,)
    fused = split == 1 or fixup  # the epilogue runs in this kernel
    kernel = _moe_matmul[grid](
        a, a_rows if a_rows is not None else dummy, a.stride(0),
        b, scales if mxfp4 else dummy, b.stride(0), stride_b1, stride_b2, stride_se, stride_srow,
        bias if bias is not None else dummy, bias.stride(0) if bias is not None else 0,
        extra if extra is not None else dummy, extra.stride(0) if extra is not None else 0,
        route_w if route_w is not None else dummy, plan.groups.order,
        c, c.stride(0), z if z is not None else dummy, z.stride(0) if z is not None else 0,
        dw if dw is not None else dummy, *(lora_args if fused else no_lora),
        tile_expert, tile_start, plan.groups.offsets,
        parts, parts.stride(0) if split > 1 else 0, parts.stride(1) if split > 1 else 0, counters,
        num_tiles, N, K, limit, alpha,
        MXFP4=mxfp4, B_ROWS_ARE_N=b_rows_are_n, GATHER_A=a_rows is not None,
        **(epilogue if fused else {k: False for k in epilogue}),
        DW_EPILOGUE=dw is not None, DOT_SCALED=mxfp4 and b_rows_are_n and cfg.dot_scaled and not cfg.swap_ab,
        SWAP_AB=mxfp4 and b_rows_are_n and cfg.swap_ab, PACKED=cfg.packed, PTX=ptx_decode(a), WORDS=words,
        EVEN_K=words and K % cfg.BK == 0, FOLD=words and plan.experts.scales_fold,
        SCALES_AHEAD=cfg.scales_ahead if words else 1, A_PERMUTED=a_permuted,
        TILE_R=tiled[0] if tiled else 0, TILE_W=tiled[1] if tiled else 0,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, SPLIT_K=split, FIXUP=fixup,
        **(lora_flags if fused else {}), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}),
    )
    if words and _asm_layout_matters(a) and not _word_kernel_ok(kernel):  # (this Triton laid it out otherwise)
        _WORDS_REFUSED.add((cfg, a.dtype))
        warnings.warn(f"the MXFP4 word decode's asm pairs other elements than it assumes in this Triton's "
                      f"layout for {cfg}; running the pair decode instead", RuntimeWarning, stacklevel=2)
        return _launch(plan, a_in, b_in, scales_in, N, K, c, b_rows_are_n=b_rows_are_n, a_rows=a_rows, bias=bias,
                       extra=extra, route_w=route_w, scatter=scatter, z=z, swiglu=swiglu, dw=dw, lora=lora,
                       config=replace(cfg, words=False), b_tiled=b_tiled, b_dense=b_dense, keep_parts=keep_parts)
    if not fused and keep_parts:
        return parts
    if not fused:
        _split_k_epilogue[(num_tiles, triton.cdiv(N, cfg.BN))](
            parts, parts.stride(0), parts.stride(1),
            bias if bias is not None else dummy, bias.stride(0) if bias is not None else 0,
            extra if extra is not None else dummy, extra.stride(0) if extra is not None else 0,
            route_w if route_w is not None else dummy, plan.groups.order,
            c, c.stride(0), z if z is not None else dummy, z.stride(0) if z is not None else 0,
            lora_args[0], a_rows if a_rows is not None else dummy, *lora_args[1:],
            tile_expert, tile_start, plan.groups.offsets, N, limit, alpha,
            **epilogue, SPLIT_K=split, BM=cfg.BM, BN=cfg.BN, **lora_flags, num_warps=4,
        )
    return c


def _word_layout_ok(cfg: TileConfig, a: torch.Tensor) -> bool:
    """Whether the word decode may run for this tile and input. Its PTX pairs the two elements of
    each packed register as halves h = 0, 1 of one word, which holds in the bf16 wgmma operand
    layout Triton gives it at BN a multiple of 64 and whole warpgroups (compile-checked in
    tests/test_kernels_interpreter.py); elsewhere (BN = 32 or 2 warps: mma.sync; fp32 inputs: the
    tf32 layout) the pairs are other elements, so those run the pair decode. Each compiled kernel
    is checked once more after its first launch (`_word_kernel_ok`: another Triton may lay it out
    otherwise). The arithmetic decode (no PTX) has no such constraint."""
    if not _asm_layout_matters(a):
        return True
    return word_pairs_ok(cfg, a.dtype) and (cfg, a.dtype) not in _WORDS_REFUSED


def _asm_layout_matters(a: torch.Tensor) -> bool:
    """Whether the word decode runs its PTX (whose pairing depends on the layout) for inputs like a."""
    return ptx_decode(a)


_WORDS_REFUSED: set = set()  # (TileConfig, dtype) whose compiled word kernel failed `_word_kernel_ok`
_WORD_KERNELS_OK: dict = {}  # compiled kernel hash -> `word_asm_pairs_halves` of its TTGIR


def _word_kernel_ok(kernel) -> bool:
    """`word_asm_pairs_halves` of a compiled kernel, read once per compiled variant (host-side
    text). A launcher that returns no TTGIR leaves the static rule (`word_pairs_ok`) to decide."""
    ttgir = getattr(kernel, "asm", {}).get("ttgir")
    if not isinstance(ttgir, str):
        return True
    key = getattr(kernel, "hash", ttgir)
    if key not in _WORD_KERNELS_OK:
        _WORD_KERNELS_OK[key] = word_asm_pairs_halves(ttgir)
    return _WORD_KERNELS_OK[key]


def word_pairs_ok(cfg: TileConfig, dtype: torch.dtype) -> bool:
    """The rule of `_word_layout_ok` for the PTX decode on sm_90 (see there)."""
    return dtype == torch.bfloat16 and cfg.BN % 64 == 0 and cfg.num_warps % 4 == 0


DEQUANT_MAX_BYTES = 2 << 30  # the largest transient bf16 copy of one projection (20b gate_up: 1.06 GB)


def _dense_copy_bytes(experts: ExpertWeights) -> int:
    """Bytes of the larger projection's bf16 copy (gate_up: E x H x 2I)."""
    H, I = _dims(experts)
    return experts.num_experts * H * 2 * I * 2


def choose_config(slots: int, experts: ExpertWeights) -> TileConfig:
    """`default_config`, except that a transient bf16 copy larger than DEQUANT_MAX_BYTES (a 120b
    layer's gate_up would be 4.2 GB) gives way to the packed per-tile decode, and that decode sizes
    of bf16 rollouts reading the experts' tile-contiguous copies take the tiles measured on them."""
    cfg = default_config(slots, experts.num_experts, experts.format == "mxfp4")
    if experts.tiled is not None and cfg.words and not cfg.fixup \
            and experts.gate_up_bias.dtype == torch.bfloat16 and experts.tiled[1] % 8 == 0:
        # (every word tile, i.e. up to 16 slots an expert, except the 1-token one: that is this
        # shape already, finishing in its last part)
        # reading the tile-contiguous copies (rollouts), 64-column K tiles in 2 K parts won at 8, 64
        # and 128 tokens (H100, graph replay; chunks of 16 words, results/moe_tiled.json: 0.1505 /
        # 0.2208 ms against 0.1595 / 0.2309 with the 64x128 tile on the same copies and 0.1744 /
        # 0.2548 on the published blocks; chunks of 8 words, moe_tiled_fixup.json and
        # moe_tiled_128.json: 0.1454 / 0.2165 / 0.2885 ms, the 64x128 tile 0.3197 at 128 tokens)
        return TileConfig(16, 64, 64, 4, 3, dot_scaled=False, swap_ab=True, split_k=2, words=True)
    # from 256 rows per expert (sweep: 512 rows, 2.90 / 6.69 ms against 3.10 / 7.55); a copy the
    # experts keep (`gate_up_dense`) needs no transient memory
    kept = experts.gate_up_dense is not None and experts.gate_up_dense.dtype == experts.gate_up_bias.dtype
    if cfg.dequant and not kept and _dense_copy_bytes(experts) > DEQUANT_MAX_BYTES:
        return TileConfig(128, 128, 64, 4, 4, dot_scaled=False)
    return cfg


def _dims(experts: ExpertWeights) -> tuple[int, int]:
    """(H, I) from the biases: gate_up bias is [E, 2I], down bias [E, H]."""
    return experts.down_bias.shape[1], experts.gate_up_bias.shape[1] // 2


def gate_up_forward(plan: _Plan, x, lora_z=None, z=None, lora: _LoRATerm | None = None):
    """a [S, I] in sorted order: swiglu(x[token] @ W1_e + b1_e (+ lora_z or the `lora` term));
    optionally stores z [S, 2I]."""
    ex = plan.experts
    H, I = _dims(ex)
    a = torch.empty(plan.groups.order.numel(), I, device=x.device, dtype=x.dtype)
    return _launch(plan, x, ex.gate_up, ex.gate_up_scales, 2 * I, H, a, b_rows_are_n=True,
                   a_rows=plan.groups.token, bias=ex.gate_up_bias, extra=lora_z, z=z, swiglu=True, lora=lora,
                   b_tiled=ex.gate_up_tiled, b_dense=ex.gate_up_dense)


# A split-K down projection without a LoRA term leaves its fp32 partials to the k-sum
# (`_combine_parts`: parts, bias and routing weight per slot, the same bits) instead of a second
# launch writing the [N * k, H] slot buffer that `combine_slots` then reads: one launch a layer
# fewer where the down tile splits K and does not finish in its last part (decode sizes from 2
# tokens). Needs the grouping kernels' position table. Rollouts with LoRA on the experts (GRPO's,
# whose B products run in the epilogue) keep the two launches. On since session 19 (H100): its GPU
# test passed (the same bits); with ONE_SPLIT_MAX_CAPACITY a batch-64 decode step went 7.36 -> 7.24
# ms and batch-64 rollouts 8,049 -> 8,165 tok/s (benchmarks/results/generate_b64_*_s19_h100.json).
COMBINE_PARTS = True


def down_forward(plan: _Plan, a, route_w, lora_y=None, lora: _LoRATerm | None = None):
    """out [N, H] = sum over each token's k slots of w * (a @ W2_e + b2_e (+ lora_y or the `lora` term))."""
    ex = plan.experts
    H, I = _dims(ex)
    g = plan.groups
    route_w = route_w.reshape(-1)
    keep = COMBINE_PARTS and lora_y is None and lora is None and g.position is not None
    # (the slot buffer even with `keep`: a tile that does not split K still runs its epilogue into it)
    buf = torch.empty(plan.num_tokens * g.k, H, device=a.device, dtype=a.dtype)
    out = _launch(plan, a, ex.down, ex.down_scales, H, I, buf, b_rows_are_n=True, bias=ex.down_bias,
                  extra=lora_y, route_w=route_w, scatter=True, lora=lora, b_tiled=ex.down_tiled,
                  b_dense=ex.down_dense, keep_parts=keep)
    if out is not buf:  # the partials: summed, biased and weighted per slot by the k-sum
        return _combine_parts(out, g, ex.down_bias, route_w, plan.num_tokens, a.dtype)
    return combine_slots(buf.view(plan.num_tokens, g.k, H))


@triton.jit
def _combine_kernel(Y, Out, H, K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(Y + (row * K + j) * H + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * H + cols, acc.to(Out.dtype.element_ty), mask=mask)


def combine_slots(y: torch.Tensor) -> torch.Tensor:
    """[N, k, H] (each token's k weighted expert outputs) -> [N, H], summed in fp32 in
    slot order: `y.sum(1)` in one light launch (PyTorch's reduction took 4.7 us per layer at batch
    1 on an H100, the largest of a decode step's small kernels)."""
    N, K, H = y.shape
    y = y.contiguous()  # the kernel indexes (row * K + j) * H
    out = torch.empty(N, H, device=y.device, dtype=y.dtype)
    if N:
        BLOCK = min(1024, triton.next_power_of_2(H))
        _combine_kernel[(N, triton.cdiv(H, BLOCK))](y, out, H, K=K, BLOCK=BLOCK, num_warps=4)
    return out


@triton.jit
def _combine_parts_kernel(Parts, stride_part, stride_prow, Position, Expert, Bias, stride_bias, RouteW, Out, H,
                          K: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """Token row t: sum over its K slots s (sorted position p, expert e) of bf16(w_s * (the SPLIT_K
    partials of p summed in part order + b_e)), in fp32 in slot order: what `_split_k_epilogue`
    stores per slot and `_combine_kernel` then sums, bit for bit (launched without FMA contraction:
    with an fp32 output the per-slot rounding is no rounding, and w_s * y + acc must not fuse)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(K):
        s = row * K + j
        p = tl.load(Position + s)
        e = tl.load(Expert + p)
        y = _sum_parts(Parts + p * stride_prow + cols, mask, stride_part, SPLIT_K, "")
        y += tl.load(Bias + e * stride_bias + cols, mask=mask, other=0.0).to(tl.float32)
        y = y * tl.load(RouteW + s).to(tl.float32)
        acc += y.to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * H + cols, acc.to(Out.dtype.element_ty), mask=mask)


def _combine_parts(parts: torch.Tensor, groups: ExpertGroups, bias: torch.Tensor, route_w: torch.Tensor,
                   num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """The down projection's split-K epilogue and k-sum in one launch (COMBINE_PARTS): parts [split,
    sorted slots, H] fp32 -> out [num_tokens, H] in `dtype`."""
    split, _, H = parts.shape
    out = torch.empty(num_tokens, H, device=parts.device, dtype=dtype)
    if num_tokens:
        BLOCK = min(1024, triton.next_power_of_2(H))
        _combine_parts_kernel[(num_tokens, triton.cdiv(H, BLOCK))](
            parts, parts.stride(0), parts.stride(1), groups.position, groups.expert, bias, bias.stride(0), route_w,
            out, H, K=groups.k, SPLIT_K=split, BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
    return out


@triton.jit
def _swiglu_pairs_backward(z_row, dz_row, da, cols, mask, limit, alpha):
    """dz's (gate, up) pairs at `cols` of one row from z's and the fp32 gradient da of the clamped
    SwiGLU; returns the activation a = swiglu(z) there in fp32 (callers that need it: `dw`)."""
    pair = 2 * cols[:, None] + tl.arange(0, 2)[None, :]  # [BLOCK, 2] (gate, up)
    z = tl.load(z_row + pair, mask=mask[:, None], other=0.0).to(tl.float32)
    gate, up = tl.split(z)
    gc = tl.minimum(gate, limit)
    uc = tl.minimum(tl.maximum(up, -limit), limit)
    sig = tl.sigmoid(gc * alpha)
    dgate = tl.where(gate <= limit, da * (uc + 1.0) * (sig + alpha * gc * sig * (1.0 - sig)), 0.0)
    dup = tl.where((up >= -limit) & (up <= limit), da * gc * sig, 0.0)
    tl.store(dz_row + pair, tl.join(dgate, dup).to(dz_row.dtype.element_ty), mask=mask[:, None])
    return gc * sig * (uc + 1.0)


@triton.jit
def _swiglu_backward_kernel(z_ptr, da_ptr, dz_ptr, I, limit, alpha, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    da = tl.load(da_ptr + row * I + cols, mask=mask, other=0.0).to(tl.float32)
    _swiglu_pairs_backward(z_ptr + row * 2 * I, dz_ptr + row * 2 * I, da, cols, mask, limit, alpha)


def swiglu_backward(z: torch.Tensor, da: torch.Tensor, *, limit: float, alpha: float) -> torch.Tensor:
    """`ossrl.kernels.moe.clamped_swiglu_backward` in one pass: z [S, 2I], da [S, I] -> dz [S, 2I]."""
    S, I = da.shape
    dz = torch.empty_like(z)
    if S:
        _swiglu_backward_kernel[(S, triton.cdiv(I, 1024))](z, da, dz, I, float(limit), float(alpha), BLOCK=1024)
    return dz


@triton.jit
def _swiglu_lora_backward_kernel(z_ptr, da_ptr, t_ptr, a_ptr, expert_ptr, dz_ptr, w_ptr, dw_ptr, S, I, limit, alpha,
                                 R: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                                 WEIGHTED: tl.constexpr, NEED_DW: tl.constexpr):
    """ROWS consecutive sorted slots, each: da (times the slot's routing weight w where WEIGHTED:
    da is then the down projection's unweighted input gradient g) += t[row] @ A[e]^T (the down LoRA
    A path's term; A [E, I, R]), then the clamped SwiGLU's backward against z's (gate, up) pairs ->
    dz, in fp32; NEED_DW adds <swiglu(z), g> (a rounded as z is) to dw[row] (atomics: the row's
    column blocks are other programs). The rows are sorted by expert, so after the first row A's
    slice mostly comes from L1."""
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rr = tl.arange(0, RP)
    for i in range(ROWS):
        row = tl.program_id(0).to(tl.int64) * ROWS + i
        mask = (cols < I) & (row < S)
        e = tl.load(expert_ptr + row, mask=row < S, other=0).to(tl.int64)
        t = tl.load(t_ptr + row * R + rr, mask=(rr < R) & (row < S), other=0.0).to(tl.float32)
        a_blk = tl.load(a_ptr + e * I * R + cols[:, None] * R + rr[None, :], mask=mask[:, None] & (rr[None, :] < R),
                        other=0.0).to(tl.float32)
        g = tl.load(da_ptr + row * I + cols, mask=mask, other=0.0).to(tl.float32)
        da = g
        if WEIGHTED:
            da = g * tl.load(w_ptr + row, mask=row < S, other=0.0)
        da += tl.sum(a_blk * t[None, :], 1)
        act = _swiglu_pairs_backward(z_ptr + row * 2 * I, dz_ptr + row * 2 * I, da, cols, mask, limit, alpha)
        if NEED_DW:
            act = act.to(dz_ptr.dtype.element_ty).to(tl.float32)
            tl.atomic_add(dw_ptr + row, tl.sum(tl.where(mask, act * g, 0.0), 0), mask=row < S, sem="relaxed")


def swiglu_lora_backward(z: torch.Tensor, da: torch.Tensor, t: torch.Tensor, A: torch.Tensor, expert: torch.Tensor,
                         *, limit: float, alpha: float, w: torch.Tensor | None = None,
                         dw: torch.Tensor | None = None) -> torch.Tensor:
    """dz [S, 2I] of the clamped SwiGLU for the gradient da + t_s @ A_{expert s}^T per sorted slot s
    (z [S, 2I], da [S, I], t [S, r], A [E, I, r]): the down LoRA A path's input gradient added
    where the SwiGLU's backward reads da, with no [S, I] product written and no add launched.
    With `w` (the sorted slots' routing weights, fp32 [S]) da is the down projection's unweighted
    input gradient g and w * g is used; `dw` (fp32 [S], needs `w`) then gains <swiglu(z), g> per
    slot, the routing weight's gradient through the base (DW_IN_SWIGLU_BACKWARD)."""
    S, I = da.shape
    r = t.shape[1]
    dz = torch.empty_like(z)
    if dw is not None and w is None:
        raise ValueError("swiglu_lora_backward: dw needs the routing weights w")
    if S:
        RP = max(2, triton.next_power_of_2(r))
        BLOCK = max(32, min(256, 4096 // RP))  # (A's [BLOCK, RP] slice in registers: no spills to r = 128)
        ROWS = 16
        w_arg = w.reshape(-1).contiguous() if w is not None else dz
        _swiglu_lora_backward_kernel[(triton.cdiv(S, ROWS), triton.cdiv(I, BLOCK))](
            z, da.contiguous(), t.contiguous(), A.contiguous(), expert, dz, w_arg, dw if dw is not None else w_arg,
            S, I, float(limit), float(alpha), R=r, RP=RP, BLOCK=BLOCK, ROWS=ROWS, WEIGHTED=w is not None,
            NEED_DW=dw is not None)
    return dz


@triton.jit
def _down_lora_backward_kernel(dout_ptr, token_ptr, y_ptr, w_ptr, dw_ptr, dy_ptr, H: tl.constexpr,
                               NEED_DW: tl.constexpr, NEED_DY: tl.constexpr, BLOCK: tl.constexpr):
    """Per sorted slot s of token t: dw[s] += <lora_y[s], dout[t]> and dlora_y[s] = w[s] * dout[t]."""
    s = tl.program_id(0).to(tl.int64)
    t = tl.load(token_ptr + s).to(tl.int64)
    w = tl.load(w_ptr + s)
    acc = tl.zeros([BLOCK], tl.float32)
    for lo in range(0, H, BLOCK):
        cols = lo + tl.arange(0, BLOCK)
        mask = cols < H
        g = tl.load(dout_ptr + t * H + cols, mask=mask, other=0.0).to(tl.float32)
        if NEED_DW:
            acc += tl.load(y_ptr + s * H + cols, mask=mask, other=0.0).to(tl.float32) * g
        if NEED_DY:
            tl.store(dy_ptr + s * H + cols, (g * w).to(dy_ptr.dtype.element_ty), mask=mask)
    if NEED_DW:
        tl.store(dw_ptr + s, tl.load(dw_ptr + s) + tl.sum(acc))


def down_lora_backward(dout: torch.Tensor, token: torch.Tensor, lora_y: torch.Tensor, w_sorted: torch.Tensor,
                       dw_sorted: torch.Tensor | None, need_dy: bool) -> torch.Tensor | None:
    """The LoRA part of the down projection's backward in one pass over the sorted slots:
    dw_sorted += <lora_y, dout[token]> (when given) and returns w * dout[token] (when need_dy)."""
    S, H = lora_y.shape
    dy = torch.empty_like(lora_y) if need_dy else None
    if S and (dw_sorted is not None or need_dy):
        _down_lora_backward_kernel[(S,)](
            dout, token, lora_y, w_sorted, dw_sorted if dw_sorted is not None else w_sorted,
            dy if dy is not None else lora_y, H, NEED_DW=dw_sorted is not None, NEED_DY=need_dy,
            BLOCK=min(1024, triton.next_power_of_2(H)))
    return dy


class _GateUp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_z, plan):
        needs_z = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        S, I2 = plan.groups.order.numel(), plan.experts.gate_up_bias.shape[1]
        z = torch.empty(S, I2, device=x.device, dtype=x.dtype) if needs_z else None
        a = gate_up_forward(plan, x, lora_z, z)
        ctx.plan = plan
        ctx.save_for_backward(z)
        return a

    @staticmethod
    def backward(ctx, da):
        (z,) = ctx.saved_tensors
        plan = ctx.plan
        ex = plan.experts
        H, I = _dims(ex)
        dz = swiglu_backward(z, da.contiguous(), limit=ex.limit, alpha=ex.alpha)  # [S, 2I]
        dx = _gate_up_input_grad(plan, dz) if ctx.needs_input_grad[0] else None
        return dx, (dz if ctx.needs_input_grad[1] else None), None


def _gate_up_input_grad(plan: _Plan, dz: torch.Tensor) -> torch.Tensor:
    """dx [N, H] = sum over each token's k slots of dz_slot @ W1_e^T (scatter fused, then the k-sum)."""
    ex = plan.experts
    H, I = _dims(ex)
    dxs = torch.empty(plan.num_tokens * plan.groups.k, H, device=dz.device, dtype=dz.dtype)
    _launch(plan, dz, ex.gate_up, ex.gate_up_scales, H, 2 * I, dxs, b_rows_are_n=False, scatter=True,
            b_dense=ex.gate_up_dense)
    return dxs.view(plan.num_tokens, plan.groups.k, H).sum(1)


class _Down(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, route_w, lora_y, plan):
        ctx.plan = plan
        ctx.save_for_backward(a, route_w, lora_y)
        return down_forward(plan, a, route_w, lora_y)

    @staticmethod
    def backward(ctx, dout):
        a, route_w, lora_y = ctx.saved_tensors
        plan = ctx.plan
        g = plan.groups
        dout = dout.contiguous()
        need_dw = ctx.needs_input_grad[1]
        da, dw_sorted = _down_base_backward(plan, dout, a, route_w, need_dw)
        dlora_y = None
        if lora_y is not None and (need_dw or ctx.needs_input_grad[2]):
            # <lora_y, dout> and w * dout per sorted slot, reading dout by token (no [S, H] gather)
            w_sorted = route_w.reshape(-1)[g.order].float()
            dlora_y = down_lora_backward(dout, g.token, lora_y, w_sorted.contiguous(), dw_sorted,
                                         ctx.needs_input_grad[2])
        return da, _unsorted(dw_sorted, g, route_w), dlora_y, None


def _down_base_backward(plan: _Plan, dout: torch.Tensor, a: torch.Tensor, route_w: torch.Tensor, need_dw: bool,
                        weighted: bool = True):
    """The down projection's backward through its base: da [S, I] = w * (dout[token] @ W2_e^T), and
    (need_dw) the base's part of d w_slot = <a_slot, dout_token @ W2_e^T> + <b2_e, dout_token> per
    sorted slot in fp32 (the same tile computes both), or None; a LoRA term adds its own part.
    Not `weighted`: da is the plain product g = dout[token] @ W2_e^T and d w_slot holds only the
    bias's part (the caller adds <a, g>: `swiglu_lora_backward`'s dw), the matmul with no epilogue."""
    g, ex = plan.groups, plan.experts
    H, I = _dims(ex)
    dw_sorted = torch.zeros(g.order.numel(), device=a.device, dtype=torch.float32) if need_dw else None
    da = torch.empty(g.order.numel(), I, device=a.device, dtype=a.dtype)
    tile_dw = need_dw and weighted
    _launch(plan, dout, ex.down, ex.down_scales, I, H, da, b_rows_are_n=False, a_rows=g.token,
            route_w=route_w.reshape(-1) if weighted else None, extra=a if tile_dw else None,
            dw=dw_sorted if tile_dw else None, b_dense=ex.down_dense)
    if need_dw:
        dw_sorted += (dout.float() @ ex.down_bias.float().T)[g.token, g.expert]
    return da, dw_sorted


def _unsorted(dw_sorted: torch.Tensor | None, groups: ExpertGroups, route_w: torch.Tensor) -> torch.Tensor | None:
    """Per-slot values in sorted order -> route_w's layout and dtype (None stays None)."""
    if dw_sorted is None:
        return None
    return torch.empty_like(dw_sorted).index_copy_(0, groups.order, dw_sorted).view_as(route_w).to(route_w.dtype)


class _GateUpLoRA(torch.autograd.Function):
    """gate_up with the LoRA term u @ B_e added in the epilogue (`TRAINING_LORA_EPILOGUE`): u is the
    scaled rank-r intermediate by token (expert e's r columns from e * r) or by sorted slot. The
    backward gives dx through the base and, from dz, du = dz_slot @ B_e^T and dB_e = u_e^T dz_e."""

    @staticmethod
    def forward(ctx, x, u, B, plan, by_token: bool, r: int, grad: bool, A=None, scaling: float = 1.0):
        # (`grad`: the caller's grad mode; inside forward it is off, and needs_input_grad holds even
        # under no_grad for inputs that require grad: a no-grad pass must not write and keep z)
        needs_z = grad and (any(ctx.needs_input_grad[:3]) or ctx.needs_input_grad[7])
        S, I2 = plan.groups.order.numel(), plan.experts.gate_up_bias.shape[1]
        z = torch.empty(S, I2, device=x.device, dtype=x.dtype) if needs_z else None
        u = _token_u(x, A, scaling) if A is not None else u
        a = gate_up_forward(plan, x, z=z, lora=_LoRATerm(u, B, by_token, r if by_token else 0))
        ctx.plan, ctx.by_token, ctx.r, ctx.scaling = plan, by_token, r, scaling
        ctx.save_for_backward(z, u, B, x if A is not None else None, A)
        return a

    @staticmethod
    def backward(ctx, da):
        z, u, B, x, A = ctx.saved_tensors
        ex = ctx.plan.experts
        dz = swiglu_backward(z, da.contiguous(), limit=ex.limit, alpha=ex.alpha)  # [S, 2I]
        dx, du, dB, dA = _gate_up_lora_grads(ctx, dz, u, B, x, A, A is not None and ctx.needs_input_grad[7])
        return dx, du, dB, None, None, None, None, dA, None


def _token_u(x: torch.Tensor, A: torch.Tensor, scaling: float) -> torch.Tensor:
    """gate_up's rank-r intermediate by token, s * x @ [all experts' A] ([N, E * r]), computed
    inside the LoRA gate_up functions (A given): their backward then adds its input gradient to
    the base's by an addmm instead of autograd's add (the rounding of the product, then the scaling,
    as `_routed_experts_lora_trained` rounds it)."""
    return scaled(x @ A, scaling).contiguous()


def _gate_up_lora_grads(ctx, dz: torch.Tensor, u: torch.Tensor, B: torch.Tensor, x=None, A=None,
                        need_A: bool = False):
    """(dx, du, dB, dA) of gate_up with its LoRA term in the epilogue, from dz (as ctx.needs_input_grad
    asks for x, u and B, and `need_A` for A): dx through the base, du = dz_slot @ B_e^T (by token or
    by slot, as u is), dB_e = u_e^T dz_e. Where the function took A (by token, u = s * x @ A
    computed inside), du goes on to dA = s * x^T du and into dx by one addmm."""
    plan = ctx.plan
    g = plan.groups
    need_x, need_u, need_B = ctx.needs_input_grad[:3]
    dx = _gate_up_input_grad(plan, dz) if need_x else None
    by_expert = u.view(u.shape[0], u.shape[1] // ctx.r, ctx.r) if ctx.by_token else None  # [N, E, r]
    du = dB = dA = None
    if need_u or need_A or (A is not None and need_x):
        du = grouped_product(dz, B.transpose(1, 2), g)  # [S, r]
        if ctx.by_token:
            du = _slots_by_token(du, g, u.shape[0], u.shape[1] // ctx.r)
    if need_B:
        dB = grouped_weight_grad(by_expert[g.token, g.expert] if ctx.by_token else u, dz, g)
    if A is not None:
        du_s = scaled(du, ctx.scaling)
        if need_x:
            dx.addmm_(du_s, A.t())  # [N, H] += [N, E * r] @ [E * r, H]
        dA = x.t() @ du_s if need_A else None
        du = None
    return dx, du, dB, dA


class _GateUpLoRAToZ(torch.autograd.Function):
    """`_GateUpLoRA` for FUSED_SWIGLU_BACKWARD: returns (a, z), z the differentiable output (the
    pre-activation [S, 2I], which `_DownLoRAToZ` takes and differentiates through the SwiGLU), a
    beside it without a gradient of its own."""

    @staticmethod
    def forward(ctx, x, u, B, plan, by_token: bool, r: int, A=None, scaling: float = 1.0):
        S, I2 = plan.groups.order.numel(), plan.experts.gate_up_bias.shape[1]
        z = torch.empty(S, I2, device=x.device, dtype=x.dtype)
        u = _token_u(x, A, scaling) if A is not None else u
        a = gate_up_forward(plan, x, z=z, lora=_LoRATerm(u, B, by_token, r if by_token else 0))
        ctx.mark_non_differentiable(a)
        ctx.set_materialize_grads(False)  # (else autograd writes an [S, I] zero gradient for a)
        ctx.plan, ctx.by_token, ctx.r, ctx.scaling = plan, by_token, r, scaling
        ctx.save_for_backward(u, B, x if A is not None else None, A)
        return a, z

    @staticmethod
    def backward(ctx, grad_a, dz):
        if dz is None:
            return (None,) * 8
        u, B, x, A = ctx.saved_tensors
        dx, du, dB, dA = _gate_up_lora_grads(ctx, dz, u, B, x, A, A is not None and ctx.needs_input_grad[6])
        return dx, du, dB, None, None, None, dA, None


class _DownLoRAToZ(torch.autograd.Function):
    """The down projection with its LoRA pair (u = s * a @ A_e, then u @ B_e in the epilogue), whose
    backward returns dz, the gradient of gate_up's pre-activation: the base's da from the kernel,
    then `swiglu_lora_backward` adds the A path's term s * du @ A_e^T where the SwiGLU's backward
    reads da. With G the slots' dout rows and t = G @ B_e^T: du = w * t, dB_e = (w u)_e^T G_e,
    dA_e = s * a_e^T du_e, d w_slot gains <u, t>. No LoRA dropout (a reaches A as it is)."""

    @staticmethod
    def forward(ctx, z, a, route_w, A, B, plan, scaling: float):
        u = scaled(grouped_product(a, A, plan.groups), scaling).contiguous()  # (as `_routed_experts_lora_trained`)
        ctx.plan, ctx.scaling = plan, scaling
        ctx.save_for_backward(z, a, route_w, u, A, B)
        return down_forward(plan, a, route_w, lora=_LoRATerm(u, B, False, 0))

    @staticmethod
    def backward(ctx, dout):
        z, a, route_w, u, A, B = ctx.saved_tensors
        plan, s = ctx.plan, ctx.scaling
        g, ex = plan.groups, plan.experts
        dout = dout.contiguous()
        need_dw = ctx.needs_input_grad[2]
        # DW_IN_SWIGLU_BACKWARD: the matmul writes the unweighted g; the SwiGLU kernel weights it and
        # adds <swiglu(z), g> to d w (from z, which it reads anyway) instead of the tile's epilogue
        late_w = DW_IN_SWIGLU_BACKWARD
        da, dw_sorted = _down_base_backward(plan, dout, a, route_w, need_dw, weighted=not late_w)
        t, w_sorted, dB = _down_lora_b_grads(dout, u, B, route_w, g, dw_sorted, True, ctx.needs_input_grad[4])
        du_s = (t * (w_sorted * s)).to(a.dtype)  # s * du
        dA = grouped_weight_grad(a, du_s, g) if ctx.needs_input_grad[3] else None
        dz = swiglu_lora_backward(z, da, du_s, A, g.expert, limit=ex.limit, alpha=ex.alpha,
                                  w=w_sorted if late_w else None, dw=dw_sorted if late_w else None)
        return dz, None, _unsorted(dw_sorted, g, route_w), dA, dB, None, None


class _DownLoRA(torch.autograd.Function):
    """The down projection with the LoRA term u @ B_e (u per sorted slot, scaled) in the epilogue,
    before the routing weight. Backward: with G the slots' dout rows and t = G @ B_e^T [S, r],
    du = w * t, dB_e = (w u)_e^T G_e and d w_slot gains <u, t>."""

    @staticmethod
    def forward(ctx, a, route_w, u, B, plan):
        ctx.plan = plan
        ctx.save_for_backward(a, route_w, u, B)
        return down_forward(plan, a, route_w, lora=_LoRATerm(u, B, False, 0))

    @staticmethod
    def backward(ctx, dout):
        a, route_w, u, B = ctx.saved_tensors
        plan = ctx.plan
        g = plan.groups
        dout = dout.contiguous()
        need_dw, need_du, need_dB = ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        da, dw_sorted = _down_base_backward(plan, dout, a, route_w, need_dw)
        du = dB = None
        if need_dw or need_du or need_dB:
            t, w_sorted, dB = _down_lora_b_grads(dout, u, B, route_w, g, dw_sorted, need_dw or need_du, need_dB)
            if need_du:
                du = (t * w_sorted).to(u.dtype)
        return da, _unsorted(dw_sorted, g, route_w), du, dB, None


def _down_lora_b_grads(dout, u, B, route_w, groups: ExpertGroups, dw_sorted, need_t: bool, need_dB: bool):
    """The B side of the down projection's LoRA term u @ B_e in its backward, with G the slots'
    dout rows: (t = G @ B_e^T [S, r] in fp32 or None, the sorted routing weights [S, 1] in fp32,
    dB_e = (w u)_e^T G_e or None); adds <u, t> to d w_slot where `dw_sorted` is given."""
    w_sorted = route_w.reshape(-1)[groups.order].float()[:, None]
    E, r, H = B.shape
    if DOWN_LORA_BY_TOKEN and E * r <= TOKEN_LORA_MAX_COLUMNS:
        # by token: dout [N, H] times all experts' B at once (each slot then picks its expert's r
        # columns), and dB from the slots' w u placed by token: two dense products that read dout
        # once each, instead of gathering G [S, H] and two grouped products reading it
        N = dout.shape[0]
        t = None
        if need_t:
            t = (dout @ B.permute(2, 0, 1).reshape(H, E * r)).view(N, E, r)[groups.token, groups.expert].float()
        if dw_sorted is not None:
            dw_sorted += (u.float() * t).sum(-1)
        dB = None
        if need_dB:
            wu = _slots_by_token((u.float() * w_sorted).to(u.dtype), groups, N, E)  # [N, E * r]
            dB = (wu.t() @ dout).view(E, r, H)
        return t, w_sorted, dB
    G = dout[groups.token]  # [S, H]
    t = grouped_product(G, B.transpose(1, 2), groups).float() if need_t else None  # [S, r]
    if dw_sorted is not None:
        dw_sorted += (u.float() * t).sum(-1)
    dB = grouped_weight_grad((u.float() * w_sorted).to(u.dtype), G, groups) if need_dB else None
    return t, w_sorted, dB


def _slots_by_token(values: torch.Tensor, groups: ExpertGroups, num_tokens: int, num_experts: int) -> torch.Tensor:
    """Sorted slots' rows [S, r] placed at (token, expert) of an [N, E * r] matrix, zeros elsewhere
    (ids naming an expert twice for a token sum there; top-k never does). By index_add (no sort,
    unlike index_put with accumulate)."""
    r = values.shape[1]
    out = values.new_zeros(num_tokens * num_experts, r)
    out.index_add_(0, groups.token * num_experts + groups.expert, values)
    return out.view(num_tokens, num_experts * r)


def routed_experts_triton(x: torch.Tensor, route_w: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights,
                          lora=None, config: TileConfig | None = None, *, lora_epilogue: bool = False,
                          grouping: SlotGrouping | None = None) -> torch.Tensor:
    """The fused path of `ossrl.kernels.moe.routed_experts` (same arguments). No host syncs.

    `lora_epilogue` (rollouts: the model sets it inside `inference_kernels`) lets a forward without
    autograd take the rollouts' LoRA path (A products by the kernel at decode sizes, rollout copies
    with the scaling folded in); it rounds differently from the training path, so the trainer's own
    no-grad passes (old log-probs) leave it off and compute exactly what its training pass
    computes. `grouping`: the slots of `ids` already grouped
    (`ossrl.kernels.fused.router_topk_grouped`), used in place of `group_small`."""
    if config is None and gemv_ok(x, experts, lora):  # a token or two: matrix-vector products (moe_gemv)
        return routed_experts_gemv(x, route_w, ids, experts)
    N = x.shape[0]
    x = x.contiguous()
    S = ids.numel()
    cfg = config or choose_config(S, experts)
    if grouping is None and S <= SMALL_GROUP_MAX_SLOTS:  # decode-sized: sort, offsets and tile table in one launch
        grouping = group_small(ids, experts.num_experts, cfg.BM)
    if grouping is not None:  # (or the router kernel's: a table of another BM is made from its groups)
        plan = _Plan(grouping.groups, experts, N, cfg, tables={grouping.BM: grouping.table})
    else:
        plan = _Plan(group_by_expert(ids, experts.num_experts), experts, N, cfg)
    groups = plan.groups
    if lora is not None and lora_epilogue and not torch.is_grad_enabled():  # rollouts: LoRA B in the epilogues
        return _routed_experts_lora_epilogue(x, route_w, plan, lora)
    if lora is not None and TRAINING_LORA_EPILOGUE:
        return _routed_experts_lora_trained(x, route_w, plan, lora)
    lora_z = lora_y = None
    if lora is not None:
        lora_z = token_lora_delta(lora_input(lora, x), lora.gate_up_A, lora.gate_up_B, groups, lora.scaling,
                                  A_flat=getattr(lora, "gate_up_A_flat", None))
        lora_z = lora_z.contiguous()
    a = _GateUp.apply(x, lora_z, plan)
    if lora is not None:
        lora_y = grouped_lora_delta(lora_input(lora, a), lora.down_A, lora.down_B, groups, lora.scaling).contiguous()
    return _Down.apply(a, route_w.contiguous(), lora_y, plan)


# Training forwards, and the trainer's no-grad passes (old and reference log-probs: the same
# bits as its training pass), add the expert LoRA B products in the matmuls' epilogues as rollouts
# do, through autograd functions whose backward computes the LoRA gradients itself
# (`_routed_experts_lora_trained`): no [slots, 2I] and [slots, H] deltas written and read back per
# layer (at 4K tokens 189 + 94 MB), and two grouped products fewer per forward. Off: the deltas
# are computed by grouped products and added in the epilogue as an extra input.
TRAINING_LORA_EPILOGUE = True
# With it, training forwards (autograd on, no LoRA dropout) may take the SwiGLU's backward and the
# down LoRA A path's input gradient in one light kernel (`_DownLoRAToZ`, `swiglu_lora_backward`):
# no [S, I] product for that gradient and no add into da. Off until measured on the device
# (written in session 24 after its device time was spent; estimated at 2-3 ms a 4K step).
FUSED_SWIGLU_BACKWARD = False
# With it: the down projection's backward matmul writes the unweighted g = dout[token] @ W2_e^T with
# no epilogue, and `swiglu_lora_backward` multiplies by the routing weight and adds the weight's
# gradient <swiglu(z), g> (a recomputed from z, which it reads anyway) per slot: no [S, I] read of a
# and no row dot in the matmul's epilogue (session 25, H100, `moe.py --launch-times`: that launch ran
# at 54% of the matmul rate at 4K tokens, 0.69 ms, against 70-76% for the other three).
DW_IN_SWIGLU_BACKWARD = True
# Training backwards of the down projection's LoRA B side where E * r <= TOKEN_LORA_MAX_COLUMNS (20b
# at r = 16: 512): t and dB from dout by token against all experts' B at once (`_down_lora_b_grads`)
# instead of the gathered [S, H] slot rows and two grouped products over them. Off until run and
# timed on a GPU (written in session 25 after its last device call; interpreter-tested only).
DOWN_LORA_BY_TOKEN = False


def _routed_experts_lora_trained(x, route_w, plan: _Plan, lora) -> torch.Tensor:
    """`routed_experts_triton` with LoRA under TRAINING_LORA_EPILOGUE (with or without autograd).
    gate_up's rank-r intermediate is x @ [all experts' A] by token where E * r is small (as
    `token_lora_delta`), else per sorted slot; down's per sorted slot. Scaled before the epilogue."""
    groups = plan.groups
    E, H, r = lora.gate_up_A.shape
    xl = lora_input(lora, x)
    by_token = E * r <= TOKEN_LORA_MAX_COLUMNS
    dropout = _dropout_active(lora)
    u = A_in = None
    if by_token:
        A_flat = getattr(lora, "gate_up_A_flat", None)
        A_flat = all_experts_A(lora.gate_up_A) if A_flat is None else A_flat
        if dropout:  # (the A path reads the dropped-out x: autograd's product and add)
            u = _token_u(xl, A_flat, lora.scaling)
        else:  # u inside the gate_up function, whose backward adds its dx by an addmm (`_token_u`)
            A_in = A_flat
    else:
        u = scaled(grouped_product(xl[groups.token], lora.gate_up_A, groups), lora.scaling).contiguous()
    scaling = float(lora.scaling)
    if FUSED_SWIGLU_BACKWARD and torch.is_grad_enabled() and not dropout:
        # (no-grad passes take the path below: the same forward sums, without z written)
        a, z = _GateUpLoRAToZ.apply(x, u, lora.gate_up_B.contiguous(), plan, by_token, r, A_in, scaling)
        return _DownLoRAToZ.apply(z, a, route_w.contiguous(), lora.down_A.contiguous(), lora.down_B.contiguous(),
                                  plan, scaling)
    a = _GateUpLoRA.apply(x, u, lora.gate_up_B.contiguous(), plan, by_token, r, torch.is_grad_enabled(), A_in,
                          scaling)
    u = scaled(grouped_product(lora_input(lora, a), lora.down_A, groups), lora.scaling)
    return _DownLoRA.apply(a, route_w.contiguous(), u.contiguous(), lora.down_B.contiguous(), plan)


def _dropout_active(lora) -> bool:
    """Whether the adapter's dropout may change its input: anything but none, an Identity, or a
    dropout module that is in eval mode or has p = 0."""
    dropout = getattr(lora, "dropout", None)
    if dropout is None or isinstance(dropout, torch.nn.Identity):
        return False
    from torch.nn.modules.dropout import _DropoutNd

    return not (isinstance(dropout, _DropoutNd) and (not dropout.training or dropout.p == 0))


# The rollouts' expert LoRA A products (sorted slot rows @ A_e -> [slots, r]) on the dense path of
# `_moe_matmul` with these tiles (BN fitted to the rank); None runs `grouped_product`
# (torch._grouped_mm at r = 16). Measured by `benchmarks/profile_decode.py --lora --lora-a-tiles`
# (H100, 20b, r = 16, session 7), decode-step graph replay: batch 1 5.10 -> 4.79 ms, batch 64
# 12.13 -> 11.68 ms; split-K 8 gave the same times. Up to LORA_A_MAX_SLOTS sorted slots (decode
# sizes, where it was timed); prefills above that keep grouped_mm.
LORA_A_TILES: TileConfig | None = TileConfig(16, 16, 128, 4, 3, split_k=4)
LORA_A_MAX_SLOTS = 1024


def lora_a_product(plan: _Plan, x: torch.Tensor, A: torch.Tensor, config: TileConfig,
                   a_rows: torch.Tensor | None = None) -> torch.Tensor:
    """u [slots, r] = x[row] @ A[expert] for every sorted slot (x's rows are the slots themselves, or
    `a_rows` of them: the tokens), by the dense path of `_moe_matmul`: A [E, in, r] is the dense
    experts' [E, in, out] layout. No host sync."""
    r = A.shape[-1]
    cfg = replace(config, BN=max(16, triton.next_power_of_2(r)), dequant=False)
    u = torch.empty(plan.groups.order.numel(), r, device=x.device, dtype=x.dtype)
    return _launch(plan, x, A.contiguous(), None, r, A.shape[1], u, b_rows_are_n=True, a_rows=a_rows, config=cfg)


def _routed_experts_lora_epilogue(x, route_w, plan: _Plan, lora) -> torch.Tensor:
    """`routed_experts_triton` without autograd: each expert matmul's epilogue adds u @ B_e from the
    rank-r intermediate u (gate_up: x @ [all experts' A] by token when E * r is small, as
    `token_lora_delta` does; down: the per-expert a_e @ A_e), so no [slots, out] LoRA delta is
    written, read back or launched for. Same sums as the autograd path, in fp32 until the output."""
    E, H, r = lora.gate_up_A.shape
    xl = lora_input(lora, x)
    if E * r <= TOKEN_LORA_MAX_COLUMNS:
        A_flat = getattr(lora, "gate_up_A_flat", None)
        A_flat = all_experts_A(lora.gate_up_A) if A_flat is None else A_flat
        up = _LoRATerm(scaled(xl @ A_flat.to(x.dtype), lora.scaling), lora.gate_up_B.contiguous(), True, r)
    else:
        u = _slot_lora_a(plan, xl, lora.gate_up_A, a_rows=plan.groups.token)
        up = _LoRATerm(scaled(u, lora.scaling), lora.gate_up_B.contiguous(), False, 0)
    a = gate_up_forward(plan, x, lora=up)
    u = _slot_lora_a(plan, lora_input(lora, a), lora.down_A)
    down = _LoRATerm(scaled(u, lora.scaling), lora.down_B.contiguous(), False, 0)
    return down_forward(plan, a, route_w.contiguous(), lora=down)


def _slot_lora_a(plan: _Plan, x: torch.Tensor, A: torch.Tensor, a_rows: torch.Tensor | None = None) -> torch.Tensor:
    """[slots, r] = x[row] @ A[expert] per sorted slot (rows: the slots, or `a_rows` of x): on the
    kernel's dense path with `LORA_A_TILES`, else `grouped_product` on the gathered rows."""
    if LORA_A_TILES is not None and plan.groups.order.numel() <= LORA_A_MAX_SLOTS:
        return lora_a_product(plan, x, A, LORA_A_TILES, a_rows=a_rows)
    return grouped_product(x if a_rows is None else x[a_rows], A, plan.groups)
