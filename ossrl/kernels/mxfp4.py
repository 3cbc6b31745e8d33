"""MXFP4 (OCP microscaling FP4) decode and encode, in plain PyTorch (spec sections 3.2 and 3.5).

A weight matrix [rows, in] is stored as `blocks` uint8 [rows, in/32, 16] (two E2M1 codes per
byte: low nibble = even column, high nibble = odd column) and `scales` uint8 [rows, in/32]
(E8M0 exponent, bias 127). Decoding is exact in bf16 and fp32. Encoding follows the
triton_kernels rule: scale = amax/6 rounded *up* to a power of two, round-to-nearest-even E2M1,
saturating at +-6. The GPU kernels decode tiles in registers; this module is their oracle and
the CPU path.
"""

from __future__ import annotations

import torch

FP4_VALUES = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)
BLOCK = 32  # input elements per scale


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[..., G, 16] uint8 codes and [..., G] uint8 exponents -> [..., G*32] values of `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 shapes do not match: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    low = lut[(blocks & 0x0F).long()]
    high = lut[(blocks >> 4).long()]
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., G, 32], even/odd interleaved
    exponents = scales.to(torch.int32) - 127
    values = torch.ldexp(values, exponents.unsqueeze(-1).to(values.device)).to(dtype)
    return values.flatten(-2)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., in] float values -> (blocks [..., in/32, 16] uint8, scales [..., in/32] uint8).

    Blocks of 32 along the last (contraction) dimension. Values already representable in MXFP4
    round-trip to the same values (not always the same bytes; spec 3.5).
    """
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"the last dimension ({weight.shape[-1]}) must be a multiple of {BLOCK}")
    x = weight.float().reshape(*weight.shape[:-1], weight.shape[-1] // BLOCK, BLOCK)
    amax = x.abs().amax(dim=-1)  # [..., G]
    # dequant_scale = amax / 6, rounded up to a power of two on the fp32 bits.
    bits = (amax / 6.0).view(torch.int32)
    bits = (bits + 0x7FFFFF) & 0x7F800000
    scale_exp = (bits >> 23)  # biased exponent, 0..255
    scale = bits.view(torch.float32)
    # amax == 0 gives scale 0: keep the exponent byte 0 and quantize against 2^-127 (all zeros).
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = x / safe_scale.unsqueeze(-1)
    codes = _e2m1_round(q)
    codes = codes.reshape(*codes.shape[:-1], BLOCK // 2, 2)
    packed = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)
    return packed, scale_exp.to(torch.uint8)


def _e2m1_round(q: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (ties to even mantissa), saturating at 6; returns int32 codes 0..15."""
    mag = q.abs().clamp(max=6.0)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], device=q.device)
    # Index of the grid point nearest to mag; on an exact tie pick the even code (even mantissa bit).
    upper = torch.searchsorted(grid, mag.contiguous(), right=False).clamp(1, 7)
    lower = upper - 1
    d_low = mag - grid[lower]
    d_up = grid[upper] - mag
    pick_up = (d_up < d_low) | ((d_up == d_low) & (upper % 2 == 0))
    code = torch.where(pick_up, upper, lower).to(torch.int32)
    code = torch.where(mag == 0, torch.zeros_like(code), code)
    sign = (q < 0) & (code > 0)
    return code | (sign.to(torch.int32) << 3)
