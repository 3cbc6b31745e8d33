"""The lean training step on CPU in fp32: LoRA, chunked log-probs, packing, checkpointing, offload."""

import pytest
import torch

from ossrl.kernels.attention import AttentionMask
from ossrl.model.checkpointing import activations_then_copies, measure_saved_bytes, plain_layer_count
from ossrl.model.lora import LoRAConfig, apply_lora, lora_parameters, lora_state_dict, load_lora_state_dict
from ossrl.testing import random_model, tiny_config
from ossrl.train.logprobs import pack_sequences, sequence_logprobs, token_logprobs
from ossrl.train.memory import configure_memory


def lora_model(seed=0, expert_format="bf16", **overrides):
    config = tiny_config(quantization="mxfp4" if expert_format == "mxfp4" else None, **overrides)
    model = random_model(config, seed=seed, expert_format=expert_format)
    counts = apply_lora(model, LoRAConfig(r=4, alpha=8, seed=seed))
    # B starts at zero (LoRA = identity); give it values so gradients reach A as well.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "lora_B" in name or "_B" in name.rpartition(".")[2]:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, counts


def full_logits_logprobs(model, ids, positions=None, doc_ids=None):
    logits = model(ids, positions=positions, doc_ids=doc_ids)
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def test_lora_counts_and_only_lora_trains():
    model, counts = lora_model()
    assert set(counts) == {"q_proj", "k_proj", "v_proj", "o_proj", "experts"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert sum(p.numel() for p in lora_parameters(model)) == sum(counts.values())
    # Base names are untouched: still the Hugging Face keys.
    names = dict(model.named_parameters())
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "model.layers.0.mlp.experts.lora.gate_up_A" in names


def test_fresh_lora_is_the_identity_and_disabled_adapters_give_the_base_model():
    config = tiny_config()
    base = random_model(config, seed=1)
    ids = torch.randint(0, config.vocab_size, (2, 13))
    with torch.no_grad():
        expected = base(ids)
        apply_lora(base, LoRAConfig(r=4))
        torch.testing.assert_close(base(ids), expected, rtol=0, atol=0)  # B = 0
    model, _ = lora_model(seed=1)
    with torch.no_grad():
        changed = model(ids)
        with model.adapters_disabled():
            off = model(ids)
        assert not torch.allclose(changed, expected)
        torch.testing.assert_close(off, expected, rtol=0, atol=0)
        torch.testing.assert_close(model(ids), changed, rtol=0, atol=0)  # switched back on


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_entropy_match_full_softmax_with_gradients(temperature):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, generator=gen, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=gen)
    gl, ge = torch.randn(37, generator=gen), torch.randn(37, generator=gen)

    lp, ent = token_logprobs(h, w, y, temperature=temperature, chunk=8, with_entropy=True)
    (lp * gl + ent * ge).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None

    logp = torch.log_softmax((h @ w.T) / temperature, -1)
    lp_ref = logp.gather(1, y[:, None]).squeeze(1)
    ent_ref = -(logp.exp() * logp).sum(-1)
    (lp_ref * gl + ent_ref * ge).sum().backward()
    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(ent, ent_ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", ["none", "logged", "detached", "differentiated"])
def test_eager_logprob_gradient_equals_the_recomputing_backward(temperature, entropy, monkeypatch):
    """EAGER_GRADIENT with a frozen lm_head: the forward keeps d logp / d h per row and the backward
    scales rows (no logits recomputed), giving the full softmax's gradient; an entropy that is
    differentiated has its term recomputed (the hidden states are kept for it unless the entropy
    is asked for without a gradient: "logged", as GRPO does); a weight that wants a gradient takes
    the recomputing backward."""
    from ossrl.train import logprobs as lp_module

    gen = torch.Generator().manual_seed(4)
    hidden, w = torch.randn(37, 16, generator=gen), torch.randn(50, 16, generator=gen)
    y = torch.randint(0, 50, (37,), generator=gen)
    gl, ge = torch.randn(37, generator=gen), torch.randn(37, generator=gen)
    chunks = []
    real = lp_module._chunk_logprobs
    monkeypatch.setattr(lp_module, "_chunk_logprobs", lambda *a: chunks.append(1) or real(*a))
    monkeypatch.setattr(lp_module, "EAGER_GRADIENT", True)

    h = hidden.clone().requires_grad_(True)
    lp, ent = token_logprobs(h, w, y, temperature=temperature, chunk=8, with_entropy=entropy != "none",
                             entropy_grad=entropy != "logged")
    forward_chunks = len(chunks)
    kept = [t for t in lp.grad_fn.saved_tensors if t is not None and t.shape == h.shape]
    assert len(kept) == (2 if entropy in ("detached", "differentiated") else 1)  # d logp / d h (and h)
    assert entropy == "none" or ent.requires_grad == (entropy != "logged")
    loss = (lp * gl).sum() + ((ent * ge).sum() if entropy == "differentiated" else 0.0)
    loss.backward()
    assert forward_chunks == 5 and len(chunks) == (10 if entropy == "differentiated" else 5)

    h_ref = hidden.clone().requires_grad_(True)
    logp = torch.log_softmax((h_ref @ w.T) / temperature, -1)
    ref = (logp.gather(1, y[:, None]).squeeze(1) * gl).sum()
    if entropy == "differentiated":
        ref = ref - ((logp.exp() * logp).sum(-1) * ge).sum()
    ref.backward()
    torch.testing.assert_close(h.grad, h_ref.grad)

    h, w_trained = hidden.clone().requires_grad_(True), w.clone().requires_grad_(True)
    chunks.clear()
    lp, _ = token_logprobs(h, w_trained, y, temperature=temperature, chunk=8)
    (lp * gl).sum().backward()
    assert len(chunks) == 10  # recomputed: the weight's gradient needs g
    h_ref, w_ref = hidden.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logp = torch.log_softmax((h_ref @ w_ref.T) / temperature, -1)
    (logp.gather(1, y[:, None]).squeeze(1) * gl).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad)
    torch.testing.assert_close(w_trained.grad, w_ref.grad)


@pytest.mark.parametrize("expert_format", ["bf16", "mxfp4"])
def test_lora_gradients_from_sequence_logprobs_equal_full_logits_autograd(expert_format):
    model, _ = lora_model(seed=2, expert_format=expert_format)
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (9, 14, 6)]
    trained = [[False] * 4 + [True] * (len(s) - 4) for s in seqs]
    batch = pack_sequences(seqs, trained, max_tokens=24)

    lp, _ = sequence_logprobs(model, batch, chunk=5)
    lp.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    ref_total, ref_lps = 0.0, []
    for s, t in zip(seqs, trained):
        full = full_logits_logprobs(model, torch.tensor([s]))[0]
        chosen = full[torch.tensor(t[1:])]
        ref_lps.append(chosen)
        ref_total = ref_total + chosen.sum()
    ref_total.backward()
    # Packed order: row-major over the packed rows; compare sorted per-sequence values instead.
    idx = batch.sequence_index[batch.target_mask]
    for i, ref in enumerate(ref_lps):
        torch.testing.assert_close(lp[idx == i], ref, rtol=1e-5, atol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(g, model.get_parameter(n).grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_training_qkv_gives_the_gradients_of_the_projections_one_by_one(dropout, monkeypatch):
    """FUSED_TRAINING_QKV: with q, k and v laid out side by side (configure_memory does it), a
    training forward computes them from one base matmul, one A matmul and one block-diagonal B
    addmm; log-probs and every LoRA gradient equal the projections one by one. With LoRA dropout
    (a mask per projection) it stays one by one; without the layout it does not apply."""
    from ossrl.model import lora as lora_module

    fused_calls = []
    real = lora_module.training_qkv
    monkeypatch.setattr(lora_module, "training_qkv",
                        lambda attn, x: (lambda r: fused_calls.append(r is not None) or r)(real(attn, x)))
    results = []
    for fused in (False, True):
        monkeypatch.setattr(lora_module, "FUSED_TRAINING_QKV", fused)
        model, _ = lora_model(seed=3)
        if dropout:
            for m in model.modules():
                if isinstance(m, lora_module.LoRALinear):
                    m.dropout = torch.nn.Dropout(dropout)
        configure_memory(model, gradient_checkpointing=False)
        V = model.config.vocab_size
        gen = torch.Generator().manual_seed(3)
        seqs = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (9, 14)]
        batch = pack_sequences(seqs, [[False] * 3 + [True] * (len(q) - 3) for q in seqs], max_tokens=24)
        torch.manual_seed(0)  # the same dropout masks both ways
        lp, _ = sequence_logprobs(model, batch, chunk=5)
        (lp * torch.linspace(-1, 1, lp.numel())).sum().backward()
        results.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    layers = model.config.num_hidden_layers
    assert fused_calls == [False] * layers + [not dropout] * layers
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert any("q_proj.lora_A" in n for n in results[0][1])
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-4, atol=1e-6, msg=n)

    model, _ = lora_model(seed=3)  # not laid out: the projections one by one
    q = model.model.layers[0].self_attn
    assert lora_module.training_qkv(q, torch.randn(2, 3, model.config.hidden_size)) is None


@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_gives_autograd_of_the_plain_formula(bias):
    """`lora_linear` (FUSED_LORA_BACKWARD): its output is the unfused path's bit for bit, and every
    gradient (x, the LoRA pair, a trained base weight and bias) is autograd's through the plain
    formula x W^T + b + s (x A^T) B^T, in fp64."""
    from ossrl.model.lora import lora_linear

    gen = torch.Generator().manual_seed(5)
    x, w, a, b = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in
                  ((2, 7, 12), (9, 12), (3, 12), (9, 3)))
    bi = torch.randn(9, generator=gen, dtype=torch.float64) if bias else None
    leaves = [t.requires_grad_(True) for t in (x, w, a, b, bi) if t is not None]
    y = lora_linear(x, w, bi, a, b, 0.5)
    plain = torch.nn.functional.linear(x, w, bi) + (torch.nn.functional.linear(x, a) * 0.5) @ b.t()
    torch.testing.assert_close(y, plain, rtol=1e-12, atol=1e-12)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, dy)
    want = torch.autograd.grad(plain, leaves, dy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the trainer's no-grad passes: the same function, the same bits
        assert torch.equal(lora_linear(x, w, bi, a, b, 0.5), y.detach())
    frozen = lora_linear(x.detach().requires_grad_(True), w.detach(), None, a, b.detach(), 0.5)
    frozen.sum().backward()  # only x and A need gradients: the others' products are skipped
    assert b.grad is None and w.grad is None


def test_fused_lora_backward_gives_the_unfused_gradients(monkeypatch):
    """The model with FUSED_LORA_BACKWARD on and off (o_proj one by one, q/k/v fused after
    configure_memory's layout): the same log-probs and LoRA gradients."""
    from ossrl.model import lora as lora_module

    results = []
    for fused in (False, True):
        monkeypatch.setattr(lora_module, "FUSED_LORA_BACKWARD", fused)
        model, _ = lora_model(seed=4)
        configure_memory(model, gradient_checkpointing=False)
        V = model.config.vocab_size
        gen = torch.Generator().manual_seed(4)
        seqs = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (10, 13)]
        batch = pack_sequences(seqs, [[False] * 3 + [True] * (len(q) - 3) for q in seqs], max_tokens=24)
        lp, _ = sequence_logprobs(model, batch, chunk=5)
        (lp * torch.linspace(-1, 1, lp.numel())).sum().backward()
        results.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    assert any("o_proj.lora_A" in n for n in results[0][1])
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_packing_places_every_sequence_once_and_restarts_positions():
    seqs = [[1] * 5, [2] * 7, [3] * 3, [4] * 8]
    batch = pack_sequences(seqs, [[True] * len(s) for s in seqs], max_tokens=10)
    assert batch.input_ids.shape[1] <= 10
    for i, s in enumerate(seqs):
        assert int((batch.sequence_index == i).sum()) == len(s) - 1
    starts = (batch.positions == 0) & (batch.doc_ids >= 0)
    assert int(starts.sum()) >= len(seqs)
    with pytest.raises(ValueError, match="more than max_tokens"):
        pack_sequences([[1] * 11], [[True] * 11], max_tokens=10)


def test_target_index_is_the_masks_order_computed_on_the_host_and_skips_the_last_column():
    """`to` computes the targets' flat index on the host (a boolean mask on the device would wait for
    its count); per_target gives the mask's row-major order; a flag in a row's last column (it would
    predict past the row) is no target; the log-probs are those of the unmoved batch."""
    torch.manual_seed(0)
    config = tiny_config()
    model = random_model(config, seed=2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (9, 14, 6, 11)]
    trained = [[False] * 3 + [True] * (len(s) - 3) for s in seqs]
    batch = pack_sequences(seqs, trained, max_tokens=24)
    moved = batch.to("cpu")
    assert moved.target_rows is not None and batch.target_rows is None
    T = batch.input_ids.shape[1]
    mask = batch.target_mask
    assert torch.equal(moved.target_rows, mask.flatten().nonzero().squeeze(1))
    assert torch.equal(moved.per_target(moved.sequence_index), batch.sequence_index[mask])
    assert torch.equal(moved.per_target(moved.input_ids), batch.input_ids.flatten()[moved.target_rows])
    lp, _ = sequence_logprobs(model, batch)
    torch.testing.assert_close(sequence_logprobs(model, moved)[0], lp, rtol=0, atol=0)
    flagged = pack_sequences(seqs, trained, max_tokens=24)
    flagged.target_mask[:, -1] = True  # (not what packing makes: a hand-built batch)
    assert torch.equal(flagged.target_index(), moved.target_rows)
    assert int((flagged.target_index() % T == T - 1).sum()) == 0
    # the token ids' range, read on the host, is checked there before the forward (no read-back on a
    # GPU, and a clear error where the embedding would fail)
    assert moved.token_range == (int(batch.input_ids.min()), int(batch.input_ids.max()))
    bad = pack_sequences([seqs[0][:4] + [config.vocab_size + 3]], [[False, True, True, True, True]], max_tokens=24)
    with pytest.raises(ValueError, match=rf"\[0, {config.vocab_size}\) \(the model's vocab_size\), got "
                                         rf".*\.\.{config.vocab_size + 3}"):
        sequence_logprobs(model, bad.to("cpu"))


def test_input_gradients_through_mxfp4_experts_equal_dequantized_experts(tmp_path):
    from ossrl.model.loading import load_model, save_model

    config = tiny_config(quantization="mxfp4")
    save_model(random_model(config, seed=4, expert_format="mxfp4"), tmp_path)
    grads = {}
    for fmt in ("mxfp4", "bf16"):
        model = load_model(tmp_path, dtype=torch.float32, experts=fmt)
        emb = model.model.embed_tokens.weight
        emb.requires_grad_(True)
        ids = torch.randint(0, config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(0))
        full_logits_logprobs(model, ids).sum().backward()
        grads[fmt] = emb.grad.clone()
    assert grads["mxfp4"].abs().sum() > 0
    torch.testing.assert_close(grads["mxfp4"], grads["bf16"], rtol=1e-4, atol=1e-6)


def test_checkpointing_and_offload_do_not_change_gradients():
    results = []
    for checkpointing, offload in ((False, False), (True, False), (True, True)):
        model, _ = lora_model(seed=5)
        model.model.gradient_checkpointing = checkpointing
        model.model.offload_activations = offload
        ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
        full_logits_logprobs(model, ids).sum().backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for other in results[1:]:
        for n, g in results[0].items():
            torch.testing.assert_close(other[n], g, rtol=1e-5, atol=1e-7)


def _layer_calls(model):
    calls = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: calls.append(i))  # recompute may stop early
    return calls


@pytest.mark.parametrize("budget_layers", [0, 2.5, 100])
def test_auto_checkpointing_recomputes_only_the_layers_over_budget(budget_layers):
    """"auto" keeps as many layers' activations as the budget holds and recomputes the others in
    backward; gradients equal the plain step's. The bytes a layer keeps are measured once (a
    forward of layer 0 whose saved tensors are dropped), then scaled by the token count."""
    ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(1))
    ref, _ = lora_model(seed=5, num_hidden_layers=4)
    full_logits_logprobs(ref, ids).sum().backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}

    model, _ = lora_model(seed=5, num_hidden_layers=4)
    x = model.model.embed_tokens(ids)
    pos = torch.arange(11).expand(2, 11)
    cos, sin = model.model.rope_tables(pos, x.dtype)
    masks = {w: AttentionMask(pos, pos, window=w) for w in {model.config.window(i) for i in range(4)}}
    # measured as a later layer sees it: its input needs a gradient
    layer_bytes = measure_saved_bytes(model.model.layers[0], x.detach().requires_grad_(True), cos, sin, masks, None)
    assert layer_bytes > x.numel() * 4  # more than the output alone
    model.model.gradient_checkpointing = "auto"
    plain = min(4, int(budget_layers))
    # the budget also pays for the inputs the checkpointed layers keep
    model.model.activation_budget = int(budget_layers * layer_bytes) + (4 - plain) * x.numel() * 4
    calls = _layer_calls(model)
    for step in range(2):
        calls.clear()
        full_logits_logprobs(model, ids).sum().backward()
        assert model.model.layer_activation_bytes == layer_bytes
        assert model.model.checkpointed_layers == 4 - plain
        measured = [0] if step == 0 else []  # the measuring forward, the first time only
        assert calls == measured + [0, 1, 2, 3] + list(range(3, plain - 1, -1))  # recomputed last first
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, grads[n] * (step + 1), rtol=1e-5, atol=1e-7)


def test_auto_checkpointing_with_offload_and_measured_budget():
    model, _ = lora_model(seed=5, num_hidden_layers=3)
    ref, _ = lora_model(seed=5, num_hidden_layers=3)
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(2))
    configure_memory(model, gradient_checkpointing="auto", offload_activations=True)
    configure_memory(ref, gradient_checkpointing=False)  # (the same q/k/v layout: the same fused products)
    full_logits_logprobs(model, ids).sum().backward()
    full_logits_logprobs(ref, ids).sum().backward()
    assert model.model.checkpointed_layers == 0  # a tiny model fits in this machine's free memory
    with torch.no_grad():
        model(ids)  # no gradient: nothing is measured or checkpointed
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="gradient_checkpointing must be true, false or 'auto'"):
        configure_memory(model, gradient_checkpointing="always")
    with pytest.raises(ValueError, match="offload_activations needs"):
        configure_memory(model, gradient_checkpointing=False, offload_activations=True)


@pytest.mark.parametrize("room", ["all", "one", "none", "tight"])
def test_auto_checkpointing_gives_kept_expert_copies_only_what_the_activations_leave(monkeypatch, room):
    """`configure_memory(gradient_checkpointing="auto", dense_experts_gb=)`: each training forward
    plans its kept activations as if the copies' memory were free (`activations_then_copies`), then
    frees or makes copies (`fit_dense_copies`, whole layers in order) to fit what is left; gradients
    are the plain step's whichever copies exist. The copies are made on this CPU (the placement rule
    patched) and the device's free memory simulated: a pool shared by activations and copies, less
    what the copies hold. "tight": free memory below the activations' margin (the copies' bytes
    count once, not on top of a budget already clamped at zero)."""
    from ossrl.model import checkpointing, expert_copies
    from ossrl.model.expert_copies import dense_bytes, dense_bytes_kept
    from ossrl.model.gptoss import Experts

    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(3))
    ref, _ = lora_model(seed=6, expert_format="mxfp4", num_hidden_layers=3)
    configure_memory(ref, gradient_checkpointing=False)  # (the same q/k/v layout: the same fused products)
    full_logits_logprobs(ref, ids).sum().backward()
    model, _ = lora_model(seed=6, expert_format="mxfp4", num_hidden_layers=3)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    one = dense_bytes(experts[0])
    monkeypatch.setattr(expert_copies, "_copyable", lambda model, m, stamp: stamp is not None)
    monkeypatch.setattr(expert_copies, "device_memory", lambda device: (1 << 50, 1 << 50))
    configure_memory(model, gradient_checkpointing="auto", dense_experts_gb=10 * one / 2**30)
    assert model.model.dense_experts_cap == 10 * one and dense_bytes_kept(model) == 3 * one  # made up front
    full_logits_logprobs(model, ids)  # (measures a layer's bytes; the pool below is set from them)
    model.zero_grad(set_to_none=True)
    layer = model.model.layer_activation_bytes
    inputs = ids.numel() * model.config.hidden_size * 4  # what a checkpointed layer keeps (fp32 stream)
    # none: two layers' activations and the third's input exactly, nothing left for copies
    pool = int({"all": 3 * layer + 5 * one, "one": 3 * layer + 1.5 * one, "none": 2 * layer + inputs,
                "tight": 0.5 * one}[room])
    # free memory as the device would report it: the pool less what the copies hold, plus the
    # margin `activation_budget` keeps back (two layers; the headroom patched to zero)
    monkeypatch.setattr(checkpointing, "headroom", lambda total: 0)
    monkeypatch.setattr(checkpointing, "device_memory",
                        lambda device: (pool + 2 * layer - dense_bytes_kept(model), 1 << 50))
    made = []
    real = expert_copies.dense_experts
    monkeypatch.setattr(expert_copies, "dense_experts", lambda *a, **k: made.append(k) or real(*a, **k))
    plain = {"all": 3, "one": 3, "none": 2, "tight": plain_layer_count(layer, 3, pool, inputs)}[room]
    for _ in range(2):  # (the first step starts with all three layers' copies)
        full_logits_logprobs(model, ids).sum().backward()
        assert model.model.checkpointed_layers == 3 - plain
    kept = [m.dense is not None for m in experts]
    assert kept == {"all": [True] * 3, "one": [True, False, False]}.get(room, [False] * 3)
    assert len(made) == (room != "all")  # the second step changed nothing: no refit
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * q.grad, rtol=1e-5, atol=1e-7)
    configure_memory(model, gradient_checkpointing=True, dense_experts_gb=10 * one / 2**30)
    assert model.model.dense_experts_cap == 0  # copies stay as configured outside "auto"


def test_oom_fallback_frees_the_kept_expert_copies_before_the_retry(monkeypatch):
    """An out-of-memory pass under "auto" retries with every layer checkpointed and without the kept
    expert copies (which the retry's memory needs more); the retry sees neither."""
    from ossrl.model import expert_copies
    from ossrl.model.expert_copies import dense_bytes_kept
    from ossrl.train.memory import with_checkpointing_fallback

    model, _ = lora_model(seed=6, expert_format="mxfp4", num_hidden_layers=2)
    monkeypatch.setattr(expert_copies, "_copyable", lambda model, m, stamp: stamp is not None)
    monkeypatch.setattr(expert_copies, "device_memory", lambda device: (1 << 50, 1 << 50))
    configure_memory(model, gradient_checkpointing="auto", dense_experts_gb=1.0)
    assert dense_bytes_kept(model) > 0
    seen = []

    def run_pass():
        seen.append((model.model.gradient_checkpointing, dense_bytes_kept(model)))
        if len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return "done"

    assert with_checkpointing_fallback(model, run_pass) == ("done", True)
    assert seen[1] == (True, 0) and model.model.dense_experts_cap == 0


def test_measured_bytes_count_what_autograd_keeps_but_not_parameters_or_inputs():
    linear = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Tanh())
    x = torch.randn(4, 10, requires_grad=True)
    # Linear saves its input (an input here: not counted) and its weight (the module's own);
    # Tanh saves its output [4, 10], and the output is counted as the next layer's input
    assert measure_saved_bytes(linear, x) == 4 * 10 * 4
    assert plain_layer_count(100, 24, 0) == 0 and plain_layer_count(100, 24, 950) == 9
    assert plain_layer_count(100, 24, 10**9) == 24 and plain_layer_count(0, 24, 0) == 24
    # checkpointed layers keep their inputs (10 each): 9 plain layers cost 900 + 15 * 10
    assert plain_layer_count(100, 24, 1050, input_bytes=10) == 9
    assert plain_layer_count(100, 24, 1049, input_bytes=10) == 8
    assert plain_layer_count(100, 24, 100, input_bytes=10) == 0  # not even the inputs fit: all checkpointed
    # kept expert copies get what the activations leave, at most their cap
    assert activations_then_copies(100, 24, 2450, 10, 30) == (24, 30)
    assert activations_then_copies(100, 24, 2450, 10, 80) == (24, 50)
    assert activations_then_copies(100, 24, 1089, 10, 80) == (9, 39)  # less than one more layer's
    assert activations_then_copies(100, 24, 100, 10, 80) == (0, 0)


def test_auto_checkpointing_measures_a_layer_whose_input_needs_a_gradient():
    """With LoRA on the experts only, the first layer's attention keeps nothing for its input's
    gradient (the embedding output needs none) but every later layer's does: "auto" must count what
    a later layer keeps (measured here directly on layer 1's real inputs), not what layer 0 does."""
    model = random_model(tiny_config(num_hidden_layers=3), seed=4)
    apply_lora(model, LoRAConfig(r=4, targets=("experts",)))
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    seen = []
    hook = model.model.layers[1].register_forward_pre_hook(lambda module, args: seen.append(args))
    full_logits_logprobs(model, ids).sum().backward()  # no checkpointing: layer 1's real inputs
    hook.remove()
    layer1 = measure_saved_bytes(model.model.layers[1], *seen[0])
    x = seen[0][0].detach()  # what layer 0 keeps for an input without a gradient is less
    assert measure_saved_bytes(model.model.layers[0], x, *seen[0][1:]) < layer1
    configure_memory(model, gradient_checkpointing="auto")
    full_logits_logprobs(model, ids).sum().backward()
    assert model.model.layer_activation_bytes == layer1


def test_measuring_forward_frees_what_it_measured():
    """The measuring forward's graph holds the pack hook, whose closure held the output: a cycle
    through C++ that gc does not break, leaking one layer's activations per measurement."""
    import gc
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    assert measure_saved_bytes(model, torch.randn(8, 16, requires_grad=True)) > 0
    gc.collect()
    assert outputs and outputs[0]() is None


def test_embedding_table_on_another_device_changes_nothing():
    model, _ = lora_model(seed=6)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        expected = model(ids)
        model.model.embed_tokens.to(torch.device("cpu"))  # the offload path: gather, then move
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)


def test_lora_state_dict_round_trips_and_rejects_mismatches():
    a, _ = lora_model(seed=7)
    b, _ = lora_model(seed=7)
    ids = torch.randint(0, a.config.vocab_size, (1, 9))
    with torch.no_grad():
        for p in lora_parameters(b):
            p.add_(0.1)
        assert not torch.allclose(a(ids), b(ids))
        load_lora_state_dict(b, lora_state_dict(a))
        torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=0)
    bad = dict(lora_state_dict(a))
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(b, bad)


def test_lora_weights_and_gradients_stay_fp32_on_a_bf16_model():
    model = random_model(tiny_config(), seed=9, dtype=torch.bfloat16)
    apply_lora(model, LoRAConfig(r=4))
    params = lora_parameters(model)
    assert params and all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in params)


def test_memory_options_are_set_in_one_place_and_checked():
    from ossrl.train.memory import configure_memory

    model, _ = lora_model(seed=10)
    configure_memory(model, gradient_checkpointing=True, offload_activations=True)
    assert model.model.gradient_checkpointing and model.model.offload_activations
    with pytest.raises(ValueError, match="needs gradient_checkpointing"):
        configure_memory(model, gradient_checkpointing=False, offload_activations=True)


def test_fp16_mode_keeps_outliers_above_65504_finite():
    """Expert down-projection outputs above fp16's range: the fp16 mode (fp32 residual stream and
    down projection) stays finite and close to fp32, where plain fp16 arithmetic overflows."""
    config = tiny_config()
    reference = random_model(config, seed=12)
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.mlp.experts.down_proj.mul_(32768.0)  # power of two: exact in fp16 and bf16
    ids = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    captured = []
    hook = reference.model.layers[0].mlp.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        expected = reference(ids)
    hook.remove()
    assert captured[0].abs().max() > 65504  # the test is about real overflow
    half = random_model(config, seed=12, dtype=torch.float16)
    with torch.no_grad():
        half.load_state_dict(reference.state_dict())
        got = half(ids)
        assert torch.isfinite(got).all()
        assert ((got.float() - expected).norm() / expected.norm()).item() < 2e-2
        # plain fp16 arithmetic on the same expert output overflows
        assert not torch.isfinite(captured[0].half()).all()
    # the training path works in this mode too
    apply_lora(half, LoRAConfig(r=2))
    batch = pack_sequences([ids[0].tolist()], [[True] * 12], max_tokens=12)
    lp, _ = sequence_logprobs(half, batch)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and all(torch.isfinite(p.grad).all() for p in lora_parameters(half))


def test_pack_pad_to_rounds_the_row_length_and_changes_no_logprob():
    torch.manual_seed(3)
    model = random_model(tiny_config(), seed=3, dtype=torch.float32)
    seqs = [[5, 6, 7, 8, 9], [10, 11, 12]]
    trained = [[False, True, True, True, True], [False, True, True]]
    plain = pack_sequences(seqs, trained, max_tokens=16)
    padded = pack_sequences(seqs, trained, max_tokens=16, pad_to=6)
    assert plain.input_ids.shape[1] == 8 and padded.input_ids.shape[1] == 12
    assert pack_sequences(seqs, trained, max_tokens=10, pad_to=64).input_ids.shape[1] == 10  # capped
    with torch.no_grad():
        a, _ = sequence_logprobs(model, plain)
        b, _ = sequence_logprobs(model, padded)
    torch.testing.assert_close(a, b)


def _grouped_rollouts(g):
    """Two prompts x three completions (GRPO's shape) and a plain sequence; prompts untrained."""
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (21, 30)]
    seqs, trained = [], []
    for p in prompts:
        for n in (5, 9, 1):
            completion = torch.randint(3, 200, (n,), generator=g).tolist()
            seqs.append(p + completion)
            trained.append([False] * len(p) + [True] * n)
    seqs.append(torch.randint(3, 200, (12,), generator=g).tolist())
    trained.append([False] + [True] * 11)
    return seqs, trained


@pytest.mark.parametrize("sliding_window", [None, 8])
def test_shared_prompt_packing_equals_separate_sequences_with_gradients(sliding_window):
    """GRPO's completions of one prompt packed as branches of one prompt copy: the same log-probs
    and LoRA gradients as packing every sequence whole, with fewer tokens."""
    overrides = {} if sliding_window is None else {"sliding_window": sliding_window}
    model, _ = lora_model(seed=3, **overrides)
    g = torch.Generator().manual_seed(5)
    seqs, trained = _grouped_rollouts(g)
    plain = pack_sequences(seqs, trained, max_tokens=200)
    shared = pack_sequences(seqs, trained, max_tokens=200, share_prefixes=True)
    assert (shared.doc_ids >= 0).sum() < (plain.doc_ids >= 0).sum()  # padding aside: fewer tokens
    assert int(shared.branch_ids.max()) == 3
    results = []
    for batch in (plain, shared):
        lp, ent = sequence_logprobs(model, batch, with_entropy=True)
        seq = batch.sequence_index[batch.target_mask]
        per_seq = [lp[seq == i] for i in range(len(seqs))]
        model.zero_grad(set_to_none=True)
        sum(((i + 1) * x).sum() for i, x in enumerate(per_seq)).backward()  # weights: order matters
        grads = [p.grad.clone() for p in lora_parameters(model)]
        results.append((per_seq, grads, [ent[seq == i] for i in range(len(seqs))]))
    (a_lp, a_g, a_e), (b_lp, b_g, b_e) = results
    # and GRPO's [completions x length] view of them (ossrl.rl.step) is the same
    from ossrl.rl.step import _unflatten

    lengths = [sum(t) for t in trained]
    with torch.no_grad():
        views = [_unflatten(sequence_logprobs(model, b)[0], b, list(range(len(seqs))), lengths, with_mask=True)
                 for b in (plain, shared)]
    torch.testing.assert_close(views[1][0], views[0][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(views[1][1], views[0][1])
    for x, y in zip(a_lp, b_lp):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    for x, y in zip(a_e, b_e):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    for x, y in zip(a_g, b_g):  # summation order differs (the prefix's gradient arrives at once)
        assert ((y - x).norm() / x.norm()).item() < 1e-5


def test_prefix_sharing_respects_trained_tokens_and_the_row_limit():
    g = torch.Generator().manual_seed(6)
    seqs, trained = _grouped_rollouts(g)
    trained[1] = [False] * 10 + [True] * (len(seqs[1]) - 10)  # a trained token inside the prompt
    batch = pack_sequences(seqs, trained, max_tokens=60, share_prefixes=True)
    assert batch.input_ids.shape[1] <= 60
    # every trained token is a target exactly once, whatever the grouping
    counts = torch.bincount(batch.sequence_index[batch.target_mask], minlength=len(seqs))
    assert counts.tolist() == [sum(t[1:]) for t in trained]


def test_prefix_groups_stay_per_prompt_when_prompts_share_only_a_header():
    """Two prompts with a common 20-token header (the chat template's) and 3 completions each:
    two groups sharing their whole prompts, not one group sharing the header."""
    g = torch.Generator().manual_seed(7)
    header = torch.randint(3, 200, (20,), generator=g).tolist()
    seqs, trained = [], []
    for _ in range(2):
        prompt = header + torch.randint(3, 200, (30,), generator=g).tolist()
        for _ in range(3):
            seqs.append(prompt + torch.randint(3, 200, (6,), generator=g).tolist())
            trained.append([False] * 50 + [True] * 6)
    batch = pack_sequences(seqs, trained, max_tokens=1000, share_prefixes=True)
    assert batch.input_ids.shape == (1, 2 * (49 + 3 * 7))  # each prompt once, then branches of 7 tokens
    assert batch.doc_ids[0].unique().tolist() == [0, 1] and int(batch.branch_ids.max()) == 3
    with pytest.raises(ValueError, match="min_shared"):
        pack_sequences(seqs, trained, max_tokens=1000, share_prefixes=True, min_shared=0)
    assert pack_sequences(seqs[:1], trained[:1], max_tokens=100, share_prefixes=True).branch_ids is None


def test_branch_ids_need_documents_and_no_cache():
    model, _ = lora_model(seed=1)
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="branch_ids need doc_ids"):
        model(ids, branch_ids=torch.zeros(1, 4, dtype=torch.long))


def test_cuda_free_memory_figure_leaves_out_private_pools(monkeypatch):
    """The arithmetic of the CUDA figure (the GPU test checks it against a real graph): unused
    bytes of segments owned by a private pool (a CUDA graph's) and of other devices' segments are
    left out of reserved - allocated; a snapshot without the pool field changes nothing."""
    import ossrl.model.checkpointing as ckpt

    MiB = 1 << 20
    segments = [
        dict(device=0, segment_pool_id=(0, 0), total_size=100 * MiB, allocated_size=40 * MiB),
        dict(device=0, segment_pool_id=(0, 1), total_size=50 * MiB, allocated_size=10 * MiB),  # a graph's pool
        dict(device=1, segment_pool_id=(0, 1), total_size=80 * MiB, allocated_size=0),  # another GPU
        dict(device=0, total_size=8 * MiB, allocated_size=0),  # no pool field: counted as the default pool
    ]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000 * MiB, 4000 * MiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 158 * MiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 50 * MiB)
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda *a, **k: segments)
    free, total = ckpt.device_memory(torch.device("cuda", 0))
    assert (free, total) == ((1000 + 158 - 50 - 40) * MiB, 4000 * MiB)
    segments[1]["segment_pool_id"] = (0, 0)  # the same block in the default pool is usable
    assert ckpt.device_memory(torch.device("cuda", 0))[0] == (1000 + 108) * MiB


def test_a_one_token_shared_prefix_packs_as_branches_alone():
    """min_shared=1 with prompts sharing one token: the branches repeat it and nothing is placed
    before them (the empty prefix's slice t:t-1 once failed at column 0 with a shape mismatch);
    every trained token is a target once, and the log-probs equal the plain packing's."""
    seqs, trained = [[1, 2, 3], [1, 4, 5]], [[False, True, True]] * 2
    shared = pack_sequences(seqs, trained, max_tokens=8, share_prefixes=True, min_shared=1)
    assert shared.input_ids[0, :6].tolist() == [1, 2, 3, 1, 4, 5]
    assert torch.bincount(shared.sequence_index[shared.target_mask], minlength=2).tolist() == [2, 2]
    model, _ = lora_model(seed=3)
    with torch.no_grad():
        a, _ = sequence_logprobs(model, pack_sequences(seqs, trained, max_tokens=8))
        b, _ = sequence_logprobs(model, shared)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
