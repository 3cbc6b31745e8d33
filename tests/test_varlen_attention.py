"""The varlen sink attention's CPU pieces: its reference equals the packed-mask reference of
`ossrl.kernels.attention` built from document ids, and its argument checks. (The CUDA kernel's
forward and gradients against this reference: tests/test_attention_gpu.py.)"""

import pytest
import torch

from ossrl.kernels.attention import AttentionMask, sink_attention
from ossrl.kernels.varlen_attention import varlen_available, varlen_sink_attention, varlen_sink_attention_reference


@pytest.mark.parametrize("window", [None, 3])
def test_reference_equals_the_packed_document_mask(window):
    lengths = [5, 1, 7]
    N = sum(lengths)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(N, 4, 8, generator=g), torch.randn(N, 2, 8, generator=g), torch.randn(N, 2, 8, generator=g)
    sinks = torch.randn(4, generator=g)
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    expect = sink_attention(q[None], k[None], v[None], sinks, AttentionMask(pos, pos, window, doc, doc), scale=0.3)[0]
    got = varlen_sink_attention_reference(q, k, v, sinks, cu, window=window, scale=0.3)
    torch.testing.assert_close(got, expect)


def test_reference_refuses_offsets_that_do_not_cover_the_tokens():
    x = torch.zeros(6, 2, 8)
    with pytest.raises(ValueError, match="covers 5 tokens, q has 6"):
        varlen_sink_attention_reference(x, x, x, torch.zeros(2), torch.tensor([0, 5], dtype=torch.int32),
                                        window=None, scale=1.0)


def test_cpu_tensors_are_not_served_and_offsets_are_checked():
    x = torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    assert not varlen_available(x)
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        varlen_sink_attention(x, x, x, torch.zeros(2), torch.tensor([0, 4]), 4, window=None, scale=1.0)


def test_document_segments_of_packed_rows():
    from ossrl.kernels.varlen_attention import document_segments

    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 8, 0, 1]])
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 9, 9]])
    cu, longest = document_segments(pos, doc)
    assert cu.tolist() == [0, 3, 5, 6, 10, 12] and cu.dtype == torch.int32 and longest == 4
    cu, longest = document_segments(torch.arange(4).expand(2, 4), None)  # one document a row
    assert cu.tolist() == [0, 4, 8] and longest == 4


@pytest.mark.parametrize("pos,doc", [
    ([[0, 1, 3, 4]], [[0, 0, 0, 0]]),  # a gap inside a document
    ([[0, 1, 0, 0]], [[0, 0, 1, 0]]),  # document 0 in two runs of the row
    ([[0, 0, 1, 2]], None),  # positions restart without documents
])
def test_document_segments_refuse_other_layouts(pos, doc):
    from ossrl.kernels.varlen_attention import document_segments

    assert document_segments(torch.tensor(pos), None if doc is None else torch.tensor(doc)) is None


def test_mask_segments_come_from_the_host_copy_and_skip_branches():
    pos = torch.tensor([[0, 1, 0, 1]])
    doc = torch.tensor([[0, 0, 1, 1]])
    host = AttentionMask(pos, pos, None, doc, doc)
    assert AttentionMask(pos.clone(), pos.clone(), None, doc.clone(), doc.clone(), host=host).segments()[1] == 2
    assert AttentionMask(pos, pos, None, doc, doc).segments() is None  # no host copy: not read back
    branch = torch.tensor([[0, 1, 0, 0]])
    shared = AttentionMask(pos, pos, None, doc, doc, branch, branch)
    assert AttentionMask(pos, pos, None, doc, doc, branch, branch, host=shared).segments() is None
