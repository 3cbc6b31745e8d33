"""MXFP4 decode on the GPU (Triton): E2M1 codes and E8M0 scales to bf16 / fp32 tiles in registers,
and whole experts to a dense bf16 copy. Used by the grouped expert matmuls in
`ossrl.kernels.moe_triton`; the plain-PyTorch oracle is `ossrl.kernels.mxfp4.dequantize_mxfp4`.

Three decodes compute the same values (spec 3.2): `mxfp4_tile` by fp32 arithmetic (any GPU, the
interpreter); `mxfp4_pairs` by packed integer PTX on sm_90 (`ptx_decode`), which returns the
even and odd input columns apart so that callers contract them without an interleave; and
`mxfp4_words`, which reads the codes as 32-bit words and returns each 32-column block in the order
`permute_k32` gives the activations, the order in which every thread's words decode straight into
its wgmma operand registers (no shared-memory round trip of decoded values, no byte repacking).
"""

from __future__ import annotations

import re

import torch
import triton
import triton.language as tl


@triton.jit
def _e2m1_to_f32(code):
    """uint8 E2M1 codes (0..15) -> fp32 values times 2^-14 (spec 3.2 LUT, exactly).

    The 3 magnitude bits placed at fp16's exponent/mantissa boundary give 2^-14 * value, with
    code 1 (0.5) landing on an fp16 subnormal that the fp16 -> fp32 conversion keeps exact.
    """
    c = code.to(tl.int16)
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e8m0_to_f32(s):
    """E8M0 exponents (uint8, 0..254) -> 2^(s-127) in fp32, exactly (s = 0: the subnormal 2^-127)."""
    si = s.to(tl.int32)
    return tl.where(si == 0, 5.877471754111438e-39, (si << 23).to(tl.float32, bitcast=True))


@triton.jit
def _load_codes(blocks_ptr, scales_ptr, rows, row_mask, col0, n_cols, stride_brow, stride_srow, C: tl.constexpr):
    """One expert's codes for `rows` x input columns col0..col0+C: bytes [R, C/2] (two codes each)
    and E8M0 scales [R, C/32], zero where masked."""
    bcols = col0 // 2 + tl.arange(0, C // 2)
    b = tl.load(blocks_ptr + rows[:, None] * stride_brow + bcols[None, :],
                mask=row_mask[:, None] & (bcols[None, :] < n_cols // 2), other=0)
    groups = col0 // 32 + tl.arange(0, C // 32)
    s = tl.load(scales_ptr + rows[:, None] * stride_srow + groups[None, :],
                mask=row_mask[:, None] & (groups[None, :] < n_cols // 32), other=0)
    return b, s


@triton.jit
def mxfp4_tile(blocks_ptr, scales_ptr, rows, row_mask, col0, n_cols, stride_brow, stride_srow,
                R: tl.constexpr, C: tl.constexpr):
    """Decoded [R, C] fp32 tile of one expert: `rows` (outputs) x input columns col0..col0+C."""
    b, s = _load_codes(blocks_ptr, scales_ptr, rows, row_mask, col0, n_cols, stride_brow, stride_srow, C)
    v = tl.join(_e2m1_to_f32(b & 15), _e2m1_to_f32(b >> 4)).reshape(R, C) * 16384.0  # low nibble = even column
    return (v.reshape(R, C // 32, 32) * _e8m0_to_f32(s)[:, :, None]).reshape(R, C)


# E2M1 pairs with packed integer ops (PTX), four bytes per instance: prmt spreads bytes (0, 1) and
# (2, 3) into the 16-bit halves of t0 and t1; then for each output pair, each code's 3 magnitude
# bits go to bf16 bits 6-8 and its sign to bit 15, which is the value times 2^-126 exactly (code 1,
# 0.5, lands on a bf16 subnormal); then x 2^126 (k) and x the block scale, two elements per multiply.
# Outputs: $0 $1 = low nibbles of bytes (0, 1), (2, 3); $2 $3 = high nibbles (shifted 4 less);
# inputs: $4 the four bytes, $5 $6 the bf16 scale bits of bytes (0, 1), (2, 3).
def _e2m1_pair_ptx(out: str, src: str, shift: int, scale: str) -> str:
    return (f"shl.b32 u, {src}, {shift};\nand.b32 u, u, 0x01C001C0;\n"  # magnitude to bits 6-8
            f"shl.b32 v, {src}, {shift + 6};\nand.b32 v, v, 0x80008000;\n"  # sign to bit 15
            f"or.b32 u, u, v;\nmul.rn.bf16x2 u, u, k;\nmul.rn.bf16x2 {out}, u, {scale};\n")


_E2M1_PAIRS_PTX = tl.constexpr(
    "\n{\n.reg .b32 t0, t1, u, v, k;\nmov.b32 k, 0x7E807E80;\n"
    "prmt.b32 t0, $4, 0, 0x4140;\nprmt.b32 t1, $4, 0, 0x4342;\n"
    + _e2m1_pair_ptx("$0", "t0", 6, "$5") + _e2m1_pair_ptx("$1", "t1", 6, "$6")
    + _e2m1_pair_ptx("$2", "t0", 2, "$5") + _e2m1_pair_ptx("$3", "t1", 2, "$6") + "}\n")


@triton.jit
def mxfp4_pairs(blocks_ptr, scales_ptr, rows, row_mask, col0, n_cols, stride_brow, stride_srow,
                 R: tl.constexpr, C: tl.constexpr, PTX: tl.constexpr):
    """Decoded [R, C/2] tiles of one expert, `rows` (outputs) x input columns col0..col0+C split by
    parity: (even columns, odd columns), bf16 from PTX, fp32 from the arithmetic fallback. No
    interleave is needed: callers contract them against the activations' even and odd columns."""
    b, s = _load_codes(blocks_ptr, scales_ptr, rows, row_mask, col0, n_cols, stride_brow, stride_srow, C)
    if PTX:
        si = s.to(tl.int16)
        bits = tl.where(si == 0, 0x40, si << 7)  # 2^(s-127) as bf16 (s = 0: the subnormal 2^-127)
        bits = tl.broadcast_to(bits[:, :, None], (R, C // 32, 16)).reshape(R, C // 2)
        lo, hi = tl.inline_asm_elementwise(_E2M1_PAIRS_PTX, "=r,=r,=r,=r,r,r,r", [b, bits],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:  # GPUs before sm_90 (no mul.bf16x2) and the interpreter: the same values by fp32 arithmetic
        scale = tl.broadcast_to(_e8m0_to_f32(s)[:, :, None], (R, C // 32, 16)).reshape(R, C // 2)
        lo = _e2m1_to_f32(b & 15) * 16384.0 * scale
        hi = _e2m1_to_f32(b >> 4) * 16384.0 * scale
    return lo, hi


# Eight E2M1 codes per 32-bit word (codes i = 0..7 at bits 4i: input columns 8w + i). Output m
# (m = 0..3) pairs code m (low half) with code m + 4 (high half, 16 bits up), so one shift places
# both: magnitude bits to bf16 bits 6-8, sign to bit 15 (the value times 2^-126, exactly; code 1
# lands on a subnormal), then x 2^126 (k) and x the block scale ($6), two elements per multiply.
def _e2m1_word_ptx(m: int) -> str:
    mag = 6 - 4 * m
    mag_op = f"shl.b32 u, $4, {mag};" if mag >= 0 else f"shr.u32 u, $4, {-mag};"
    sign_op = f"shl.b32 v, $4, {12 - 4 * m};" if m < 3 else "mov.b32 v, $4;"
    return (f"{mag_op}\nand.b32 u, u, 0x01C001C0;\n{sign_op}\nand.b32 v, v, 0x80008000;\n"
            f"or.b32 u, u, v;\nmul.rn.bf16x2 u, u, k;\nmul.rn.bf16x2 ${m}, u, $6;\n")


_WORD_ASM_TAG = "ossrl word decode"  # a PTX comment that marks the word asm in compiled kernels


def _e2m1_words_ptx() -> str:
    return (f"{{\n// {_WORD_ASM_TAG}\n.reg .b32 u, v, k;\nmov.b32 k, 0x7E807E80;\n"
            + "".join(_e2m1_word_ptx(m) for m in range(4)) + "}\n")


# Folded (scales of at most 2, E8M0 <= 128: 2^126 * 2^(s-127) = 2^(s-1) is a normal bf16, and one
# multiply by it rounds exactly as the two, the product being the same real number). Its bit
# placement moves work from shifts to the multiplier: codes m and m + 4 masked (t = word & 0x000F000F,
# or 0x00F000F0 for odd m; the word shifted down a byte for m = 2, 3), then t * (2^6 + 2^12) (odd
# m: 2^2 + 2^8) puts the magnitude bits at 6-8 and a copy of the sign at 15 without carries (the two
# shifted copies do not overlap), and one mask keeps those: 3 integer instructions a pair against 4.
def _e2m1_word_folded_ptx(m: int) -> str:
    src = "$4" if m < 2 else "w"
    mask, mul = ("0x000F000F", "0x1040") if m % 2 == 0 else ("0x00F000F0", "0x0104")
    return (f"and.b32 u, {src}, {mask};\nmul.lo.u32 u, u, {mul};\nand.b32 u, u, 0x81C081C0;\n"
            f"mul.rn.bf16x2 ${m}, u, $6;\n")


_E2M1_WORDS_PTX = tl.constexpr(_e2m1_words_ptx())
_E2M1_WORDS_FOLDED_PTX = tl.constexpr(f"{{\n// {_WORD_ASM_TAG}\n.reg .b32 u, w;\nshr.u32 w, $4, 8;\n"
                                      + "".join(_e2m1_word_folded_ptx(m) for m in range(4)) + "}\n")


def word_asm_pairs_halves(ttgir: str) -> bool:
    """Whether every word-decode asm in a compiled kernel (its TTGIR text) gets, in each packed
    register pair, the two halves h = 0, 1 of one word, as its PTX assumes: operands shaped
    [..., 4, 2] whose layout's first register basis steps h alone. Triton's layout choices (the
    wgmma operand layout propagated back to the words) make this so for bf16 tiles of BN a
    multiple of 64 on whole warpgroups; mma.sync and tf32 layouts, or a broadcast hoisted past the
    asm, pair other elements. False if the kernel has no word asm."""
    lines = ttgir.split("\n")
    found = False
    for line in lines:
        if "tt.elementwise_inline_asm" not in line or _WORD_ASM_TAG not in line:
            continue
        found = True
        operand = re.search(r": tensor<((?:\d+x)+)i32, (#\w+)>", line)
        if operand is None:
            return False
        dims = [int(d) for d in operand.group(1).rstrip("x").split("x")]
        layout = next((text for text in lines if text.startswith(operand.group(2) + " = ")), "")
        if dims[-2:] != [4, 2]:
            return False
        if "#ttg.linear" in layout:
            first = re.search(r"register = \[\[([^\]]*)\]", layout)
            if first is None or first.group(1).replace(" ", "") != ",".join(["0"] * (len(dims) - 1) + ["1"]):
                return False
        elif "#ttg.blocked" in layout:
            per_thread = re.search(r"sizePerThread = \[([^\]]*)\]", layout)
            order = re.search(r"order = \[(\d+)", layout)
            if per_thread is None or order is None or per_thread.group(1).replace(" ", "").split(",")[-1] != "2" \
                    or int(order.group(1)) != len(dims) - 1:
                return False
        else:
            return False
    return found


@triton.jit
def permute_k32(x, R: tl.constexpr, C: tl.constexpr):
    """x [R, C] with each block of 32 columns reordered as `mxfp4_words` returns the weights:
    position 8m + 2q + h holds column 8q + m + 4h (C a multiple of 32)."""
    return tl.permute(x.reshape(R, C // 32, 4, 2, 2, 2), (0, 1, 4, 5, 2, 3)).reshape(R, C)


def permute_k32_rows(x: torch.Tensor) -> torch.Tensor:
    """`permute_k32` in PyTorch: a copy of x [rows, C] (C a multiple of 32) with each 32-column
    block in the word decode's order, made once before a kernel that reads it as it is."""
    rows, C = x.shape
    return x.reshape(rows, C // 32, 4, 2, 2, 2).permute(0, 1, 4, 5, 2, 3).reshape(rows, C)


def tile_blocks(blocks: torch.Tensor, rows: int, words: int) -> torch.Tensor:
    """MXFP4 blocks [E, N, G, 16] -> the same bytes, same shape, tile-contiguous: each expert's rows
    in runs of `rows`, and within a run the words (4 bytes: 8 codes) in chunks of `words` columns,
    each chunk's rows x words stored contiguously (a ragged last chunk as wide as what is left).
    `mxfp4_words(TILE_R=rows, TILE_W=words)` reads it; a kernel tile of `rows` rows and `words`
    columns (or a divisor of it) is then one contiguous span instead of `rows` strided pieces."""
    E, N, G, _ = blocks.shape
    kw = G * 4  # words a row
    if N % rows or words % 4:
        raise ValueError(f"tile_blocks: {N} rows in runs of {rows}, chunks of {words} words (a multiple of 4)")
    w = blocks.contiguous().view(torch.int32).reshape(E, N // rows, rows, kw)
    full = kw // words
    parts = [w[..., :full * words].reshape(E, N // rows, rows, full, words).permute(0, 1, 3, 2, 4).reshape(E, N // rows, -1)]
    if kw % words:
        parts.append(w[..., full * words:].reshape(E, N // rows, -1))
    return torch.cat(parts, -1).reshape(E, N, kw).view(torch.uint8).reshape(E, N, G, 16)


def untile_blocks(tiled: torch.Tensor, rows: int, words: int) -> torch.Tensor:
    """The inverse of `tile_blocks`."""
    E, N, G, _ = tiled.shape
    kw = G * 4
    t = tiled.contiguous().view(torch.int32).reshape(E, N // rows, rows * kw)
    full = kw // words
    head = t[..., :rows * full * words].reshape(E, N // rows, full, rows, words).permute(0, 1, 3, 2, 4)
    head = head.reshape(E, N // rows, rows, full * words)
    if kw % words:
        head = torch.cat([head, t[..., rows * full * words:].reshape(E, N // rows, rows, kw - full * words)], -1)
    return head.reshape(E, N, kw).view(torch.uint8).reshape(E, N, G, 16)


@triton.jit
def mxfp4_words(words_ptr, rows, row_mask, col0, n_cols, stride_wrow, scales,
                R: tl.constexpr, C: tl.constexpr, PTX: tl.constexpr, EVEN: tl.constexpr = False,
                FOLD: tl.constexpr = False, TILE_R: tl.constexpr = 0, TILE_W: tl.constexpr = 0):
    """Decoded [R, C] tile of one expert (rows = outputs, input columns col0..col0+C, C a multiple of
    32) with each 32-column block in `permute_k32`'s order; the codes read as int32 words
    (`words_ptr` the blocks viewed as int32, `stride_wrow` in words) and `scales` the [R, C/32] E8M0
    tile (the caller loads it, one iteration ahead). bf16 from PTX, fp32 from the arithmetic fallback.
    EVEN: n_cols is a whole number of C-column tiles (no column masks). FOLD (PTX only; every scale
    <= 128): one multiply by 2^126 x the scale instead of two, the same bits. The PTX pairs the two
    elements of each packed register as halves of one word: callers run it only in the wgmma
    operand layout (`moe_triton._word_layout_ok`).
    TILE_R, TILE_W: the blocks are in `tile_blocks(blocks, TILE_R, TILE_W)`'s layout (C / 8 divides
    TILE_W)."""
    wcols = col0 // 8 + tl.arange(0, C // 8)
    # Rows of n_cols / 8 words, a multiple of 4, so 16-byte copies; the runtime specialisation sees
    # 360 for gpt-oss (not a multiple of 16) and would copy word by word (measured: twice as slow).
    # Written as products, which carry the divisibility (a tl.multiple_of hint on an argument is lost).
    stride_wrow = stride_wrow // 4 * 4
    n_words = n_cols // 32 * 4
    if TILE_R:  # run of TILE_R rows, chunk of TILE_W words (the last chunk: what is left, a multiple of 4)
        chunk = col0 // (8 * TILE_W)
        width = tl.minimum(TILE_W // 4, n_cols // 32 - chunk * (TILE_W // 4)) * 4
        offs = ((rows // TILE_R) * (TILE_R * stride_wrow) + chunk * (TILE_R * TILE_W) + (rows % TILE_R) * width)[:, None] \
            + (wcols - chunk * TILE_W)[None, :]
    else:
        offs = rows[:, None] * stride_wrow + wcols[None, :]
    if EVEN:  # the caller's K is a whole number of C-column tiles
        words = tl.load(words_ptr + offs, mask=row_mask[:, None], other=0)
    else:
        words = tl.load(words_ptr + offs, mask=row_mask[:, None] & (wcols[None, :] < n_words), other=0)
    # [R, block s, word q of the block, half h]: each asm call reads one word (both halves alike)
    words = tl.broadcast_to(words.reshape(R, C // 32, 4)[:, :, :, None], (R, C // 32, 4, 2))
    if PTX:  # the scale's bf16 bits in both halves of a register
        if FOLD:  # 2^(s-1) = 2^126 x the scale ((s + 126) << 7, s <= 128)
            bits = scales.to(tl.int32) * 0x00800080 + 0x3F003F00
        else:  # 2^(s-127) (s << 7; s = 0: the subnormal 2^-127, 0x40)
            bits = tl.maximum(scales.to(tl.int32) * 0x00800080, 0x00400040)
        bits = tl.broadcast_to(bits[:, :, None, None], (R, C // 32, 4, 2))
        o0, o1, o2, o3 = tl.inline_asm_elementwise(_E2M1_WORDS_FOLDED_PTX if FOLD else _E2M1_WORDS_PTX,
                                                   "=r,=r,=r,=r,r,r,r,r", [words, bits],
                                                   dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2)
    else:  # GPUs before sm_90 and the interpreter: the same values by fp32 arithmetic
        scale = _e8m0_to_f32(scales)[:, :, None, None] * 16384.0
        shift = 16 * tl.arange(0, 2)[None, None, None, :]  # half h holds code m + 4
        o0 = _e2m1_to_f32((words >> shift) & 15) * scale
        o1 = _e2m1_to_f32((words >> (shift + 4)) & 15) * scale
        o2 = _e2m1_to_f32((words >> (shift + 8)) & 15) * scale
        o3 = _e2m1_to_f32((words >> (shift + 12)) & 15) * scale
    w = tl.join(tl.join(o0, o1), tl.join(o2, o3))  # [R, s, q, h, m % 2, m // 2]
    return tl.permute(w, (0, 1, 5, 4, 2, 3)).reshape(R, C)  # position 8m + 2q + h of each block


@triton.jit
def _dequant_kernel(blocks_ptr, scales_ptr, out_ptr, R, C, stride_be, stride_brow, stride_se, stride_srow,
                    stride_oe, stride_ok, BR: tl.constexpr, BC: tl.constexpr, PTX: tl.constexpr):
    """One expert's MXFP4 [R (out), C (in)] tile -> out[e, in, out] (the dense experts' layout)."""
    e = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    col0 = tl.program_id(1) * BC
    lo, hi = mxfp4_pairs(blocks_ptr + e * stride_be, scales_ptr + e * stride_se, rows, rows < R, col0, C,
                          stride_brow, stride_srow, BR, BC, PTX)
    even = col0 + 2 * tl.arange(0, BC // 2)  # input columns of the low nibbles; the high ones are even + 1
    ptrs = out_ptr + e * stride_oe + even[:, None].to(tl.int64) * stride_ok + rows[None, :]
    mask = (even[:, None] < C) & (rows[None, :] < R)
    tl.store(ptrs, tl.trans(lo).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(ptrs + stride_ok, tl.trans(hi).to(out_ptr.dtype.element_ty), mask=mask)


def ptx_decode(t: torch.Tensor) -> bool:
    """Whether the PTX pair decode can run for tensors like t: it needs sm_90 (`mul.bf16x2`)."""
    return t.is_cuda and torch.cuda.get_device_capability(t.device) >= (9, 0)


def dequantize_experts(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 experts, blocks [E, out, in/32, 16] and scales [E, out, in/32] -> dense [E, in, out]
    of `dtype` (as bf16 experts are stored), in one pass on the GPU."""
    E, R, G = scales.shape
    C = G * 32
    out = torch.empty(E, C, R, device=blocks.device, dtype=dtype)
    BR, BC = 64, 64
    _dequant_kernel[(triton.cdiv(R, BR), triton.cdiv(C, BC), E)](
        blocks, scales, out, R, C, blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1),
        out.stride(0), out.stride(1), BR=BR, BC=BC, PTX=ptx_decode(blocks))
    return out
