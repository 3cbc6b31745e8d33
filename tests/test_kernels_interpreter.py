"""The Triton kernels' logic on CPU, in Triton's interpreter (fp32; set up by tests/conftest.py).

The GPU tests (`-m gpu`) check the same kernels compiled, in bf16, on CUDA; these run in CI on any
machine with the `triton` test extra, so a session without a GPU still catches a kernel's indexing,
masking or maths regressions. The interpreter rounds fp32 -> bf16 by truncation, so only fp32
results are compared tightly here.
"""

import dataclasses
import os

import pytest
import torch

if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("interpreter tests run where there is no CUDA (the gpu tests cover CUDA)", allow_module_level=True)
pytest.importorskip("triton")

from ossrl.kernels import fused, moe, moe_triton, mxfp4_triton  # noqa: E402
from ossrl.kernels import sampling as sampling_kernels  # noqa: E402
from ossrl.kernels.decode_attention import _decode_triton, append_kv_reference, decode_attention_reference  # noqa: E402
from ossrl.kernels.moe import ExpertWeights, group_by_expert, route, routed_experts_twin  # noqa: E402
from ossrl.kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4  # noqa: E402
from ossrl.model.gptoss import RMSNorm, apply_rotary  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_rms_norm():
    x = torch.randn(5, 200) * 3
    norm = RMSNorm(200, 1e-5)
    norm.weight.data = torch.randn(200)
    with torch.no_grad():
        torch.testing.assert_close(fused.rms_norm(x, norm.weight, 1e-5), norm(x), rtol=1e-5, atol=1e-6)


def test_add_rms_norm_equals_the_add_then_the_norm():
    x, a = torch.randn(2, 3, 200) * 3, torch.randn(2, 3, 200)
    norm = RMSNorm(200, 1e-5)
    norm.weight.data = torch.randn(200)
    s, y = fused.add_rms_norm(x, a, norm.weight, 1e-5)
    assert torch.equal(s, x + a)
    with torch.no_grad():
        torch.testing.assert_close(y, norm(x + a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trained_weight", [False, True])
def test_rms_norm_backward(trained_weight):
    x = (torch.randn(2, 5, 200) * 3).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    norm = RMSNorm(200, 1e-5)
    norm.weight.data = torch.randn(200)
    norm.weight.requires_grad_(trained_weight)
    weight = norm.weight.detach().clone().requires_grad_(trained_weight)
    dy = torch.randn(2, 5, 200)
    fused.rms_norm_autograd(x, weight, 1e-5).backward(dy)
    norm(x_ref).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    if trained_weight:
        torch.testing.assert_close(weight.grad, norm.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_a", [False, True])
@pytest.mark.parametrize("used", ["both", "norm", "residual"])
def test_add_rms_norm_autograd_adds_the_residual_gradient_in_the_norm_backward(with_a, used):
    """`add_rms_norm_autograd` (s = x + a, or x; y = RMSNorm(s)): s and y as the add then the norm
    give them, and x's and a's gradients autograd's through the two, where the residual's gradient
    (ds) reaches the norm's backward kernel, where only y is used (no ds) and where only s is."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 5, 200, generator=g) * 3).requires_grad_(True)
    a = torch.randn(2, 5, 200, generator=g).requires_grad_(True) if with_a else None
    weight = torch.randn(200, generator=g)
    ds, dy = torch.randn(2, 5, 200, generator=g), torch.randn(2, 5, 200, generator=g)
    s, y = fused.add_rms_norm_autograd(x, a, weight, 1e-5)
    leaves = [x] + ([a] if with_a else [])
    s_ref = x + a if with_a else x
    y_ref = fused.rms_norm_autograd(s_ref, weight, 1e-5)
    assert torch.equal(s, s_ref) and torch.equal(y, y_ref)
    outs, refs, grads = {"both": ((s, y), (s_ref, y_ref), (ds, dy)), "norm": ((y,), (y_ref,), (dy,)),
                         "residual": ((s,), (s_ref,), (ds,))}[used]
    got = torch.autograd.grad(outs, leaves, grads)
    want = torch.autograd.grad(refs, leaves, grads)
    for gt, w in zip(got, want):
        torch.testing.assert_close(gt, w, rtol=1e-5, atol=1e-6)


def test_rotary_backward_is_the_rotation_by_minus_the_angle():
    qkv = torch.randn(2, 3, 7 * 64)
    q = qkv[..., : 4 * 64].view(2, 3, 4, 64).requires_grad_(True)
    k = qkv[..., 4 * 64: 6 * 64].view(2, 3, 2, 64).clone().requires_grad_(True)
    q_ref, k_ref = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    ang = torch.randn(2, 3, 32)
    oq, ok = fused.rotary_qk_autograd(q, k, ang.cos(), ang.sin())
    dq, dk = torch.randn_like(oq), torch.randn_like(ok)
    (oq * dq).sum().add((ok * dk).sum()).backward()
    (apply_rotary(q_ref, ang.cos(), ang.sin()) * dq).sum().add((apply_rotary(k_ref, ang.cos(), ang.sin()) * dk).sum()).backward()
    torch.testing.assert_close(q.grad, q_ref.grad)
    torch.testing.assert_close(k.grad, k_ref.grad)


@pytest.mark.parametrize("head_dim", [64, 48])  # 48: half not a power of two (padded)
def test_rotary_on_views_of_one_projection(head_dim):
    qkv = torch.randn(2, 3, 7 * head_dim)
    q = qkv[..., : 4 * head_dim].view(2, 3, 4, head_dim)
    k = qkv[..., 4 * head_dim: 6 * head_dim].view(2, 3, 2, head_dim)
    ang = torch.randn(2, 3, head_dim // 2)
    oq, ok = fused.rotary_qk(q, k, ang.cos(), ang.sin())
    torch.testing.assert_close(oq, apply_rotary(q, ang.cos(), ang.sin()))
    torch.testing.assert_close(ok, apply_rotary(k, ang.cos(), ang.sin()))


@pytest.mark.parametrize("B,T", [(5, 1), (1, 3)])
def test_rotary_on_decode_views_reads_them_in_place(B, T):
    """A decode step's q and k are slices of the fused q/k/v output whose size-1 dim may carry any
    stride: the kernel reads them where they are (no copy) and rotates them right."""
    D = 64
    qkv = torch.randn(B, T, 7 * D)
    q = qkv[..., : 4 * D].as_strided((B, T, 4, D), (T * 7 * D, 4 * D if T == 1 else 7 * D, D, 1))
    k = qkv[..., 4 * D: 6 * D].view(B, T, 2, D)
    assert fused._row_stride(q) is not None and fused._row_stride(k) is not None
    ang = torch.randn(B, T, D // 2)
    oq, ok = fused.rotary_qk(q, k, ang.cos(), ang.sin())
    torch.testing.assert_close(oq, apply_rotary(q, ang.cos(), ang.sin()))
    torch.testing.assert_close(ok, apply_rotary(k, ang.cos(), ang.sin()))


@pytest.mark.parametrize("HQ,HK", [(4, 2), (20, 17)])
def test_rotary_append_equals_rotary_then_append(HQ, HK):
    """`fused.rotary_append` (a decode step's rotary and KV append in one launch) leaves the caches
    and returns q exactly as `rotary_qk` then `append_kv` do: q, k and v read as slices of one
    fused q/k/v output, a ring of 5 rows (positions past it wrap), several head blocks of 16."""
    D, B = 16, 3
    qkv = torch.randn(B, 1, (HQ + 2 * HK) * D)
    q = qkv[..., : HQ * D].view(B, 1, HQ, D)
    k = qkv[..., HQ * D: (HQ + HK) * D].view(B, 1, HK, D)
    v = qkv[..., (HQ + HK) * D:].view(B, 1, HK, D)
    ang = torch.randn(B, 1, D // 2)
    slots, pos = torch.tensor([2, 0, 3]), torch.tensor([7, 1, 4])
    kc, vc = torch.randn(4, 5, HK, D), torch.randn(4, 5, HK, D)
    kr, vr = kc.clone(), vc.clone()
    oq = fused.rotary_append(q, k, v, ang.cos(), ang.sin(), kc, vc, slots, pos)
    rq, rk = fused.rotary_qk(q, k, ang.cos(), ang.sin())
    fused.append_kv(kr, vr, rk[:, 0], v[:, 0], slots, pos)
    assert torch.equal(oq, rq) and torch.equal(kc, kr) and torch.equal(vc, vr)
    with pytest.raises(ValueError, match="one token a row"):
        fused.rotary_append(q.expand(B, 2, HQ, D), k.expand(B, 2, HK, D), v.expand(B, 2, HK, D),
                            ang.cos().expand(B, 2, D // 2), ang.sin().expand(B, 2, D // 2), kc, vc, slots, pos)


def test_slot_engine_decodes_the_same_with_rotary_append(monkeypatch):
    """gptoss.ROTARY_APPEND: the slot engine's decode steps (CPU tensors, the kernels in the
    interpreter) rotate and append through `rotary_append` and give the same completions, tokens
    and log-probs bit for bit, as with `rotary_qk` and the separate append."""
    from ossrl.engine.engine import RolloutEngine
    from ossrl.engine.sampling import SamplingParams
    from ossrl.model import gptoss
    from ossrl.testing import random_model, tiny_config

    calls = _fused_kernels_on_cpu(monkeypatch, ("rotary_qk", "rotary_append"))
    model = random_model(tiny_config(num_hidden_layers=2, sliding_window=4), seed=2).eval()
    prompts = [[3, 9, 4, 4, 1], [7, 2]]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=1)

    engine = RolloutEngine(model, backend="slots", sync_every=3)  # one engine: the switch flips under it

    def run(on):
        monkeypatch.setattr(gptoss, "ROTARY_APPEND", on)
        calls.clear()
        out = engine.generate(prompts, 2, params)
        return out, set(calls), engine._slots.graph_params

    out, used, key = run(True)
    ref, ref_used, ref_key = run(False)
    assert used == {"rotary_qk", "rotary_append"} and ref_used == {"rotary_qk"}  # prefills keep rotary_qk
    assert out == ref
    assert key != ref_key  # graphs captured under one setting are not replayed under the other


def test_append_kv_into_a_ring():
    kc, vc = torch.zeros(4, 5, 2, 8), torch.zeros(4, 5, 2, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots, pos = torch.tensor([2, 0, 3]), torch.tensor([7, 1, 4])
    kr, vr = kc.clone(), vc.clone()
    append_kv_reference(kr, vr, k, v, slots, pos)
    fused.append_kv(kc, vc, k, v, slots, pos)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@pytest.mark.parametrize("N,E,k", [(1, 32, 4), (37, 32, 4), (9, 6, 3), (5, 4, 1)])
def test_route_topk(N, E, k):
    logits = torch.randn(N, E)
    w, ids = fused.route_topk(logits, k)
    wr, idr = route(logits, k)
    assert torch.equal(ids, idr)
    torch.testing.assert_close(w, wr)


@pytest.mark.parametrize("N,E,H,k", [(1, 32, 300, 4), (37, 32, 600, 4), (9, 6, 70, 3), (5, 128, 96, 4)])
def test_router_topk_equals_linear_then_route(N, E, H, k):
    """The router's logits computed in the top-k kernel (H not a multiple of the chunk, E padded
    to the dot's 16 columns, several programs of 16 rows): the same experts and weights as
    F.linear followed by `route`."""
    g = torch.Generator().manual_seed(N * E)
    x, weight, bias = torch.randn(N, H, generator=g), torch.randn(E, H, generator=g) / 8, torch.randn(E, generator=g)
    w, ids = fused.router_topk(x, weight, bias, k)
    wr, idr = route(torch.nn.functional.linear(x, weight, bias), k)
    assert torch.equal(ids, idr)
    torch.testing.assert_close(w, wr, rtol=1e-5, atol=1e-6)


def test_route_topk_nan_row_keeps_ids_in_range():
    logits = torch.randn(3, 8)
    logits[1, 4] = float("nan")
    _, ids = fused.route_topk(logits, 2)
    assert ((ids >= 0) & (ids < 8)).all()


@pytest.mark.parametrize("shape,E,BM", [((1, 4), 32, 16), ((64, 4), 32, 16), ((700, 4), 32, 64), ((50, 1), 8, 16)])
def test_group_small_equals_the_sort_and_tile_table(shape, E, BM):
    ids = torch.randint(0, E, shape, generator=torch.Generator().manual_seed(shape[0]))
    if shape[0] == 50:
        ids[:] = 3
    small = fused.group_small(ids, E, BM)
    groups, (te, ts, nt) = small.groups, small.table
    ref = group_by_expert(ids, E)
    for f in ("order", "token", "expert", "offsets"):
        assert torch.equal(getattr(groups, f), getattr(ref, f)), f
    assert torch.equal(groups.position[ref.order], torch.arange(ids.numel()))  # the order's inverse

    class _E:
        num_experts = E
    re, rs, rn = moe_triton._Plan(ref, _E(), shape[0], moe_triton.TileConfig(BM, 64, 64, 4, 3)).tiles(BM)
    assert nt == rn and torch.equal(te, re) and torch.equal(ts[re >= 0], rs[re >= 0])


@pytest.mark.parametrize("N,E,H,k,BM", [(1, 32, 300, 4, 16), (37, 32, 600, 4, 16), (64, 32, 96, 4, 16),
                                        (9, 6, 70, 3, 64)])
def test_router_topk_grouped_equals_router_topk_then_group_small(N, E, H, k, BM):
    """The router's top-k kernel grouping the slots itself (one program, every row): the same
    weights and ids as `router_topk`, and the same grouping and tile table as `group_small`."""
    g = torch.Generator().manual_seed(N + E)
    x, weight, bias = torch.randn(N, H, generator=g), torch.randn(E, H, generator=g) / 8, torch.randn(E, generator=g)
    if N == 37:
        bias[5] = 50.0  # every token routes to expert 5 (first), crowding one expert's tiles
    w, ids, grouping = fused.router_topk_grouped(x, weight, bias, k, BM)
    wr, idr = fused.router_topk(x, weight, bias, k)
    assert torch.equal(ids, idr) and torch.equal(w, wr)
    small = fused.group_small(ids, E, BM)
    groups, (te, ts, nt) = small.groups, small.table
    assert grouping.BM == BM and grouping.table[2] == nt
    for f in ("order", "token", "expert", "offsets", "position"):
        assert torch.equal(getattr(grouping.groups, f), getattr(groups, f)), f
    assert torch.equal(grouping.table[0], te) and torch.equal(grouping.table[1][te >= 0], ts[te >= 0])
    with pytest.raises(ValueError, match="1 to 64 rows"):
        fused.router_topk_grouped(torch.randn(65, H), weight, bias, k, BM)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_split_sampling_kernels(temperature):
    logits = torch.randn(3, 3000) * 3
    keys = sampling_kernels.fold_seed(torch.tensor([1, 2, 3]))
    steps = torch.tensor([0, 5, 9])
    tokens, plain, sampled = sampling_kernels._sample_triton(logits, temperature, keys, steps, splits=32, block=64)
    rt, rp, rs = sampling_kernels._sample_temperature_twin(logits, temperature, keys, steps)
    assert torch.equal(tokens, rt)
    torch.testing.assert_close(plain, rp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sampled, rs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention_kernel(splits, monkeypatch):
    """Split-K decode attention against the twin (a slot of length 0 included); one split finishes
    the output in the partial kernel itself, with no combine launch."""
    from ossrl.kernels import decode_attention

    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(3, 40, 2, 16, generator=g), torch.randn(3, 40, 2, 16, generator=g)
    q, sinks = torch.randn(3, 4, 16, generator=g), torch.randn(4, generator=g)
    slots, lengths = torch.tensor([2, 1, 0], dtype=torch.int32), torch.tensor([17, 0, 33], dtype=torch.int32)
    combines = []
    real = decode_attention._decode_combine_kernel

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **k: combines.append(grid) or real[grid](*a, **k)

    monkeypatch.setattr(decode_attention, "_decode_combine_kernel", Spy())
    got = _decode_triton(q, kc, vc, sinks, slots, lengths, scale=0.25, num_splits=splits, block_n=16)
    torch.testing.assert_close(got, decode_attention_reference(q, kc, vc, sinks, slots, lengths, scale=0.25),
                               rtol=1e-5, atol=1e-5)
    assert len(combines) == (splits > 1)


def test_one_split_where_the_rule_asks_for_two_and_the_cache_is_short(monkeypatch):
    """`default_num_splits`: about four programs an SM; with ONE_SPLIT_MAX_CAPACITY, a cache of at
    most that many rows a slot takes one split where the rule asks for two (and only then)."""
    from ossrl.kernels import decode_attention

    monkeypatch.setattr(decode_attention, "_sm_count", lambda index: 132)
    splits = decode_attention.default_num_splits
    assert [splits(b, 8, 4096, 32, "cpu") for b in (1, 32, 64, 128)] == [66, 3, 2, 1]
    assert splits(1, 8, 128, 32, "cpu") == 4  # at most one split a block of rows
    monkeypatch.setattr(decode_attention, "ONE_SPLIT_MAX_CAPACITY", 2048)
    assert [splits(b, 8, 2048, 32, "cpu") for b in (1, 32, 64, 128)] == [64, 3, 1, 1]
    assert splits(64, 8, 4096, 32, "cpu") == 2


@pytest.mark.parametrize("splits,block_n", [(1, 16), (3, 16), (4, 8)])
def test_decode_attention_with_shared_prefixes_reads_the_prefix_from_its_slot(splits, block_n):
    """Slots 1-3 are samples of one prompt (11 tokens, kept in slot 1), slot 0 of another (6 tokens,
    in slot 4), slot 5 has none: rows below a slot's prefix_len come from its prefix_slot (its own
    copies there are NaN: never read), the rest from the slot; the same as the twin on full
    copies, and the twin with prefixes agrees."""
    g = torch.Generator().manual_seed(1)
    kc, vc = torch.randn(6, 40, 2, 16, generator=g), torch.randn(6, 40, 2, 16, generator=g)
    prefix_slot = torch.tensor([4, 1, 1, 1, 4, 5], dtype=torch.int32)
    prefix_len = torch.tensor([6, 11, 11, 11, 6, 0], dtype=torch.int32)
    full_k, full_v = kc.clone(), vc.clone()
    for s in range(6):  # the copies a prefill would have written, and NaN where sharing leaves them out
        p, n = int(prefix_slot[s]), int(prefix_len[s])
        full_k[s, :n], full_v[s, :n] = kc[p, :n], vc[p, :n]
        if p != s:
            kc[s, :n], vc[s, :n] = float("nan"), float("nan")
    q, sinks = torch.randn(5, 4, 16, generator=g), torch.randn(4, generator=g)
    slots = torch.tensor([3, 0, 1, 5, 2], dtype=torch.int32)
    lengths = torch.tensor([9, 30, 8, 20, 6, 17], dtype=torch.int32)  # slot 2: shorter than its prefix
    want = decode_attention_reference(q, full_k, full_v, sinks, slots, lengths, scale=0.25)
    twin = decode_attention_reference(q, kc, vc, sinks, slots, lengths, scale=0.25, prefix_slot=prefix_slot,
                                      prefix_len=prefix_len)
    got = _decode_triton(q, kc, vc, sinks, slots, lengths, scale=0.25, prefix_slot=prefix_slot,
                         prefix_len=prefix_len, num_splits=splits, block_n=block_n)
    assert not want.isnan().any()
    torch.testing.assert_close(twin, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _experts(E=4, H=96, I=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    (q1, s1), (q2, s2) = quantize_mxfp4(torch.randn(E, 2 * I, H, generator=g) * 0.1), \
        quantize_mxfp4(torch.randn(E, H, I, generator=g) * 0.1)
    return ExpertWeights(q1, torch.randn(E, 2 * I, generator=g) * 0.1, q2, torch.randn(E, H, generator=g) * 0.1,
                         s1, s2)


@pytest.mark.parametrize("cfg", [moe_triton.TileConfig(16, 32, 64, 4, 1, dot_scaled=False),
                                 moe_triton.TileConfig(16, 64, 32, 4, 1, dot_scaled=False, swap_ab=True),
                                 moe_triton.TileConfig(16, 32, 64, 4, 1, dot_scaled=False, packed=False),
                                 moe_triton.TileConfig(16, 64, 32, 4, 1, dot_scaled=False, swap_ab=True, packed=False),
                                 moe_triton.TileConfig(16, 32, 32, 4, 1, dequant=True),
                                 moe_triton.TileConfig(16, 64, 32, 4, 1, dot_scaled=False, swap_ab=True, split_k=2),
                                 moe_triton.TileConfig(16, 32, 32, 4, 1, dot_scaled=False, split_k=3),
                                 moe_triton.TileConfig(16, 64, 32, 4, 1, dot_scaled=False, swap_ab=True, words=True),
                                 moe_triton.TileConfig(16, 32, 64, 4, 1, dot_scaled=False, swap_ab=True, words=True),
                                 moe_triton.TileConfig(16, 32, 64, 4, 1, dot_scaled=False, swap_ab=True, words=True,
                                                       split_k=2),
                                 moe_triton.TileConfig(32, 64, 32, 4, 1, dot_scaled=False, swap_ab=True, words=True,
                                                       dequant=True, maxnreg=80),
                                 moe_triton.TileConfig(16, 64, 32, 4, 1, dot_scaled=False, swap_ab=True, words=True,
                                                       scales_ahead=2),
                                 moe_triton.TileConfig(16, 32, 32, 4, 1, dot_scaled=False, swap_ab=True, words=True,
                                                       split_k=2, scales_ahead=2),
                                 moe_triton.TileConfig(16, 64, 64, 4, 1, dot_scaled=False, swap_ab=True, words=True,
                                                       permuted_input=True),
                                 moe_triton.TileConfig(16, 32, 32, 4, 1, dot_scaled=False, swap_ab=True, words=True,
                                                       split_k=2, scales_ahead=2, permuted_input=True)],
                         ids=["packed", "packed-swap_ab", "own-decode", "swap_ab", "dequant", "split2", "split3",
                              "words32", "words64", "words-split2", "words-fwd-dequant-bwd-maxnreg",
                              "words-scales-2-ahead", "words-split2-scales-2-ahead", "words-permuted-input",
                              "words-split2-ahead2-permuted-input"])
@pytest.mark.parametrize("N", [1, 40])
def test_mxfp4_moe_forward_and_gradients(cfg, N):
    """Output, and the gradients of the input, the routing weights and expert LoRA pairs (the LoRA
    B products in the epilogues: TRAINING_LORA_EPILOGUE, the default)."""
    _check_forward_and_gradients(cfg, N, 4)


@pytest.mark.parametrize("epilogue,by_token,r", [(False, True, 4), (False, False, 4), (True, False, 4),
                                                 (True, False, 12), (True, True, 12)])
def test_expert_lora_gradients_with_the_b_products_in_the_epilogue_and_as_deltas(epilogue, by_token, r,
                                                                                 monkeypatch):
    """TRAINING_LORA_EPILOGUE on and off, gate_up's rank-r intermediate by token and by sorted slot,
    ranks below and not a multiple of 8: the same outputs and gradients as the twin; and a no-grad
    forward (the trainer's old log-probs) gives the training forward's bits."""
    monkeypatch.setattr(moe_triton, "TRAINING_LORA_EPILOGUE", epilogue)
    if not by_token:  # (the deltas' path reads moe's constant, the epilogue's moe_triton's)
        monkeypatch.setattr(moe_triton, "TOKEN_LORA_MAX_COLUMNS", 0)
        monkeypatch.setattr(moe, "TOKEN_LORA_MAX_COLUMNS", 0)
    cfg = moe_triton.TileConfig(16, 32, 32, 4, 1, dequant=True)
    _check_forward_and_gradients(cfg, 40, r)


@pytest.mark.parametrize("late_w", [False, True], ids=["", "dw_in_swiglu_backward"])
@pytest.mark.parametrize("by_token,r", [(True, 4), (False, 12)])
def test_the_fused_swiglu_backward_gives_the_twins_gradients(by_token, r, late_w, monkeypatch):
    """FUSED_SWIGLU_BACKWARD: the SwiGLU's backward and the down LoRA A path's input gradient in one
    kernel (`swiglu_lora_backward`), gate_up's intermediate by token and by slot, ranks 4 and 12,
    the routing weight and its gradient in the down matmul's epilogue or in that kernel
    (DW_IN_SWIGLU_BACKWARD): the twin's outputs and every gradient; that kernel ran, the plain
    SwiGLU backward did not."""
    monkeypatch.setattr(moe_triton, "FUSED_SWIGLU_BACKWARD", True)
    monkeypatch.setattr(moe_triton, "DW_IN_SWIGLU_BACKWARD", late_w)
    monkeypatch.setattr(moe_triton, "DOWN_LORA_BY_TOKEN", late_w)  # (its by-token B side, off by default)
    if not by_token:
        monkeypatch.setattr(moe_triton, "TOKEN_LORA_MAX_COLUMNS", 0)
    calls = {"plain": 0, "fused": 0}
    for name, key in (("swiglu_backward", "plain"), ("swiglu_lora_backward", "fused")):
        real = getattr(moe_triton, name)
        monkeypatch.setattr(moe_triton, name, lambda *a, _r=real, _k=key, **k: calls.__setitem__(_k, calls[_k] + 1)
                            or _r(*a, **k))
    _check_forward_and_gradients(moe_triton.TileConfig(16, 32, 32, 4, 1, dequant=True), 40, r)
    assert calls == {"plain": 0, "fused": 1}


@pytest.mark.parametrize("S,I,r", [(37, 300, 3), (16, 64, 16)])
def test_swiglu_lora_backward_kernel_equals_the_plain_sum_then_swiglu_backward(S, I, r):
    """`swiglu_lora_backward` against da + t_s @ A_e^T then `clamped_swiglu_backward` (several column
    blocks, rows not a multiple of the kernel's 16, a rank not a power of two, gates past the limit)."""
    from ossrl.kernels.moe import clamped_swiglu_backward

    g = torch.Generator().manual_seed(S)
    z = torch.randn(S, 2 * I, generator=g) * 6
    da, t = torch.randn(S, I, generator=g), torch.randn(S, r, generator=g)
    A = torch.randn(3, I, r, generator=g)
    expert = torch.randint(0, 3, (S,), generator=g).sort().values
    got = moe_triton.swiglu_lora_backward(z, da, t, A, expert, limit=7.0, alpha=1.702)
    lora_term = torch.einsum("sr,sir->si", t, A[expert])
    want = clamped_swiglu_backward(z, da + lora_term, limit=7.0, alpha=1.702)
    assert rel(got, want) < 1e-6
    # with the routing weights (DW_IN_SWIGLU_BACKWARD): da is the unweighted g, w * g is used, and
    # dw gains <swiglu(z), g> per slot on top of what it held
    from ossrl.kernels.moe import clamped_swiglu

    w = torch.rand(S, generator=g)
    dw = torch.randn(S, generator=g)
    dw_before = dw.clone()
    got = moe_triton.swiglu_lora_backward(z, da, t, A, expert, limit=7.0, alpha=1.702, w=w, dw=dw)
    want = clamped_swiglu_backward(z, w[:, None] * da + lora_term, limit=7.0, alpha=1.702)
    assert rel(got, want) < 1e-6
    want_dw = dw_before + (clamped_swiglu(z, limit=7.0, alpha=1.702) * da).sum(-1)
    assert rel(dw, want_dw) < 1e-5
    with pytest.raises(ValueError, match="needs the routing weights"):
        moe_triton.swiglu_lora_backward(z, da, t, A, expert, limit=7.0, alpha=1.702, dw=dw)


def test_lora_dropout_keeps_the_unfused_swiglu_backward():
    """FUSED_SWIGLU_BACKWARD needs the down A path's input as it is: an adapter's active dropout
    (training mode, p > 0) takes the unfused path; eval mode, p = 0 (Identity) and none fuse."""
    from ossrl.model.lora import AdapterSwitch, ExpertLoRA, LoRAConfig

    lora = ExpertLoRA(4, 96, 64, LoRAConfig(r=4, dropout=0.2), AdapterSwitch())
    assert moe_triton._dropout_active(lora)
    lora.eval()
    assert not moe_triton._dropout_active(lora)
    assert not moe_triton._dropout_active(ExpertLoRA(4, 96, 64, LoRAConfig(r=4), AdapterSwitch()))
    assert moe_triton._dropout_active(type("L", (), {"dropout": torch.nn.AlphaDropout(0.1)})())


@pytest.mark.parametrize("fused", [False, True], ids=["", "fused_swiglu_backward"])
@pytest.mark.parametrize("case", ["no_tokens", "an_expert_named_twice"])
def test_expert_lora_in_the_epilogue_with_no_tokens_and_repeated_experts(case, fused, monkeypatch):
    """The training epilogue path (gate_up's intermediate by token) with a batch of no tokens, and
    with ids naming one expert twice for a token (top-k never does; `routed_experts` takes any):
    the twin's outputs and gradients (the by-token du sums both slots); also with FUSED_SWIGLU_BACKWARD."""
    monkeypatch.setattr(moe_triton, "FUSED_SWIGLU_BACKWARD", fused)
    cfg = moe_triton.TileConfig(16, 32, 32, 4, 1, dequant=True)
    if case == "no_tokens":
        _check_forward_and_gradients(cfg, 0, 4)
    else:
        ids = torch.tensor([[1, 1], [0, 2], [3, 3], [2, 1], [0, 3]])
        _check_forward_and_gradients(cfg, 5, 4, ids=ids)


def _check_forward_and_gradients(cfg, N, r, ids=None):
    def close(a, b):  # (no tokens: empty outputs)
        return rel(a, b) < 1e-5 if b.numel() else a.shape == b.shape

    ex = _experts()
    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, 96, generator=g)
    w, routed = route(torch.randn(N, 4, generator=g), 2)
    ids = routed if ids is None else ids

    class LoRA:
        scaling = 2.0

        def __init__(self, src=None):
            shapes = {"gate_up_A": (4, 96, r), "gate_up_B": (4, r, 128), "down_A": (4, 64, r), "down_B": (4, r, 96)}
            for name, shape in shapes.items():
                value = getattr(src, name).detach().clone() if src else torch.randn(*shape, generator=g) * 0.1
                setattr(self, name, value.requires_grad_(True))

    lora1 = LoRA()
    lora2 = LoRA(lora1)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    w1, w2 = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = moe_triton.routed_experts_triton(x1, w1, ids, ex, lora1, config=cfg)
    ref = routed_experts_twin(x2, w2, ids, ex, lora2)
    assert close(out, ref)
    with torch.no_grad():
        assert torch.equal(moe_triton.routed_experts_triton(x, w, ids, ex, lora1, config=cfg), out)
    dout = torch.randn(N, 96, generator=g)
    out.backward(dout)
    names = ("gate_up_A", "gate_up_B", "down_A", "down_B")
    if N == 0:  # (the twin's empty output has no graph): no gradient anywhere
        assert all(t.grad is None or not t.grad.any() for t in [x1, w1] + [getattr(lora1, n) for n in names])
        return
    ref.backward(dout)
    assert close(x1.grad, x2.grad) and close(w1.grad, w2.grad)
    for name in names:
        assert close(getattr(lora1, name).grad, getattr(lora2, name).grad), name


def _spy_matmul_launches(monkeypatch, *flags: str) -> list:
    """A list that gets, for each `_moe_matmul` launch from now on, the tuple of the named flags."""
    seen = []
    kernel = moe_triton._moe_matmul

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append(tuple(kw[f] for f in flags)) or kernel[grid](*args, **kw)

    monkeypatch.setattr(moe_triton, "_moe_matmul", Spy())
    return seen


def test_permuted_input_reaches_both_projections_and_the_fallback_reads_the_original(monkeypatch):
    """`TileConfig.permuted_input`: gate_up's x and down's input are copied with each 32-column
    block in the decode's order and the kernel told so (A_PERMUTED) in both word forwards; the
    gradients' launches (no words) read them as they are; outputs as the twin's. A kernel refused
    the word decode reruns with the pair decode on the unpermuted input."""
    flags = _spy_matmul_launches(monkeypatch, "A_PERMUTED", "WORDS")
    ex = _experts()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 96, generator=g)
    w, ids = route(torch.randn(6, 4, generator=g), 2)
    cfg = moe_triton.TileConfig(16, 64, 32, 4, 1, dot_scaled=False, swap_ab=True, words=True, permuted_input=True)
    with torch.no_grad():
        out = moe_triton.routed_experts_triton(x, w, ids, ex, config=cfg)
    assert flags == [(True, True), (True, True)]
    assert rel(out, routed_experts_twin(x, w, ids, ex)) < 1e-5
    flags.clear()
    monkeypatch.setattr(moe_triton, "_asm_layout_matters", lambda a: True)  # as on sm_90, with a Triton
    monkeypatch.setattr(moe_triton, "_word_kernel_ok", lambda kernel: False)  # whose layout fails the check
    monkeypatch.setattr(moe_triton, "_WORDS_REFUSED", set())
    monkeypatch.setattr(moe_triton, "word_pairs_ok", lambda cfg, dtype: True)
    with pytest.warns(RuntimeWarning, match="running the pair decode instead"):
        with torch.no_grad():
            out = moe_triton.routed_experts_triton(x, w, ids, ex, config=cfg)
    assert flags[:2] == [(True, True), (False, False)]  # gate_up: refused, rerun on the original x
    assert rel(out, routed_experts_twin(x, w, ids, ex)) < 1e-5


@pytest.mark.parametrize("BM", [16, 32])
def test_experts_take_the_router_kernels_grouping(BM, monkeypatch):
    """`routed_experts_triton(..., grouping=)`: the router kernel's grouping replaces group_small
    (not launched), and the output is the same bit for bit; a grouping whose tile table has
    another BM than the tile's (32 here) still serves: the table is rebuilt from its groups."""
    ex = _experts()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 96, generator=g)
    weight, bias = torch.randn(4, 96, generator=g) / 8, torch.randn(4, generator=g)
    w, ids, grouping = fused.router_topk_grouped(x, weight, bias, 2, BM)
    cfg = moe_triton.TileConfig(16, 64, 32, 4, 1, dot_scaled=False, swap_ab=True, words=True)
    with torch.no_grad():
        plain = moe_triton.routed_experts_triton(x, w, ids, ex, config=cfg)
        monkeypatch.setattr(moe_triton, "group_small", lambda *a: pytest.fail("group_small launched"))
        grouped = moe_triton.routed_experts_triton(x, w, ids, ex, config=cfg, grouping=grouping)
    assert torch.equal(grouped, plain)


@pytest.mark.parametrize("scales_fold", [False, True])
def test_the_word_decode_gets_the_fold_and_even_k_flags(scales_fold, monkeypatch):
    """`_launch` passes FOLD where the experts' scales were checked <= 128, and EVEN_K where K is a
    whole number of tiles (gate_up's K = 96 with BK = 32; down's 64 too, but not with BK = 64);
    the outputs are the twin's either way (the fallback decode ignores FOLD)."""
    import dataclasses

    flags = _spy_matmul_launches(monkeypatch, "FOLD", "EVEN_K")
    ex = dataclasses.replace(_experts(), scales_fold=scales_fold)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 96, generator=g)
    w, ids = route(torch.randn(5, 4, generator=g), 2)
    fold = scales_fold
    for bk, even in ((32, [True, True]), (64, [False, True])):
        flags.clear()
        cfg = moe_triton.TileConfig(16, 64, bk, 4, 1, dot_scaled=False, swap_ab=True, words=True)
        with torch.no_grad():
            out = moe_triton.routed_experts_triton(x, w, ids, ex, config=cfg)
        assert flags == [(fold, e) for e in even]
        assert rel(out, routed_experts_twin(x, w, ids, ex)) < 1e-5


@pytest.mark.parametrize("cfg", [moe_triton.TileConfig(16, 32, 64, 4, 1, dot_scaled=False),
                                 moe_triton.TileConfig(16, 64, 32, 4, 1, dot_scaled=False, swap_ab=True),
                                 moe_triton.TileConfig(16, 32, 32, 4, 1, dequant=True),
                                 moe_triton.TileConfig(16, 64, 32, 4, 1, dot_scaled=False, swap_ab=True, split_k=2),
                                 moe_triton.TileConfig(16, 32, 64, 4, 1, dot_scaled=False, swap_ab=True, words=True,
                                                       split_k=2)],
                         ids=["packed", "packed-swap_ab", "dequant", "split2", "words-split2"])
@pytest.mark.parametrize("r,by_token", [(4, True), (16, True), (4, False), (24, True)])
def test_mxfp4_moe_lora_in_the_epilogue_without_autograd(cfg, r, by_token, monkeypatch):
    """Rollout forwards (no autograd, `lora_epilogue`) add u @ B_e in the matmuls' epilogues instead
    of a precomputed [slots, out] delta: the same outputs as the twin, for ranks below, at and above
    the MMA's 16 (zero-padded) and with gate_up's u by token (x @ all experts' A) or by sorted slot.
    Without the flag a no-grad forward is bit for bit the autograd path's."""
    _check_lora_epilogue(cfg, r, by_token, None, monkeypatch)


@pytest.mark.parametrize("a_tiles", [moe_triton.TileConfig(16, 16, 32, 4, 1),
                                     moe_triton.TileConfig(16, 16, 32, 4, 1, split_k=3)], ids=["unsplit", "split3"])
@pytest.mark.parametrize("r,by_token", [(4, True), (24, False)])
def test_lora_a_products_on_the_kernels_dense_path(a_tiles, r, by_token, monkeypatch):
    """The rollouts' expert LoRA A products by `_moe_matmul`'s dense path (`LORA_A_TILES`): slot rows,
    or token rows gathered in the kernel (gate_up when E * r is large), ranks fitted into BN."""
    _check_lora_epilogue(moe_triton.TileConfig(16, 64, 32, 4, 1, dot_scaled=False, swap_ab=True), r, by_token,
                         a_tiles, monkeypatch)


def _check_lora_epilogue(cfg, r, by_token, a_tiles, monkeypatch):
    if not by_token:
        monkeypatch.setattr(moe_triton, "TOKEN_LORA_MAX_COLUMNS", 0)
    monkeypatch.setattr(moe_triton, "LORA_A_TILES", a_tiles)  # None: grouped products (the loop on CPU)
    ex = _experts()
    g = torch.Generator().manual_seed(r)
    x = torch.randn(40, 96, generator=g)
    w, ids = route(torch.randn(40, 4, generator=g), 2)

    class LoRA:
        scaling = 1.5
        gate_up_A, gate_up_B = torch.randn(4, 96, r, generator=g) * 0.2, torch.randn(4, r, 128, generator=g) * 0.2
        down_A, down_B = torch.randn(4, 64, r, generator=g) * 0.2, torch.randn(4, r, 96, generator=g) * 0.2

    with torch.no_grad():
        out = moe_triton.routed_experts_triton(x, w, ids, ex, LoRA, config=cfg, lora_epilogue=True)
        ref = routed_experts_twin(x, w, ids, ex, LoRA)
        base = routed_experts_twin(x, w, ids, ex)
    assert rel(ref, base) > 0.05  # the LoRA term is not negligible
    assert rel(out, ref) < 1e-5
    with torch.no_grad():  # the trainer's no-grad passes (old log-probs): exactly its training pass
        plain = moe_triton.routed_experts_triton(x, w, ids, ex, LoRA, config=cfg)
    assert torch.equal(plain, moe_triton.routed_experts_triton(x.requires_grad_(True), w, ids, ex, LoRA,
                                                               config=cfg).detach())


@pytest.mark.parametrize("cfg", [moe_triton.TileConfig(16, 64, 32, 4, 1, dot_scaled=False, swap_ab=True, split_k=2),
                                 moe_triton.TileConfig(16, 32, 32, 4, 1, dot_scaled=False, split_k=3),
                                 moe_triton.TileConfig(16, 32, 32, 4, 1, dot_scaled=False, swap_ab=True, words=True,
                                                       split_k=2)],
                         ids=["split2", "split3", "words-split2"])
def test_split_k_parts_finish_in_the_kernel_with_the_epilogue_kernels_bits(cfg, monkeypatch):
    """SPLIT_K_FIXUP: the tile's last part to arrive sums the partials and runs the epilogue (bias,
    SwiGLU, routing weight, scatter, the LoRA B product by token and by slot) in `_moe_matmul`,
    bit for bit what `_split_k_epilogue` gives, and leaves every arrival counter at zero for the
    next launch (a CUDA graph replays with them), whichever launch ran before."""
    ex = _experts()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 96, generator=g)
    w, ids = route(torch.randn(40, 4, generator=g), 2)

    class LoRA:
        scaling = 1.5
        gate_up_A, gate_up_B = torch.randn(4, 96, 8, generator=g) * 0.2, torch.randn(4, 8, 128, generator=g) * 0.2
        down_A, down_B = torch.randn(4, 64, 8, generator=g) * 0.2, torch.randn(4, 8, 96, generator=g) * 0.2

    def run(fixup, lora):
        monkeypatch.setattr(moe_triton, "SPLIT_K_FIXUP", fixup)
        with torch.no_grad():
            return moe_triton.routed_experts_triton(x, w, ids, ex, LoRA if lora else None, config=cfg,
                                                    lora_epilogue=lora)

    for lora in (False, True):
        monkeypatch.setattr(moe_triton, "_COUNTERS", {})
        apart = run(False, lora)
        assert not moe_triton._COUNTERS  # the two-launch path keeps no counters
        fused = run(True, lora)
        assert torch.equal(fused, apart)
        assert torch.equal(run(True, lora), fused)  # again, from the counters the first launch left
        assert len(moe_triton._COUNTERS[x.device]) == 1 and not moe_triton._COUNTERS[x.device][0].any()
    assert rel(fused, routed_experts_twin(x, w, ids, ex, LoRA)) < 1e-5


@pytest.mark.parametrize("cfg", [moe_triton.TileConfig(16, 64, 32, 4, 1, dot_scaled=False, swap_ab=True, split_k=2),
                                 moe_triton.TileConfig(16, 32, 32, 4, 1, dot_scaled=False, split_k=3)],
                         ids=["split2", "split3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_parts_gives_the_epilogue_and_k_sum_bits_in_one_launch(cfg, dtype, monkeypatch):
    """COMBINE_PARTS: a split-K down projection without a LoRA term leaves its fp32 partials to
    `_combine_parts` (parts summed in part order, bias, routing weight, rounded per slot, summed in
    slot order), the same bits as `_split_k_epilogue` then `combine_slots`; with a LoRA term in the
    epilogue, or a grouping without the position table (the sort), the two launches run as before."""
    ex = _experts()
    if dtype == torch.bfloat16:
        ex = ExpertWeights(ex.gate_up, ex.gate_up_bias.to(dtype), ex.down, ex.down_bias.to(dtype), ex.gate_up_scales,
                           ex.down_scales)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, 96, generator=g).to(dtype)
    w, ids = route(torch.randn(40, 4, generator=g).to(dtype), 2)

    class LoRA:  # (in the model's dtype, as the adapters' rollout copies are)
        scaling = 1.5
        gate_up_A, gate_up_B = ((torch.randn(*shape, generator=g) * 0.2).to(dtype) for shape in ((4, 96, 8), (4, 8, 128)))
        down_A, down_B = ((torch.randn(*shape, generator=g) * 0.2).to(dtype) for shape in ((4, 64, 8), (4, 8, 96)))

    calls = []
    real = moe_triton._combine_parts
    monkeypatch.setattr(moe_triton, "_combine_parts", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(moe_triton, "SPLIT_K_FIXUP", False)  # split tiles finish in a second launch

    def run(combine, lora=None, **kw):
        monkeypatch.setattr(moe_triton, "COMBINE_PARTS", combine)
        calls.clear()
        with torch.no_grad():
            out = moe_triton.routed_experts_triton(x, w, ids, ex, lora, config=cfg, lora_epilogue=lora is not None,
                                                   **kw)
        return out, len(calls)

    apart, n = run(False)
    assert n == 0
    together, n = run(True)
    assert n == 1 and together.dtype == dtype and torch.equal(together, apart)
    assert run(True, LoRA)[1] == 0  # the LoRA term stays in the epilogue kernel
    groups = group_by_expert(ids, 4)  # the sort's grouping has no position table: the two launches
    grouping = fused.SlotGrouping(groups, moe_triton._Plan(groups, ex, 40, cfg).tiles(cfg.BM), cfg.BM)
    out, n = run(True, grouping=grouping)
    assert n == 0 and torch.equal(out, apart)
    # the router kernel's grouping (decode steps with ROUTER_GROUPS) carries the position table too
    weight, bias = (torch.randn(4, 96, generator=g) / 8).to(dtype), torch.randn(4, generator=g).to(dtype)
    w, ids, grouping = fused.router_topk_grouped(x, weight, bias, 2, cfg.BM)
    apart, _ = run(False, grouping=grouping)
    together, n = run(True, grouping=grouping)
    assert n == 1 and torch.equal(together, apart)
    if dtype == torch.float32:
        assert rel(together, routed_experts_twin(x, w, ids, ex)) < 1e-5


def test_dequantize_experts_matches_the_reference_decode():
    """The transient dense copy (training sizes): [E, out, in] MXFP4 -> [E, in, out], exactly."""
    g = torch.Generator().manual_seed(3)
    blocks, scales = quantize_mxfp4(torch.randn(3, 80, 96, generator=g))  # 80 and 96: not multiples of 64
    scales = (torch.arange(scales.numel()) % 255).to(torch.uint8).reshape(scales.shape)  # every E8M0 exponent
    dense = mxfp4_triton.dequantize_experts(blocks, scales, torch.float32)
    assert torch.equal(dense, dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2))


_COMPILE_FOR = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ossrl.kernels import fused, moe_triton, mxfp4_triton

kernel, cap, ptx = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if kernel == "dequant":
    fn, ptr = mxfp4_triton._dequant_kernel, {"blocks_ptr": "*u8", "scales_ptr": "*u8", "out_ptr": "*bf16"}
    const = dict(BR=64, BC=64, PTX=ptx)
elif kernel.startswith("rotary"):  # no PTX of its own: compiled with and without the KV append
    fn = fused._rotary_kernel
    ptr = {n: "*bf16" for n in ("Q", "K", "Cos", "Sin", "OQ", "OK", "V", "KC", "VC")}
    ptr.update(SlotIds="*i64", Positions="*i64")
    const = dict(HALF=32, HALF_P=32, BLOCK_H=16, APPEND=kernel == "rotary_append")
    if not const["APPEND"]:
        const.update(V=None, KC=None, VC=None, SlotIds=None, Positions=None)
elif kernel == "router_grouped":  # the top-k over every row, then the slots' grouping after a barrier
    fn = fused._router_topk_kernel
    ptr = {n: "*i64" for n in ("Ids", "Order", "Token", "Expert", "Offsets", "Position")}
    ptr.update(Part="*fp32", Bias="*bf16", Weights="*bf16", TileExpert="*i32", TileStart="*i32")
    const = dict(SPLITS=12, K=4, KP=4, EP=32, R=64, GROUP=True, BM=16, CH=128)
elif kernel == "combine_parts":  # COMBINE_PARTS's k-sum of the down projection's split-K partials
    fn = moe_triton._combine_parts_kernel
    ptr = dict(Parts="*fp32", Position="*i64", Expert="*i64", Bias="*bf16", RouteW="*bf16", Out="*bf16")
    const = dict(K=4, SPLIT_K=2, BLOCK=1024)
elif kernel == "decode_finish":  # decode attention in one split, finishing the output itself
    from ossrl.kernels import decode_attention
    fn = decode_attention._decode_partial_kernel
    ptr = {n: "*bf16" for n in ("Q", "K", "V", "Out")}
    ptr.update(SlotIds="*i32", Lengths="*i32", PrefixSlot="*i32", PrefixLen="*i32", Acc="*bf16", Max="*bf16",
               Sum="*bf16", Sinks="*fp32", qk_scale="fp32")
    const = dict(G=8, G_PAD=16, D=64, BLOCK_N=32, NUM_SPLITS=1, SHARED_PREFIX=True, FINISH=True)
elif kernel == "swiglu_lora":  # FUSED_SWIGLU_BACKWARD's kernel
    fn = moe_triton._swiglu_lora_backward_kernel
    ptr = {n: "*bf16" for n in ("z_ptr", "da_ptr", "t_ptr", "a_ptr", "dz_ptr")}
    ptr.update(expert_ptr="*i64", w_ptr="*fp32", dw_ptr="*fp32")
    const = dict(R=16, RP=16, BLOCK=256, ROWS=16, WEIGHTED=True, NEED_DW=True)  # with DW_IN_SWIGLU_BACKWARD
elif kernel.startswith("gemv"):
    from ossrl.kernels import moe_gemv
    fn = moe_gemv._gate_up_gemv if kernel == "gemv_gate_up" else moe_gemv._down_gemv
    ptr = {n: "*bf16" for n in ("x_ptr", "a_ptr", "bias_ptr", "route_w_ptr", "y_ptr")}
    ptr.update(ids_ptr="*i64", blocks_ptr="*u8", scales_ptr="*u8")
    const = dict(BN=16, BK=512, PTX=ptx, **({"TOP_K": 4} if kernel == "gemv_gate_up" else {}))
else:
    fn = moe_triton._moe_matmul
    ptr = {n: "*bf16" for n in ("a_ptr", "bias_ptr", "extra_ptr", "route_w_ptr", "c_ptr", "z_ptr", "lu_ptr",
                                "lb_ptr")}
    ptr.update(b_ptr="*u8", scales_ptr="*u8", a_rows_ptr="*i64", slot_ptr="*i64", dw_ptr="*fp32",
               tile_expert_ptr="*i32", tile_start_ptr="*i32", offsets_ptr="*i64", parts_ptr="*fp32",
               counter_ptr="*i32")
    const = dict(MXFP4=True, B_ROWS_ARE_N=True, GATHER_A=True, HAS_BIAS=True, HAS_EXTRA=False, SWIGLU=True,
                 STORE_Z=False, ROUTE_WEIGHT=False, SCATTER_C=False, DW_EPILOGUE=False, DOT_SCALED=False,
                 SWAP_AB=True, PACKED=True, PTX=ptx, BM=16, BN=64, BK=128, GROUP_M=8, SPLIT_K=1,
                 LORA_R=16, LORA_RP=16, LORA_BY_TOKEN=True,  # a rollout's gate_up, LoRA in the epilogue
                 WORDS=cap >= 90 or not ptx,  # the word decode (the default); on sm_80 the PTX refusal of the pairs
                 EVEN_K=False, FOLD=cap >= 90 and ptx)
    ptr["b_ptr"] = "*i32" if const["WORDS"] else "*u8"  # the word decode reads the blocks as int32
# constexprs left at their defaults stay constexprs (else they would be typed as runtime ints)
const.update({p.name: p.default for p in fn.params if p.is_constexpr and p.has_default and p.name not in const})
sig = {n: "constexpr" if n in const else ptr.get(n, "fp32" if n in ("limit", "alpha") else "i32")
       for n in fn.arg_names}
triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", cap, 32))
"""


@pytest.mark.parametrize("kernel", ["moe_matmul", "dequant", "gemv_gate_up", "gemv_down"])
def test_kernels_compile_for_gpus_before_hopper(kernel):
    """sm_80/89 have no mul.bf16x2: there the decode takes the arithmetic path (PTX off), and the
    kernels compile (Triton's ptxas runs on this CPU machine; outside the interpreter, hence a
    subprocess). The PTX path is refused for sm_80 and compiles for sm_90."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def compiles(cap, ptx):
        run = subprocess.run([sys.executable, "-c", _COMPILE_FOR, kernel, str(cap), "1" if ptx else "0"],
                             env=env, capture_output=True, text=True, timeout=300)
        return run.returncode == 0, run.stderr[-2000:]

    for cap in (80, 89):
        ok, err = compiles(cap, ptx=False)
        assert ok, err
    ok, err = compiles(80, ptx=True)
    assert not ok and "sm_90" in err
    ok, err = compiles(90, ptx=True)
    assert ok, err


@pytest.mark.parametrize("kernel", ["rotary", "rotary_append", "router_grouped", "combine_parts", "decode_finish",
                                    "swiglu_lora"])
def test_the_rotary_kernel_compiles_with_and_without_the_kv_append(kernel):
    """The rotary kernel (an early return for the v heads where it appends) compiles for sm_80 and
    sm_90, with the KV append and without (as `rotary_qk` calls it); so do the router's top-k
    kernel grouping the slots (ROUTER_GROUPS), COMBINE_PARTS's k-sum, the one-split decode
    attention and FUSED_SWIGLU_BACKWARD's kernel."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for cap in (80, 90):
        run = subprocess.run([sys.executable, "-c", _COMPILE_FOR, kernel, str(cap), "0"], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]


_WORD_LAYOUT = """
import json
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ossrl.kernels import moe_triton, mxfp4_triton

BM, BN, BK, warps, split, lora, dtype, variant = json.loads(sys.argv[1])
fn = moe_triton._moe_matmul
ptr = {n: "*" + dtype for n in ("a_ptr", "bias_ptr", "extra_ptr", "route_w_ptr", "c_ptr", "z_ptr", "lu_ptr", "lb_ptr")}
ptr.update(b_ptr="*i32", scales_ptr="*u8", a_rows_ptr="*i64", slot_ptr="*i64", dw_ptr="*fp32",
           tile_expert_ptr="*i32", tile_start_ptr="*i32", offsets_ptr="*i64", parts_ptr="*fp32", counter_ptr="*i32")
const = dict(MXFP4=True, B_ROWS_ARE_N=True, GATHER_A=True, HAS_BIAS=True, HAS_EXTRA=False, SWIGLU=True,
             STORE_Z=False, ROUTE_WEIGHT=False, SCATTER_C=False, DW_EPILOGUE=False, DOT_SCALED=False, SWAP_AB=True,
             PACKED=True, PTX=True, BM=BM, BN=BN, BK=BK, GROUP_M=8, SPLIT_K=split, LORA_R=16 if lora else 0, LORA_RP=16,
             LORA_BY_TOKEN=lora, WORDS=True, EVEN_K=BK == 64, FOLD=True, FIXUP=split > 1)
const.update(variant)
if split > 1 and not const["FIXUP"]:  # two launches: the matmul stores partials only (as `_launch` passes it)
    const.update(HAS_BIAS=False, SWIGLU=False, LORA_R=0, LORA_BY_TOKEN=False)
# constexprs left at their defaults stay constexprs (else they would be typed as runtime ints)
const.update({p.name: p.default for p in fn.params if p.is_constexpr and p.has_default and p.name not in const})
sig = {n: "constexpr" if n in const else ptr.get(n, "fp32" if n in ("limit", "alpha") else "i32") for n in fn.arg_names}
ir = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                    options=dict(num_warps=warps, num_stages=3)).asm["ttgir"]
pairs = mxfp4_triton.word_asm_pairs_halves(ir)
print(json.dumps(pairs))
"""


AHEAD_PERMUTED = {"SCALES_AHEAD": 2, "A_PERMUTED": True}  # `TileConfig.scales_ahead`, `.permuted_input`


@pytest.mark.parametrize("BM,BN,BK,warps,split,lora,dtype,variant", [
    (16, 64, 64, 4, 2, False, "bf16", {}), (16, 64, 64, 4, 2, True, "bf16", {"FIXUP": False}),
    (16, 64, 128, 4, 1, True, "bf16", {}),
    (16, 128, 128, 8, 1, False, "bf16", {}),
    (128, 128, 64, 8, 1, False, "bf16", {}),  # the decode defaults, wider, a training-size tile; refused:
    (16, 32, 128, 4, 1, False, "bf16", {}), (16, 64, 128, 2, 1, False, "bf16", {}),
    (16, 64, 128, 4, 1, False, "fp32", {}),
    (16, 64, 64, 4, 2, False, "bf16", AHEAD_PERMUTED), (16, 64, 128, 4, 1, True, "bf16", AHEAD_PERMUTED),
    (16, 128, 128, 8, 1, False, "bf16", AHEAD_PERMUTED)])  # the session-10 variants of the decode tiles
def test_the_word_decode_runs_only_where_its_asm_pairs_halves_of_one_word(BM, BN, BK, warps, split, lora, dtype,
                                                                          variant):
    """The word decode's PTX reads one word per packed register pair, right only where Triton puts
    the two halves (h = 0, 1) of one word in consecutive registers. Compiled for sm_90 (Triton's
    own compiler on this CPU), the asm operand's layout (`word_asm_pairs_halves`, which `_launch`
    also applies to each compiled kernel) agrees with `word_pairs_ok` for the default tiles (and
    with the scales two tiles ahead and the input permuted) and for the shapes it refuses
    (mma.sync at BN = 32 or 2 warps; tf32 for fp32 inputs)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _WORD_LAYOUT, json.dumps([BM, BN, BK, warps, split, lora, dtype,
                                                                           variant])],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    cfg = moe_triton.TileConfig(BM, BN, BK, warps, 3, dot_scaled=False, swap_ab=True, split_k=split, words=True)
    expected = moe_triton.word_pairs_ok(cfg, torch.float32 if dtype == "fp32" else torch.bfloat16)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == expected


def test_a_word_kernel_whose_layout_fails_the_check_reruns_with_the_pair_decode(monkeypatch):
    """Where a compiled word kernel's asm layout fails `word_asm_pairs_halves` (another Triton's
    layouts), `_launch` warns, reruns that projection with the pair decode, and refuses the word
    decode for that tile from then on: the outputs stay the twin's."""
    monkeypatch.setattr(moe_triton, "_asm_layout_matters", lambda a: True)  # as on sm_90 (the kernels
    monkeypatch.setattr(moe_triton, "_word_kernel_ok", lambda kernel: False)  # still run the fallback here)
    monkeypatch.setattr(moe_triton, "_WORDS_REFUSED", set())
    monkeypatch.setattr(moe_triton, "word_pairs_ok", lambda cfg, dtype: True)
    words = _spy_matmul_launches(monkeypatch, "WORDS")
    ex = _experts()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 96, generator=g)
    w, ids = route(torch.randn(9, 4, generator=g), 2)
    cfg = moe_triton.TileConfig(16, 64, 32, 4, 1, dot_scaled=False, swap_ab=True, words=True)
    with pytest.warns(RuntimeWarning, match="pair decode"), torch.no_grad():
        out = moe_triton.routed_experts_triton(x, w, ids, ex, config=cfg)
    assert words == [(True,), (False,), (False,)]  # gate_up tried and rerun; down refused up front
    assert (cfg, x.dtype) in moe_triton._WORDS_REFUSED
    assert rel(out, routed_experts_twin(x, w, ids, ex)) < 1e-5


_COMPILE_TRAINING_KERNEL = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ossrl.kernels import fused, moe_triton

if sys.argv[1] == "rms_norm_backward":
    fn, const = fused._rms_norm_backward_kernel, dict(BLOCK=4096, HAS_DS=True)  # with the residual's gradient
    types = {"X": "*bf16", "W": "*bf16", "DY": "*bf16", "DS": "*bf16", "DX": "*bf16", "eps": "fp32"}
elif sys.argv[1] in ("moe_matmul_split_k", "moe_matmul_split_k_partials", "moe_matmul_lora"):  # decode sizes
    fn = moe_triton._moe_matmul
    types = {n: "*bf16" for n in ("a_ptr", "bias_ptr", "extra_ptr", "route_w_ptr", "z_ptr", "lu_ptr", "lb_ptr")}
    types.update(c_ptr="*bf16", b_ptr="*u8", scales_ptr="*u8", a_rows_ptr="*i64", slot_ptr="*i64", dw_ptr="*fp32",
                 tile_expert_ptr="*i32", tile_start_ptr="*i32", offsets_ptr="*i64", parts_ptr="*fp32",
                 counter_ptr="*i32", limit="fp32", alpha="fp32")
    # the split-K pick's down projection of a rollout: the last part sums the partials, then bias,
    # routing weight, scatter and the LoRA B product (FIXUP)
    const = dict(MXFP4=True, B_ROWS_ARE_N=True, GATHER_A=False, HAS_BIAS=True, HAS_EXTRA=False, SWIGLU=False,
                 STORE_Z=False, ROUTE_WEIGHT=True, SCATTER_C=True, DW_EPILOGUE=False, DOT_SCALED=False,
                 SWAP_AB=True, PACKED=True, PTX=True, BM=16, BN=64, BK=64, GROUP_M=8, SPLIT_K=2,
                 LORA_R=16, LORA_RP=16, LORA_BY_TOKEN=False, WORDS=True, EVEN_K=True, FOLD=True, FIXUP=True)
    types["b_ptr"] = "*i32"  # the word decode reads the blocks as int32
    if sys.argv[1] == "moe_matmul_lora":  # gate_up of a rollout: the LoRA B product in the epilogue
        const.update(GATHER_A=True, SWIGLU=True, ROUTE_WEIGHT=False, SCATTER_C=False, SPLIT_K=1, BN=64, BK=128,
                     LORA_BY_TOKEN=True, FIXUP=False)
    if sys.argv[1] == "moe_matmul_split_k_partials":  # the rollouts' pick: partials only, `_split_k_epilogue` after
        const.update(HAS_BIAS=False, ROUTE_WEIGHT=False, SCATTER_C=False, LORA_R=0, FIXUP=False)
elif sys.argv[1] == "split_k_epilogue":
    fn = moe_triton._split_k_epilogue
    types = {n: "*bf16" for n in ("bias_ptr", "extra_ptr", "route_w_ptr", "c_ptr", "z_ptr", "lu_ptr", "lb_ptr")}
    types.update(parts_ptr="*fp32", slot_ptr="*i64", tile_expert_ptr="*i32", tile_start_ptr="*i32",
                 offsets_ptr="*i64", lora_rows_ptr="*i64", limit="fp32", alpha="fp32")
    const = dict(HAS_BIAS=True, HAS_EXTRA=False, SWIGLU=True, STORE_Z=False, ROUTE_WEIGHT=False, SCATTER_C=False,
                 SPLIT_K=4, BM=16, BN=32, LORA_R=4, LORA_RP=16, LORA_BY_TOKEN=True)
else:
    fn, const = moe_triton._down_lora_backward_kernel, dict(H=2880, NEED_DW=True, NEED_DY=True, BLOCK=1024)
    types = {"dout_ptr": "*bf16", "token_ptr": "*i64", "y_ptr": "*bf16", "w_ptr": "*fp32", "dw_ptr": "*fp32",
             "dy_ptr": "*bf16"}
# constexprs left at their defaults stay constexprs (else they would be typed as runtime ints)
const.update({p.name: p.default for p in fn.params if p.is_constexpr and p.has_default and p.name not in const})
sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
"""


@pytest.mark.parametrize("kernel", ["rms_norm_backward", "down_lora_backward", "moe_matmul_split_k",
                                    "moe_matmul_split_k_partials", "moe_matmul_lora", "split_k_epilogue"])
def test_training_backward_kernels_compile_for_hopper(kernel):
    """The training path's one-kernel backwards and the split-K decode pair compile for sm_90 with
    Triton's ptxas (20b sizes), which the interpreter (their logic's tests above) never does."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_TRAINING_KERNEL, kernel], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("with_lora", [False, True])
def test_kept_dense_copies_replace_the_per_call_decode(monkeypatch, with_lora):
    """Experts that keep bf16 copies of their projections (`ExpertWeights.gate_up_dense`,
    `ossrl.model.expert_copies.dense_experts`) are read at the sizes that would decode a transient
    copy (`TileConfig.dequant`), forward and backward: the same output and gradients bit for bit,
    no decode launched, and the published blocks not read (zeroed here: nothing changes)."""
    ex = _experts()
    dense = dataclasses.replace(ex, gate_up=torch.zeros_like(ex.gate_up), down=torch.zeros_like(ex.down),
                                gate_up_dense=mxfp4_triton.dequantize_experts(ex.gate_up, ex.gate_up_scales,
                                                                              torch.float32),
                                down_dense=mxfp4_triton.dequantize_experts(ex.down, ex.down_scales, torch.float32))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 96, generator=g)
    w, ids = route(torch.randn(40, 4, generator=g), 2)
    dout = torch.randn(40, 96, generator=g)
    lora = None
    if with_lora:
        class lora:  # noqa: N801 (a namespace of the expert LoRA pairs)
            scaling = 2.0
            gate_up_A, gate_up_B = torch.randn(4, 96, 4, generator=g) * 0.1, torch.randn(4, 4, 128, generator=g) * 0.1
            down_A, down_B = torch.randn(4, 64, 4, generator=g) * 0.1, torch.randn(4, 4, 96, generator=g) * 0.1
    cfg = moe_triton.TileConfig(16, 32, 32, 4, 1, dequant=True)
    results = []
    decodes = []
    real = moe_triton.dequantize_experts
    monkeypatch.setattr(moe_triton, "dequantize_experts", lambda *a: decodes.append(1) or real(*a))
    for weights in (ex, dense):
        decodes.clear()
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = moe_triton.routed_experts_triton(xi, wi, ids, weights, lora, config=cfg)
        out.backward(dout)
        results.append((out, xi.grad, wi.grad, len(decodes)))
    (out1, dx1, dw1, n1), (out2, dx2, dw2, n2) = results
    assert n1 == 4 and n2 == 0  # gate_up and down, forward and backward
    assert torch.equal(out1, out2) and torch.equal(dx1, dx2) and torch.equal(dw1, dw2)
    assert rel(out1, routed_experts_twin(x, w, ids, ex, lora)) < 1e-5


def test_training_sizes_copy_to_bf16_unless_the_copy_is_too_large():
    """From 256 rows per expert MXFP4 layers decode once to a bf16 copy (20b: 1.06 GB), but not a
    120b layer (4.2 GB): it keeps the per-tile decode."""
    def layer(E):  # only the shapes matter here
        u8, bias = torch.empty(0, dtype=torch.uint8), torch.empty(E, 5760)
        return ExpertWeights(u8, bias, u8, torch.empty(E, 2880), u8, u8)

    assert moe_triton.choose_config(4096 * 4, layer(32)).dequant  # 20b, 4K tokens: 512 rows per expert
    assert not moe_triton.choose_config(1024 * 4, layer(32)).dequant  # 128 rows per expert
    big = moe_triton.choose_config(16384 * 4, layer(128))  # 120b, 16K tokens
    assert not big.dequant and not big.dot_scaled and big.packed and big.BM == 128
    kept = dataclasses.replace(layer(128), gate_up_dense=torch.empty(0), down_dense=torch.empty(0))
    assert moe_triton.choose_config(16384 * 4, kept).dequant  # a kept copy costs no transient memory


@pytest.mark.parametrize("N", [3, 40])
def test_dense_moe_forward_and_input_gradient(N):
    """The dense-weight ([E, in, out]) path of the same kernel."""
    g = torch.Generator().manual_seed(N)
    ex = ExpertWeights(torch.randn(4, 96, 128, generator=g) * 0.1, torch.randn(4, 128, generator=g) * 0.1,
                       torch.randn(4, 64, 96, generator=g) * 0.1, torch.randn(4, 96, generator=g) * 0.1)
    x = torch.randn(N, 96, generator=g)
    w, ids = route(torch.randn(N, 4, generator=g), 2)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    cfg = moe_triton.TileConfig(16, 32, 32, 4, 1)
    out = moe_triton.routed_experts_triton(x1, w, ids, ex, config=cfg)
    ref = routed_experts_twin(x2, w, ids, ex)
    assert rel(out, ref) < 1e-5
    dout = torch.randn(N, 96, generator=g)
    out.backward(dout)
    ref.backward(dout)
    assert rel(x1.grad, x2.grad) < 1e-5


def _fused_kernels_on_cpu(monkeypatch, names) -> list:
    """The model's `fused_kernels` without its CUDA condition (the kernels run in the interpreter);
    returns the list each call of the kernels `names` appends its name to."""
    from ossrl.model import gptoss

    calls = []
    monkeypatch.setattr(fused, "fused_ok", lambda *t: not (torch.is_grad_enabled() and any(x.requires_grad for x in t)))
    monkeypatch.setattr(gptoss, "fused_kernels",
                        lambda *t: fused if gptoss.inference_kernels_on() and fused.fused_ok(*t) else None)
    for name in names:
        kernel = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    return calls


@torch.no_grad()
def _forward_and_step(model, ids):
    """The model's logits for ids [B, T], and for the last token as a decode step after a prefill
    of the others into a KVCache."""
    from ossrl.model.gptoss import KVCache

    cache = KVCache()
    full = model(ids)
    model(ids[:, :-1], cache=cache)
    return full, model(ids[:, -1:], cache=cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_model_forward_with_the_inference_kernels(dtype, monkeypatch):
    """The rollout engine's kernel wiring in the model (q/k/v as one matmul, rotary on its slices,
    add_rms_norm, RMSNorm, and in fp16 router_topk), on CPU tensors: the same outputs as the
    plain model for a prefill and a decode step (fp32 to fp32 rounding; fp16 exactly)."""
    from ossrl.model.gptoss import inference_kernels, lay_out_qkv
    from ossrl.testing import random_model, tiny_config

    calls = _fused_kernels_on_cpu(monkeypatch, ("rms_norm", "add_rms_norm", "rotary_qk", "router_topk"))
    model = random_model(tiny_config(num_hidden_layers=2, sliding_window=4), seed=3, dtype=dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    ref, ref_step = _forward_and_step(model, ids)
    assert not calls
    assert lay_out_qkv(model) == 2
    with inference_kernels():
        out, step = _forward_and_step(model, ids)
    expected = {"rms_norm", "rotary_qk", "router_topk"} if dtype == torch.float16 else {"rms_norm", "rotary_qk", "add_rms_norm"}
    assert set(calls) == expected  # fp16: fp32 residual stream (no add_rms_norm); fp32: no router_topk (TF32)
    if dtype == torch.float16:
        assert torch.equal(out, ref) and torch.equal(step, ref_step)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step, ref_step, rtol=1e-5, atol=1e-5)


def test_router_groups_switch_routes_through_the_grouping_kernel(monkeypatch):
    """fused.ROUTER_GROUPS: inside the inference kernels the routers (up to 64 rows) run
    `router_topk_grouped` where the experts' kernels serve and hand its grouping to the experts
    (tile rows DECODE_TILE_ROWS); the outputs are the plain model's bit for bit (an fp16 model on
    the CPU, told its experts' kernels serve: the wiring; the twin ignores the grouping). Where the
    kernels do not serve, the router does not group."""
    from ossrl.model import gptoss
    from ossrl.model.gptoss import inference_kernels
    from ossrl.testing import random_model, tiny_config

    calls = _fused_kernels_on_cpu(monkeypatch, ("router_topk", "router_topk_grouped"))
    monkeypatch.setattr(fused, "ROUTER_GROUPS", True)
    monkeypatch.setattr(gptoss.Experts, "kernels_serve", lambda self, x: True)  # (CPU fp16: the twin runs)
    model = random_model(tiny_config(num_hidden_layers=2, sliding_window=4), seed=3, dtype=torch.float16).eval()
    seen = []
    experts_forward = gptoss.Experts.forward
    monkeypatch.setattr(gptoss.Experts, "forward", lambda self, x, w, i, grouping=None:
                        seen.append(grouping) or experts_forward(self, x, w, i, grouping))
    ids = torch.randint(0, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    ref, ref_step = _forward_and_step(model, ids)
    seen.clear()
    with inference_kernels():
        out, step = _forward_and_step(model, ids)
    assert set(calls) == {"router_topk_grouped"}
    assert seen and all(g is not None and g.BM == gptoss.DECODE_TILE_ROWS for g in seen)
    assert torch.equal(out, ref) and torch.equal(step, ref_step)
    monkeypatch.setattr(gptoss.Experts, "kernels_serve", lambda self, x: False)
    calls.clear()
    with torch.no_grad(), inference_kernels():
        assert torch.equal(model(ids), ref)
    assert set(calls) == {"router_topk"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rollout_forwards_add_each_mlp_output_in_the_next_norm(dtype, monkeypatch):
    """DEFER_RESIDUAL_ADD: inside the inference kernels each layer's MLP output is added to the
    residual stream by the next layer's input norm and the last one by the final norm
    (`add_rms_norm`): in fp32 the same outputs bit for bit as adding it in its own op, for a
    prefill and a decode step; one plain rms_norm a forward (layer 0's input) against one per layer
    and the final norm without. fp16 (an fp32 residual stream) keeps its own add. (bf16 is not
    compared here: the interpreter truncates fp32 -> bf16 casts where the GPU rounds them, so its
    add_rms_norm sum differs from x + a; tests/test_fused_gpu.py checks that sum on the GPU.)"""
    from ossrl.model import gptoss
    from ossrl.model.gptoss import KVCache, inference_kernels
    from ossrl.testing import random_model, tiny_config

    calls = _fused_kernels_on_cpu(monkeypatch, ("rms_norm", "add_rms_norm"))
    layers = 3
    model = random_model(tiny_config(num_hidden_layers=layers, sliding_window=4), seed=8, dtype=dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))

    def run(defer):
        monkeypatch.setattr(gptoss, "DEFER_RESIDUAL_ADD", defer)
        calls.clear()
        with torch.no_grad(), inference_kernels():
            out = model(ids)
            counts = (calls.count("rms_norm"), calls.count("add_rms_norm"))
            cache = KVCache()
            model(ids[:, :6], cache=cache)
            return out, model(ids[:, 6:], cache=cache), counts

    out, step, counts = run(True)
    ref, ref_step, ref_counts = run(False)
    # (fp16: the attention's residual add is its own op too; every norm is a plain rms_norm)
    assert ref_counts == ((layers + 1, layers) if dtype == torch.float32 else (2 * layers + 1, 0))
    assert counts == ((1, 2 * layers) if dtype == torch.float32 else ref_counts)
    assert torch.equal(out, ref) and torch.equal(step, ref_step)


def _entropy64(logp):
    """-sum p log p in float64 with 0 log 0 = 0 (and a zero gradient there, unlike where(p > 0, ...))."""
    finite = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    return -(logp.exp() * finite).sum(-1)


def _reference_stats(z, targets, t):
    logp = torch.log_softmax(z.double() / t, dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1), _entropy64(logp), torch.logsumexp(z.double() / t, -1)


def _reference_grad(z, targets, t, g_logp, g_ent):
    zz = z.double().requires_grad_(True)
    logp_all = torch.log_softmax(zz / t, dim=-1)
    loss = (g_logp.double() * logp_all.gather(1, targets[:, None]).squeeze(1)).sum()
    if g_ent is not None:
        loss = loss + (g_ent.double() * _entropy64(logp_all)).sum()
    loss.backward()
    return zz.grad


def _awkward_logits(V, gen):
    """Rows a softmax can trip on: plain, peaked with its max in the last partial block, confident at
    a large offset (1 - p of order 1e-4), and -inf logits (first column included)."""
    z = torch.randn(5, V, generator=gen) * 4
    z[1, V - 1] = 30.0
    z[2] = torch.randn(V, generator=gen) * 2 + 300.0
    z[2, 5] = 316.6  # 1 - p(peak) about 1e-4 at t = 0.8
    z[3, 0] = z[3, 3] = float("-inf")
    z[4, :V // 2] = float("-inf")
    return z


@pytest.mark.parametrize("V", [5000, 7])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_softmax_row_stats_equal_the_full_softmax(temperature, V):
    """One pass per row (lane-wise online softmax, differences taken against the max) over a
    vocabulary that is not a multiple of the block, or smaller than it: the target's log-prob, the
    entropy and the logsumexp of softmax(z / t), against float64; -inf logits take no part."""
    from ossrl.kernels import log_softmax

    gen = torch.Generator().manual_seed(0)
    z = _awkward_logits(V, gen)
    targets = torch.tensor([0, V - 1, 5, 1, V - 1])
    logp, ent, top, log_total = log_softmax.row_stats(z, targets, temperature, with_entropy=True)
    ref_logp, ref_ent, ref_lse = _reference_stats(z, targets, temperature)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((top + log_total).double(), ref_lse, rtol=1e-6, atol=1e-5)
    logp2, ent2, _, _ = log_softmax.row_stats(z, targets, temperature, with_entropy=False)
    assert torch.equal(logp2, logp) and ent2.numel() == 0


@pytest.mark.parametrize("with_entropy", [False, True])
def test_log_softmax_grad_in_place_equals_autograd(with_entropy):
    """The gradient written over the logits against float64 autograd, row by row, to 1e-5 of the
    row's gradient norm or 2e-6, whichever is larger (near-certain rows have gradients of 1e-8 to
    1e-4, where fp32's 1 - p cancels, in PyTorch's fp32 path as here). A log p taken against the
    logsumexp instead of the max is off by |lse| x 6e-8: 2e-5 on the confident row at offset 300."""
    from ossrl.kernels import log_softmax

    gen = torch.Generator().manual_seed(1)
    t = 0.8
    z = _awkward_logits(4500, gen)
    targets = torch.tensor([3, 4499, 5, 4096, 4499])
    g_logp, g_ent = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    want = _reference_grad(z, targets, t, g_logp, g_ent if with_entropy else None)
    _, ent, top, log_total = log_softmax.row_stats(z, targets, t, with_entropy=True)
    grad = log_softmax.softmax_grad_(z.clone(), targets, top, log_total, ent, g_logp,
                                     g_ent if with_entropy else None, t)
    assert torch.isfinite(grad).all()
    assert torch.isfinite(want).all()
    for row in range(5):
        err = (grad[row].double() - want[row]).norm()
        assert err < 1e-5 * max(want[row].norm().item(), 0.2), (row, err.item(), want[row].norm().item())


def test_log_softmax_reads_strided_targets_and_checks_shapes():
    from ossrl.kernels import log_softmax

    z = torch.randn(3, 100)
    targets = torch.tensor([[5, 0], [7, 0], [99, 0]])[:, 0]  # a stride-2 view
    logp, _, _, _ = log_softmax.row_stats(z, targets, 1.0, with_entropy=False)
    torch.testing.assert_close(logp, torch.log_softmax(z, -1).gather(1, targets[:, None]).squeeze(1))
    with pytest.raises(ValueError, match="targets must be"):
        log_softmax.row_stats(z, targets[:2], 1.0, with_entropy=False)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_logprobs_through_the_fused_kernels_equal_the_pytorch_path(with_entropy, monkeypatch):
    """token_logprobs with the fused softmax (forced on for CPU tensors, in the interpreter): the
    same log-probs, entropies and gradients for the hidden states and the weight, chunk by chunk;
    an entropy nobody differentiates (detached, as GRPO logs it) takes no part in the backward."""
    from ossrl.kernels import log_softmax
    from ossrl.train import logprobs as lp_module

    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(37, 24, generator=gen)
    weight = torch.randn(3000, 24, generator=gen) * 0.3
    targets = torch.randint(0, 3000, (37,), generator=gen)
    g_logp, g_ent = torch.randn(37, generator=gen), torch.randn(37, generator=gen)

    def run(fused):
        monkeypatch.setattr(lp_module, "_fused_log_softmax", lambda h: log_softmax if fused else None)
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lp, ent = lp_module.token_logprobs(h, w, targets, temperature=0.9, chunk=16, with_entropy=True)
        loss = (lp * g_logp).sum() + ((ent * g_ent).sum() if with_entropy else 0.0)
        loss.backward()
        return lp.detach(), ent.detach(), h.grad, w.grad

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_eager_logprob_gradient_through_the_fused_kernels_equals_the_recomputing_backward(with_entropy, monkeypatch):
    """EAGER_GRADIENT with the fused softmax (interpreter): the forward's softmax_grad_ (a gradient
    of 1 a row) times the backward's row scale equals the recomputing backward's gradient."""
    from ossrl.kernels import log_softmax
    from ossrl.train import logprobs as lp_module

    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(37, 24, generator=gen)
    weight = torch.randn(3000, 24, generator=gen) * 0.3
    targets = torch.randint(0, 3000, (37,), generator=gen)
    g_logp, g_ent = torch.randn(37, generator=gen), torch.randn(37, generator=gen)
    monkeypatch.setattr(lp_module, "_fused_log_softmax", lambda h: log_softmax)

    def run(eager):
        monkeypatch.setattr(lp_module, "EAGER_GRADIENT", eager)
        h = hidden.clone().requires_grad_(True)
        lp, ent = lp_module.token_logprobs(h, weight, targets, temperature=0.9, chunk=16, with_entropy=with_entropy)
        loss = (lp * g_logp).sum() + ((ent * g_ent).sum() if with_entropy else 0.0)
        loss.backward()
        return lp.detach(), h.grad, *((ent.detach(),) if with_entropy else ())

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_sink_rescale_kernels_equal_the_pytorch_twin(layout, monkeypatch):
    """`_SinkRescale` through `ossrl.kernels.sink_triton` (one pass each way) against its PyTorch
    path: output, and the gradients of out, lse and the sinks, for FlexAttention's own layout
    (q's stride order: [B, T, H, D] in memory) and a contiguous [B, H, T, D], with rows (145) not
    a multiple of the block, and gradients in either stride order and broadcast (stride 0)."""
    from ossrl.kernels import attention

    gen = torch.Generator().manual_seed(6)
    B, H, T, D = 1, 5, 29, 64
    base = torch.randn(B, T, H, D, generator=gen).transpose(1, 2) if layout == "bthd" else \
        torch.randn(B, H, T, D, generator=gen)
    lse = torch.randn(B, H, T, generator=gen)
    sinks = torch.randn(H, generator=gen)
    grads = (torch.randn(B, H, T, D, generator=gen), torch.randn(B, T, H, D, generator=gen).transpose(1, 2),
             torch.randn(1, 1, 1, D, generator=gen).expand(B, H, T, D))

    def run(kernels, grad):
        from ossrl.kernels import sink_triton

        monkeypatch.setattr(attention, "_sink_kernels", lambda out: sink_triton if kernels else None)
        out, l, s = (t.clone().requires_grad_(True) for t in (base, lse, sinks))
        y = attention._SinkRescale.apply(out, l, s)
        y.backward(grad)
        return y.detach(), out.grad, l.grad, s.grad, y.stride()

    for grad in grads:
        *ours, ours_stride = run(True, grad)
        *twin, twin_stride = run(False, grad)
        assert ours_stride == twin_stride == base.stride()  # the output keeps out's layout
        for a, b in zip(ours, twin):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_moe_read_roofline_kernels_read_every_routed_byte_once(monkeypatch):
    """benchmarks/moe_read.py (the MoE decode's read ceiling): the tile-mapped read (a ragged
    last K tile, as at K = 2,880 with 128-column tiles) and the contiguous read each fold exactly
    the routed experts' code words and scale bytes, nothing twice, nothing of the others."""
    import functools
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from moe_read import expected_xor, read_flat, read_tiles

    g = torch.Generator().manual_seed(0)
    E, rows, K = 4, 32, 320  # K / 8 = 40 words a row: 2.5 tiles of 128 columns
    blocks = torch.randint(0, 256, (E, rows, K // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 256, (E, rows, K // 32), generator=g, dtype=torch.uint8)
    experts = torch.tensor([3, 1], dtype=torch.int32)

    def folded(out):
        return functools.reduce(lambda a, b: a ^ b, (v & 0xFFFFFFFF for v in out.tolist()), 0)

    want = expected_xor(blocks, scales, experts)
    assert want != expected_xor(blocks, scales, experts[:1])  # the check tells experts apart
    for bn, bk, split in ((16, 128, 1), (32, 64, 1), (16, 64, 2), (16, 128, 2)):  # 5 and 3 K tiles cut in 2
        assert folded(read_tiles(blocks, scales, experts, bn=bn, bk=bk, split_k=split, stages=2)) == want
    for parts, bw, bs in ((2, 64, 32), (4, 128, 32)):  # whole blocks; a masked end in every part
        assert folded(read_flat(blocks, scales, experts, parts=parts, block_words=bw, block_scales=bs, stages=2)) == want
    with pytest.raises(ValueError, match="do not cut"):
        read_flat(blocks, scales, experts, parts=3)


@pytest.mark.parametrize("rows,words,bk,split", [(32, 8, 64, 1), (32, 8, 32, 1), (32, 4, 32, 2), (16, 8, 32, 1)])
def test_the_word_decode_reads_the_tile_contiguous_copies(rows, words, bk, split):
    """`ExpertWeights.gate_up_tiled / down_tiled`: copies of both projections' blocks by `tile_blocks`
    (gate_up's rows of 12 words leave a ragged last chunk at 8 words). The word forward reads them
    (the published blocks zeroed: the same output as the published layout gives); `untile_blocks`
    restores the bytes; the pair decode and the gradients read the published blocks."""
    from ossrl.kernels.mxfp4_triton import tile_blocks, untile_blocks

    ex = _experts()
    gate_up_tiled, down_tiled = tile_blocks(ex.gate_up, rows, words), tile_blocks(ex.down, rows, words)
    assert not torch.equal(gate_up_tiled, ex.gate_up)  # (down's rows are 8 words: one chunk unless words < 8)
    assert torch.equal(untile_blocks(gate_up_tiled, rows, words), ex.gate_up)
    assert torch.equal(untile_blocks(down_tiled, rows, words), ex.down)
    only_tiled = dataclasses.replace(ex, gate_up=torch.zeros_like(ex.gate_up), down=torch.zeros_like(ex.down),
                                     gate_up_tiled=gate_up_tiled, down_tiled=down_tiled, tiled=(rows, words))
    with_both = dataclasses.replace(ex, gate_up_tiled=torch.zeros_like(gate_up_tiled),
                                    down_tiled=torch.zeros_like(down_tiled), tiled=(rows, words))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 96, generator=g)
    w, ids = route(torch.randn(40, 4, generator=g), 2)
    cfg = moe_triton.TileConfig(16, 32, bk, 4, 1, dot_scaled=False, swap_ab=True, words=True, split_k=split)
    with torch.no_grad():
        want = moe_triton.routed_experts_triton(x, w, ids, ex, config=cfg)
        got = moe_triton.routed_experts_triton(x, w, ids, only_tiled, config=cfg)
        pairs = dataclasses.replace(cfg, words=False)
        pair_want = moe_triton.routed_experts_triton(x, w, ids, ex, config=pairs)
        pair_got = moe_triton.routed_experts_triton(x, w, ids, with_both, config=pairs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(pair_got, pair_want, rtol=0, atol=0)
    assert rel(want, routed_experts_twin(x, w, ids, ex)) < 1e-5


def test_decode_sizes_reading_the_tiled_copies_take_the_two_part_64_column_tiles():
    """`choose_config` with tile-contiguous copies (rollouts): 16x64x64 word tiles in 2 K parts (two
    launches) wherever the defaults take the 64x128 word tile (up to 16 slots an expert; measured at
    8, 64 and 128 tokens), the 1-token tile as it is (the same shape, finishing in its last part),
    the defaults above that and without copies."""
    ex = _experts()  # 4 experts
    ex = dataclasses.replace(ex, gate_up_bias=ex.gate_up_bias.bfloat16(), down_bias=ex.down_bias.bfloat16())
    tiled = dataclasses.replace(ex, gate_up_tiled=ex.gate_up, down_tiled=ex.down, tiled=(32, 8))
    pick = moe_triton.TileConfig(16, 64, 64, 4, 3, dot_scaled=False, swap_ab=True, split_k=2, words=True)
    one = moe_triton.choose_config(1, tiled)
    assert one == moe_triton.default_config(1, 4, True) == dataclasses.replace(pick, fixup=True)
    for slots in (2, 8, 32, 64):
        assert moe_triton.choose_config(slots, tiled) == pick
        assert moe_triton.choose_config(slots, ex) == moe_triton.default_config(slots, 4, True)
    assert moe_triton.choose_config(65, tiled) == moe_triton.default_config(65, 4, True) != pick
    assert moe_triton.choose_config(4096, tiled) == moe_triton.choose_config(4096, ex)
    # copies the 64-column tile cannot read whole, or an fp32 model (no word decode on sm_90): the defaults
    for other in (dataclasses.replace(tiled, tiled=(32, 4)),
                  dataclasses.replace(tiled, gate_up_bias=ex.gate_up_bias.float(), down_bias=ex.down_bias.float())):
        assert moe_triton.choose_config(8, other) == moe_triton.default_config(8, 4, True) != pick


def test_copies_whose_chunks_are_narrower_than_the_k_tile_are_not_read():
    """The word decode reads the tiled copies only where its K tile divides a chunk: chunks of 4
    words (32 columns) under a 64-column tile leave it to the published blocks (copies zeroed here,
    so reading them would show)."""
    from ossrl.kernels.mxfp4_triton import tile_blocks

    ex = _experts()
    zeros = dataclasses.replace(ex, gate_up_tiled=torch.zeros_like(tile_blocks(ex.gate_up, 32, 4)),
                                down_tiled=torch.zeros_like(tile_blocks(ex.down, 32, 4)), tiled=(32, 4))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 96, generator=g)
    w, ids = route(torch.randn(12, 4, generator=g), 2)
    cfg = moe_triton.TileConfig(16, 32, 64, 4, 1, dot_scaled=False, swap_ab=True, words=True)
    with torch.no_grad():
        torch.testing.assert_close(moe_triton.routed_experts_triton(x, w, ids, zeros, config=cfg),
                                   moe_triton.routed_experts_triton(x, w, ids, ex, config=cfg), rtol=0, atol=0)


@pytest.mark.parametrize("tile", [(16, 32), (32, 64), (16, 512)])
@pytest.mark.parametrize("N", [1, 3])
def test_moe_gemv_equals_the_twin(tile, N, monkeypatch):
    """`ossrl.kernels.moe_gemv`: a token's (or three tokens') routed MXFP4 experts as matrix-vector
    products, taken by `routed_experts_triton` without autograd or LoRA up to GEMV_MAX_TOKENS
    tokens, equal the twin (K tiles of 32 and 64 columns cut H = 96 and I = 64 evenly, 512 leaves a
    ragged tile; 16-row tiles cut 2I = 128 evenly, 32 too); with GEMV off (the default), more
    tokens, or autograd, the grouped kernels run instead."""
    from ossrl.kernels import moe_gemv

    ex = _experts()
    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, 96, generator=g)
    w, ids = route(torch.randn(N, 4, generator=g), 2)
    ref = routed_experts_twin(x, w, ids, ex)
    with torch.no_grad():
        assert rel(moe_gemv.routed_experts_gemv(x, w, ids, ex, tile=tile), ref) < 1e-5
        calls = []
        real = moe_gemv.routed_experts_gemv
        monkeypatch.setattr(moe_triton, "routed_experts_gemv", lambda *a: calls.append(1) or real(*a))
        moe_triton.routed_experts_triton(x, w, ids, ex)  # off by default
        monkeypatch.setattr(moe_gemv, "GEMV", True)
        monkeypatch.setattr(moe_gemv, "GEMV_MAX_TOKENS", N)
        assert rel(moe_triton.routed_experts_triton(x, w, ids, ex), ref) < 1e-5 and calls == [1]
        monkeypatch.setattr(moe_gemv, "GEMV_MAX_TOKENS", N - 1)
        moe_triton.routed_experts_triton(x, w, ids, ex)
    monkeypatch.setattr(moe_gemv, "GEMV_MAX_TOKENS", N)
    moe_triton.routed_experts_triton(x.requires_grad_(True), w, ids, ex)  # autograd: the grouped kernels
    assert calls == [1]


def test_moe_gemv_clamps_and_biases_like_the_twin():
    """Large inputs reach the SwiGLU clamp (limit 7) on both gate and up, with the biases on."""
    from ossrl.kernels import moe_gemv

    ex = _experts(seed=3)
    ex = dataclasses.replace(ex, gate_up_bias=ex.gate_up_bias * 30, limit=2.0)
    x = torch.randn(1, 96) * 40
    w, ids = route(torch.randn(1, 4), 2)
    with torch.no_grad():
        out = moe_gemv.routed_experts_gemv(x, w, ids, ex, tile=(16, 64))
    assert rel(out, routed_experts_twin(x, w, ids, ex)) < 1e-5
