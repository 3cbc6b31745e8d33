"""The rollout engine (CPU path) against naive decoding, and the sampler's distributions."""

import math

import pytest
import torch

from ossrl.engine.engine import RolloutEngine
from ossrl.engine.naive import generate_naive
from ossrl.engine.sampling import SamplingParams, processed_logprobs, sample_tokens
from ossrl.kernels.sampling import fold_seed, uniform_noise
from ossrl.testing import random_model, tiny_config


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(num_hidden_layers=3, sliding_window=4), seed=21).eval()


PROMPTS = [[5, 9, 33, 100, 7, 7, 81], [250, 1], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


def test_greedy_equals_naive_decoding_token_for_token(model):
    params = SamplingParams(temperature=0, max_new_tokens=10)
    groups = RolloutEngine(model).generate(PROMPTS, n=3, params=params)
    for prompt, group in zip(PROMPTS, groups):
        reference = generate_naive(model, prompt, params)
        for c in group:
            assert c.token_ids == reference.token_ids
            assert c.sampling_logprobs == [0.0] * 10  # greedy: probability one


def test_returned_logprobs_are_the_models_logprobs_of_the_sampled_tokens(model):
    groups = RolloutEngine(model).generate(PROMPTS[:2], n=2, params=SamplingParams(max_new_tokens=8, seed=4))
    for prompt, group in zip(PROMPTS, groups):
        for c in group:
            seq = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(seq)[0, len(prompt) - 1:-1], -1)
            expected = logp[torch.arange(len(c.token_ids)), torch.tensor(c.token_ids)]
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, rtol=1e-4, atol=1e-4)
            # temperature 1, no filters: the sampling distribution is the model's
            torch.testing.assert_close(torch.tensor(c.sampling_logprobs), expected, rtol=1e-4, atol=1e-4)


def test_prefix_shared_samples_equal_separate_requests_with_the_same_seeds(model):
    params = dict(temperature=0.9, top_p=0.95, max_new_tokens=12)
    batched = RolloutEngine(model).generate([PROMPTS[0]], n=4, params=SamplingParams(seed=100, **params))[0]
    for j, c in enumerate(batched):
        alone = generate_naive(model, PROMPTS[0], SamplingParams(seed=100 + j, **params))
        assert c.token_ids == alone.token_ids
    assert len({tuple(c.token_ids) for c in batched}) > 1  # the samples differ from each other


@pytest.mark.parametrize("window,options", [(4, dict(sync_every=1, prefill_tokens=8)),
                                            (4096, dict(sync_every=2, prefill_tokens=8))],
                         ids=["rings-retire-every-step", "no-rings"])
def test_shared_prefixes_read_each_prompts_kv_from_one_slot_with_the_same_outputs(window, options):
    """`share_prefixes`: on the layers that are not rings (full attention; sliding ones too where
    the window is past the capacity) a prompt's keys and values are written to its first sample
    slot only and the other n - 1 read them there. Every cache row is poisoned (NaN) before each
    generate, so a row read from the wrong slot would show: completions and log-probs equal the
    unshared engine's over four generates with other prompts and n (the pool reused and grown),
    one prompt per prefill forward, and slots, leaders too, retiring on stop tokens mid-rollout."""
    model = random_model(tiny_config(num_hidden_layers=3, sliding_window=window), seed=21).eval()
    other = [[17, 3, 3, 99, 41], [8] * 12, [250, 1, 2], [60, 61]]
    free = RolloutEngine(model, backend="slots").generate(PROMPTS, 4, SamplingParams(max_new_tokens=12, seed=3))
    stops = [free[0][0].token_ids[2], free[2][0].token_ids[1]]
    plain = RolloutEngine(model, backend="slots", share_prefixes=False, **options)
    shared = RolloutEngine(model, backend="slots", share_prefixes=True, **options)
    finished_early = unwritten = 0
    for prompts, n, limit in ((PROMPTS, 4, 12), (other, 2, [9, 14, 5, 11]), (PROMPTS[:2], 6, 10), (other, 3, 700)):
        params = SamplingParams(max_new_tokens=limit, seed=3, stop_token_ids=stops)
        want = plain.generate(prompts, n, params)
        poisoned = shared._slots.pool if shared._slots is not None else None
        if poisoned is not None:
            for cache in (*poisoned.k.values(), *poisoned.v.values()):
                cache.fill_(float("nan"))
        assert shared.generate(prompts, n, params) == want
        finished_early += sum(c.finish_reason == "stop" for group in want for c in group[:1])  # leaders
        if shared._slots.pool is poisoned:  # (a grown pool is new memory): slot 1's copy of its prompt
            first_shared = next(k for k in poisoned.k.values() if poisoned.shares(k))  # was never written
            unwritten += bool(first_shared[1, :len(prompts[0])].isnan().all())
    pool = shared._slots.pool
    assert unwritten == 2  # the second and third generates reuse the poisoned pool; the fourth grows it
    assert finished_early and pool.share_prefixes and pool.capacity >= 700
    assert pool.prefix_len.tolist()[:12] == [5] * 3 + [12] * 3 + [3] * 3 + [2] * 3
    assert pool.prefix_slot.tolist()[:12] == [0] * 3 + [3] * 3 + [6] * 3 + [9] * 3
    sharing = [pool.shares(k) for k in pool.k.values()]
    assert all(sharing) if window > pool.capacity else (any(sharing) and not all(sharing))


def test_stop_tokens_end_a_sample_and_finished_slots_leave_the_batch(model):
    free = RolloutEngine(model).generate([PROMPTS[1]], n=6, params=SamplingParams(max_new_tokens=15, seed=7))[0]
    stop = free[0].token_ids[3]
    stopped = RolloutEngine(model).generate(
        [PROMPTS[1]], n=6, params=SamplingParams(max_new_tokens=15, seed=7, stop_token_ids=[stop]))[0]
    for a, b in zip(free, stopped):
        if stop in a.token_ids:
            assert b.token_ids == a.token_ids[: a.token_ids.index(stop) + 1] and b.finish_reason == "stop"
        else:
            assert b.token_ids == a.token_ids and b.finish_reason == "length"


def test_max_new_tokens_per_prompt(model):
    groups = RolloutEngine(model).generate(PROMPTS, n=2, params=SamplingParams(max_new_tokens=[3, 5, 1], seed=0))
    assert [[len(c.token_ids) for c in g] for g in groups] == [[3, 3], [5, 5], [1, 1]]
    with pytest.raises(ValueError, match="max_new_tokens"):
        RolloutEngine(model).generate(PROMPTS, params=SamplingParams(max_new_tokens=[3, 5]))


def test_prompt_ids_outside_the_vocabulary_are_refused_by_name(model):
    """(On a GPU such an id would fail inside the embedding as a device-side assert.)"""
    V = model.config.vocab_size
    engine = RolloutEngine(model)
    for bad, shown in (([5, V, 7], rf"prompt 1: token id {V} \(at 1\)"), ([-2, 3], r"prompt 1: token id -2 \(at 0\)")):
        with pytest.raises(ValueError, match=shown + rf" is outside the vocabulary \[0, {V}\)"):
            engine.generate([PROMPTS[0], bad])
    assert engine.generate([[V - 1]], params=SamplingParams(max_new_tokens=1))[0][0].finish_reason


# ---------------------------------------------------------------- distributions on fixed logits
LOGITS = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])


def empirical(params, draws=20000, seed=0):
    """Draw through the real sampling rule: `draws` rows with distinct seeds (and steps)."""
    lp = processed_logprobs(LOGITS, params)
    seeds = torch.arange(draws) + seed * draws
    tokens, _, _ = sample_tokens(LOGITS.expand(draws, -1), params, seeds, seeds % 7)
    counts = torch.bincount(tokens, minlength=6)
    return counts.float() / draws, lp.exp()[0]


def assert_matches(freq, probs, draws=20000):
    # 5-sigma binomial bound per token: fails on a wrong distribution, not on noise.
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-9).all(), (freq, probs)


def test_temperature_scales_the_logits():
    freq, probs = empirical(SamplingParams(temperature=0.5))
    torch.testing.assert_close(probs, torch.softmax(LOGITS[0] / 0.5, -1))
    assert_matches(freq, probs)


def test_top_k_keeps_the_k_largest():
    freq, probs = empirical(SamplingParams(top_k=2))
    torch.testing.assert_close(probs, torch.tensor([math.exp(2), math.exp(1.5), 0, 0, 0, 0]) / (math.exp(2) + math.exp(1.5)))
    assert_matches(freq, probs)


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = torch.softmax(LOGITS[0], -1)  # sorted already: 0.43, 0.26, 0.16, ...
    freq, probs = empirical(SamplingParams(top_p=0.75))
    kept = 3 if p[:2].sum() < 0.75 <= p[:3].sum() else None
    assert kept == 3
    torch.testing.assert_close(probs, torch.cat((p[:3] / p[:3].sum(), torch.zeros(3))))
    assert_matches(freq, probs)


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    p = torch.softmax(LOGITS[0], -1)
    freq, probs = empirical(SamplingParams(min_p=0.3))
    keep = p >= 0.3 * p.max()
    torch.testing.assert_close(probs, torch.where(keep, p, 0) / p[keep].sum())
    assert_matches(freq, probs)


def test_a_rows_noise_depends_only_on_its_seed_and_step():
    batch = sample_tokens(LOGITS.expand(3, -1), SamplingParams(), torch.tensor([5, 6, 7]), torch.tensor([0, 1, 2]))
    alone = sample_tokens(LOGITS, SamplingParams(), torch.tensor([6]), torch.tensor([1]))
    assert batch[0][1] == alone[0][0] and batch[1][1] == alone[1][0]


def test_hash_noise_is_uniform_and_distinct_within_a_row():
    u = uniform_noise(fold_seed(torch.tensor([3, 4])), torch.tensor([0, 0]), 50000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert len(torch.unique(u[0])) > 49900  # 24-bit outputs of a bijection: almost no ties
    assert not torch.equal(u[0], u[1])


def test_sampling_logprobs_follow_the_filters():
    params = SamplingParams(top_k=2, temperature=0.7)
    tokens, plain, sampled = sample_tokens(LOGITS.expand(50, -1), params, torch.arange(50), torch.zeros(50))
    assert set(tokens.tolist()) <= {0, 1}
    lp = processed_logprobs(LOGITS, params)[0]
    full = torch.log_softmax(LOGITS[0], -1)
    torch.testing.assert_close(sampled, lp[tokens])
    torch.testing.assert_close(plain, full[tokens])


def test_bad_sampling_params_are_rejected():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(min_p=1.0), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# ------------------------------------------------------- the slot backend (the GPU path) on CPU
@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_new_tokens=12),
                                    SamplingParams(temperature=1.0, max_new_tokens=12, seed=5),
                                    SamplingParams(temperature=0.8, top_k=20, max_new_tokens=9, seed=1)],
                         ids=["greedy", "sampled", "top_k"])
def test_slot_backend_equals_the_simple_backend(model, params):
    simple = RolloutEngine(model, backend="simple").generate(PROMPTS, n=3, params=params)
    slots = RolloutEngine(model, backend="slots", sync_every=4).generate(PROMPTS, n=3, params=params)
    for a_group, b_group in zip(simple, slots):
        for a, b in zip(a_group, b_group):
            assert a.token_ids == b.token_ids
            assert a.finish_reason == b.finish_reason
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(torch.tensor(b.sampling_logprobs), torch.tensor(a.sampling_logprobs),
                                       rtol=1e-4, atol=1e-4)


def test_packed_prefill_equals_one_prompt_at_a_time(model):
    """Prompts prefilled together as documents of one row (ring wrap included: window 4, a
    10-token prompt) give what prefilling them one per forward gives."""
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
    together = RolloutEngine(model, backend="slots").generate(PROMPTS, n=2, params=params)
    apart = RolloutEngine(model, backend="slots", prefill_tokens=1).generate(PROMPTS, n=2, params=params)
    split = RolloutEngine(model, backend="slots", prefill_tokens=10).generate(PROMPTS, n=2, params=params)  # [7+2], [10]
    for a_group, b_group, c_group in zip(together, apart, split):
        for a, b, c in zip(a_group, b_group, c_group):
            assert a.token_ids == b.token_ids == c.token_ids
            for other in (b, c):
                torch.testing.assert_close(torch.tensor(other.logprobs), torch.tensor(a.logprobs), rtol=1e-5, atol=1e-5)


def test_slot_backend_stops_compacts_and_wraps_the_sliding_ring(model):
    # window 4 in the fixture: 30 new tokens wrap the sliding layers' ring many times
    free = RolloutEngine(model, backend="simple").generate([PROMPTS[2]], n=6, params=SamplingParams(max_new_tokens=30, seed=2))[0]
    stop = free[0].token_ids[5]
    params = SamplingParams(max_new_tokens=[30], seed=2, stop_token_ids=[stop])
    a = RolloutEngine(model, backend="simple").generate([PROMPTS[2]], n=6, params=params)[0]
    engine = RolloutEngine(model, backend="slots", sync_every=3)
    b = engine.generate([PROMPTS[2]], n=6, params=params)[0]
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.finish_reason for c in a] == [c.finish_reason for c in b]
    assert any(c.finish_reason == "stop" for c in b) and any(len(c.token_ids) == 30 for c in b)
    engine.release()
    again = engine.generate([PROMPTS[2]], n=6, params=params)[0]  # after standby: allocates anew
    assert [c.token_ids for c in again] == [c.token_ids for c in b]


def test_rollouts_sample_from_the_adapted_policy_in_both_backends():
    from ossrl.model.lora import LoRAConfig, apply_lora, lora_parameters

    model = random_model(tiny_config(num_hidden_layers=2, sliding_window=4), seed=31).eval()
    apply_lora(model, LoRAConfig(r=4))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    params = SamplingParams(temperature=0, max_new_tokens=10)
    simple = RolloutEngine(model, backend="simple").generate(PROMPTS, n=2, params=params)
    slots = RolloutEngine(model, backend="slots").generate(PROMPTS, n=2, params=params)
    assert [[c.token_ids for c in g] for g in simple] == [[c.token_ids for c in g] for g in slots]
    with model.adapters_disabled():
        base = RolloutEngine(model, backend="slots").generate(PROMPTS, n=2, params=params)
    assert [[c.token_ids for c in g] for g in base] != [[c.token_ids for c in g] for g in slots]


def test_rollout_copies_give_the_same_samples_and_follow_weight_updates(monkeypatch):
    """In a bf16 model the adapters' weights are cast once per generate (rollout copies), not in
    every forward: the same completions and log-probs bit for bit as casting per forward; the
    copies keep their storage across calls (captured graphs read it) and take in-place updates
    (the optimizer's) at the next generate; release() frees them; a forward with autograd inside
    the context still trains the fp32 weights."""
    import contextlib

    import ossrl.engine.engine as engine_module
    from ossrl.model.lora import LoRAConfig, LoRALinear, apply_lora, lora_parameters, rollout_copies

    model = random_model(tiny_config(num_hidden_layers=2, sliding_window=4), seed=31, dtype=torch.bfloat16).eval()
    apply_lora(model, LoRAConfig(r=4))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)

    def run(engine):
        return [[(c.token_ids, c.logprobs, c.sampling_logprobs) for c in g] for g in engine.generate(PROMPTS, 2, params)]

    for backend in ("simple", "slots"):
        engine = RolloutEngine(model, backend=backend)
        with_copies = run(engine)
        q = next(m for m in model.modules() if isinstance(m, LoRALinear))
        assert q.rollout_copy is not None and q.rollout_copy[0].dtype == torch.bfloat16
        address = q.rollout_copy[1].data_ptr()
        with monkeypatch.context() as patch:
            patch.setattr(engine_module, "rollout_copies", lambda m: contextlib.nullcontext())
            assert run(RolloutEngine(model, backend=backend)) == with_copies  # casting per forward
        with torch.no_grad():  # an optimizer step, in place
            for p in lora_parameters(model):
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        updated = run(engine)
        assert q.rollout_copy[1].data_ptr() == address
        assert updated == run(RolloutEngine(model, backend=backend)) and updated != with_copies
        engine.release()
        assert q.rollout_copy is None and all(
            getattr(m, "lora", None) is None or m.lora.rollout_copy is None for m in model.modules())

    engine = RolloutEngine(model)
    with torch.inference_mode():  # copies made there stay usable outside it (no inference tensors)
        inside = run(engine)
    assert run(engine) == inside

    ids = torch.tensor([PROMPTS[0]])
    experts = next(m for m in model.modules() if getattr(m, "lora", None) is not None)
    with rollout_copies(model), torch.no_grad():  # the forwards read the copies, for both kinds of adapter
        reference = model(ids)
        q.rollout_copy[1].zero_()
        assert not torch.equal(model(ids), reference)
        reference = model(ids)
        experts.lora.rollout_copy.gate_up_B.zero_()
        assert not torch.equal(model(ids), reference)
    model.train()
    with rollout_copies(model):  # autograd inside: the fp32 weights, differentiably
        model(torch.tensor([PROMPTS[0]])).float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))


def test_q_k_v_laid_out_side_by_side_run_as_one_matmul(monkeypatch):
    """`lay_out_qkv` (the engine's first generate) puts each layer's q, k, v weights and biases back
    to back in one buffer, values and Parameter objects unchanged; inside `inference_kernels`
    without autograd a forward then multiplies by the fused view once per layer, with the same
    outputs. A parameter moved to new storage undoes it (three matmuls, same outputs); weights that
    need gradients never take it."""
    import torch.nn.functional as F

    from ossrl.model.gptoss import inference_kernels, lay_out_qkv

    model = random_model(tiny_config(num_hidden_layers=2, sliding_window=4), seed=5, dtype=torch.bfloat16).eval()
    ids = torch.tensor([PROMPTS[1]])
    attn = model.model.layers[1].self_attn
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.v_proj.bias]
    values = [p.detach().clone() for p in params]
    with torch.no_grad():
        separate = model(ids)
    assert attn.fused_qkv() is None
    RolloutEngine(model).generate([PROMPTS[0]], 1, SamplingParams(max_new_tokens=2, temperature=0))
    assert lay_out_qkv(model) == 0  # the engine did it; nothing left to do
    now = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.v_proj.bias]
    assert all(p is q and torch.equal(p, v) for p, q, v in zip(now, params, values))
    with torch.no_grad():
        weight, bias = attn.fused_qkv()
    assert weight.data_ptr() == attn.q_proj.weight.data_ptr() and weight.shape[0] == sum(p.shape[0] for p in params[:3])
    assert torch.equal(weight[-attn.v_proj.weight.shape[0]:], attn.v_proj.weight)
    assert torch.equal(bias[-attn.v_proj.bias.shape[0]:], attn.v_proj.bias)

    linear, weights_seen = F.linear, []
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: weights_seen.append(w) or linear(x, w, b))
    with torch.no_grad(), inference_kernels():
        assert torch.equal(model(ids), separate)
    q_weights = [layer.self_attn.q_proj.weight for layer in model.model.layers]
    starts = {q.data_ptr() for q in q_weights}
    fused_calls = [w for w in weights_seen if w.shape == weight.shape and w.data_ptr() in starts]
    assert len(fused_calls) == 2 and not any(w is q for w in weights_seen for q in q_weights)
    weights_seen.clear()
    with torch.no_grad():  # outside the engine's kernels: as before
        assert torch.equal(model(ids), separate)
    assert sum(w is q for w in weights_seen for q in q_weights) == 2
    assert weight.shape not in [w.shape for w in weights_seen]

    attn.k_proj.weight.data = attn.k_proj.weight.data.clone()  # new storage: no longer side by side
    with torch.no_grad():
        assert attn.fused_qkv() is None
    with torch.no_grad(), inference_kernels():
        assert torch.equal(model(ids), separate)
    assert lay_out_qkv(model) == 1
    model.requires_grad_(True)
    with inference_kernels():
        assert attn.fused_qkv() is None  # autograd into the weights: three matmuls
        model(ids).float().sum().backward()
    assert attn.k_proj.weight.grad is not None and attn.q_proj.weight.grad is not None


def test_lay_out_reserves_rows_for_adapters_added_later_and_rollouts_use_them(monkeypatch):
    """A model laid out before LoRA is applied is laid out again with rows for the A copies after
    q/k/v and o_proj (values unchanged, reported as moved), once; the rollout forward then runs one
    matmul per projection group (no rank-r matmul: F.linear never gets a bare A copy) and gives the
    outputs of the plain adapter forward; a moved weight falls back to the separate A matmul."""
    import torch.nn.functional as F

    from ossrl.model.gptoss import inference_kernels, lay_out_qkv
    from ossrl.model.lora import LoRAConfig, apply_lora, lora_parameters, rollout_copies

    model = random_model(tiny_config(num_hidden_layers=2, sliding_window=4), seed=5, dtype=torch.bfloat16).eval()
    assert lay_out_qkv(model) == 2 and lay_out_qkv(model) == 0
    apply_lora(model, LoRAConfig(r=6, alpha=12))  # scaling 2: rollout copies equal the plain forward bit for bit
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        ids = torch.tensor([PROMPTS[1]])
        plain = model(ids)  # autograd off, no rollout copies: each adapter's own A and B products
    attn = model.model.layers[1].self_attn
    weights = [attn.q_proj.weight.detach().clone(), attn.o_proj.weight.detach().clone()]
    assert lay_out_qkv(model) == 2 and lay_out_qkv(model) == 0
    assert torch.equal(attn.q_proj.weight, weights[0]) and torch.equal(attn.o_proj.weight, weights[1])
    assert attn.lora_rows[0].shape == (24, attn.q_proj.weight.shape[1])  # 3 x r = 18, rounded up to 8
    assert attn.o_proj.lora_rows[0].shape == (8, attn.o_proj.weight.shape[1])
    linear_widths = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: linear_widths.append(w.shape[0]) or real_linear(x, w, b))
    with rollout_copies(model), inference_kernels(), torch.no_grad():
        out = model(ids)
        assert torch.equal(out, plain)
        n_qkv = sum(p.weight.shape[0] for p in attn.input_projections())
        assert n_qkv + 24 in linear_widths and attn.o_proj.weight.shape[0] + 8 in linear_widths
        assert 6 not in linear_widths and 18 not in linear_widths  # no bare rank-r A matmul
    with torch.no_grad():  # o_proj's weight moves away from its reserved rows
        attn.o_proj.weight.data = attn.o_proj.weight.data.clone()
    linear_widths.clear()
    with rollout_copies(model), inference_kernels(), torch.no_grad():
        assert attn.o_proj._extended() is None
        assert torch.equal(model(ids), plain)
        assert 6 in linear_widths  # its A copy is multiplied alone again
    # biases that cannot move (dtypes differ): the weights are laid out once, without rows
    other = random_model(tiny_config(num_hidden_layers=1), seed=5, dtype=torch.bfloat16)
    apply_lora(other, LoRAConfig(r=6, alpha=12))
    other.model.layers[0].self_attn.k_proj.bias.data = other.model.layers[0].self_attn.k_proj.bias.data.float()
    assert lay_out_qkv(other) == 1 and lay_out_qkv(other) == 0
    assert getattr(other.model.layers[0].self_attn, "lora_rows", None) is None


def test_lay_out_qkv_leaves_what_it_cannot_move_and_the_engine_drops_stale_graphs(monkeypatch):
    """Parameters made in inference mode (their storage cannot be swapped) and q/k/v of different
    dtypes are left alone, and the model still runs; a bias alone on new storage counts as a moved
    layer, so the engine drops the graphs and pool that read the old addresses."""
    from ossrl.engine.slots import SlotDecoder
    from ossrl.model.gptoss import lay_out_qkv

    for fmt in ("bf16", "mxfp4"):  # MXFP4: the engine's scale check reads inference tensors too
        with torch.inference_mode():
            frozen = random_model(tiny_config(num_hidden_layers=1), seed=2, dtype=torch.bfloat16,
                                  expert_format=fmt).eval()
        assert lay_out_qkv(frozen) == 0
        with torch.no_grad():
            frozen(torch.tensor([PROMPTS[0]]))
        RolloutEngine(frozen, fold_scales=True).generate([PROMPTS[0]], 2, SamplingParams(max_new_tokens=2, seed=1))

    mixed = random_model(tiny_config(num_hidden_layers=1), seed=2, dtype=torch.bfloat16).eval()
    attn = mixed.model.layers[0].self_attn
    attn.k_proj.float()  # k's weight and bias in fp32, q's and v's in bf16
    k_weight = attn.k_proj.weight.detach().clone()
    assert lay_out_qkv(mixed) == 0
    assert attn.k_proj.weight.dtype == torch.float32 and torch.equal(attn.k_proj.weight, k_weight)
    with torch.no_grad():
        assert attn.fused_qkv() is None

    model = random_model(tiny_config(num_hidden_layers=2), seed=2, dtype=torch.bfloat16).eval()
    engine = RolloutEngine(model, backend="slots")
    params = SamplingParams(max_new_tokens=3, seed=4)
    first = engine.generate([PROMPTS[0]], 2, params)
    releases = []
    release = SlotDecoder.release
    monkeypatch.setattr(SlotDecoder, "release", lambda self: releases.append(1) or release(self))
    assert engine.generate([PROMPTS[0]], 2, params) == first and not releases  # nothing moved
    attn = model.model.layers[1].self_attn
    attn.q_proj.bias.data = attn.q_proj.bias.data.clone()  # one bias on new storage
    assert engine.generate([PROMPTS[0]], 2, params) == first and releases  # dropped (then allocated anew)
    with torch.no_grad():
        assert attn.fused_qkv() is not None


@pytest.mark.parametrize("fmt", ["bf16", "mxfp4"])
def test_the_engine_drops_graphs_when_any_weight_moves_and_only_then(fmt):
    """Captured graphs read the weights' addresses. Expert weights (MXFP4 blocks are buffers),
    the embedding or LoRA pairs on new storage (a `load_state_dict(assign=True)`, say) make the
    engine drop its graphs and pool (a new pool is made); values written in place (an optimizer
    step on the adapters) and repeated generates keep them."""
    from ossrl.model.lora import LoRAConfig, apply_lora, lora_parameters

    model = random_model(tiny_config(num_hidden_layers=2), seed=2, dtype=torch.bfloat16, expert_format=fmt).eval()
    apply_lora(model, LoRAConfig(r=4, alpha=8))  # attention and experts
    engine = RolloutEngine(model, backend="slots")
    params = SamplingParams(max_new_tokens=3, seed=4)
    first = engine.generate([PROMPTS[0]], 2, params)
    pool = engine._slots.pool
    assert engine.generate([PROMPTS[0]], 2, params) == first and engine._slots.pool is pool
    with torch.no_grad():  # an optimizer step: in place
        for p in lora_parameters(model):
            p.add_(0.0)
    assert engine.generate([PROMPTS[0]], 2, params) == first and engine._slots.pool is pool
    experts = model.model.layers[1].mlp.experts
    name = "down_proj_blocks" if fmt == "mxfp4" else "down_proj"
    experts.load_state_dict({name: getattr(experts, name).detach().clone()}, strict=False, assign=True)
    assert engine.generate([PROMPTS[0]], 2, params) == first and engine._slots.pool is not pool
    pool = engine._slots.pool
    assert engine.generate([PROMPTS[0]], 2, params) == first and engine._slots.pool is pool  # once
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    lora_b.data = lora_b.data.clone()
    model.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.clone()
    assert engine.generate([PROMPTS[0]], 2, params) == first and engine._slots.pool is not pool


def test_the_scale_check_of_the_folded_decode_is_fresh_on_each_generate(monkeypatch):
    """`check_scales_fold` answers, per MXFP4 experts module, whether every scale is <= 128 (the
    GPU word decode may then fold 2^126 into the scale), and only rollout forwards (inside
    `inference_kernels`) pass the answer to the kernels. An engine built with fold_scales=True
    checks on each generate, so a write through `.data` (no version bump) is seen, and drops the
    graphs built for an answer that changed; with fold_scales=False every answer is cleared."""
    from ossrl.engine.slots import SlotDecoder
    from ossrl.model.gptoss import check_scales_fold, inference_kernels

    model = random_model(tiny_config(num_hidden_layers=2), seed=2, expert_format="mxfp4", dtype=torch.bfloat16).eval()
    experts = [layer.mlp.experts for layer in model.model.layers]
    assert all(int(e.gate_up_proj_scales.max()) <= 128 and int(e.down_proj_scales.max()) <= 128 for e in experts)
    assert not any(e.scales_fold for e in experts)
    assert check_scales_fold(model) == 2 and all(e.scales_fold for e in experts)
    assert check_scales_fold(model) == 0
    assert not experts[0].expert_weights().scales_fold  # training forwards: two multiplies
    with inference_kernels():
        assert experts[0].expert_weights().scales_fold
    experts[1].down_proj_scales.data[0, 0, 0] = 129  # 2^2: too large to fold; .data bumps no version
    assert check_scales_fold(model) == 1 and experts[0].scales_fold and not experts[1].scales_fold

    engine = RolloutEngine(model, backend="slots", fold_scales=True)
    params = SamplingParams(max_new_tokens=3, seed=4)
    engine.generate([PROMPTS[0]], 2, params)
    releases = []
    release = SlotDecoder.release
    monkeypatch.setattr(SlotDecoder, "release", lambda self: releases.append(1) or release(self))
    engine.generate([PROMPTS[0]], 2, params)
    assert not releases and not experts[1].scales_fold  # nothing changed
    experts[1].down_proj_scales.data[0, 0, 0] = 120  # the answer for layer 1 turns True
    engine.generate([PROMPTS[0]], 2, params)
    assert releases and experts[1].scales_fold
    releases.clear()
    RolloutEngine(model, backend="slots", fold_scales=False).generate([PROMPTS[0]], 2, params)
    assert not any(e.scales_fold for e in experts)


@pytest.mark.parametrize("laid_out", [False, True], ids=["apart", "laid_out"])
@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj"), ("v_proj",)])
def test_rollout_copies_share_one_a_matmul_for_q_k_v(targets, laid_out, monkeypatch):
    """Inside rollout_copies the q/k/v adapters' A copies are rows of one buffer and a forward
    multiplies by it once: the same outputs as one matmul per projection (q and v only: k runs
    plain), the buffer is what is read, and release frees it. With the base weights laid out side
    by side (`lay_out_qkv`, inside `inference_kernels`) the base is one matmul and the B copies one
    addmm (their block-diagonal buffer is what is read). With LoRA dropout active in a no-grad
    training-mode forward each projection keeps its own mask (no sharing)."""
    from ossrl.model.gptoss import inference_kernels, lay_out_qkv
    from ossrl.model.lora import LoRAConfig, SharedRolloutA, apply_lora, lora_parameters, release_rollout_copies, \
        rollout_copies

    model = random_model(tiny_config(num_hidden_layers=2, sliding_window=4), seed=31, dtype=torch.bfloat16).eval()
    apply_lora(model, LoRAConfig(r=4, targets=targets))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        separate = model(ids := torch.tensor([PROMPTS[0]]))
    if laid_out:
        assert lay_out_qkv(model) == 2
    attn = model.model.layers[0].self_attn
    call = SharedRolloutA.__call__
    with rollout_copies(model), inference_kernels(), torch.no_grad():
        shared = attn.shared_lora_a
        ranks = 4 * (len(targets) - ("o_proj" in targets))
        # laid out, the A copies live in rows reserved after the base weights (rounded up to 8) and
        # the base matmul computes the rank-r intermediates too
        assert shared is not None and shared.buffer.shape[0] == (-(-ranks // 8) * 8 if laid_out else ranks)
        assert (shared.extended is not None) == laid_out
        if "o_proj" in targets:
            assert (attn.o_proj._extended() is not None) == laid_out
        assert shared.serves(torch.zeros(1, dtype=torch.bfloat16))
        calls = []
        with monkeypatch.context() as patch:
            patch.setattr(SharedRolloutA, "__call__", lambda self, x, fused=None: calls.append(fused) or
                          call(self, x, fused))
            out = model(ids)
        assert len(calls) == 2  # one shared A matmul per layer
        assert all((fused is not None) == laid_out for fused in calls)
        with monkeypatch.context() as patch:
            patch.setattr(SharedRolloutA, "serves", lambda self, x: False)
            assert torch.equal(model(ids), out)  # one A matmul per projection
        assert torch.equal(out, separate)
        shared.members[-1].rollout_copy[0].zero_()  # the last member's A rows (v)
        assert not torch.equal(model(ids), out)
        for m in shared.members:
            m.refresh_rollout_copy(torch.bfloat16)
        assert torch.equal(model(ids), out)
        shared.b_buffer[-8:].zero_()  # the last rows of v's block of the B copies
        assert not torch.equal(model(ids), out)
    release_rollout_copies(model)
    assert getattr(attn, "shared_lora_a", None) is None

    dropped = random_model(tiny_config(num_hidden_layers=1), seed=31, dtype=torch.bfloat16)
    apply_lora(dropped, LoRAConfig(r=4, dropout=0.5))
    with rollout_copies(dropped), torch.no_grad():
        assert dropped.model.layers[0].self_attn.shared_lora_a.serves(torch.zeros(1, dtype=torch.bfloat16)) is False


@pytest.mark.parametrize("alpha", [6.0, 0.5])
def test_rollout_copies_carry_any_scaling(alpha):
    """The copies hold scaling * A (no multiply per forward). With a scaling that is not a power of
    two they round differently from casting per forward, so this compares per module (a whole bf16
    model amplifies any rounding through its routing): the copies' LoRA deltas equal the cast
    path's to bf16 rounding, where a dropped or doubled scaling would be off by a third or more."""
    from ossrl.kernels.moe import routed_experts_twin
    from ossrl.model.lora import LoRAConfig, LoRALinear, apply_lora, lora_parameters, rollout_copies

    model = random_model(tiny_config(num_hidden_layers=1), seed=31, dtype=torch.bfloat16).eval()
    apply_lora(model, LoRAConfig(r=4, alpha=alpha))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    q = next(m for m in model.modules() if isinstance(m, LoRALinear))
    experts = next(m for m in model.modules() if getattr(m, "lora", None) is not None)
    x = torch.randn(6, q.weight.shape[1], generator=gen).bfloat16()
    ids = torch.randint(0, experts.lora.gate_up_A.shape[0], (6, 2), generator=gen)
    route_w = torch.rand(6, 2, generator=gen).bfloat16()

    def outputs():
        lora = experts.lora.in_dtype(torch.bfloat16) if model.adapter_switch.enabled else None
        return q(x).float(), routed_experts_twin(x, route_w, ids, experts.expert_weights(), lora).float()

    with torch.no_grad():
        cast = outputs()
        with rollout_copies(model):
            copies = outputs()
        assert q.rollout_copy is not None and experts.lora.rollout_copy.scaling == 1
        with model.adapters_disabled():
            base = outputs()
    for c, k, b in zip(copies, cast, base):
        delta = (k - b).abs().max()
        assert delta > 0.1 * b.abs().max()  # the adapters matter
        assert (c - k).abs().max() <= 0.05 * delta


def test_experts_hand_out_their_dense_copies_to_every_forward_while_fresh():
    """Dense bf16 copies (`expert_copies.dense_experts`) go to training and rollout forwards alike
    while their stamp matches the blocks (a rollout's reserve counts no transient copy where every
    layer keeps them); a write makes them stale (freed with a warning, not handed
    out); `dense_experts` frees copies of modules it would not give any (here: off the GPU) and
    checks its budget."""
    from ossrl.kernels.moe_triton import _dense_copy_bytes
    from ossrl.model.expert_copies import _all_dense_kept, _rollout_reserve, dense_experts
    from ossrl.model.gptoss import Experts, blocks_stamp, inference_kernels

    model = random_model(tiny_config(quantization="mxfp4"), seed=3, expert_format="mxfp4").to(torch.bfloat16)
    m = next(x for x in model.modules() if isinstance(x, Experts))
    copies = dict(gate_up=torch.zeros(1), down=torch.ones(1), stamp=blocks_stamp(m))
    m.dense = copies
    assert m.expert_weights().gate_up_dense is copies["gate_up"]
    with inference_kernels():
        assert m.expert_weights().down_dense is copies["down"]
    # a rollout's memory reserve leaves out the transient bf16 copy only where every layer keeps
    # fresh copies (a prefill decodes one in any layer without)
    modules = [x for x in model.modules() if isinstance(x, Experts)]
    assert len(modules) > 1 and not _all_dense_kept(model)
    for other in modules[1:]:
        other.dense = dict(copies, stamp=blocks_stamp(other))
    assert _all_dense_kept(model)
    for other in modules[1:]:
        other.dense = None
    transient = _rollout_reserve(m, 80 << 30, 256, 4) - _rollout_reserve(m, 80 << 30, 256, 4, transient=False)
    assert transient == _dense_copy_bytes(m.expert_weights()) > 0
    with torch.no_grad():
        m.down_proj_blocks[0, 0, 0, 0] ^= 1
    with pytest.warns(RuntimeWarning, match="no longer match"):
        stale = m.expert_weights()
    assert stale.gate_up_dense is None and stale.down_dense is None and m.dense is None  # freed
    m.dense = dict(copies, stamp=blocks_stamp(m))
    assert dense_experts(model) == 1 and m.dense is None
    with pytest.raises(ValueError, match="max_bytes"):
        dense_experts(model, max_bytes=-1)


def test_experts_hand_out_their_tiled_copies_only_to_rollouts_and_only_while_fresh():
    """`Experts.expert_weights` gives the kernels the tiled copies inside `inference_kernels` while
    their stamp matches the blocks (address, version); an in-place write makes them stale (the
    published blocks are read until `tile_experts` refreshes them); inference-mode blocks stamp
    None (no copies); `tile_experts` frees copies of modules it does not tile (here: off the GPU)
    and bumps `tiled_epoch` for each module it changed."""
    from ossrl.model.gptoss import Experts, blocks_stamp, inference_kernels, tile_experts, tiled_epoch

    model = random_model(tiny_config(quantization="mxfp4"), seed=3, expert_format="mxfp4").to(torch.bfloat16)
    m = next(x for x in model.modules() if isinstance(x, Experts))
    copies = dict(gate_up=m.gate_up_proj_blocks.clone(), down=m.down_proj_blocks.clone(), layout=(64, 16),
                  stamp=blocks_stamp(m))
    m.tiled = copies
    assert m.expert_weights().gate_up_tiled is None  # training and reference forwards: the published blocks
    with inference_kernels():
        got = m.expert_weights()
        assert got.gate_up_tiled is copies["gate_up"] and got.down_tiled is copies["down"] and got.tiled == (64, 16)
        with torch.no_grad():
            m.gate_up_proj_blocks[0, 0, 0, 0] ^= 1
        assert m.expert_weights().gate_up_tiled is None
    with torch.inference_mode():
        assert blocks_stamp(m) is not None
        frozen = m.gate_up_proj_blocks.clone()
    saved = m.gate_up_proj_blocks
    m.gate_up_proj_blocks = frozen
    assert blocks_stamp(m) is None
    m.gate_up_proj_blocks = saved
    epoch = tiled_epoch()
    assert tile_experts(model) == 1 and m.tiled is None and tiled_epoch() == epoch + 1
    assert tile_experts(model) == 0 and tiled_epoch() == epoch + 1
