"""CapturedLogprobs' bookkeeping on the CPU (graphs=False: the same fixed buffers, buckets, padding
and gradient path, run eagerly); the capture itself is tested on a GPU (test_train_gpu.py)."""

import pytest
import torch

from ossrl.model.lora import LoRAConfig, apply_lora
from ossrl.testing import random_model, tiny_config
from ossrl.train.graphed import CapturedLogprobs, target_capacity
from ossrl.train.logprobs import pack_sequences, sequence_logprobs


def lora_model(dropout=0.0):
    model = random_model(tiny_config(), seed=0)
    apply_lora(model, LoRAConfig(r=4, alpha=8, seed=0, dropout=dropout))
    with torch.no_grad():  # B is zero at start: make the adapters matter
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    model.train()
    return model


def batches(vocab, count, shared=False, seed=0):
    """`count` packed micro-batches of one shape (rows of 32 tokens), different tokens each."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        prompt = torch.randint(0, vocab, (6,), generator=gen).tolist()
        seqs = [(prompt if shared else torch.randint(0, vocab, (6,), generator=gen).tolist())
                + torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (5, 8, 3)]
        trained = [[False] * 6 + [True] * (len(s) - 6) for s in seqs]
        out.append(pack_sequences(seqs, trained, max_tokens=32, pad_to=32, share_prefixes=shared,
                                  min_shared=4).to("cpu"))
    return out


def run(model, fn, batches, with_entropy=False, entropy_grad=False):
    """Each batch's log-probs (and entropies), with a loss on both backpropagated; the summed grads."""
    outs = []
    for b in batches:
        lp, ent = fn(b, with_entropy=with_entropy, entropy_grad=entropy_grad)
        w = torch.linspace(-1, 1, lp.numel())
        loss = (lp * w).sum() + ((ent * w.flip(0)).sum() if with_entropy and entropy_grad else 0.0)
        loss.backward()
        outs.append((lp.detach().clone(), None if ent is None else ent.detach().clone()))
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return outs, grads


def test_target_capacity_rounds_up_to_few_sizes_and_never_below_the_count():
    sizes = [target_capacity(n, 10**6) for n in (1, 256, 257, 384, 385, 600, 1000, 1025, 5000)]
    assert sizes == [256, 256, 384, 384, 512, 768, 1024, 1536, 6144]
    assert target_capacity(300, 320) == 320  # capped at every position of the batch
    assert target_capacity(100, 90) == 100  # (never below the count)


@pytest.mark.parametrize("shared,with_entropy,entropy_grad",
                         [(False, False, False), (True, True, False), (False, True, True)])
def test_replayed_steps_give_the_log_probs_and_summed_gradients_of_eager_steps(shared, with_entropy, entropy_grad):
    model = lora_model()
    data = batches(model.config.vocab_size, 4, shared=shared)
    if shared:
        assert data[0].branch_ids is not None
    ref_outs, ref_grads = run(model, lambda b, **kw: sequence_logprobs(model, b, **kw), data, with_entropy,
                              entropy_grad)
    captured = CapturedLogprobs(model, graphs=False)
    captured.zero_grad()
    outs, grads = run(model, captured, data, with_entropy, entropy_grad)
    # the first batch of the shape runs eagerly, the rest on the bucket's buffers
    assert (captured.eager_calls, captured.replayed_calls) == (1, 3)
    for (lp, ent), (ref_lp, ref_ent) in zip(outs, ref_outs):
        torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
        if with_entropy:
            torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    # zero_grad clears the same buffers
    kept = [p.grad for p in model.parameters() if p.requires_grad]
    captured.zero_grad()
    assert all(p.grad is g and not g.any() for p, g in zip([p for p in model.parameters() if p.requires_grad], kept))


def test_a_shape_with_more_targets_gets_its_own_bucket_and_the_padding_adds_no_gradient():
    model = lora_model()
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(5)
    # 302 targets: the buffer holds 384 (82 padded rows whose gradient must be zero); the row of 320
    # tokens is padded to 1,024
    seqs = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (160, 150)]
    trained = [[False] * 4 + [True] * (len(s) - 4) for s in seqs]
    big = pack_sequences(seqs, trained, max_tokens=320, pad_to=32).to("cpu")
    assert big.target_index().numel() == 302 and big.input_ids.shape == (1, 320)
    data = [big, big, batches(V, 1)[0], big]
    ref_outs, ref_grads = run(model, lambda b, **kw: sequence_logprobs(model, b, **kw), data)
    captured = CapturedLogprobs(model, graphs=False)
    captured.zero_grad()
    outs, grads = run(model, captured, data)
    assert (captured.eager_calls, captured.replayed_calls) == (2, 2)  # each shape's first call is eager
    assert [b.index.numel() for b in captured._buckets.values()] == [384]
    assert [b.ids.shape for b in captured._buckets.values()] == [(1, 1024)]
    for (lp, _), (ref, _) in zip(outs, ref_outs):
        torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_gradients_cleared_to_none_are_refused_by_name():
    model = lora_model()
    data = batches(model.config.vocab_size, 2)
    captured = CapturedLogprobs(model, graphs=False)
    with pytest.raises(RuntimeError, match=r"captured.zero_grad\(\)"):
        captured(data[0])
    captured.zero_grad()
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=r"captured.zero_grad\(\)"):
        captured(data[0])


def test_a_backward_after_the_next_replayed_forward_is_refused():
    model = lora_model()
    data = batches(model.config.vocab_size, 3)
    captured = CapturedLogprobs(model, graphs=False)
    captured.zero_grad()
    captured(data[0])[0].sum().backward()  # (eager: the shape's first)
    first, _ = captured(data[1])
    second, _ = captured(data[2])
    with pytest.raises(RuntimeError, match="before the next replayed forward"):
        first.sum().backward()
    second.sum().backward()  # its own backward still runs


def test_what_cannot_be_replayed_runs_eagerly():
    model = lora_model(dropout=0.1)
    captured = CapturedLogprobs(model, graphs=False)
    assert "dropout" in captured.unsupported()
    captured.zero_grad()
    for b in batches(model.config.vocab_size, 3):
        captured(b)[0].sum().backward()
    assert (captured.eager_calls, captured.replayed_calls) == (3, 0)
    plain = CapturedLogprobs(lora_model(), graphs=False)
    with torch.no_grad():  # reference log-probs: no backward to replay
        for b in batches(plain.model.config.vocab_size, 3):
            plain(b)
    assert (plain.eager_calls, plain.replayed_calls) == (3, 0)


def test_max_buckets_keeps_later_shapes_eager():
    model = lora_model()
    V = model.config.vocab_size
    captured = CapturedLogprobs(model, graphs=False, max_buckets=1)
    captured.zero_grad()
    small = batches(V, 1)[0]
    seqs = [[1 + j % 300 for j in range(301)]]  # 300 targets: another capacity, another bucket
    other = pack_sequences(seqs, [[False] + [True] * 300], max_tokens=320, pad_to=32).to("cpu")
    for b in (small, small, other, other, other):
        captured(b)[0].sum().backward()
    assert len(captured._buckets) == 1
    assert (captured.eager_calls, captured.replayed_calls) == (4, 1)


def test_grpo_policy_phase_through_captured_steps_equals_the_eager_phase():
    """optimise_policy with `captured` (two micro-batches, three optimisation passes: the first runs
    eagerly, the later ones on the bucket) leaves the same adapters and metrics as without it."""
    import copy
    from types import SimpleNamespace

    from ossrl.rl.config import GRPOConfig
    from ossrl.rl.step import optimise_policy

    model = lora_model()
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (6,), generator=gen).tolist()
    rollouts = []
    for n in (4, 9, 2, 6):
        completion = torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist()
        rollouts.append(SimpleNamespace(prompt_ids=prompt, completion_ids=completion, finish_reason="stop",
                                        sampling_logprobs=[-2.0] * n))
    c = GRPOConfig(model="unused", gradient_accumulation_steps=2, num_iterations=3, loss_type="dapo",
                   max_prompt_length=16, max_completion_length=16, learning_rate=1e-2)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    outs = []
    for m, captured in ((model, None), (twin, CapturedLogprobs(twin, graphs=False))):
        params = [p for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=c.learning_rate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        outs.append(optimise_policy(m, optimizer, scheduler, params, c, rollouts, advantages, captured=captured))
    # two packed shapes (19 and 14 tokens), one bucket (padded to 1,024): only the first runs eagerly
    assert (captured.eager_calls, captured.replayed_calls) == (1, 5)
    assert outs[0].keys() == outs[1].keys()
    for key in outs[0]:
        assert outs[1][key] == pytest.approx(outs[0][key], rel=1e-4, abs=1e-6), key
    for a, b in zip(model.parameters(), twin.parameters()):  # (after three AdamW steps of 1e-2)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any((a.grad is not None and a.grad.abs().sum() > 0) for a in twin.parameters() if a.requires_grad)


def test_padded_columns_keep_every_targets_log_prob_and_its_order():
    from ossrl.train.graphed import pad_columns

    model = lora_model()
    for b in batches(model.config.vocab_size, 2, shared=True):
        wide = pad_columns(b, 80)
        assert wide.input_ids.shape == (b.input_ids.shape[0], 80)
        assert torch.equal(wide.per_target(wide.sequence_index), b.per_target(b.sequence_index))
        assert torch.equal(wide.target_index(), wide.target_mask.flatten().nonzero().squeeze(1))
        assert (wide.doc_ids[:, 32:] > b.doc_ids.amax(1, keepdim=True)).all()  # a document of its own
        with torch.no_grad():
            torch.testing.assert_close(sequence_logprobs(model, wide)[0], sequence_logprobs(model, b)[0],
                                       rtol=1e-5, atol=1e-5)


def test_a_bucket_is_captured_again_when_weights_or_kept_expert_copies_move():
    """The graphs read the weights and the kept bf16 expert copies by address ("auto" checkpointing
    refits the copies to each forward's free memory; the rollout engine lays q, k and v out again
    after a move): a bucket whose weights or copies were remade elsewhere is captured anew."""
    from ossrl.kernels.mxfp4 import dequantize_mxfp4
    from ossrl.model.expert_copies import blocks_stamp

    model = random_model(tiny_config(quantization="mxfp4"), seed=0, expert_format="mxfp4")
    apply_lora(model, LoRAConfig(r=4, alpha=8, seed=0))
    model.train()
    experts = [m for m in model.modules() if hasattr(m, "dense") and m.format == "mxfp4"]

    def keep_copies(m):
        m.dense = dict(gate_up=dequantize_mxfp4(m.gate_up_proj_blocks, m.gate_up_proj_scales, torch.float32),
                       down=dequantize_mxfp4(m.down_proj_blocks, m.down_proj_scales, torch.float32),
                       stamp=blocks_stamp(m))

    for m in experts:
        keep_copies(m)
    captured = CapturedLogprobs(model, graphs=False)
    captured.zero_grad()
    data = batches(model.config.vocab_size, 5)
    for b in data[:3]:
        captured(b)[0].sum().backward()
    assert captured.captures == 1
    keep_copies(experts[0])  # remade: other tensors
    for b in data[3:]:
        captured(b)[0].sum().backward()
    assert captured.captures == 2 and captured.replayed_calls == 4
    head = model.lm_head.weight
    head.data = head.data.clone()  # new storage, same values: found at the next pass's zero_grad
    captured.zero_grad()
    assert not captured._buckets
    for b in data[:2]:
        captured(b)[0].sum().backward()
    assert captured.captures == 3 and captured.replayed_calls == 5


def test_batches_above_max_tokens_run_eagerly():
    model = lora_model()
    captured = CapturedLogprobs(model, graphs=False, max_tokens=1024)
    captured.zero_grad()
    small = pack_sequences([[1 + j % 300 for j in range(30)]], [[False] + [True] * 29],
                           max_tokens=32).to("cpu")  # one row, padded to 1,024
    two_rows = pack_sequences([[1 + j % 300 for j in range(30)]] * 2, [[False] + [True] * 29] * 2,
                              max_tokens=32).to("cpu")  # two rows: 2,048 padded tokens
    assert two_rows.input_ids.shape[0] == 2
    for b in (small, small, two_rows, two_rows, two_rows):
        captured(b)[0].sum().backward()
    assert (captured.eager_calls, captured.replayed_calls) == (4, 1)


def test_kept_expert_copies_stay_as_they_are_while_graphs_read_them():
    model = lora_model()
    captured = CapturedLogprobs(model, graphs=False)
    captured.zero_grad()
    for b in batches(model.config.vocab_size, 2):
        captured(b)[0].sum().backward()
    assert model.model.dense_copies_frozen  # ("auto" checkpointing then neither frees nor makes copies)
    captured.release()
    assert not model.model.dense_copies_frozen


def test_rows_and_temperatures_key_their_own_buckets_and_disabled_adapters_run_eagerly():
    """Micro-batches of two rows whose target counts differ within one capacity (the index remapped
    to the padded length, the incoming gradient zeroed past each one's targets), two temperatures,
    and adapters disabled under autograd (eager: nothing to train): every call as the eager path
    gives it."""
    from ossrl.model.lora import adapters_disabled

    model = lora_model()
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(9)
    data = []
    for lengths in ((20, 25, 18), (12, 30, 20), (28, 9, 24)):
        seqs = [torch.randint(0, V, (n,), generator=gen).tolist() for n in lengths]
        trained = [[False] * 3 + [True] * (n - 3) for n in lengths]
        data.append(pack_sequences(seqs, trained, max_tokens=40, pad_to=40).to("cpu"))
    assert all(b.input_ids.shape == (2, 40) for b in data)
    assert len({b.target_index().numel() for b in data}) == 3
    calls = [(b, 1.0, False) for b in data] + [(b, 0.7, False) for b in data] + [(b, 1.0, True) for b in data]

    def run_all(fn):
        outs, grads = [], []
        for b, temperature, disabled in calls:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.zero_()
            with adapters_disabled(model) if disabled else torch.enable_grad():
                lp, _ = fn(b, temperature=temperature)
                if lp.requires_grad:  # (not with the adapters off: no trained weight is involved)
                    (lp * torch.linspace(-1, 1, lp.numel())).sum().backward()
            outs.append(lp.detach().clone())
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        return outs, grads

    captured = CapturedLogprobs(model, graphs=False)
    captured.zero_grad()
    ref_outs, ref_grads = run_all(lambda b, **kw: sequence_logprobs(model, b, **kw))
    outs, grads = run_all(captured)
    # two keys, each first call eager; the three calls with the adapters off eager
    assert (captured.eager_calls, captured.replayed_calls) == (5, 4)
    for lp, ref in zip(outs, ref_outs):
        torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    for gs, refs in zip(grads, ref_grads):
        for g, ref in zip(gs, refs):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
