"""Sink attention on CPU: mask semantics, the BlockMask layout the CUDA path uses, the flex formula
(out * sigmoid(lse - sink)) through flex's eager version, and the decode twin on slot/ring caches.

The GPU kernels themselves are checked in test_attention_gpu.py (marked gpu).
"""

import pytest
import torch

import ossrl.kernels.attention as attention_module
import ossrl.kernels.block_mask as block_mask_module
from ossrl.kernels.attention import (
    AttentionMask, _flex_sink_attention, _SinkRescale, attention_mask, sink_attention, sink_attention_reference,
    static_length,
)
from ossrl.kernels.block_mask import BLOCK, block_layout
from ossrl.kernels.decode_attention import append_kv, decode_attention, decode_attention_reference


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def packed_positions(lengths):
    """positions restarting per document and doc ids, each [1, sum(lengths)]."""
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    return pos, doc


def branched_positions(prefix, branches, other=50):
    """A document of a shared prefix and its branches (positions continue from the prefix), then a
    plain document: positions, doc ids and branch ids, each [1, T]."""
    pos = [torch.arange(prefix)] + [torch.arange(prefix, prefix + n) for n in branches] + [torch.arange(other)]
    doc = [torch.zeros(prefix + sum(branches), dtype=torch.long), torch.ones(other, dtype=torch.long)]
    branch = [torch.zeros(prefix, dtype=torch.long)] + [torch.full((n,), b + 1) for b, n in enumerate(branches)]
    branch.append(torch.zeros(other, dtype=torch.long))
    return torch.cat(pos)[None], torch.cat(doc)[None], torch.cat(branch)[None]


def mask_cases():
    """(name, AttentionMask) pairs: causal, sliding, packed, prefill offset, per-row positions."""
    ar = lambda n, start=0: torch.arange(start, start + n).unsqueeze(0)  # noqa: E731
    pos, doc = packed_positions([37, 190, 73, 300])
    rows = torch.stack((torch.arange(260), torch.arange(5, 265)))  # [2, 260], rows differ
    return [
        ("causal", AttentionMask(ar(300), ar(300))),
        ("sliding", AttentionMask(ar(300), ar(300), window=128)),
        ("packed", AttentionMask(pos, pos, q_doc=doc, k_doc=doc)),
        ("packed_sliding", AttentionMask(pos, pos, window=128, q_doc=doc, k_doc=doc)),
        ("prefill_offset", AttentionMask(ar(150, 450), ar(600))),
        ("prefill_offset_sliding", AttentionMask(ar(150, 450), ar(600), window=128)),
        ("per_row_positions", AttentionMask(rows, rows, window=128)),
        ("batch_broadcast", AttentionMask(torch.arange(200).expand(3, 200), torch.arange(200).expand(3, 200))),
    ] + branch_cases() + crowded_cases()


def crowded_cases():
    """Documents of about 30 tokens: blocks of more than RUNS runs (min/max superset) next to
    blocks classified run by run."""
    pos, doc = packed_positions([29, 31, 30, 33, 28, 200, 31, 29, 150])
    return [("crowded", AttentionMask(pos, pos, q_doc=doc, k_doc=doc)),
            ("crowded_sliding", AttentionMask(pos, pos, window=64, q_doc=doc, k_doc=doc))]


def branch_cases():
    bpos, bdoc, br = branched_positions(200, [150, 90, 260])
    return [
        ("branches", AttentionMask(bpos, bpos, q_doc=bdoc, k_doc=bdoc, q_branch=br, k_branch=br)),
        ("branches_sliding", AttentionMask(bpos, bpos, window=128, q_doc=bdoc, k_doc=bdoc, q_branch=br, k_branch=br)),
    ]


def test_a_branch_sees_the_shared_prefix_and_itself_only():
    """Each branch's attention equals its sequence's own causal mask (prefix + branch)."""
    prefix, branches = 3, [2, 4]
    pos, doc, branch = branched_positions(prefix, branches, other=2)
    allowed = AttentionMask(pos, pos, q_doc=doc, k_doc=doc, q_branch=branch, k_branch=branch).dense()[0]
    for b, n in enumerate(branches):
        start = prefix + sum(branches[:b])
        rows = list(range(prefix)) + list(range(start, start + n))  # the tokens of sequence b
        seq = allowed[rows][:, rows]
        assert seq.equal(torch.ones(len(rows), len(rows), dtype=torch.bool).tril())
        others = [i for i in range(allowed.shape[1]) if i not in rows]
        assert not allowed[start:start + n, others].any()
    assert not allowed[:prefix, prefix:].any()  # the prefix sees no branch


def test_window_counts_the_current_token():
    q_pos = torch.tensor([[200]])
    k_pos = torch.arange(201).unsqueeze(0)
    visible = attention_mask(q_pos, k_pos, window=128)[0, 0].nonzero().flatten()
    assert visible.tolist() == list(range(73, 201))  # 128 keys: the current one and 127 before it


def test_documents_do_not_see_each_other():
    pos, doc = packed_positions([3, 4])
    allowed = AttentionMask(pos, pos, q_doc=doc, k_doc=doc).dense()[0]
    assert not allowed[3:, :3].any() and not allowed[:3, 3:].any()
    assert allowed[3:, 3:].equal(torch.ones(4, 4, dtype=torch.bool).tril())


def test_mask_builds_its_dense_form_once():
    mask = AttentionMask(torch.arange(10).unsqueeze(0), torch.arange(10).unsqueeze(0))
    assert mask.dense() is mask.dense()
    assert mask.block_mask() is mask.block_mask()


def host_twin(mask: AttentionMask) -> AttentionMask:
    """`mask` with a host twin of its own tensors' copies (other objects: the twin path is taken)."""
    def copied(t):  # (rows shared by a stride-0 view stay shared: the tables' batch size follows them)
        if t is None:
            return None
        return t[:1].clone().expand_as(t) if t.stride(0) == 0 else t.clone()
    q_pos = copied(mask.q_pos)
    k_pos = q_pos if mask.k_pos is mask.q_pos else copied(mask.k_pos)
    q_doc = copied(mask.q_doc)
    k_doc = q_doc if mask.k_doc is mask.q_doc else copied(mask.k_doc)
    q_branch = copied(mask.q_branch)
    k_branch = q_branch if mask.k_branch is mask.q_branch else copied(mask.k_branch)
    twin = AttentionMask(q_pos, k_pos, mask.window, q_doc, k_doc, q_branch, k_branch)
    return AttentionMask(mask.q_pos, mask.k_pos, mask.window, mask.q_doc, mask.k_doc, mask.q_branch, mask.k_branch,
                         host=twin)


def assert_same_block_masks(a, b, q_pos, k_pos):
    """Every table of two BlockMasks equal (values, dtype, device and strides: the compiled kernel
    specialises on them), and their mask_mods agree on every (query, key) pair."""
    from torch.nn.attention.flex_attention import BlockMask

    for name in BlockMask._TENSOR_ATTRS:
        x, y = getattr(a, name, None), getattr(b, name, None)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.device == y.device and x.dtype == y.dtype and x.equal(y), name
            assert x.stride() == y.stride(), (name, x.stride(), y.stride())
    B, Tq, Tk = q_pos.shape[0], q_pos.shape[1], k_pos.shape[1]
    bq = torch.arange(B, device=q_pos.device)[:, None, None]
    qi = torch.arange(Tq, device=q_pos.device)[None, :, None]
    ki = torch.arange(Tk, device=q_pos.device)[None, None, :]
    assert a.mask_mod(bq, 0, qi, ki).equal(b.mask_mod(bq, 0, qi, ki))


@pytest.mark.parametrize("name,mask", mask_cases(), ids=[c[0] for c in mask_cases()])
def test_block_mask_from_a_host_twin_equals_the_one_built_in_place(name, mask):
    """`AttentionMask(host=...)` holding the same values: the tables and mask_mod built from the host
    twin (then copied over; on the CPU the copy is the tensor itself) equal those built in place."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    with_twin = host_twin(mask)
    assert_same_block_masks(with_twin.block_mask(), mask.block_mask(), mask.q_pos, mask.k_pos)
    with pytest.raises(ValueError, match="host mask"):
        AttentionMask(mask.q_pos, mask.k_pos, window=7, host=with_twin.host)


def test_block_mask_tables_and_mask_mod_come_from_the_host_twin():
    """The twin decides: given one of other documents (same shapes), the BlockMask is the twin's
    own, not the one the mask's tensors would give (so a twin ignored would show)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    pos, doc = packed_positions([300])
    twin_pos, twin_doc = packed_positions([150, 150])
    mask = AttentionMask(pos, pos, q_doc=doc, k_doc=doc,
                         host=AttentionMask(twin_pos, twin_pos, q_doc=twin_doc, k_doc=twin_doc))
    own = AttentionMask(twin_pos, twin_pos, q_doc=twin_doc, k_doc=twin_doc).block_mask()
    assert_same_block_masks(mask.block_mask(), own, pos, pos)
    plain = AttentionMask(pos, pos, q_doc=doc, k_doc=doc).block_mask()
    assert not (plain.kv_num_blocks.equal(own.kv_num_blocks) and plain.full_kv_num_blocks.equal(own.full_kv_num_blocks))


@pytest.mark.parametrize("name,mask", mask_cases(), ids=[c[0] for c in mask_cases()])
def test_block_layout_covers_every_visible_pair_and_full_blocks_are_exact(name, mask):
    partial, full, _ = block_layout(mask)
    dense = mask.dense()  # [B, Tq, Tk]
    B, Tq, Tk = dense.shape
    nq, nk = -(-Tq // BLOCK), -(-Tk // BLOCK)
    padded = torch.zeros(B, nq * BLOCK, nk * BLOCK, dtype=torch.bool)
    padded[:, :Tq, :Tk] = dense
    blocks = padded.view(B, nq, BLOCK, nk, BLOCK)
    any_visible, all_visible = blocks.any(dim=(2, 4)), blocks.all(dim=(2, 4))
    partial, full = partial.expand(B, -1, -1), full.expand(B, -1, -1)
    assert not (partial & full).any()
    assert (any_visible <= (partial | full)).all(), "a block with visible pairs would be skipped"
    assert (full <= all_visible).all(), "a block marked full hides masked pairs"
    if name.startswith("crowded"):  # the min/max superset's branch runs too
        assert block_mask_module._block_runs(mask.q_pos, mask.q_doc, None)["crowded"].any()
    if name in ("causal", "sliding", "packed"):
        assert (~(partial | full)).any()  # the layout is sparse: some blocks are skipped
    if name == "causal":
        assert full.any()  # and below the diagonal mask_mod is not evaluated


def test_block_layout_is_exact_where_blocks_hold_few_runs():
    """Blocks straddling two branches (GRPO packs: one prompt, then its completions) are classified
    exactly: a block is skipped iff none of its pairs is visible, full iff all are; and per-block
    minima/maxima alone would have kept far more blocks."""
    for window in (None, 128):
        pos, doc, branch = branched_positions(300, [1016] * 4 + [700, 333])
        mask = AttentionMask(pos, pos, window=window, q_doc=doc, k_doc=doc, q_branch=branch, k_branch=branch)
        partial, full, _ = block_layout(mask)
        T = pos.shape[1]
        nb = -(-T // BLOCK)
        assert T % BLOCK
        dense = torch.zeros(nb * BLOCK, nb * BLOCK, dtype=torch.bool)
        dense[:T, :T] = mask.dense()[0]
        blocks = dense.view(nb, BLOCK, nb, BLOCK)
        assert (partial | full)[0].equal(blocks.any(dim=(1, 3)))
        all_visible = blocks.all(dim=(1, 3))
        all_visible[-1, :] = all_visible[:, -1] = False  # the padded last block is never full
        assert full[0].equal(all_visible)
        with pytest.MonkeyPatch.context() as mp:  # runs forced coarse: the min/max superset, larger
            mp.setattr(block_mask_module, "RUNS", 0)
            coarse_partial, coarse_full, _ = block_layout(mask)
        coarse_any = (coarse_partial | coarse_full)[0]
        assert ((partial | full)[0] <= coarse_any).all()
        assert coarse_any.sum() > 1.2 * (partial | full).sum()


def random_pack(gen, T: int):
    """[T] positions, doc and branch ids of random documents, each a prefix and 0-3 branches
    continuing its positions (GRPO's shared prefixes), cut to T tokens."""
    pos, doc, branch = [], [], []
    d = 0
    while sum(len(p) for p in pos) < T:
        prefix = int(torch.randint(1, 400, (1,), generator=gen))
        pos.append(torch.arange(prefix)), doc.append(torch.full((prefix,), d)), branch.append(torch.zeros(prefix, dtype=torch.long))
        for b in range(int(torch.randint(0, 4, (1,), generator=gen))):
            n = int(torch.randint(1, 300, (1,), generator=gen))
            pos.append(torch.arange(prefix, prefix + n)), doc.append(torch.full((n,), d)), branch.append(torch.full((n,), b + 1))
        d += 1
    return torch.cat(pos)[:T], torch.cat(doc)[:T], torch.cat(branch)[:T]


@pytest.mark.parametrize("seed", range(6))
def test_block_layout_is_exact_on_random_packs_wherever_no_block_is_crowded(seed):
    """Random packs (documents, shared prefixes with branches; one row or two rows of their own;
    queries all the tokens or only the last ones; with and without a window): every block pair
    whose blocks hold at most RUNS runs each is classified exactly, pairs of one-run blocks (which
    the minima/maxima serve without comparing runs) included."""
    gen = torch.Generator().manual_seed(seed)
    rows = 1 + seed % 2
    T = int(torch.randint(300, 1500, (1,), generator=gen))
    packs = [random_pack(gen, T) for _ in range(rows)]
    pos, doc, branch = (torch.stack(t) for t in zip(*packs))
    Tq = T if seed < 3 else int(torch.randint(1, T, (1,), generator=gen))
    for window in (None, 128):
        mask = AttentionMask(pos[:, -Tq:], pos, window=window, q_doc=doc[:, -Tq:], k_doc=doc,
                             q_branch=branch[:, -Tq:], k_branch=branch)
        partial, full, _ = block_layout(mask)
        nq, nk = -(-Tq // BLOCK), -(-T // BLOCK)
        dense = torch.zeros(rows, nq * BLOCK, nk * BLOCK, dtype=torch.bool)
        dense[:, :Tq, :T] = mask.dense()
        blocks = dense.view(rows, nq, BLOCK, nk, BLOCK)
        any_visible, all_visible = blocks.any(dim=(2, 4)), blocks.all(dim=(2, 4))
        all_visible[:, -1, :] = Tq % BLOCK == 0 and all_visible[:, -1, :]  # (padded blocks are never full)
        all_visible[:, :, -1] = T % BLOCK == 0 and all_visible[:, :, -1]
        crowded = (block_mask_module._block_runs(pos[:, -Tq:], doc[:, -Tq:], branch[:, -Tq:])["crowded"][:, :, None]
                   | block_mask_module._block_runs(pos, doc, branch)["crowded"][:, None, :])
        exact = ~crowded
        assert exact.any()
        assert ((partial | full) == any_visible)[exact].all()
        assert (full == all_visible)[exact].all()
        assert (any_visible <= (partial | full)).all() and (full <= all_visible).all()
        with pytest.MonkeyPatch.context() as mp:  # every block's runs compared (a device's way): the same
            mp.setattr(block_mask_module, "_mixed_blocks", lambda runs: slice(None))
            every_partial, every_full, _ = block_layout(mask)
        assert every_partial.equal(partial) and every_full.equal(full)


def flex_inputs(mask: AttentionMask, seed: int):
    """Random q [B, Tq, 8, 16], k, v [B, Tk, 2, 16] and sinks [8] fitting `mask`."""
    gen = torch.Generator().manual_seed(seed)
    B, Tq, Tk = mask.q_pos.shape[0], mask.q_pos.shape[1], mask.k_pos.shape[1]
    q = torch.randn(B, Tq, 8, 16, generator=gen)
    k, v = torch.randn(B, Tk, 2, 16, generator=gen), torch.randn(B, Tk, 2, 16, generator=gen)
    return q, k, v, torch.randn(8, generator=gen) * 2


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name,mask", mask_cases()[:6], ids=[c[0] for c in mask_cases()[:6]])
def test_flex_formula_equals_twin(name, mask):
    """The CUDA path's maths (BlockMask mask_mod, lse, sigmoid rescale) through flex's eager version."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v, sinks = flex_inputs(mask, seed=0)
    with torch.no_grad():
        flex = _flex_sink_attention(q, k, v, sinks, mask, scale=0.25, compiled=False)
    twin = sink_attention_reference(q, k, v, sinks, mask.dense(), scale=0.25)
    assert rel_err(flex, twin) < 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name,mask", branch_cases(), ids=[c[0] for c in branch_cases()])
def test_flex_formula_with_branches_equals_twin(name, mask):
    test_flex_formula_equals_twin(name, mask)


def test_static_length_rounds_up_by_at_most_a_quarter():
    assert [static_length(t) for t in (1, 128, 129, 300, 1024)] == [128, 128, 256, 512, 1024]
    assert [static_length(t) for t in (1025, 1280, 1281, 2048, 2049, 4096, 5000, 16383)] == [
        1280, 1280, 1536, 2048, 2560, 4096, 5120, 16384]
    for t in range(1, 20000, 37):
        assert t <= static_length(t) <= max(128, 1.25 * t, 2 * t if t <= 1024 else 0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name,mask", mask_cases(), ids=[c[0] for c in mask_cases()])
def test_static_lengths_pad_and_the_padding_changes_nothing(name, mask, monkeypatch):
    """FLEX_STATIC: self-attention's q, k, v and mask padded to `static_length` (every such case
    here pads), the padded queries dropped: the output equals the twin's; the padded mask is built
    once for every layer, keeps a batch-shared row shared, and a host twin is padded with it; a
    mask of other lengths is refused. Queries against a cache (Tq != Tk) are not padded."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(attention_module, "FLEX_STATIC", True)
    if name == "causal":  # (with a host twin: its padded copy builds the tables)
        mask = AttentionMask(mask.q_pos, mask.k_pos, host=AttentionMask(mask.q_pos.clone(), mask.k_pos.clone()))
    q, k, v, sinks = flex_inputs(mask, seed=1)
    B, Tq, Tk = mask.q_pos.shape[0], mask.q_pos.shape[1], mask.k_pos.shape[1]
    with torch.no_grad():
        flex = _flex_sink_attention(q, k, v, sinks, mask, scale=0.25, compiled=False)
        again = _flex_sink_attention(q, k, v, sinks, mask, scale=0.25, compiled=False)
    assert again.equal(flex) and flex.shape == q.shape
    if Tq != Tk:  # queries against a cache: the dynamic kernel, unpadded
        assert mask._padded is None
    else:
        padded = mask._padded[1]
        assert mask._padded[0] == (static_length(Tq),) * 2 != (Tq, Tk)
        assert padded.block_mask().seq_lengths == mask._padded[0]
        assert (padded.host is None) == (mask.host is None)
        shared = B > 1 and mask.q_pos.stride(0) == 0
        assert (padded.q_pos.stride(0) == 0) == shared  # a batch-shared mask keeps one table row
        with torch.no_grad():
            _flex_sink_attention(q, k, v, sinks, mask, scale=0.25, compiled=False)
        assert mask._padded[1] is padded  # built once for every layer
        with pytest.raises(ValueError, match="the mask is for"):
            _flex_sink_attention(q[:, :-1], k[:, :-1], v[:, :-1], sinks, mask, scale=0.25, compiled=False)
    twin = sink_attention_reference(q, k, v, sinks, mask.dense(), scale=0.25)
    assert rel_err(flex, twin) < 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_static_kernels_in_training_mode_serve_only_calls_under_autograd(monkeypatch):
    """FLEX_STATIC = "training" (the default) pads to a static length under autograd (training
    forwards and their recompute: every layer, even the first, whose q needs no gradient when only
    the experts carry LoRA), not under no_grad (a prefill, a reference policy's forward); True pads
    both, False neither. (Eager flex, the CPU's, has no backward, so q here needs no gradient.)"""
    pytest.importorskip("torch.nn.attention.flex_attention")
    assert attention_module.FLEX_STATIC == "training"
    monkeypatch.setattr(attention_module, "_static_kinds", set())
    sinks = torch.zeros(8)

    def padded(mode, grad_enabled: bool) -> bool:
        monkeypatch.setattr(attention_module, "FLEX_STATIC", mode)
        mask = AttentionMask(torch.arange(300)[None], torch.arange(300)[None])
        q, k = torch.randn(1, 300, 8, 16), torch.randn(1, 300, 2, 16)
        with torch.set_grad_enabled(grad_enabled):
            out = _flex_sink_attention(q, k, k, sinks, mask, scale=0.25, compiled=False)
        assert out.shape == q.shape
        return mask._padded is not None

    assert padded("training", grad_enabled=True)
    assert not padded("training", grad_enabled=False)
    assert padded(True, grad_enabled=False)
    assert not padded(False, grad_enabled=True)
    with pytest.raises(ValueError, match="FLEX_STATIC must be True, False or 'training', got 'train'"):
        padded("train", grad_enabled=True)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_static_kernels_stop_at_their_cap_and_new_kinds_run_unpadded(monkeypatch):
    """Past STATIC_KINDS kinds (dynamo's recompile limit would fall back to eager flex), a new kind
    runs the dynamic kernel, unpadded; kinds already static stay static."""
    monkeypatch.setattr(attention_module, "FLEX_STATIC", True)
    monkeypatch.setattr(attention_module, "_static_kinds", set())
    monkeypatch.setattr(attention_module, "STATIC_KINDS", 1)
    q, k = torch.randn(1, 300, 8, 16), torch.randn(1, 300, 2, 16)
    sinks = torch.zeros(8)
    first, second, third = (AttentionMask(torch.arange(300)[None], torch.arange(300)[None], window=w)
                            for w in (None, 128, None))
    with torch.no_grad():
        for mask in (first, second, third):
            _flex_sink_attention(q, k, k, sinks, mask, scale=0.25, compiled=False)
    assert first._padded is not None and third._padded is not None and second._padded is None
    assert len(attention_module._static_kinds) == 1


def test_sink_rescale_gradients_equal_autograd_of_the_formula():
    """The CUDA path's out * sigmoid(lse - sink) with a hand-written, head-chunked backward."""
    gen = torch.Generator().manual_seed(4)
    out = torch.randn(2, 20, 9, 16, generator=gen, requires_grad=True)
    lse = torch.randn(2, 20, 9, generator=gen, requires_grad=True)
    sinks = torch.randn(20, generator=gen, requires_grad=True)
    grad = torch.randn(2, 20, 9, 16, generator=gen)
    plain = out * torch.sigmoid(lse - sinks[:, None])[..., None]
    plain_grads = torch.autograd.grad(plain, (out, lse, sinks), grad)
    for chunk_elements in (2**26, 8 * 2 * 9 * 16):  # one chunk; chunks of 8, 8 and 4 heads
        ours = _SinkRescale.apply(out, lse, sinks, chunk_elements)
        ours_grads = torch.autograd.grad(ours, (out, lse, sinks), grad)
        torch.testing.assert_close(ours, plain)
        for a, b in zip(ours_grads, plain_grads):
            torch.testing.assert_close(a, b)


def test_sink_attention_on_cpu_is_the_twin_with_the_dense_mask():
    pos, doc = packed_positions([5, 9])
    mask = AttentionMask(pos, pos, window=4, q_doc=doc, k_doc=doc)
    q, k, v = torch.randn(1, 14, 4, 8), torch.randn(1, 14, 2, 8), torch.randn(1, 14, 2, 8)
    sinks = torch.randn(4)
    out = sink_attention(q, k, v, sinks, mask, scale=0.3)
    assert torch.equal(out, sink_attention_reference(q, k, v, sinks, mask.dense(), scale=0.3))


def fill_caches(lengths, capacity, hkv, d, gen, slot_of):
    """Per-sequence keys/values [L, Hkv, D] and slot caches filled one token at a time via append_kv."""
    slots = max(slot_of) + 1
    k_cache = torch.full((slots, capacity, hkv, d), float("nan"))  # unwritten rows must never be read
    v_cache = torch.full((slots, capacity, hkv, d), float("nan"))
    keys = [torch.randn(n, hkv, d, generator=gen) for n in lengths]
    values = [torch.randn(n, hkv, d, generator=gen) for n in lengths]
    for b, n in enumerate(lengths):
        slot = torch.tensor([slot_of[b]])
        for p in range(n):
            append_kv(k_cache, v_cache, keys[b][p:p + 1], values[b][p:p + 1], slot, torch.tensor([p]))
    lens = torch.zeros(slots, dtype=torch.int32)
    lens[torch.tensor(slot_of)] = torch.tensor(lengths, dtype=torch.int32)
    return keys, values, k_cache, v_cache, lens


@pytest.mark.parametrize("window", [None, 16], ids=["full_layer", "ring_layer"])
def test_decode_twin_equals_last_row_of_full_attention(window):
    gen = torch.Generator().manual_seed(1)
    hq, hkv, d = 8, 2, 16
    lengths = [1, 5, 16, 17, 40]  # ragged; with a 16-ring, 17 and 40 wrap around
    slot_of = [3, 0, 4, 1, 5]  # rows map to arbitrary slots
    capacity = window or 48
    keys, values, k_cache, v_cache, lens = fill_caches(lengths, capacity, hkv, d, gen, slot_of)
    q = torch.randn(len(lengths), hq, d, generator=gen)
    sinks = torch.randn(hq, generator=gen)
    out = decode_attention(q, k_cache, v_cache, sinks, torch.tensor(slot_of, dtype=torch.int32), lens, scale=0.25)
    for b, n in enumerate(lengths):
        pos = torch.arange(n).unsqueeze(0)
        allowed = attention_mask(pos[:, -1:], pos, window=window)
        ref = sink_attention_reference(q[b][None, None], keys[b][None], values[b][None], sinks, allowed, scale=0.25)
        torch.testing.assert_close(out[b], ref[0, 0], rtol=1e-5, atol=1e-6)


def test_decode_twin_of_an_empty_slot_is_zero():
    k = torch.randn(2, 8, 1, 16)
    out = decode_attention_reference(torch.randn(2, 4, 16), k, k, torch.randn(4), torch.tensor([0, 1]),
                                     torch.tensor([0, 3], dtype=torch.int32), scale=0.25)
    assert out[0].abs().max() == 0 and out[1].abs().max() > 0


def test_flex_kernel_options_come_from_the_override_then_the_tuned_table(monkeypatch):
    """`attention._kernel_options`: FLEX_KERNEL_OPTIONS (when set) for every call, else FLEX_TUNED's
    entry for the GPU's compute capability, head size and dtype, else None (torch's defaults)."""
    from ossrl.kernels import attention

    q = torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attention, "FLEX_KERNEL_OPTIONS", {})
    monkeypatch.setattr(attention, "FLEX_TUNED", {})
    assert attention._kernel_options(q) is None
    monkeypatch.setattr(attention, "FLEX_TUNED", {((9, 0), 64, torch.bfloat16): {"fwd_BLOCK_M": 64}})
    assert attention._kernel_options(q) == {"fwd_BLOCK_M": 64}
    assert attention._kernel_options(q.float()) is None and attention._kernel_options(q[..., :32]) is None
    monkeypatch.setattr(attention, "FLEX_KERNEL_OPTIONS", {"USE_TMA": True})
    options = attention._kernel_options(q)
    assert options == {"USE_TMA": True}
    options["USE_TMA"] = False  # a copy: the module's dict is not the one torch gets
    assert attention.FLEX_KERNEL_OPTIONS == {"USE_TMA": True}
