"""The one-launch inference kernels (ossrl.kernels.fused, the split sampling kernel) against the
PyTorch code they replace (run: pytest -m gpu tests/test_fused_gpu.py)."""

from types import SimpleNamespace

import pytest
import torch

from ossrl.kernels.decode_attention import append_kv_reference
from ossrl.kernels.moe import group_by_expert, route
from ossrl.model.gptoss import RMSNorm, apply_rotary

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
fused = pytest.importorskip("ossrl.kernels.fused")
from ossrl.kernels import moe_triton  # noqa: E402
from ossrl.kernels.sampling import _sample_temperature_twin, fold_seed, sample_temperature  # noqa: E402

DEV = "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("rows,H", [(1, 2880), (37, 2880), (5, 64), (3, 5000)])
def test_rms_norm_matches_the_module(dtype, rows, H):
    g = torch.Generator(device=DEV).manual_seed(rows + H)
    x = (torch.randn(rows, H, generator=g, device=DEV) * 3).to(dtype)
    norm = RMSNorm(H, 1e-5, device=DEV, dtype=dtype)
    norm.weight.data = torch.randn(H, generator=g, device=DEV).to(dtype)
    ref = rms_norm_reference(x, norm.weight, 1e-5)
    got = fused.rms_norm(x, norm.weight, 1e-5)
    assert got.dtype == dtype
    ulp = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 2 ** -22}[dtype]
    assert ((got.float() - ref.float()).abs() <= 2 * ulp * ref.float().abs() + 1e-6).all()


@pytest.mark.parametrize("rows", [1, 64, 300])
def test_add_rms_norm_is_the_add_then_the_kernel_norm(rows):
    """bf16, 20b's hidden size: the residual sum bit for bit `x + a`, the norm the rms_norm
    kernel's on that sum (the same code and launch; compared to a bf16 rounding)."""
    g = torch.Generator(device=DEV).manual_seed(rows)
    x = (torch.randn(rows, 2880, generator=g, device=DEV) * 3).bfloat16()
    a = torch.randn(rows, 2880, generator=g, device=DEV).bfloat16()
    weight = torch.randn(2880, generator=g, device=DEV).bfloat16()
    s, y = fused.add_rms_norm(x, a, weight, 1e-5)
    assert torch.equal(s, x + a)
    ref = fused.rms_norm(x + a, weight, 1e-5)
    assert ((y.float() - ref.float()).abs() <= 2 ** -8 * ref.float().abs()).all()


def rms_norm_reference(x, weight, eps):
    """The module's PyTorch code (on CUDA the module itself runs the kernels)."""
    xf = x.float()
    return (weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,H", [(37, 2880), (3, 5000)])
def test_training_rms_norm_and_rotary_gradients_match_autograd(dtype, rows, H):
    """The training path's one-kernel backwards against autograd through the PyTorch code: within
    2 ulp of the dtype for RMSNorm (fp32 inside both), and for rotary within the reference's own
    bf16 rounding of each product (the same pattern as the forward test below)."""
    g = torch.Generator(device=DEV).manual_seed(rows)
    x = (torch.randn(rows, H, generator=g, device=DEV) * 3).to(dtype).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w = torch.randn(H, generator=g, device=DEV).to(dtype)
    dy = torch.randn(rows, H, generator=g, device=DEV).to(dtype)
    fused.rms_norm_autograd(x, w, 1e-5).backward(dy)
    rms_norm_reference(x_ref, w, 1e-5).backward(dy)
    exact = x_ref.grad.float()
    ulp = {torch.bfloat16: 2 ** -7, torch.float32: 2 ** -20}[dtype]
    assert ((x.grad.float() - exact).abs() <= 2 * ulp * exact.abs() + 1e-5 * exact.abs().max()).all()

    q = torch.randn(2, rows, 64, 64, generator=g, device=DEV).to(dtype).requires_grad_(True)
    k = torch.randn(2, rows, 8, 64, generator=g, device=DEV).to(dtype).requires_grad_(True)
    q_ref, k_ref = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    ang = torch.randn(2, rows, 32, generator=g, device=DEV)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    oq, ok = fused.rotary_qk_autograd(q, k, cos, sin)
    torch.autograd.backward((oq, ok), (dq, dk))
    torch.autograd.backward((apply_rotary(q_ref, cos, sin), apply_rotary(k_ref, cos, sin)), (dq, dk))
    for got, ref in ((q.grad, q_ref.grad), (k.grad, k_ref.grad)):
        assert ((got.float() - ref.float()).abs() <= 3 * ulp * (dq.float().abs().max() + 1)).all()


@pytest.mark.parametrize("with_a", [False, True])
def test_training_add_rms_norm_gradient_matches_the_add_then_the_norm(with_a):
    """`add_rms_norm_autograd` on CUDA in bf16 (the training path's residual add and norm, 20b's
    width): s and y bit for bit as the add then `rms_norm_autograd`, and x's gradient (ds added in
    the norm's backward kernel, in fp32) within one bf16 rounding of theirs (rounded twice)."""
    g = torch.Generator(device=DEV).manual_seed(11)
    x = (torch.randn(300, 2880, generator=g, device=DEV) * 3).to(torch.bfloat16).requires_grad_(True)
    a = torch.randn(300, 2880, generator=g, device=DEV).to(torch.bfloat16).requires_grad_(True) if with_a else None
    w = torch.randn(2880, generator=g, device=DEV).to(torch.bfloat16)
    ds, dy = (torch.randn(300, 2880, generator=g, device=DEV).to(torch.bfloat16) for _ in range(2))
    s, y = fused.add_rms_norm_autograd(x, a, w, 1e-5)
    s_ref = x + a if with_a else x
    y_ref = fused.rms_norm_autograd(s_ref, w, 1e-5)
    assert torch.equal(s, s_ref) and torch.equal(y, y_ref)
    got = torch.autograd.grad((s, y), x, (ds, dy))[0].float()
    want = torch.autograd.grad((s_ref, y_ref), x, (ds, dy), retain_graph=True)[0].float()
    norm_part = torch.autograd.grad(y_ref, x, dy)[0].float()  # rounded once more in theirs
    assert ((got - want).abs() <= 2 ** -7 * (want.abs() + norm_part.abs()) + 1e-6).all()


def test_model_modules_pick_the_fused_path_only_in_the_engine_and_without_grad():
    x = torch.randn(4, 64, device=DEV, dtype=torch.bfloat16)
    norm = RMSNorm(64, 1e-5, device=DEV, dtype=torch.bfloat16)
    from ossrl.model import gptoss
    with torch.no_grad():  # the trainer's no-grad passes: the same PyTorch code as its training pass
        assert gptoss.fused_kernels(x, norm.weight) is None
    with gptoss.inference_kernels():
        assert gptoss.fused_kernels(x, norm.weight) is None  # the weight requires grad
        with torch.no_grad():
            assert gptoss.fused_kernels(x, norm.weight) is fused
    with torch.no_grad():
        assert gptoss.fused_kernels(x, norm.weight) is None  # the context restored the flag


def test_deferred_residual_add_matches_the_separate_add_in_bf16(monkeypatch):
    """DEFER_RESIDUAL_ADD in a bf16 rollout forward (prefill and decode): each layer's MLP output
    added by the next norm kernel gives the separate add's residual sums bit for bit (the add's
    rounding), the norms within a bf16 rounding of the rms_norm kernel's; so the logits agree to
    bf16 noise, and a forward takes one plain norm kernel instead of one per layer."""
    from ossrl.model import gptoss
    from ossrl.model.gptoss import KVCache, inference_kernels
    from ossrl.testing import random_model, tiny_config

    model = random_model(tiny_config(num_hidden_layers=4, sliding_window=4), seed=8, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
    norms = []
    kernel = fused.rms_norm
    monkeypatch.setattr(fused, "rms_norm", lambda *a, **kw: norms.append(1) or kernel(*a, **kw))

    def run(defer):
        monkeypatch.setattr(gptoss, "DEFER_RESIDUAL_ADD", defer)
        norms.clear()
        with torch.no_grad(), inference_kernels():
            out = model(ids).float()
            count = len(norms)
            cache = KVCache()
            model(ids[:, :8], cache=cache)
            return out, model(ids[:, 8:], cache=cache).float(), count

    out, step, count = run(True)
    ref, ref_step, ref_count = run(False)
    assert (count, ref_count) == (1, 5)
    for a, b in ((out, ref), (step, ref_step)):
        assert (a - b).norm() / b.norm() < 2e-2


@pytest.mark.parametrize("B,T", [(1, 1), (5, 1), (1, 300), (2, 7)])
def test_rotary_matches_apply_rotary(B, T):
    g = torch.Generator(device=DEV).manual_seed(B * T)
    qkv = torch.randn(B, T, (64 + 16) * 64, generator=g, device=DEV).bfloat16()
    q = qkv[..., : 64 * 64].view(B, T, 64, 64)  # views of one projection, as a fused qkv would give
    k = qkv[..., 64 * 64: 72 * 64].view(B, T, 8, 64)
    ang = torch.randn(B, T, 32, generator=g, device=DEV)
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    oq, ok = fused.rotary_qk(q, k, cos, sin)
    # within bf16 rounding of the terms (the reference rounds each product, then the sum; on the
    # H100 the kernel's results differed from it by one rounding on 23% of elements, and were as
    # close to the exact fp32 value as the reference's)
    for got, x in ((oq, q), (ok, k)):
        ref = apply_rotary(x, cos, sin).float()
        x1, x2 = x.float().abs().chunk(2, -1)
        c, s = cos.float().abs()[:, :, None], sin.float().abs()[:, :, None]
        size = torch.cat((x1 * c + x2 * s, x2 * c + x1 * s), -1)  # |x1 cos| + |x2 sin|, |x2 cos| + |x1 sin|
        assert ((got.float() - ref).abs() <= 2 ** -6 * size + 1e-6).all()


@pytest.mark.parametrize("rows", [5, 128])  # a ring of 5 rows and a long cache
def test_append_kv_matches_the_reference(rows):
    g = torch.Generator(device=DEV).manual_seed(rows)
    kc = torch.randn(6, rows, 8, 64, generator=g, device=DEV).bfloat16()
    vc = torch.randn(6, rows, 8, 64, generator=g, device=DEV).bfloat16()
    k = torch.randn(3, 8, 64, generator=g, device=DEV).bfloat16()
    v = torch.randn(3, 8, 64, generator=g, device=DEV).bfloat16()
    slots, pos = torch.tensor([4, 0, 5], device=DEV), torch.tensor([9, 0, 131], device=DEV)
    kr, vr = kc.clone(), vc.clone()
    append_kv_reference(kr, vr, k, v, slots, pos)
    fused.append_kv(kc, vc, k, v, slots, pos)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@pytest.mark.parametrize("rows", [5, 128])
def test_rotary_append_is_rotary_then_append_in_bf16(rows):
    """`rotary_append` at 20b's decode shapes (64 q heads, 8 kv heads, D 64; q, k, v slices of one
    fused output) gives `rotary_qk` then `append_kv` bit for bit, in a ring and a long cache."""
    g = torch.Generator(device=DEV).manual_seed(rows)
    B, HQ, HK, D = 3, 64, 8, 64
    qkv = torch.randn(B, 1, (HQ + 2 * HK) * D, generator=g, device=DEV).bfloat16()
    q = qkv[..., : HQ * D].view(B, 1, HQ, D)
    k = qkv[..., HQ * D: (HQ + HK) * D].view(B, 1, HK, D)
    v = qkv[..., (HQ + HK) * D:].view(B, 1, HK, D)
    ang = torch.randn(B, 1, D // 2, generator=g, device=DEV)
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    kc = torch.randn(6, rows, HK, D, generator=g, device=DEV).bfloat16()
    vc = torch.randn(6, rows, HK, D, generator=g, device=DEV).bfloat16()
    slots, pos = torch.tensor([4, 0, 5], device=DEV), torch.tensor([9, 0, 131], device=DEV)
    kr, vr = kc.clone(), vc.clone()
    oq = fused.rotary_append(q, k, v, cos, sin, kc, vc, slots, pos)
    rq, rk = fused.rotary_qk(q, k, cos, sin)
    fused.append_kv(kr, vr, rk[:, 0], v[:, 0], slots, pos)
    assert torch.equal(oq, rq) and torch.equal(kc, kr) and torch.equal(vc, vr)


@pytest.mark.parametrize("N,E,k", [(1, 32, 4), (64, 32, 4), (300, 128, 4), (7, 4, 2), (9, 6, 1)])
def test_route_topk_matches_route(N, E, k):
    g = torch.Generator(device=DEV).manual_seed(N + E)
    logits = (torch.randn(N, E, generator=g, device=DEV) * 2).bfloat16()
    w, ids = fused.route_topk(logits, k)
    wr, idr = route(logits, k)
    # same selected values (ties may pick a different expert of equal logit), same weights
    torch.testing.assert_close(logits.gather(1, ids), logits.gather(1, idr), rtol=0, atol=0)
    torch.testing.assert_close(w, wr, rtol=0, atol=0)
    distinct = (logits.float().unsqueeze(-1) == logits.float().unsqueeze(-2)).sum((1, 2)) == E
    assert torch.equal(ids[distinct], idr[distinct])


@pytest.mark.parametrize("N,E,k", [(1, 32, 4), (64, 32, 4), (256, 128, 4), (7, 4, 2)])
def test_router_topk_matches_linear_then_route(N, E, k):
    """bf16, 20b's hidden size: in every row experts whose exact logits equal those F.linear + route
    picks to the logits' bf16 rounding (the kernel's fp32 sums run in another order than cuBLAS's);
    where no two of the top k + 1 are that close, the same experts and weights."""
    g = torch.Generator(device=DEV).manual_seed(N + E)
    H = 2880
    x = torch.randn(N, H, generator=g, device=DEV).bfloat16()
    weight = (torch.randn(E, H, generator=g, device=DEV) * 0.25 / H ** 0.5).bfloat16()  # x . w: std 0.25
    # biases 0.75 apart (|logit| < 64: bf16 spacing <= 0.25), so most rows have no near-tie (session 7:
    # at a spread of 1.4 only 38-45% of rows with 32 experts had none, fewer with 128)
    bias = ((torch.randperm(E, generator=g, device=DEV) - E / 2) * 0.75).bfloat16()
    w, ids = fused.router_topk(x, weight, bias, k)
    logits = torch.nn.functional.linear(x, weight, bias)
    wr, idr = route(logits, k)
    exact = x.float() @ weight.float().T + bias.float()
    # every row: the experts chosen are F.linear + route's up to the logits' bf16 rounding
    torch.testing.assert_close(exact.gather(1, ids).sort(1).values, exact.gather(1, idr).sort(1).values,
                               rtol=0, atol=0.3)
    top = exact.topk(k + 1, dim=1).values
    clear = ((top[:, :-1] - top[:, 1:]).abs() > 0.3).all(1)  # no near-tie among the top k + 1
    assert clear.sum() >= N // 4  # enough rows compared exactly
    assert torch.equal(ids[clear], idr[clear])
    torch.testing.assert_close(w[clear].float(), wr[clear].float(), rtol=0.02, atol=0.01)


@pytest.mark.parametrize("ids_shape,E,BM", [((1, 4), 32, 16), ((64, 4), 32, 16), ((64, 4), 32, 1),
                                            ((1000, 4), 32, 64), ((50, 1), 8, 16)])
def test_group_small_matches_group_by_expert_and_tile_table(ids_shape, E, BM):
    g = torch.Generator(device=DEV).manual_seed(ids_shape[0])
    ids = torch.randint(0, E, ids_shape, generator=g, device=DEV)
    if ids_shape[0] == 50:
        ids[:] = 3  # every slot on one expert
    small = fused.group_small(ids, E, BM)
    groups, (te, ts, nt) = small.groups, small.table
    ref = group_by_expert(ids, E)
    for f in ("order", "token", "expert", "offsets"):
        assert torch.equal(getattr(groups, f), getattr(ref, f)), f
    plan = moe_triton._Plan(ref, SimpleNamespace(num_experts=E), ids_shape[0], moe_triton.TileConfig(BM, 64, 64, 4, 3))
    re, rs, rn = plan.tiles(BM)
    assert nt == rn and torch.equal(te, re)
    valid = re >= 0
    assert torch.equal(ts[valid], rs[valid])


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("B,V", [(1, 201088), (8, 5000), (3, 100)])
def test_split_sampling_matches_the_twin(temperature, B, V):
    g = torch.Generator(device=DEV).manual_seed(B + V)
    logits = torch.randn(B, V, generator=g, device=DEV) * 4
    keys = fold_seed(torch.arange(B, device=DEV) + 11)
    steps = torch.arange(B, device=DEV) * 3
    tok, plain, sampled = sample_temperature(logits, temperature, keys, steps)
    rt, rp, rs = _sample_temperature_twin(logits, temperature, keys, steps)
    assert torch.equal(tok, rt)
    torch.testing.assert_close(plain, rp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sampled, rs, rtol=1e-5, atol=1e-4)
