"""policy_loss, advantages and importance weights against values computed by hand (TRL's formulas)."""

import math

import pytest
import torch

from ossrl.rl.loss import group_advantages, high_entropy_mask, importance_sampling_weights, policy_loss

# Two sequences, three token slots; the second sequence has two real tokens.
LOGP = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -1.5, 0.0]])
OLD = torch.tensor([[-1.2, -0.5, -1.0], [-0.2, -1.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADV = torch.tensor([1.0, -2.0])


def by_hand(eps_low=0.2, eps_high=0.2, delta=None, old=OLD):
    """Per-token clipped surrogate written out element by element (TRL: coef_1 capped at delta for
    two-sided clipping, coef_2 clipped to [1 - eps_low, 1 + eps_high], -min of the two products)."""
    out = torch.zeros(2, 3)
    for b in range(2):
        for t in range(3):
            r = math.exp(LOGP[b, t] - old[b, t])
            a = float(ADV[b])
            unclipped = r if delta is None else min(r, delta)
            out[b, t] = -min(unclipped * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
    return out


def test_grpo_averages_tokens_per_sequence_then_sequences():
    pt = by_hand()
    expected = ((pt[0] * MASK[0]).sum() / 3 + (pt[1] * MASK[1]).sum() / 2) / 2
    loss, _ = policy_loss(LOGP, OLD, ADV, MASK, loss_type="grpo")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bnpo_and_dapo_average_over_all_tokens():
    pt = by_hand()
    expected = (pt * MASK).sum() / 5
    for loss_type in ("bnpo", "dapo"):
        loss, _ = policy_loss(LOGP, OLD, ADV, MASK, loss_type=loss_type)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss, _ = policy_loss(LOGP, OLD, ADV, MASK, loss_type="dapo", num_items_in_batch=20)
    assert loss.item() == pytest.approx(((pt * MASK).sum() / 20).item(), rel=1e-6)


def test_dr_grpo_divides_by_batch_times_max_completion_length():
    pt = by_hand()
    loss, _ = policy_loss(LOGP, OLD, ADV, MASK, loss_type="dr_grpo", max_completion_length=8)
    assert loss.item() == pytest.approx(((pt * MASK).sum() / (2 * 8)).item(), rel=1e-6)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(LOGP, OLD, ADV, MASK, loss_type="dr_grpo")


def test_clipping_on_both_sides_and_clip_metrics():
    # token (0,0): r = e^0.2 = 1.221 > 1.2 with A>0 -> clipped high; token (0,2): r = e^-1 with A>0 -> no clip
    # token (1,1): r = e^-0.5 = 0.607 < 0.8 with A<0 -> clipped low
    loss, m = policy_loss(LOGP, OLD, ADV, MASK, loss_type="bnpo")
    assert m["clip_ratio/high_mean"] == pytest.approx(1 / 5)
    assert m["clip_ratio/low_mean"] == pytest.approx(1 / 5)
    assert m["clip_ratio/region_mean"] == pytest.approx(2 / 5)
    pt = by_hand()
    assert pt[0, 0].item() == pytest.approx(-1.2)  # clipped at 1 + eps
    assert pt[1, 1].item() == pytest.approx(-0.8 * -2.0)  # clipped at 1 - eps
    # asymmetric epsilon_high (DAPO clip-higher) lifts the upper bound only
    _, m2 = policy_loss(LOGP, OLD, ADV, MASK, loss_type="bnpo", epsilon_high=0.28)
    assert m2["clip_ratio/high_mean"] == 0 and m2["clip_ratio/low_mean"] == pytest.approx(1 / 5)


def test_kl_term_is_k3_and_weighted_by_beta():
    ref = torch.tensor([[-1.1, -0.7, -1.5], [-0.3, -1.2, 0.0]])
    base, _ = policy_loss(LOGP, OLD, ADV, MASK, loss_type="bnpo")
    loss, m = policy_loss(LOGP, OLD, ADV, MASK, loss_type="bnpo", ref_logprobs=ref, beta=0.1)
    d = ref - LOGP
    kl = torch.exp(d) - d - 1
    expected_kl = (kl * MASK).sum() / 5
    assert m["kl"] == pytest.approx(expected_kl.item(), rel=1e-6)
    assert loss.item() == pytest.approx(base.item() + 0.1 * expected_kl.item(), rel=1e-6)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(LOGP, OLD, ADV, MASK, beta=0.1)


def test_gspo_uses_one_sequence_level_ratio():
    loss, m = policy_loss(LOGP, OLD, ADV, MASK, loss_type="gspo", epsilon=0.5)
    s0 = math.exp(((LOGP[0] - OLD[0]) * MASK[0]).sum().item() / 3)
    s1 = math.exp(((LOGP[1] - OLD[1]) * MASK[1]).sum().item() / 2)
    l0 = -min(s0 * 1.0, min(max(s0, 0.5), 1.5) * 1.0)
    l1 = -min(s1 * -2.0, min(max(s1, 0.5), 1.5) * -2.0)
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_gradient_is_zero_where_clipped_and_flows_elsewhere():
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, OLD, ADV, MASK, loss_type="bnpo")
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[1, 1] == 0  # clipped tokens
    assert logp.grad[0, 1] != 0 and logp.grad[1, 2] == 0  # masked token has no gradient


def test_importance_weights_multiply_the_token_loss():
    w = torch.tensor([[2.0, 1.0, 0.5], [1.0, 1.0, 1.0]])
    loss, _ = policy_loss(LOGP, OLD, ADV, MASK, loss_type="bnpo", importance_weights=w)
    assert loss.item() == pytest.approx(((by_hand() * w * MASK).sum() / 5).item(), rel=1e-6)


def test_advantages_for_each_scale_mode():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    adv, std = group_advantages(r, 4, scale_rewards="none")
    assert adv.tolist() == [-1.5, -0.5, 0.5, 1.5, 0, 0, 0, 0]
    assert std[1] == 0
    g, _ = group_advantages(r, 4, scale_rewards="group")
    s = torch.tensor([1.0, 2, 3, 4]).std().item()
    assert g[:4].tolist() == pytest.approx([x / (s + 1e-4) for x in (-1.5, -0.5, 0.5, 1.5)], rel=1e-6)
    assert g[4:].abs().sum() == 0
    b, _ = group_advantages(r, 4, scale_rewards="batch")
    assert b[:4].tolist() == pytest.approx([x / (r.std().item() + 1e-4) for x in (-1.5, -0.5, 0.5, 1.5)], rel=1e-6)
    with pytest.raises(ValueError):
        group_advantages(r, 3)


def test_importance_sampling_weights_token_and_sequence_level_truncated():
    trainer = torch.tensor([[-1.0, -1.0], [-0.1, -3.0]])
    sampler = torch.tensor([[-1.5, -0.9], [-2.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    tok = importance_sampling_weights(trainer, sampler, mask, level="token", cap=2.0)
    assert tok[0].tolist() == pytest.approx([math.exp(0.5), math.exp(-0.1)])
    assert tok[1, 0].item() == 2.0  # exp(1.9) = 6.7 truncated at the cap
    seq = importance_sampling_weights(trainer, sampler, mask, level="sequence", cap=2.0)
    assert seq.shape == (2, 1)
    assert seq[0, 0].item() == pytest.approx(math.exp(0.4)) and seq[1, 0].item() == 2.0


def test_two_sided_clipping_caps_the_unclipped_ratio_at_delta():
    # token (1, 0) of sequence 1 (A < 0) gets r = e^0 = 1; token (1, 1) r = e^-0.5. Make one large:
    # with OLD far below LOGP at (1, 0), r = e^1.3 = 3.67 and A < 0: -min(r A, clip(r) A) = -r A
    # unbounded without delta, -delta A with it (the INTELLECT-2 bound on negative advantages).
    old = OLD.clone()
    old[1, 0] = -1.5
    for delta in (None, 1.5, 3.0):
        loss, _ = policy_loss(LOGP, old, ADV, MASK, loss_type="bnpo", epsilon_high=0.28, delta=delta)
        expected = by_hand(eps_high=0.28, delta=delta, old=old)
        assert loss.item() == pytest.approx(((expected * MASK).sum() / 5).item(), rel=1e-6), delta
    capped, _ = policy_loss(LOGP, old, ADV, MASK, loss_type="bnpo", delta=1.5)
    free, _ = policy_loss(LOGP, old, ADV, MASK, loss_type="bnpo")
    assert capped.item() < free.item()  # the large ratio's term -r A = 7.3 became -1.5 A = 3.0
    assert by_hand(delta=1.5)[0].tolist() == by_hand()[0].tolist()  # (A > 0 rows: clip already binds)
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="delta"):
            policy_loss(LOGP, OLD, ADV, MASK, delta=bad)


def test_cispo_is_the_capped_stop_gradient_weight_times_the_log_prob():
    # TRL: per_token = -clamp(r, max=epsilon_high).detach() * A * logp, normalised as dapo
    logp = LOGP.clone().requires_grad_(True)
    loss, m = policy_loss(logp, OLD, ADV, MASK, loss_type="cispo", epsilon_high=1.1, num_items_in_batch=20)
    weight = torch.clamp(torch.exp(LOGP - OLD), max=1.1)
    expected = (-(weight * ADV[:, None] * LOGP) * MASK).sum() / 20
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    # the weight is a constant: d/dlogp = -w A / 20 on every trained token, clipped or not
    assert torch.allclose(logp.grad, -(weight * ADV[:, None]) * MASK / 20)
    # the cap reached where it limits an increase: (0, 0) has r = e^0.2 > 1.1 and A > 0
    assert m["clip_ratio/high_mean"] == pytest.approx(1 / 5) and m["clip_ratio/low_mean"] == 0
    with pytest.raises(ValueError, match="epsilon_high"):
        policy_loss(LOGP, OLD, ADV, MASK, loss_type="cispo")
    with pytest.raises(ValueError, match="delta"):
        policy_loss(LOGP, OLD, ADV, MASK, loss_type="cispo", epsilon_high=5.0, delta=2.0)


def test_sapo_is_a_soft_gate_with_one_temperature_per_advantage_sign():
    # TRL: per_token = -sigmoid(tau (r - 1)) * 4 / tau * A, tau_pos for A > 0 else tau_neg; grpo's mean
    loss, m = policy_loss(LOGP, OLD, ADV, MASK, loss_type="sapo", sapo_temperatures=(1.0, 1.05))
    expected = torch.zeros(2, 3)
    for b in range(2):
        tau = 1.0 if ADV[b] > 0 else 1.05
        for t in range(3):
            r = math.exp(LOGP[b, t] - OLD[b, t])
            expected[b, t] = -(1 / (1 + math.exp(-tau * (r - 1)))) * 4 / tau * float(ADV[b])
    assert loss.item() == pytest.approx((((expected * MASK).sum(-1) / MASK.sum(-1)).mean()).item(), rel=1e-6)
    assert m["clip_ratio/region_mean"] == 0
    # on policy (r = 1) its gradient is the plain policy gradient's, as grpo's is
    grads = []
    for loss_type in ("sapo", "grpo"):
        logp = LOGP.clone().requires_grad_(True)
        policy_loss(logp, LOGP, ADV, MASK, loss_type=loss_type, sapo_temperatures=(3.0, 7.0))[0].backward()
        grads.append(logp.grad)
    assert torch.allclose(grads[0], grads[1]) and grads[1].abs().sum() > 0
    with pytest.raises(ValueError, match="sapo_temperatures"):
        policy_loss(LOGP, OLD, ADV, MASK, loss_type="sapo", sapo_temperatures=(1.0, 0.0))


def test_high_entropy_mask_keeps_the_top_quantile_of_the_trained_tokens():
    # TRL's rule: threshold = torch.quantile(entropies of trained tokens, 1 - rho); keep >= threshold
    entropy = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.3, 5.0]])  # (1, 2) is untrained: not counted
    kept = high_entropy_mask(entropy, MASK, 0.4)
    threshold = torch.quantile(torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3]), 0.6)  # 0.58
    assert kept.tolist() == ((entropy >= threshold) & (MASK > 0)).tolist()
    assert kept.tolist() == [[False, True, False], [True, False, False]]
    assert high_entropy_mask(entropy, MASK, 1.0).tolist() == (MASK > 0).tolist()
    assert high_entropy_mask(entropy, MASK, 0.0).tolist() == [[False, True, False], [False, False, False]]
    assert not high_entropy_mask(entropy, torch.zeros_like(MASK), 0.5).any()
    with pytest.raises(ValueError):
        high_entropy_mask(entropy, MASK, 1.5)
    g = torch.Generator().manual_seed(0)  # random masks and quantiles: TRL's selection, computed directly
    for q in (0.05, 0.2, 0.5, 0.9):
        ent = torch.rand(6, 40, generator=g) * 3
        mask = (torch.rand(6, 40, generator=g) < 0.6).float()
        threshold = torch.quantile(ent[mask > 0], 1 - q)
        assert torch.equal(high_entropy_mask(ent, mask, q), (ent >= threshold) & (mask > 0))


def test_entropy_mask_drops_the_policy_term_but_not_the_kl():
    ref = torch.tensor([[-1.1, -0.7, -1.5], [-0.3, -1.2, 0.0]])
    keep = torch.tensor([[True, False, True], [False, True, False]])
    loss, m = policy_loss(LOGP, OLD, ADV, MASK, loss_type="bnpo", ref_logprobs=ref, beta=0.1, entropy_mask=keep)
    d = ref - LOGP
    kl = torch.exp(d) - d - 1
    expected = ((by_hand() * keep + 0.1 * kl) * MASK).sum() / 5
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert m["entropy_mask/kept_fraction"] == pytest.approx(3 / 5)


def test_config_refuses_what_the_new_loss_options_cannot_mean():
    from ossrl.rl.config import GRPOConfig

    base = dict(model="m", dataset="d.jsonl")
    GRPOConfig(**base, loss_type="cispo", epsilon_high=5.0)
    GRPOConfig(**base, delta=1.5, top_entropy_quantile=0.2)
    for bad, match in (({"loss_type": "cispo"}, "epsilon_high"), ({"delta": 1.0}, "delta"),
                       ({"loss_type": "cispo", "epsilon_high": 5.0, "delta": 2.0}, "delta"),
                       ({"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
                       ({"loss_type": "sapo", "delta": 2.0}, "delta"), ({"sapo_temperature_neg": 0.0}, "sapo"),
                       ({"top_entropy_quantile": -0.1}, "top_entropy_quantile")):
        with pytest.raises(ValueError, match=match):
            GRPOConfig(**base, **bad)
