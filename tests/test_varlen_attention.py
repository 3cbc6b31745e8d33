"""The varlen sink attention's CPU pieces: the packed layouts it serves as `Segments` (documents,
shared prefixes with their keys gathered before each branch) and the refusals, checked by its
segment-by-segment reference against the general mask's reference, and its argument checks. (The
CUDA kernels' forward and gradients: tests/test_attention_gpu.py and tests/test_train_gpu.py.)"""

import pytest
import torch

from ossrl.kernels.attention import AttentionMask, attention_mask, sink_attention_reference
from ossrl.kernels.varlen_attention import Segments, document_segments, varlen_available, varlen_sink_attention, \
    varlen_sink_attention_reference


def _row(*runs):
    """[1, N] positions, documents and branches from (doc, branch, first position, length) runs."""
    pos = torch.cat([torch.arange(p, p + n) for _, _, p, n in runs])[None]
    doc = torch.cat([torch.full((n,), d) for d, _, _, n in runs])[None]
    branch = torch.cat([torch.full((n,), b) for _, b, _, n in runs])[None]
    return pos, doc, branch


LAYOUTS = {
    "documents": [_row((0, 0, 0, 5), (1, 0, 0, 1), (2, 0, 0, 7))],
    "shared_prefix": [_row((0, 0, 0, 4), (1, 0, 0, 3), (1, 1, 3, 4), (1, 2, 3, 1), (1, 3, 3, 5), (2, 0, 0, 2))],
    "branches_without_prefix": [_row((0, 1, 0, 3), (0, 2, 0, 4))],
    "two_rows": [_row((0, 0, 0, 3), (0, 1, 3, 5), (1, 0, 0, 4)), _row((0, 0, 7, 6), (1, 0, 0, 6))],
}


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_segments_give_the_general_mask_attention(layout, window):
    rows = LAYOUTS[layout]
    pos, doc, branch = (torch.cat(t) for t in zip(*rows))
    B, T = pos.shape
    segments = document_segments(pos, doc, branch)
    assert segments is not None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B * T, h, 8, generator=g) for h in (4, 2, 2))
    sinks = torch.randn(4, generator=g)
    allowed = attention_mask(pos, pos, window=window, q_doc=doc, k_doc=doc, q_branch=branch, k_branch=branch)
    expect = sink_attention_reference(q.view(B, T, 4, 8), k.view(B, T, 2, 8), v.view(B, T, 2, 8), sinks, allowed,
                                      scale=0.3).reshape(B * T, 4, 8)
    got = varlen_sink_attention_reference(q, k, v, sinks, segments, window=window, scale=0.3)
    torch.testing.assert_close(got, expect)


def test_segments_of_packed_rows():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 8, 0, 1]])
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 9, 9]])
    s = document_segments(pos, doc)
    assert s.cu_q.tolist() == [0, 3, 5, 6, 10, 12] and s.cu_q.dtype == torch.int32 and s.max_q == s.max_k == 4
    assert s.cu_k is s.cu_q and s.key_index is None
    s = document_segments(torch.arange(4).expand(2, 4), None)  # one document a row
    assert s.cu_q.tolist() == [0, 4, 8]
    s = document_segments(*LAYOUTS["shared_prefix"][0])  # branch keys: the prefix's, then its own
    assert s.cu_q.tolist() == [0, 4, 7, 11, 12, 17, 19] and s.cu_k.tolist() == [0, 4, 7, 14, 18, 26, 28]
    assert s.key_index[7:14].tolist() == [4, 5, 6, 7, 8, 9, 10] and (s.max_q, s.max_k) == (5, 8)


@pytest.mark.parametrize("pos,doc,branch", [
    ([[0, 1, 3, 4]], [[0, 0, 0, 0]], None),  # a gap inside a document
    ([[0, 1, 0, 0]], [[0, 0, 1, 0]], None),  # document 0 in two runs of the row
    ([[0, 0, 1, 2]], None, None),  # positions restart without documents
    ([[0, 1, 3, 4]], [[0, 0, 0, 0]], [[0, 0, 1, 1]]),  # a branch not continuing from its prefix
    ([[0, 1, 2, 0]], [[0, 0, 0, 0]], [[1, 1, 0, 0]]),  # the prefix after a branch
    ([[0, 1, 2, 2, 2]], [[0] * 5], [[0, 0, 1, 2, 1]]),  # branch 1 in two runs
    ([[0, 1, 2, 0, 2]], [[0, 0, 0, 1, 0]], [[0, 0, 1, 0, 2]]),  # with branches, document 0 in two runs
])
def test_other_layouts_are_refused(pos, doc, branch):
    t = [None if x is None else torch.tensor(x) for x in (pos, doc, branch)]
    assert document_segments(*t) is None


def test_mask_segments_are_what_its_creator_gave():
    """AttentionMask.segments: the `varlen` given (segments, or a function called when asked), else
    None; a mask never derives them itself (GptOssModel.forward gives them to forwards without a KV
    cache; the engine's prefills keep FlexAttention)."""
    pos, doc, branch = LAYOUTS["shared_prefix"][0]
    found = document_segments(pos, doc, branch)
    host = AttentionMask(pos, pos, None, doc, doc, branch, branch)
    assert AttentionMask(pos, pos, None, doc, doc, branch, branch, host=host).segments() is None
    assert AttentionMask(pos, pos, None, doc, doc, branch, branch, varlen=found).segments() is found
    calls = []
    lazy = AttentionMask(pos, pos, None, doc, doc, branch, branch, varlen=lambda: calls.append(1) or found)
    assert calls == [] and lazy.segments() is found and calls == [1]


def test_reference_refuses_segments_that_do_not_cover_the_queries():
    x = torch.zeros(6, 2, 8)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="cover 5 queries, q has 6"):
        varlen_sink_attention_reference(x, x, x, torch.zeros(2), Segments(cu, cu, 5, 5), window=None, scale=1.0)


def test_cpu_tensors_are_not_served_and_offsets_are_checked():
    from ossrl.kernels.varlen_attention import varlen_serves

    x = torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    assert not varlen_available(x) and not varlen_serves("cpu", torch.bfloat16, 64)
    cu = torch.tensor([0, 4])
    with pytest.raises(ValueError, match="segments.cu_q must be int32"):
        varlen_sink_attention(x, x, x, torch.zeros(2), Segments(cu, cu, 4, 4), window=None, scale=1.0)


def test_segment_buffers_hold_a_layout_padded_with_empty_segments():
    from ossrl.kernels.varlen_attention import SegmentBuffers

    pos, doc, branch = LAYOUTS["shared_prefix"][0]
    host = document_segments(pos, doc, branch)
    T = pos.shape[1]
    buffers = SegmentBuffers(host.capacity(T), "cpu")
    assert buffers.capacity == host.capacity(T) == (8, T, T, 1024)
    buffers.fill(host)
    s = buffers.segments
    assert s.cu_q.tolist() == [0, 4, 7, 11, 12, 17, 19, 19, 19] and s.cu_k.tolist()[-3:] == [28, 28, 28]
    assert s.key_index[:28].tolist() == host.key_index.tolist() and not s.key_index[28:].any() and s.padded
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(T, h, 8, generator=g) for h in (4, 2, 2))
    sinks = torch.randn(4, generator=g)
    torch.testing.assert_close(varlen_sink_attention_reference(q, k, v, sinks, s, window=3, scale=0.3),
                               varlen_sink_attention_reference(q, k, v, sinks, host, window=3, scale=0.3))
    plain = document_segments(*LAYOUTS["documents"][0][:2])
    assert plain.capacity(13) == (8, 13, 13, 0) and SegmentBuffers(plain.capacity(13), "cpu").segments.key_index is None


def test_captured_buckets_keep_the_varlen_segments(monkeypatch):
    """CapturedLogprobs (graphs off, as on the CPU) with VARLEN_ATTENTION where the kernels serve the
    model (said so here: on the CPU they do not): a bucket's key carries the layout's segment
    capacity and its buffers the padded batch's segments, passed to the model; where they do not
    serve it, no segments are made."""
    from ossrl.kernels import attention
    from ossrl.model.lora import LoRAConfig, apply_lora
    from ossrl.testing import random_model, tiny_config
    from ossrl.train import graphed
    from ossrl.train.graphed import CapturedLogprobs
    from ossrl.train.logprobs import pack_sequences

    monkeypatch.setattr(attention, "VARLEN_ATTENTION", True)
    model = random_model(tiny_config(num_hidden_layers=2), seed=0)
    apply_lora(model, LoRAConfig(r=4, seed=0))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 200, (20,), generator=g).tolist()
    seqs = [prompt + torch.randint(0, 200, (n,), generator=g).tolist() for n in (30, 12, 25)]
    batch = pack_sequences(seqs, [[j >= 20 for j in range(len(s))] for s in seqs], max_tokens=256,
                           share_prefixes=True).to("cpu")
    assert CapturedLogprobs(model, graphs=False)._segments(batch) is None  # (a CPU model: not served)
    monkeypatch.setattr(graphed, "varlen_serves", lambda *a: True)
    captured = CapturedLogprobs(model, graphs=False)
    seen = []
    real = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda *a, **kw: seen.append(kw.get("segments")) or real(*a, **kw))
    for _ in range(2):
        captured.zero_grad()
        lp, _ = captured(batch)
        lp.sum().backward()
    (bucket,) = captured._buckets.values()
    # (the padding document, 935 tokens, is a segment of its own)
    assert captured.bucket_count == 1 and bucket.key[-1] == (8, 1024, 1024, 2048)
    assert seen[0] is None and seen[-1] is bucket.segments.segments  # eager first call: from the host copies
    cu = bucket.segments.segments.cu_q
    assert cu.tolist() == [0, 19, 50, 63, 89, 1024, 1024, 1024, 1024]  # prefix, 3 branches, padding, empty


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="branch ids need document ids"):
        document_segments(torch.tensor([[0, 1, 2, 2]]), None, torch.tensor([[0, 0, 1, 2]]))
    from ossrl.kernels.varlen_attention import _window_sizes

    with pytest.raises(ValueError, match="at least the query itself, got 0"):
        _window_sizes(0)
