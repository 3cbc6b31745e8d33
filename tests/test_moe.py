"""Routing, token grouping and the MoE twin on CPU (the GPU kernels are checked in test_moe_gpu.py)."""

import pytest
import torch

from ossrl.kernels.moe import (
    ExpertWeights, clamped_swiglu, clamped_swiglu_backward, group_by_expert, grouped_lora_delta, route,
    routed_experts, routed_experts_twin, token_lora_delta,
)
from ossrl.kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4

LIMIT, ALPHA = 7.0, 1.702


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_experts(E, H, I, fmt, gen, dtype=torch.float32):
    w1 = torch.randn(E, 2 * I, H, generator=gen) * H ** -0.5  # [E, out, in]
    w2 = torch.randn(E, H, I, generator=gen) * I ** -0.5
    b1, b2 = torch.randn(E, 2 * I, generator=gen) * 0.1, torch.randn(E, H, generator=gen) * 0.1
    if fmt == "mxfp4":
        (q1, s1), (q2, s2) = quantize_mxfp4(w1), quantize_mxfp4(w2)
        return ExpertWeights(q1, b1.to(dtype), q2, b2.to(dtype), s1, s2, limit=LIMIT, alpha=ALPHA)
    return ExpertWeights(w1.transpose(1, 2).contiguous().to(dtype), b1.to(dtype),
                         w2.transpose(1, 2).contiguous().to(dtype), b2.to(dtype), limit=LIMIT, alpha=ALPHA)


def dense_all_experts(x, weights, ids, ex: ExpertWeights):
    """Every expert on every token, masked by the routing: an independent (slow) formula."""
    E = ex.num_experts
    if ex.format == "mxfp4":
        w1 = dequantize_mxfp4(ex.gate_up, ex.gate_up_scales, x.dtype).transpose(1, 2)
        w2 = dequantize_mxfp4(ex.down, ex.down_scales, x.dtype).transpose(1, 2)
    else:
        w1, w2 = ex.gate_up, ex.down
    z = torch.einsum("nh,ehf->enf", x, w1) + ex.gate_up_bias[:, None]
    y = torch.einsum("eni,eih->enh", clamped_swiglu(z, limit=LIMIT, alpha=ALPHA), w2) + ex.down_bias[:, None]
    dense_w = torch.zeros(x.shape[0], E, dtype=x.dtype).scatter_add_(1, ids, weights)  # [N, E]
    return torch.einsum("ne,enh->nh", dense_w, y)


def test_route_is_topk_then_softmax_over_the_k_values():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 0.5, 0.2]])
    weights, ids = route(logits, 2)
    assert ids.tolist() == [[1, 3], [0, 2]]
    assert torch.allclose(weights[0], torch.softmax(torch.tensor([2.0, 1.5]), 0))
    assert torch.allclose(weights.sum(-1), torch.ones(2))


def test_group_by_expert_sorts_slots_stably_and_counts_empty_experts():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]])  # expert 1 gets nothing
    g = group_by_expert(ids, num_experts=5)
    assert g.offsets.tolist() == [0, 2, 2, 5, 6, 6]
    assert g.counts.tolist() == [2, 0, 3, 1, 0]
    assert g.order.tolist() == [1, 4, 0, 2, 5, 3]  # slot = token*k + j, stable within an expert
    assert g.token.tolist() == [0, 2, 0, 1, 2, 1]
    assert torch.equal(g.expert, ids.flatten()[g.order])


def test_group_by_expert_all_tokens_to_one_expert():
    g = group_by_expert(torch.full((7, 1), 3), num_experts=4)
    assert g.counts.tolist() == [0, 0, 0, 7]
    assert g.token.tolist() == list(range(7))


def test_swiglu_backward_matches_autograd_including_clamp_edges():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 64, generator=gen, dtype=torch.float64) * 6
    z[0, 0], z[0, 1], z[1, 3] = LIMIT, -LIMIT, LIMIT  # exactly at the bounds
    da = torch.randn(5, 32, generator=gen, dtype=torch.float64)
    z.requires_grad_(True)
    clamped_swiglu(z, limit=LIMIT, alpha=ALPHA).backward(da)
    ours = clamped_swiglu_backward(z.detach(), da, limit=LIMIT, alpha=ALPHA)
    assert rel_err(ours, z.grad) < 1e-6


@pytest.mark.parametrize("fmt", ["bf16", "mxfp4"])
@pytest.mark.parametrize("N,E,k", [(1, 8, 2), (13, 8, 4), (40, 6, 3)])
def test_twin_equals_all_experts_formula(fmt, N, E, k):
    gen = torch.Generator().manual_seed(N * 7 + E)
    H, I = 64, 96
    ex = random_experts(E, H, I, fmt, gen)
    x = torch.randn(N, H, generator=gen)
    weights, ids = route(torch.randn(N, E, generator=gen), k)
    assert rel_err(routed_experts_twin(x, weights, ids, ex), dense_all_experts(x, weights, ids, ex)) < 1e-5


class _LoRA:
    def __init__(self, E, H, I, r, gen, scaling=0.5):
        self.gate_up_A = torch.randn(E, H, r, generator=gen) * 0.1
        self.gate_up_B = torch.randn(E, r, 2 * I, generator=gen) * 0.1
        self.down_A = torch.randn(E, I, r, generator=gen) * 0.1
        self.down_B = torch.randn(E, r, H, generator=gen) * 0.1
        self.scaling = scaling


def test_twin_lora_equals_merged_weights():
    gen = torch.Generator().manual_seed(1)
    E, H, I, N = 4, 32, 32, 9
    ex = random_experts(E, H, I, "bf16", gen)
    lora = _LoRA(E, H, I, 4, gen)
    x = torch.randn(N, H, generator=gen)
    weights, ids = route(torch.randn(N, E, generator=gen), 2)
    merged = ExpertWeights(ex.gate_up + lora.gate_up_A @ lora.gate_up_B * lora.scaling, ex.gate_up_bias,
                           ex.down + lora.down_A @ lora.down_B * lora.scaling, ex.down_bias, limit=LIMIT, alpha=ALPHA)
    assert rel_err(routed_experts_twin(x, weights, ids, ex, lora), routed_experts_twin(x, weights, ids, merged)) < 1e-5


def test_grouped_lora_delta_loop_matches_per_row_formula():
    gen = torch.Generator().manual_seed(2)
    E, N, k = 5, 11, 2
    ids = torch.randint(0, E, (N, k), generator=gen)
    g = group_by_expert(ids, E)
    xs = torch.randn(N * k, 16, generator=gen)
    A, B = torch.randn(E, 16, 4, generator=gen), torch.randn(E, 4, 8, generator=gen)
    ours = grouped_lora_delta(xs, A, B, g, 2.0)
    ref = torch.stack([xs[i] @ A[g.expert[i]] @ B[g.expert[i]] * 2.0 for i in range(N * k)])
    assert rel_err(ours, ref) < 1e-6


@pytest.mark.parametrize("E,r", [(5, 4), (40, 32)])  # all experts' A at once (E * r <= 1024); gathered rows
def test_token_lora_delta_equals_the_gathered_rows_with_gradients(E, r):
    gen = torch.Generator().manual_seed(4)
    N, k = 11, 3
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)])
    g = group_by_expert(ids, E)
    x = torch.randn(N, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    A = torch.randn(E, 16, r, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(E, r, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(N * k, 8, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (lambda: token_lora_delta(x, A, B, g, 0.5), lambda: grouped_lora_delta(x[g.token], A, B, g, 0.5)):
        out = fn()
        grads.append((out, *torch.autograd.grad(out, (x, A, B), dout)))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
@pytest.mark.parametrize("k,n", [(4, 16), (12, 24), (16, 4), (16, 8)])
def test_grouped_mm_pads_inner_sizes_it_does_not_take(k, n):
    """torch._grouped_mm wants 16-byte inner sizes; `grouped_mm` pads a LoRA rank of 4 or 12 (as the
    contraction or as the output) with zeros and slices back: each expert's rows times its weight,
    as a plain matmul gives them (bf16 on the CPU, where torch has the op; CUDA takes the same path)."""
    from ossrl.kernels.moe import grouped_mm

    gen = torch.Generator().manual_seed(k * n)
    E, counts = 3, [3, 0, 5]
    x = torch.randn(sum(counts), k, generator=gen).bfloat16()
    W = torch.randn(E, k, n, generator=gen).bfloat16()
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32)
    out = grouped_mm(x, W, offs)
    assert out.shape == (sum(counts), n) and out.is_contiguous()
    starts = [0] + offs.tolist()[:-1]
    ref = torch.cat([x[a:b].float() @ W[e].float() for e, (a, b) in enumerate(zip(starts, offs.tolist()))])
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("E,r", [(5, 4), (40, 32)])
def test_per_slot_products_equal_the_expert_loop_with_gradients(E, r, monkeypatch):
    """The sync-free per-slot path (CUDA at decode sizes where torch._grouped_mm does not serve;
    forced here on the CPU) equals the loop over experts, values and gradients."""
    import ossrl.kernels.moe as moe

    gen = torch.Generator().manual_seed(6)
    N, k = 9, 3
    g = group_by_expert(torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(N)]), E)
    x = torch.randn(N, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    A = torch.randn(E, 16, r, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(E, r, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(N * k, 8, generator=gen, dtype=torch.float64)
    results = []
    for forced in (False, True):
        monkeypatch.setattr(moe, "_per_slot_ok", lambda x, W: forced)
        calls = []
        monkeypatch.setattr(moe, "_per_slot", lambda *a, f=moe._per_slot: calls.append(1) or f(*a))
        for fn in (token_lora_delta, lambda *a: grouped_lora_delta(a[0][g.token], *a[1:])):
            out = fn(x, A, B, g, 0.5)
            results.append((forced, (out, *torch.autograd.grad(out, (x, A, B), dout))))
        assert bool(calls) == forced
    plain = [r for forced, r in results if not forced]
    per_slot = [r for forced, r in results if forced]
    for ours_all, ref_all in zip(per_slot, plain):
        for ours, ref in zip(ours_all, ref_all):
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_routed_experts_on_cpu_is_the_twin_with_gradients_to_x_and_weights():
    gen = torch.Generator().manual_seed(3)
    E, H, I, N = 4, 32, 64, 6
    ex = random_experts(E, H, I, "mxfp4", gen)
    x = torch.randn(N, H, generator=gen, requires_grad=True)
    logits = torch.randn(N, E, generator=gen, requires_grad=True)
    weights, ids = route(logits, 2)
    out = routed_experts(x, weights, ids, ex)
    assert torch.equal(out, routed_experts_twin(x, weights, ids, ex))
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0
