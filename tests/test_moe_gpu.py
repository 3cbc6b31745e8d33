"""The Triton MoE kernels against the fp32 twin on fresh random inputs (run: pytest -m gpu tests/test_moe_gpu.py).

Forward output, input gradient, routing-weight gradient and expert-LoRA gradients, for bf16 and
MXFP4 experts; edge cases: experts with no tokens, every token on one expert, a single token,
row counts and widths that are not multiples of the tiles; every tile configuration; capture in
a CUDA graph (which fails on any host sync).
"""

import pytest
import torch

from ossrl.kernels.moe import ExpertWeights, route, routed_experts_twin
from ossrl.kernels.mxfp4 import quantize_mxfp4

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
moe_triton = pytest.importorskip("ossrl.kernels.moe_triton")
mxfp4_triton = pytest.importorskip("ossrl.kernels.mxfp4_triton")

LIMIT, ALPHA = 7.0, 1.702
DEV = "cuda"
# The tile tuples below name TileConfig's fields in this order (by keyword: a field added to
# TileConfig later, as `fixup` was before `words` in session 13, must not shift their meaning).
TILE_FIELDS = ("BM", "BN", "BK", "num_warps", "num_stages", "dot_scaled", "GROUP_M", "swap_ab", "packed", "dequant",
               "split_k", "words")


def tile(*values) -> "moe_triton.TileConfig":
    if len(values) > len(TILE_FIELDS):
        raise ValueError(f"{len(values)} tile values for {len(TILE_FIELDS)} fields")
    return moe_triton.TileConfig(**dict(zip(TILE_FIELDS, values)))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_experts(E, H, I, fmt, gen):
    """(bf16 kernel weights, fp32 twin weights) holding identical values."""
    w1 = torch.randn(E, 2 * I, H, generator=gen, device=DEV) * H ** -0.5 * 2  # [E, out, in]
    w2 = torch.randn(E, H, I, generator=gen, device=DEV) * I ** -0.5
    b1 = (torch.randn(E, 2 * I, generator=gen, device=DEV) * 0.3).bfloat16()
    b2 = (torch.randn(E, H, generator=gen, device=DEV) * 0.1).bfloat16()
    if fmt == "mxfp4":
        (q1, s1), (q2, s2) = quantize_mxfp4(w1), quantize_mxfp4(w2)
        ours = ExpertWeights(q1, b1, q2, b2, s1, s2, limit=LIMIT, alpha=ALPHA)
        return ours, ExpertWeights(q1, b1.float(), q2, b2.float(), s1, s2, limit=LIMIT, alpha=ALPHA)
    gu, dn = w1.transpose(1, 2).contiguous().bfloat16(), w2.transpose(1, 2).contiguous().bfloat16()
    return (ExpertWeights(gu, b1, dn, b2, limit=LIMIT, alpha=ALPHA),
            ExpertWeights(gu.float(), b1.float(), dn.float(), b2.float(), limit=LIMIT, alpha=ALPHA))


class LoRA:
    def __init__(self, E, H, I, r, gen, dtype, scaling=2.0, src=None):
        if src is not None:
            for n in ("gate_up_A", "gate_up_B", "down_A", "down_B"):
                setattr(self, n, getattr(src, n).detach().to(dtype).requires_grad_(True))
        else:
            def p(*shape):
                return (torch.randn(*shape, generator=gen, device=DEV) * 0.05).to(dtype).requires_grad_(True)
            self.gate_up_A, self.gate_up_B = p(E, H, r), p(E, r, 2 * I)
            self.down_A, self.down_B = p(E, I, r), p(E, r, H)
        self.scaling = scaling

    def grads(self):
        return [getattr(self, n).grad for n in ("gate_up_A", "gate_up_B", "down_A", "down_B")]


def check(fmt, N, E, k, H, I, *, ids=None, lora_rank=0, config=None, seed=0, tol=2e-2):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    ours_w, ref_w = make_experts(E, H, I, fmt, gen)
    x = torch.randn(N, H, generator=gen, device=DEV).bfloat16()
    logits = torch.randn(N, E, generator=gen, device=DEV).bfloat16()
    weights, top = route(logits, k)
    ids = top if ids is None else ids
    lora = LoRA(E, H, I, lora_rank, gen, torch.bfloat16) if lora_rank else None
    lora32 = LoRA(E, H, I, lora_rank, gen, torch.float32, src=lora) if lora_rank else None

    x1, w1 = x.clone().requires_grad_(True), weights.detach().clone().requires_grad_(True)
    out = moe_triton.routed_experts_triton(x1, w1, ids, ours_w, lora, config=config)
    x2, w2 = x.float().requires_grad_(True), weights.detach().float().requires_grad_(True)
    ref = routed_experts_twin(x2, w2, ids, ref_w, lora32)
    assert out.dtype == torch.bfloat16 and out.shape == (N, H)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < tol / 2, "forward"

    dout = torch.randn(N, H, generator=gen, device=DEV)
    out.backward(dout.bfloat16())
    ref.backward(dout.bfloat16().float())
    assert rel_err(x1.grad, x2.grad) < tol, "dx"
    assert rel_err(w1.grad, w2.grad) < tol, "d routing weights"
    if lora:
        for name, a, b in zip(("gate_up_A", "gate_up_B", "down_A", "down_B"), lora.grads(), lora32.grads()):
            assert rel_err(a, b) < tol, f"d lora {name}"


FORMATS = ["bf16", "mxfp4"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,E,k", [(1, 8, 4), (37, 8, 4), (700, 8, 4), (3, 32, 2)],
                         ids=["single_token", "ragged", "many_rows_per_expert", "most_experts_empty"])
def test_forward_and_gradients_match_twin(fmt, N, E, k):
    check(fmt, N, E, k, H=352, I=224, seed=N + E)  # widths not multiples of 64/128


def test_packed_e2m1_decode_is_exact_for_every_code_and_scale():
    """The PTX pair decode (and the transient dense copy) against the reference decode, bit for bit:
    all 256 byte values (both nibbles, signs, the subnormal 0.5) under E8M0 scales 0..254."""
    import triton
    import triton.language as tl

    from ossrl.kernels.mxfp4 import dequantize_mxfp4

    @triton.jit
    def decode(blocks_ptr, scales_ptr, lo_ptr, hi_ptr, R: tl.constexpr, C: tl.constexpr):
        rows = tl.arange(0, R)
        lo, hi = mxfp4_triton.mxfp4_pairs(blocks_ptr, scales_ptr, rows, rows < R, 0, C, C // 2, C // 32, R, C, True)
        offs = rows[:, None] * (C // 2) + tl.arange(0, C // 2)[None, :]
        tl.store(lo_ptr + offs, lo)
        tl.store(hi_ptr + offs, hi)

    R, C = 256, 512  # row r holds the 256 byte values; its 16 blocks get 16 different scales
    blocks = (torch.arange(R * C // 2, device=DEV) % 256).to(torch.uint8).reshape(R, C // 32, 16)
    scales = (torch.arange(R * C // 32, device=DEV) % 255).to(torch.uint8).reshape(R, C // 32)
    lo = torch.empty(R, C // 2, device=DEV, dtype=torch.bfloat16)
    hi = torch.empty_like(lo)
    decode[(1,)](blocks, scales, lo, hi, R=R, C=C)
    ref = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    assert torch.equal(lo, ref[:, 0::2]) and torch.equal(hi, ref[:, 1::2])
    bits = ref.view(torch.int16)  # signs of zero too
    assert torch.equal(lo.view(torch.int16), bits[:, 0::2]) and torch.equal(hi.view(torch.int16), bits[:, 1::2])
    dense = mxfp4_triton.dequantize_experts(blocks[None], scales[None], torch.bfloat16)
    assert torch.equal(dense[0].view(torch.int16), bits.T)


@pytest.mark.parametrize("BC", [64, 128])
@pytest.mark.parametrize("fold", [False, True], ids=["two_multiplies", "folded"])
def test_word_e2m1_decode_is_exact_for_every_code_and_scale(fold, BC):
    """The 32-bit word decode (PTX), in the layouts `_moe_matmul`'s default decode tiles give it (the
    asm pairs elements by that layout), against the reference decode: all 256 byte values in every
    byte position of a word under E8M0 scales 2..250 (normal bf16 values, no overflow), or 2..128
    with 2^126 folded into the scale. One-hot activation rows through the wgmma read the weights
    back exactly, in natural column order."""
    import triton
    import triton.language as tl

    from ossrl.kernels.mxfp4 import dequantize_mxfp4

    @triton.jit
    def decode(words_ptr, scales_ptr, out_ptr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
               FOLD: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        col0 = tl.program_id(1) * BC
        sc = tl.load(scales_ptr + rows[:, None] * (C // 32) + (col0 // 32 + tl.arange(0, BC // 32))[None, :])
        w = mxfp4_triton.mxfp4_words(words_ptr, rows, rows >= 0, col0, C, C // 8, sc, BR, BC, True, FOLD=FOLD)
        for t0 in tl.static_range(0, BC, 16):  # token t reads column t0 + t
            eye = ((tl.arange(0, 16)[:, None] + t0) == tl.arange(0, BC)[None, :]).to(tl.bfloat16)
            acc = tl.dot(w, tl.trans(mxfp4_triton.permute_k32(eye, 16, BC)))
            tl.store(out_ptr + rows[:, None] * C + col0 + t0 + tl.arange(0, 16)[None, :], acc.to(tl.bfloat16))

    R, C = 256, 512
    byte = torch.arange(R * C // 2, device=DEV)
    blocks = ((byte + byte // 64) % 256).to(torch.uint8).reshape(R, C // 32, 16)  # each value in each byte slot
    scales = (2 + torch.arange(R * C // 32, device=DEV) % (127 if fold else 249)).to(torch.uint8).reshape(R, C // 32)
    out = torch.empty(R, C, device=DEV, dtype=torch.bfloat16)
    decode[(R // 64, C // BC)](blocks.view(torch.int32), scales, out, C=C, BR=64, BC=BC, FOLD=fold, num_warps=4)
    assert torch.equal(out, dequantize_mxfp4(blocks, scales, torch.bfloat16))  # (zeros' signs are lost in the sum)


@pytest.mark.parametrize("cfg", [(16, 64, 64, 4, 3, False, 8, True, True, False, 2, True),
                                 (16, 64, 128, 4, 4, False, 8, True, True, False, 1, True)], ids=["even_k", "ragged_k"])
@pytest.mark.parametrize("N", [1, 64])
def test_folded_scales_give_the_same_bits(cfg, N, monkeypatch):
    """With every scale <= 128 (`ExpertWeights.scales_fold`, set from `check_scales_fold`), one
    multiply by 2^126 x scale replaces two and rounds identically: the same output bits, at a
    K that is a whole number of tiles (EVEN_K: no K masks) and one that is not."""
    import dataclasses

    gen = torch.Generator(device=DEV).manual_seed(N)
    ours_w, _ = make_experts(32, 2880, 2880, "mxfp4", gen)
    assert int(ours_w.gate_up_scales.max()) <= 128 and int(ours_w.down_scales.max()) <= 128
    x = torch.randn(N, 2880, generator=gen, device=DEV).bfloat16()
    w, ids = route(torch.randn(N, 32, generator=gen, device=DEV).bfloat16(), 4)
    config = tile(*cfg)
    folds = []
    kernel = moe_triton._moe_matmul

    class Spy:  # the FOLD each launch gets (else equal outputs could mean the fold never ran)
        def __getitem__(self, grid):
            return lambda *args, **kw: folds.append(kw["FOLD"]) or kernel[grid](*args, **kw)

    monkeypatch.setattr(moe_triton, "_moe_matmul", Spy())
    with torch.no_grad():
        plain = moe_triton.routed_experts_triton(x, w, ids, ours_w, config=config)
        assert folds == [False, False]
        folded = moe_triton.routed_experts_triton(x, w, ids, dataclasses.replace(ours_w, scales_fold=True),
                                                  config=config)
        assert folds == [False, False, True, True]
    assert torch.equal(plain.view(torch.int16), folded.view(torch.int16))


@pytest.mark.parametrize("cfg", [(16, 64, 64, 4, 3, False, 8, True, True, False, 2, True),
                                 (16, 64, 128, 4, 4, False, 8, True, True, False, 1, True),
                                 (16, 128, 128, 8, 4, False, 8, True, True, False, 1, True)],
                         ids=["even_k-split2", "ragged_k", "8_warps"])
@pytest.mark.parametrize("N", [1, 64])
def test_scales_ahead_and_permuted_input_give_the_same_bits(cfg, N, monkeypatch):
    """`TileConfig.scales_ahead = 2` changes only when each scales tile is loaded (a ring of the
    next two) and `permuted_input` only where the activations are put in the decode's order (a
    copy before the kernel rather than registers inside it), not which values meet in the MMA:
    the same output bits as the defaults, folded, at even and ragged K, split in K parts, in
    8-warp tiles, with both kernels told (A_PERMUTED) and both variants compiled and run."""
    import dataclasses

    gen = torch.Generator(device=DEV).manual_seed(N + 7)
    ours_w, ref_w = make_experts(32, 2880, 2880, "mxfp4", gen)
    ours_w = dataclasses.replace(ours_w, scales_fold=True)
    x = torch.randn(N, 2880, generator=gen, device=DEV).bfloat16()
    w, ids = route(torch.randn(N, 32, generator=gen, device=DEV).bfloat16(), 4)
    config = tile(*cfg)
    flags = []
    kernel = moe_triton._moe_matmul

    class Spy:  # what each launch gets (equal outputs could mean a variant never ran)
        def __getitem__(self, grid):
            return lambda *args, **kw: flags.append((kw["WORDS"], kw["SCALES_AHEAD"], kw["A_PERMUTED"])) or \
                kernel[grid](*args, **kw)

    monkeypatch.setattr(moe_triton, "_moe_matmul", Spy())
    with torch.no_grad():
        base = moe_triton.routed_experts_triton(x, w, ids, ours_w, config=config)
        assert flags == [(True, 1, False)] * 2  # the word decode ran (else this compares pair decodes)
        twin = routed_experts_twin(x.float(), w.float(), ids, ref_w)
        for ahead, permuted in ((2, False), (1, True), (2, True)):
            flags.clear()
            variant = dataclasses.replace(config, scales_ahead=ahead, permuted_input=permuted)
            out = moe_triton.routed_experts_triton(x, w, ids, ours_w, config=variant)
            assert flags == [(True, ahead, permuted)] * 2
            assert torch.equal(base.view(torch.int16), out.view(torch.int16)), (ahead, permuted)
    assert rel_err(base, twin) < 1e-2  # and all are the layer's output


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_tokens_on_one_expert(fmt):
    ids = torch.full((300, 1), 5, device=DEV)
    check(fmt, 300, 8, 1, H=352, I=224, ids=ids, seed=4)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N", [5, 260])
@pytest.mark.parametrize("epilogue,by_token,fused,late_w",
                         [(True, True, False, False), (True, False, False, False), (False, True, False, False),
                          (True, True, True, False), (True, False, True, False), (True, True, True, True),
                          (True, False, True, True)],
                         ids=["b_in_epilogue", "b_in_epilogue-by_slot", "deltas", "fused_swiglu_backward",
                              "fused_swiglu_backward-by_slot", "dw_in_swiglu_backward",
                              "dw_in_swiglu_backward-by_slot"])
def test_lora_gradients_match_twin(fmt, N, epilogue, by_token, fused, late_w, monkeypatch):
    """Expert LoRA gradients with the B products in the epilogues (TRAINING_LORA_EPILOGUE) and as
    precomputed deltas; gate_up's rank-r intermediate by token, or per sorted slot (grouped_mm: the
    path of models with many experts times rank, 120b's); with FUSED_SWIGLU_BACKWARD, the routing
    weight's gradient in the down matmul's epilogue or in its kernel (DW_IN_SWIGLU_BACKWARD)."""
    from ossrl.kernels import moe

    monkeypatch.setattr(moe_triton, "TRAINING_LORA_EPILOGUE", epilogue)
    monkeypatch.setattr(moe_triton, "FUSED_SWIGLU_BACKWARD", fused)
    monkeypatch.setattr(moe_triton, "DW_IN_SWIGLU_BACKWARD", late_w)
    monkeypatch.setattr(moe_triton, "DOWN_LORA_BY_TOKEN", late_w)
    if not by_token:
        monkeypatch.setattr(moe_triton, "TOKEN_LORA_MAX_COLUMNS", 0)
        monkeypatch.setattr(moe, "TOKEN_LORA_MAX_COLUMNS", 0)
    calls, real = [], moe_triton.swiglu_lora_backward
    monkeypatch.setattr(moe_triton, "swiglu_lora_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    check(fmt, N, 8, 4, H=256, I=192, lora_rank=16, seed=N)
    assert bool(calls) == fused  # (the fused kernel is what ran)


@pytest.mark.parametrize("r", [16, 4])
def test_grouped_weight_grad_by_grouped_mm_equals_the_loop(r):
    """`moe.grouped_weight_grad` through torch._grouped_mm (contraction-grouped, a rank of 4 padded)
    against the loop over experts, with experts that have no rows (their gradient is zero)."""
    from ossrl.kernels.moe import group_by_expert, grouped_weight_grad

    gen = torch.Generator(device=DEV).manual_seed(r)
    ids = torch.randint(0, 6, (300, 2), generator=gen, device=DEV)  # experts 6 and 7 get no rows
    groups = group_by_expert(ids, 8)
    u = torch.randn(600, r, generator=gen, device=DEV).bfloat16()
    g = torch.randn(600, 192, generator=gen, device=DEV).bfloat16()
    got = grouped_weight_grad(u, g, groups)
    bounds = groups.offsets.tolist()
    want = torch.stack([u[lo:hi].float().t() @ g[lo:hi].float() for lo, hi in zip(bounds[:-1], bounds[1:])])
    assert got.shape == (8, r, 192) and got[6:].eq(0).all()
    assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("rank", [4, 12])
def test_unaligned_lora_ranks_train_through_padded_grouped_mm(rank):
    """Ranks torch._grouped_mm does not take (bf16 rows not 16-byte aligned) are padded to 8 by
    `moe.grouped_mm` (session 21; before, a loop over the experts with a host sync): values and
    gradients as the twin's."""
    check("mxfp4", 260, 8, 4, H=256, I=192, lora_rank=rank, seed=rank)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cfg", [(16, 64, 128, 4, 4), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (32, 64, 256, 4, 3),
                                 (16, 32, 256, 4, 4, False), (64, 128, 64, 4, 3, False),
                                 (128, 256, 64, 8, 3), (128, 128, 64, 4, 4, False),  # False: own MXFP4 decode
                                 (16, 64, 128, 4, 3, False, 8, True), (16, 32, 256, 4, 4, False, 8, True),  # swap_ab
                                 (16, 64, 128, 4, 3, False, 8, True, False), (16, 32, 256, 4, 3, False, 8, False, False),
                                 (128, 256, 64, 8, 3, True, 8, False, True, True),  # unpacked decode; dequant
                                 (16, 32, 128, 4, 3, False, 8, True, True, False, 4),  # split-K
                                 (16, 64, 128, 4, 3, False, 8, True, True, False, 3),
                                 (16, 64, 128, 4, 3, False, 8, True, True, False, 1, True),  # 32-bit words
                                 (16, 128, 128, 4, 4, False, 8, True, True, False, 1, True),
                                 (16, 64, 128, 4, 3, False, 8, True, True, False, 4, True),
                                 (128, 128, 64, 8, 3, False, 8, True, True, True, 1, True)])  # words fwd, copy bwd
def test_every_tile_config_is_correct(fmt, cfg):
    check(fmt, 150, 8, 4, H=352, I=224, config=tile(*cfg), seed=sum(cfg))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N", [1, 64])
def test_gpt_oss_20b_shapes(fmt, N):
    check(fmt, N, 32, 4, H=2880, I=2880, seed=N)


@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_captures_in_a_cuda_graph_without_host_syncs(fmt):
    gen = torch.Generator(device=DEV).manual_seed(9)
    ours_w, _ = make_experts(32, 2880, 2880, fmt, gen)
    x = torch.randn(8, 2880, generator=gen, device=DEV).bfloat16()
    router = torch.randn(2880, 32, generator=gen, device=DEV).bfloat16() * 0.05

    def step():
        w, ids = route(x @ router, 4)
        return moe_triton.routed_experts_triton(x, w, ids, ours_w)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    x.copy_(torch.randn(8, 2880, generator=gen, device=DEV).bfloat16())  # fresh input, new routing
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, step())


def _graphed(step):
    """(a CUDA graph of step(), its output): step runs once first on a side stream (compiles, and
    makes any buffers it keeps) outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def _same_bits_both_ways(monkeypatch, switch, step, x, inputs, seen, ran):
    """step() captured in a CUDA graph with moe_triton.<switch> False, then True (`seen`, a spy's
    record, cleared before each capture; `ran(value)` checks it after), and replayed on each of
    `inputs` copied into x: the same bits either way."""
    results = {}
    with torch.no_grad():
        for value in (False, True):
            monkeypatch.setattr(moe_triton, switch, value)
            seen.clear()
            graph, out = _graphed(step)
            ran(value)
            results[value] = _replayed(graph, out, x, inputs)
    assert torch.equal(results[True].view(torch.int16), results[False].view(torch.int16))


def _replayed(graph, out, x, inputs):
    """The graph's output for each of `inputs` copied into its input x in turn, stacked."""
    outs = []
    for i in range(len(inputs)):
        x.copy_(inputs[i])
        graph.replay()
        outs.append(out.clone())
    return torch.stack(outs)


@pytest.mark.parametrize("N,split", [(1, 2), (8, 2), (64, 2), (64, 4)])
def test_split_k_fixup_gives_the_two_launch_bits_in_graph_replays(N, split, monkeypatch):
    """SPLIT_K_FIXUP: each tile's last part to arrive (an atomic count, no second launch) sums the
    partials and runs the epilogue, bit for bit what `_split_k_epilogue` gives, with LoRA in the
    epilogue as rollouts run it, at 20b shapes; 200 replays of one CUDA graph (the counters reset
    themselves) on fresh inputs each, so a part reading its sibling's partial before it landed
    would show as different bits."""
    import dataclasses

    gen = torch.Generator(device=DEV).manual_seed(N + split)
    ours_w, _ = make_experts(32, 2880, 2880, "mxfp4", gen)
    ours_w = dataclasses.replace(ours_w, scales_fold=True)
    lora = LoRA(32, 2880, 2880, 16, gen, torch.bfloat16)
    router = torch.randn(2880, 32, generator=gen, device=DEV).bfloat16() * 0.05
    config = moe_triton.TileConfig(16, 64, 64, 4, 3, dot_scaled=False, swap_ab=True, split_k=split, words=True)
    x = torch.randn(N, 2880, generator=gen, device=DEV).bfloat16()

    def step():
        w, ids = route(x @ router, 4)
        return moe_triton.routed_experts_triton(x, w, ids, ours_w, lora, config=config, lora_epilogue=True)

    launches = []
    kernel = moe_triton._moe_matmul

    class Spy:  # the FIXUP each launch gets (else equal outputs could mean it never ran)
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((kw["SPLIT_K"], kw["FIXUP"])) or kernel[grid](*args, **kw)

    def ran(fixup):
        assert (split, fixup) in launches and all(f == fixup for k, f in launches if k > 1)

    monkeypatch.setattr(moe_triton, "_moe_matmul", Spy())
    monkeypatch.setattr(moe_triton, "_COUNTERS", {})
    inputs = torch.randn(200, N, 2880, generator=gen, device=DEV).bfloat16()
    _same_bits_both_ways(monkeypatch, "SPLIT_K_FIXUP", step, x, inputs, launches, ran)
    assert not any(b.any() for b in moe_triton._COUNTERS[x.device])


@pytest.mark.parametrize("N,split", [(8, 2), (64, 2), (64, 4)])
def test_combine_parts_gives_the_two_launch_bits_in_graph_replays(N, split, monkeypatch):
    """COMBINE_PARTS: the split-K down projection's partials summed, biased and weighted per slot by
    the k-sum (`_combine_parts`), bit for bit `_split_k_epilogue` then `combine_slots`, at 20b
    shapes in CUDA-graph replays on fresh inputs (the grouping's position table is read on the
    device, no host sync)."""
    gen = torch.Generator(device=DEV).manual_seed(N + 10 * split)
    ours_w, _ = make_experts(32, 2880, 2880, "mxfp4", gen)
    router = torch.randn(2880, 32, generator=gen, device=DEV).bfloat16() * 0.05
    config = moe_triton.TileConfig(16, 64, 64, 4, 3, dot_scaled=False, swap_ab=True, split_k=split, words=True)
    x = torch.randn(N, 2880, generator=gen, device=DEV).bfloat16()
    monkeypatch.setattr(moe_triton, "SPLIT_K_FIXUP", False)
    calls = []
    real = moe_triton._combine_parts
    monkeypatch.setattr(moe_triton, "_combine_parts", lambda *a: calls.append(1) or real(*a))

    def step():
        w, ids = route(x @ router, 4)
        return moe_triton.routed_experts_triton(x, w, ids, ours_w, config=config)

    def ran(combine):
        assert len(calls) == 2 * combine  # (the warm-up and the captured call)

    inputs = torch.randn(50, N, 2880, generator=gen, device=DEV).bfloat16()
    _same_bits_both_ways(monkeypatch, "COMBINE_PARTS", step, x, inputs, calls, ran)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,r", [(1, 16), (64, 16), (64, 4), (300, 16)])
def test_lora_in_the_epilogue_without_autograd(fmt, N, r):
    """Rollouts (no autograd): the LoRA B products run in the expert matmuls' epilogues. Same
    output as the fp32 twin (20b widths, 32 experts), the LoRA term far from negligible, and the
    forward captures in a CUDA graph (no host sync on this path, rank 4 included)."""
    gen = torch.Generator(device=DEV).manual_seed(N + r)
    ours_w, ref_w = make_experts(32, 2880, 2880, fmt, gen)
    x = torch.randn(N, 2880, generator=gen, device=DEV).bfloat16()
    w, ids = route(torch.randn(N, 32, generator=gen, device=DEV).bfloat16(), 4)
    lora = LoRA(32, 2880, 2880, r, gen, torch.bfloat16, scaling=8.0)
    lora32 = LoRA(32, 2880, 2880, r, gen, torch.float32, scaling=8.0, src=lora)
    with torch.no_grad():
        out = moe_triton.routed_experts_triton(x, w, ids, ours_w, lora, lora_epilogue=True)
        ref = routed_experts_twin(x.float(), w.float(), ids, ref_w, lora32)
        base = routed_experts_twin(x.float(), w.float(), ids, ref_w)
        assert rel_err(ref, base) > 0.05  # the adapters matter
        assert rel_err(out, ref) < 1e-2
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            moe_triton.routed_experts_triton(x, w, ids, ours_w, lora, lora_epilogue=True)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = moe_triton.routed_experts_triton(x, w, ids, ours_w, lora, lora_epilogue=True)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, out)


def test_model_experts_module_uses_kernels_on_cuda_bf16():
    from ossrl.model.gptoss import Experts
    from ossrl.testing import tiny_config

    config = tiny_config(hidden_size=128, intermediate_size=96, num_local_experts=8, num_experts_per_tok=4)
    gen = torch.Generator(device=DEV).manual_seed(11)
    module = Experts(config, "bf16", device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=DEV) * 0.1)
    x = torch.randn(20, 128, generator=gen, device=DEV).bfloat16()
    w, ids = route(torch.randn(20, 8, generator=gen, device=DEV).bfloat16(), 4)
    out = module(x, w, ids)
    ref = module.float()(x.float(), w.float(), ids)  # fp32 runs the twin
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("N", [1, 2])
@pytest.mark.parametrize("tile", [(16, 512), (32, 256)])
def test_moe_gemv_matches_the_twin_at_20b_shapes_and_replays_in_a_graph(N, tile, monkeypatch):
    """`ossrl.kernels.moe_gemv` (GEMV on) at gpt-oss-20b's shapes: within bf16 tolerance of the fp32
    twin (PTX pair decode, fp32 FMAs), taken by `routed_experts_triton` without autograd, and the
    same bits replayed from a CUDA graph with fresh routing."""
    from ossrl.kernels import moe_gemv

    monkeypatch.setattr(moe_gemv, "GEMV", True)
    monkeypatch.setattr(moe_gemv, "GEMV_MAX_TOKENS", 2)
    monkeypatch.setattr(moe_gemv, "GEMV_TILE", tile)
    gen = torch.Generator(device=DEV).manual_seed(N)
    ours_w, ref_w = make_experts(32, 2880, 2880, "mxfp4", gen)
    x = torch.randn(N, 2880, generator=gen, device=DEV).bfloat16()
    router = torch.randn(2880, 32, generator=gen, device=DEV).bfloat16() * 0.05
    calls = []
    real = moe_gemv.routed_experts_gemv
    monkeypatch.setattr(moe_triton, "routed_experts_gemv", lambda *a: calls.append(1) or real(*a))

    def step():
        w, ids = route(x @ router, 4)
        return moe_triton.routed_experts_triton(x, w, ids, ours_w)

    with torch.no_grad():
        w, ids = route(x @ router, 4)
        out = step()
        ref = routed_experts_twin(x.float(), w.float(), ids, ref_w)
        assert calls and rel_err(out, ref) < 1e-2
        graph, static_out = _graphed(step)
        x.copy_(torch.randn(N, 2880, generator=gen, device=DEV).bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, step())
