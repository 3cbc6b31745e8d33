"""The MoE kernels' tile shapes: `TileConfig` and `default_config`, the pick by rows per expert from
the sweeps in benchmarks/moe.py (their history in the comments). `moe_triton.choose_config`
adjusts the pick for the experts' copies; benchmarks swap `moe_triton.default_config` to try
other tiles.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass


@dataclass(frozen=True)
class TileConfig:
    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int
    # the options by name only: a field added among them (as `fixup` was, before `words`, in session
    # 13) then cannot silently shift what a positional tuple means (tests' tuples did, unseen until session 20)
    _: KW_ONLY
    dot_scaled: bool = True  # MXFP4 forward through tl.dot_scaled (else our own decode)
    GROUP_M: int = 8
    swap_ab: bool = False  # MXFP4 forward, own decode: compute C^T = W a^T (weights stay in registers)
    packed: bool = True  # MXFP4 forward, own decode: E2M1 pairs by packed integer ops (PTX on CUDA)
    dequant: bool = False  # MXFP4: decode each projection to a transient bf16 copy, then the dense kernel
    # (with `words`, the backward only: the word forward decodes into its wgmma registers)
    split_k: int = 1  # K cut in parts (fp32 partials, then `_split_k_epilogue`); not with DW_EPILOGUE
    # split_k > 1: the tile's last part to finish sums the partials and runs the epilogue (an arrival
    # count per tile) instead of a second launch; `SPLIT_K_FIXUP` overrides it where not None
    fixup: bool = False
    # swap_ab: codes read as 32-bit words (`mxfp4_words`; BK a multiple of 32; on sm_90 only where
    # `_word_layout_ok`: bf16, BN a multiple of 64, whole warpgroups; else the pair decode runs)
    words: bool = False
    maxnreg: int | None = None  # a register cap for the matmul kernel (ptxas spills above it)
    scales_ahead: int = 1  # words: K tiles of scales loaded ahead of their use (1 or 2; registers, not smem)
    # words: the activations copied with each 32-column block in the decode's order (`permute_k32`)
    # before the kernel, so the staged tile feeds the MMA as it is; else each tile is permuted in
    # registers and written back to shared memory (offline sm_90: 84 -> 62 registers, no fence)
    permuted_input: bool = False

    def __post_init__(self):
        if self.scales_ahead not in (1, 2):
            raise ValueError(f"TileConfig.scales_ahead must be 1 or 2, got {self.scales_ahead}")


def default_config(slots: int, num_experts: int, mxfp4: bool) -> TileConfig:
    """Tile shapes by rows per expert: decode is bandwidth-bound (small BM, many column tiles),
    training is compute-bound (128x128 tiles on the tensor cores)."""
    per_expert = slots / num_experts  # picked from the sweep in benchmarks/moe.py (H100, 20b shapes)
    # MXFP4 decode sweeps (benchmarks/moe.py --decode-sweep, H100, 20b layer, gate_up + down; the
    # 1-token times vary between runs by up to 2x, the others by a few %):
    # 1 token: our own decode at 16x32x256 (0.086 ms in one run; tl.dot_scaled 0.102). 8 and 64
    # tokens: C^T = W a^T at 16x64x128 (0.266 / 0.398 ms against 0.280 / 0.424 for tl.dot_scaled);
    # batch-64 decode steps 13.3 -> 12.6 ms. All are ALU-bound on the E2M1 decode.
    # Packed E2M1 pairs (PTX), same sweep: 8 tokens 0.265 -> 0.209 ms, 64 tokens 0.396 -> 0.313 ms
    # (45% of bandwidth) at 16x64x128 swap_ab; 1 token 0.101 ms at 16x32x128 swap_ab (the
    # unpacked 16x32x256 read 0.158 in that run, 0.084 in the one before).
    # Split-K (session 6 sweep on an H100, CUDA-graph replay, results/moe_decode_sweep_split.json):
    # 1 token 16x64x128 swap_ab packed in 4 K parts 0.0706 ms against 0.0784 unsplit and more
    # for the old 16x32x128 pick; batch-1 decode step 4.37 -> 3.68 ms. 8 and 64 tokens: no split wins.
    # Codes read as 32-bit words (`mxfp4_words`, session 8 sweep, H100, graph replay,
    # results/moe_decode_sweep_words.json): 340 instructions per 64x128 tile iteration against 459
    # (no byte repacking, scales loaded one iteration ahead; 330 since, offline, not re-timed). 1 token 0.0693 -> 0.0592 ms (16x64x64,
    # 2 K parts), 8 tokens 0.206 -> 0.176, 64 tokens 0.305 -> 0.258 (16x64x128, 4 stages: 55% of
    # bandwidth); decode steps 3.20 -> 2.95 ms (batch 1) and 9.66 -> 8.11 ms (batch 64).
    # The last part finishing each split-K tile (session 13, H100, profile_decode): at 1 token the
    # MoE matmuls 1.075 -> 1.051 ms a decode step (no second launch); at 64 tokens on the copies'
    # pick 5.41 -> 5.56 ms (each of ~5,800 programs waits on its count), so that pick keeps two launches.
    if per_expert <= 0.25 and mxfp4:  # (the last-part finish where measured: one token, top-4)
        return TileConfig(16, 64, 64, 4, 3, dot_scaled=False, swap_ab=True, split_k=2, words=True,
                          fixup=slots <= 4)
    if per_expert <= 16 and mxfp4:
        return TileConfig(16, 64, 128, 4, 4, dot_scaled=False, swap_ab=True, words=True)
    if per_expert <= 16:
        return TileConfig(16, 64, 128, 4, 4)
    # Training sizes (benchmarks/moe.py --train-sweep, H100, 20b layer, forward / forward+backward
    # ms; results/moe_train_sweep.json): from 256 rows per expert a transient bf16 copy of each
    # projection feeding the dense tiles beats decoding per row tile: 2,048 tokens 1.64 / 3.68
    # against 1.86 / 3.96 (tl.dot_scaled) and 1.66 / 3.81 (packed decode, 128x128), 4,096 tokens
    # 2.43 / 5.14 against 3.30 / 6.91 and 2.90 / 6.69, 32,768 tokens 13.0 / 26.3 against 22.0 /
    # 46.7 and 19.8 / 45.1 (11.5 / 25.5 in the first sweep, moe_train_sweep_first.json). Below that the packed decode at
    # 64x128x64 wins: 256 / 512 / 1,024 tokens 0.44 / 0.61 / 0.96 ms forward against 0.83 / 0.84
    # / 1.24 (tl.dot_scaled) and 1.46 at 1,024 for the copy.
    if mxfp4:
        return TileConfig(128, 256, 64, 8, 3, dequant=True) if per_expert >= 256 else \
            TileConfig(64, 128, 64, 4, 3, dot_scaled=False)
    if per_expert <= 64:
        return TileConfig(64, 128, 64, 4, 3)
    return TileConfig(128, 256, 64, 8, 3)
