"""What reading the routed experts' MXFP4 bytes costs with no arithmetic: the MoE decode's ceiling.

The decode kernels reach 31-56% of copy bandwidth at 1-64 tokens (docs/benchmarks.md, MoE), and
neither fewer instructions (the fold, session 9) nor earlier scale loads or a register-free K
permute (session 11) moved them by more than 2%. These kernels read the same bytes with nothing
else to do, so they say how much of the gap is the memory path itself:

- "tiles": the decode's own mapping: one program per (hit expert, BN rows, K part), each walking
  its part of K in BK-column tiles (BK / 2 bytes of codes and BK / 32 scales a row), pipelined
  `stages` deep.
  Row r of a tile is 1,440 contiguous bytes at gpt-oss's K = 2,880, so each tile load is BN
  segments of BK / 2 bytes, and the scales BN segments of BK / 32 bytes, 90 bytes apart (a
  ragged last K tile masked, as in the decode).
- "flat": the same experts' bytes as one contiguous span each (codes, then scales), cut into
  the same number of programs: the access pattern at its best.

Each program folds what it read into one int32 (xor), so nothing is optimised away, and the
result is checkable (`expected_xor`). `python benchmarks/moe.py --read-roofline` times them.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines without Triton
    triton = None

if triton is not None:

    @triton.jit
    def _read_tiles(blocks, scales, experts, out, ROWS: tl.constexpr, KW: tl.constexpr, KS: tl.constexpr,
                    BN: tl.constexpr, BKW: tl.constexpr, BKS: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr):
        """blocks: int32 words [E, ROWS, KW]; scales uint8 [E, ROWS, KS]; program pid reads rows
        [n0, n0 + BN) of expert experts[pid // (SPLIT * ROWS // BN)], part pid % SPLIT of its K
        tiles (as the decode's split-K), BKW words and BKS scales a row a step."""
        pid = tl.program_id(0)
        part = pid % SPLIT
        tile = pid // SPLIT
        e = tl.load(experts + tile // (ROWS // BN)).to(tl.int64)
        n0 = (tile % (ROWS // BN)) * BN
        rows = n0 + tl.arange(0, BN)
        words = blocks + e * ROWS * KW + rows[:, None].to(tl.int64) * KW + tl.arange(0, BKW)[None, :]
        sc = scales + e * ROWS * KS + rows[:, None].to(tl.int64) * KS + tl.arange(0, BKS)[None, :]
        acc = tl.zeros([BN, BKW], dtype=tl.int32)
        acc_s = tl.zeros([BN, BKS], dtype=tl.int32)
        steps = tl.cdiv(tl.cdiv(KW, BKW), SPLIT)
        # a ragged last tile masked, as the decode's (and steps past the last tile: all masked)
        for k in tl.range(part * steps, part * steps + steps, num_stages=STAGES):
            w_mask = (k * BKW + tl.arange(0, BKW) < KW)[None, :]
            s_mask = (k * BKS + tl.arange(0, BKS) < KS)[None, :]
            acc ^= tl.load(words + k * BKW, mask=w_mask, other=0)
            acc_s ^= tl.load(sc + k * BKS, mask=s_mask, other=0).to(tl.int32)
        folded = tl.reduce(acc, 1, _xor) ^ tl.reduce(acc_s, 1, _xor)
        tl.store(out + pid, tl.reduce(folded, 0, _xor))

    @triton.jit
    def _read_flat(blocks, scales, experts, out, WORDS: tl.constexpr, SCALES: tl.constexpr, PARTS: tl.constexpr,
                   BW: tl.constexpr, BS: tl.constexpr, STAGES: tl.constexpr):
        """A program reads part pid % PARTS of expert experts[pid // PARTS]'s WORDS int32 words and
        SCALES scale bytes, both contiguous, BW words and BS bytes a step."""
        pid = tl.program_id(0)
        e = tl.load(experts + pid // PARTS).to(tl.int64)
        part = pid % PARTS
        w0 = blocks + e * WORDS + part * (WORDS // PARTS)
        s0 = scales + e * SCALES + part * (SCALES // PARTS)
        acc = tl.zeros([BW], dtype=tl.int32)
        acc_s = tl.zeros([BS], dtype=tl.int32)
        for k in tl.range(0, tl.cdiv(WORDS // PARTS, BW), num_stages=STAGES):
            idx = k * BW + tl.arange(0, BW)
            acc ^= tl.load(w0 + idx, mask=idx < WORDS // PARTS, other=0)
        for k in tl.range(0, tl.cdiv(SCALES // PARTS, BS), num_stages=STAGES):
            idx = k * BS + tl.arange(0, BS)
            acc_s ^= tl.load(s0 + idx, mask=idx < SCALES // PARTS, other=0).to(tl.int32)
        tl.store(out + pid, tl.reduce(acc, 0, _xor) ^ tl.reduce(acc_s, 0, _xor))

    @triton.jit
    def _xor(a, b):
        return a ^ b


def tiles_fit(blocks: torch.Tensor, bn: int, bk: int) -> bool:
    """Whether `read_tiles` takes bn-row, bk-column tiles of these codes [E, rows, K/32, 16]."""
    return blocks.shape[1] % bn == 0 and bk % 32 == 0


def parts_fit(blocks: torch.Tensor, scales: torch.Tensor, parts: int) -> bool:
    """Whether `read_flat` cuts each expert's code words and scales into `parts` equal spans."""
    return (blocks[0].numel() // 4) % parts == 0 and scales[0].numel() % parts == 0


def read_tiles(blocks: torch.Tensor, scales: torch.Tensor, experts: torch.Tensor, *, bn: int = 64, bk: int = 128,
               split_k: int = 1, stages: int = 4, num_warps: int = 4) -> torch.Tensor:
    """Read experts' codes (blocks uint8 [E, rows, K/32, 16]) and scales ([E, rows, K/32]) as the
    decode's tiles of bn rows x bk columns, K cut in split_k parts: one int32 per program (xor of
    everything it read)."""
    E, rows, kb, _ = blocks.shape
    words = blocks.view(E, rows, kb * 16).view(torch.int32)  # [E, rows, K/8]
    kw, ks = words.shape[-1], scales.shape[-1]
    bkw, bks = bk // 8, bk // 32
    if not tiles_fit(blocks, bn, bk):
        raise ValueError(f"read_tiles: {rows} rows do not cut into tiles of {bn} rows, or {bk} is not a multiple of 32")
    out = torch.empty(experts.numel() * (rows // bn) * split_k, dtype=torch.int32, device=blocks.device)
    _read_tiles[(out.numel(),)](words, scales, experts, out, ROWS=rows, KW=kw, KS=ks, BN=bn, BKW=bkw, BKS=bks,
                                SPLIT=split_k, STAGES=stages, num_warps=num_warps)
    return out


def read_flat(blocks: torch.Tensor, scales: torch.Tensor, experts: torch.Tensor, *, parts: int, block_words: int = 1024,
              block_scales: int = 512, stages: int = 4, num_warps: int = 4) -> torch.Tensor:
    """Read the same bytes as `read_tiles`, each expert's codes and scales as contiguous spans cut
    into `parts` equal programs (each masked at its end): one int32 per program."""
    E = blocks.shape[0]
    words = blocks.reshape(E, -1).view(torch.int32)
    flat_scales = scales.reshape(E, -1)
    n_words, n_scales = words.shape[1], flat_scales.shape[1]
    if not parts_fit(blocks, scales, parts):
        raise ValueError(f"read_flat: {n_words} words / {n_scales} scales do not cut into {parts} parts")
    out = torch.empty(experts.numel() * parts, dtype=torch.int32, device=blocks.device)
    _read_flat[(out.numel(),)](words, flat_scales, experts, out, WORDS=n_words, SCALES=n_scales, PARTS=parts,
                               BW=block_words, BS=block_scales, STAGES=stages, num_warps=num_warps)
    return out


def expected_xor(blocks: torch.Tensor, scales: torch.Tensor, experts: torch.Tensor) -> int:
    """The xor of every int32 code word and every scale byte of the experts (either kernel's
    outputs xor to this)."""
    words = blocks[experts.long()].reshape(-1).view(torch.int32)
    acc = 0
    for t in (words, scales[experts.long()].reshape(-1).to(torch.int32)):
        t = t.to(torch.int64) & 0xFFFFFFFF
        while t.numel() > 1:
            if t.numel() % 2:
                t = torch.cat([t, t.new_zeros(1)])
            t = t[0::2] ^ t[1::2]
        acc ^= int(t[0]) if t.numel() else 0
    return acc
