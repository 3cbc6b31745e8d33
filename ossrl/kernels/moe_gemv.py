"""Routed MXFP4 experts for a token or two on the CUDA cores: matrix-vector products (decode).

At batch 1 a layer's MoE reads 4 experts' MXFP4 bytes (20b: 51 MB) for one token: a bandwidth
problem with no reuse, where the tensor-core kernels of `ossrl.kernels.moe_triton` (64-row tiles,
the MMA's smallest useful shape) reach 33.7% of the copy bandwidth on an H100 (session 13). A
plain GEMV over the same bytes, 16 to 32 rows a program and each row read whole, reached 78%
(`benchmarks/pdl_probe.py`, session 14). Here each program takes BN output rows of one slot's
expert (slot = token x k: no sort, no grouping launch), decodes the E2M1 codes with
`mxfp4_pairs` and contracts them against the input's even and odd columns with fp32 FMAs:

    gate_up: a[slot] = swiglu(W1_e x[token] + b1_e)              grid (slots, 2I / BN)
    down:    y[slot] = w_slot * (W2_e a[slot] + b2_e)            grid (slots, H / BN)
    out[token] = sum over the token's k slots of y (fp32, slot order: `combine_slots`)

Measured slower, so off (GEMV): on an H100 (benchmarks/results/moe_gemv_s14_h100.json, `moe.py
--gemv`, the whole layer in a CUDA graph) 1 token took 0.0572 ms against the 1-token tile's 0.0539
(16 x 512 tiles; 8 x 512 and 16 x 256 the same, 32-row tiles slower) and 2 tokens 0.0894 against
0.0763. So the byte GEMV's 78% does not survive here; the likely cost (not yet profiled) is the E2M1
decode on the CUDA cores, two values a byte at several integer instructions each, where the
tensor-core path decodes straight into MMA operands. Kept, with its tests, as the base for a
cheaper decode.

Rounding follows the tensor-core path's epilogues (fp32 sums and epilogue, a and y rounded to the
activations' dtype, the combine in fp32), not its bits: the products are summed in another order.
Forwards only (no autograd), no LoRA: `routed_experts_triton` sends other calls to the grouped
kernels. A token's experts are distinct, so nothing is read twice at one token; with more tokens,
experts two tokens share are read once per slot (`GEMV_MAX_TOKENS`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ossrl.kernels.moe import ExpertWeights
from ossrl.kernels.mxfp4_triton import mxfp4_pairs, ptx_decode

# Decode calls of at most GEMV_MAX_TOKENS tokens take the GEMV (`routed_experts_triton`) where GEMV
# is on: off, measured slower than the 1-token tile (module docstring; benchmarks' --moe-gemv switch).
GEMV = False
GEMV_MAX_TOKENS = 1
GEMV_TILE = (16, 512)  # (BN rows, BK input columns an iteration): the probe's fastest byte GEMV


def gemv_ok(x: torch.Tensor, experts: ExpertWeights, lora) -> bool:
    """Whether `routed_experts_gemv` serves this call (GEMV on): MXFP4 experts, at most
    GEMV_MAX_TOKENS tokens, no LoRA, no autograd."""
    return (GEMV and experts.format == "mxfp4" and lora is None and not torch.is_grad_enabled()
            and 0 < x.shape[0] <= GEMV_MAX_TOKENS and x.shape[-1] % 32 == 0)


@triton.jit
def _gemv_tile(blocks_ptr, scales_ptr, e, rows, row_mask, v_ptr, K, stride_be, stride_brow, stride_se,
               stride_srow, BN: tl.constexpr, BK: tl.constexpr, PTX: tl.constexpr):
    """sum_k W_e[rows, k] v[k] in fp32 ([BN]), W_e MXFP4 [N, K] (blocks as bytes [N, K/2])."""
    acc = tl.zeros((BN, BK // 2), tl.float32)
    for k0 in range(0, K, BK):
        lo, hi = mxfp4_pairs(blocks_ptr + e * stride_be, scales_ptr + e * stride_se, rows, row_mask, k0, K,
                             stride_brow, stride_srow, BN, BK, PTX)
        cols = k0 + tl.arange(0, BK)
        v = tl.load(v_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        v_even, v_odd = tl.split(v.reshape(BK // 2, 2))  # low nibbles hold the even input columns
        acc += lo.to(tl.float32) * v_even[None, :] + hi.to(tl.float32) * v_odd[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _gate_up_gemv(x_ptr, ids_ptr, blocks_ptr, scales_ptr, bias_ptr, a_ptr, N, K, stride_be, stride_brow, stride_se,
                  stride_srow, stride_bias, limit, alpha, TOP_K: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, PTX: tl.constexpr):
    """a[slot, pair] = clamped SwiGLU of rows (2 pair, 2 pair + 1) of W1_e x[token] + b1_e."""
    slot = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    row_mask = rows < N
    e = tl.load(ids_ptr + slot).to(tl.int64)
    z = _gemv_tile(blocks_ptr, scales_ptr, e, rows, row_mask, x_ptr + (slot // TOP_K) * K, K, stride_be,
                   stride_brow, stride_se, stride_srow, BN, BK, PTX)
    z += tl.load(bias_ptr + e * stride_bias + rows, mask=row_mask, other=0.0).to(tl.float32)
    gate, up = tl.split(z.reshape(BN // 2, 2))  # rows interleave (gate, up)
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    out = gate * tl.sigmoid(gate * alpha) * (up + 1.0)
    pairs = tl.program_id(1) * (BN // 2) + tl.arange(0, BN // 2)
    tl.store(a_ptr + slot * (N // 2) + pairs, out.to(a_ptr.dtype.element_ty), mask=pairs < N // 2)


@triton.jit
def _down_gemv(a_ptr, ids_ptr, route_w_ptr, blocks_ptr, scales_ptr, bias_ptr, y_ptr, N, K, stride_be, stride_brow,
               stride_se, stride_srow, stride_bias, BN: tl.constexpr, BK: tl.constexpr, PTX: tl.constexpr):
    """y[slot, rows] = w_slot * (W2_e a[slot] + b2_e)[rows]."""
    slot = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    row_mask = rows < N
    e = tl.load(ids_ptr + slot).to(tl.int64)
    y = _gemv_tile(blocks_ptr, scales_ptr, e, rows, row_mask, a_ptr + slot * K, K, stride_be, stride_brow,
                   stride_se, stride_srow, BN, BK, PTX)
    y += tl.load(bias_ptr + e * stride_bias + rows, mask=row_mask, other=0.0).to(tl.float32)
    y *= tl.load(route_w_ptr + slot).to(tl.float32)
    tl.store(y_ptr + slot * N + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def routed_experts_gemv(x: torch.Tensor, route_w: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights,
                        tile: tuple[int, int] | None = None) -> torch.Tensor:
    """x [N, H], routing weights and expert ids [N, k] -> [N, H], MXFP4 experts (module docstring)."""
    from ossrl.kernels.moe_triton import combine_slots

    BN, BK = tile or GEMV_TILE
    N, H = x.shape
    k = ids.shape[1]
    I2 = experts.gate_up_bias.shape[1]
    x, ids, route_w = x.contiguous(), ids.reshape(-1).contiguous(), route_w.reshape(-1).contiguous()
    gu, gus, dn, dns = experts.gate_up, experts.gate_up_scales, experts.down, experts.down_scales
    for name, blocks, scales in (("gate_up", gu, gus), ("down", dn, dns)):
        if blocks.stride(-1) != 1 or blocks.stride(-2) != 16 or blocks.stride(1) != blocks.shape[2] * 16:
            raise ValueError(f"MXFP4 {name} blocks must be contiguous rows, got strides {blocks.stride()}")
        if scales.stride(-1) != 1:
            raise ValueError(f"MXFP4 {name} scales must be contiguous along the input, got strides {scales.stride()}")
    ptx = ptx_decode(x)
    a = torch.empty(N * k, I2 // 2, device=x.device, dtype=x.dtype)
    _gate_up_gemv[(N * k, triton.cdiv(I2, BN))](
        x, ids, gu, gus, experts.gate_up_bias, a, I2, H, gu.stride(0), gu.stride(1), gus.stride(0), gus.stride(1),
        experts.gate_up_bias.stride(0), float(experts.limit), float(experts.alpha),
        TOP_K=k, BN=BN, BK=BK, PTX=ptx, num_warps=4)
    y = torch.empty(N * k, H, device=x.device, dtype=x.dtype)
    _down_gemv[(N * k, triton.cdiv(H, BN))](
        a, ids, route_w, dn, dns, experts.down_bias, y, H, I2 // 2, dn.stride(0), dn.stride(1), dns.stride(0),
        dns.stride(1), experts.down_bias.stride(0), BN=BN, BK=BK, PTX=ptx, num_warps=4)
    return combine_slots(y.view(N, k, H))
