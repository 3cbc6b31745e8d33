"""Attention with per-head sinks: the plain-PyTorch reference (CPU path and test oracle).

gpt-oss appends one learned logit per query head (the "sink") to every softmax row; it has no
value vector, so each row's weights sum to less than one (spec 2.3 item 6). Equivalently,
`out = softmax_attention(q, k, v) * sigmoid(lse - sink)`, which is what the GPU kernels use.

Which keys a query sees is described by positions, not by a fixed triangle, so one mask builder
serves training on packed sequences (document ids, positions restarting per document), prefill
that appends to a cache (query positions offset), and decode (one query per row):

    key j is visible to query i  iff  doc[i] == doc[j]  and  k_pos[j] <= q_pos[i]
                                      and (window is None or q_pos[i] - k_pos[j] < window)

The window counts the query itself: a 128-window sees the current token and 127 before it.
"""

from __future__ import annotations

import torch


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    window: int | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    k_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean visibility [B, Tq, Tk] from positions [B, Tq], [B, Tk] (and optional doc ids)."""
    qp = q_pos.unsqueeze(-1)
    kp = k_pos.unsqueeze(-2)
    allowed = kp <= qp
    if window is not None:
        allowed = allowed & (qp - kp < window)
    if q_doc is not None and k_doc is not None:
        allowed = allowed & (q_doc.unsqueeze(-1) == k_doc.unsqueeze(-2))
    if k_valid is not None:
        allowed = allowed & k_valid.unsqueeze(-2)
    return allowed


def sink_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    allowed: torch.Tensor,
    *,
    scale: float,
) -> torch.Tensor:
    """Exact sink attention in fp32 with an explicit sink column.

    q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D] with Hq a multiple of Hkv (query head h uses KV head
    h // (Hq/Hkv)); sinks [Hq]; allowed bool [B, Tq, Tk]. Returns [B, Tq, Hq, D] in q's dtype.
    A row with no visible key returns zeros (only the sink is left), never NaN.
    """
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    qf = q.float().view(B, Tq, Hkv, G, D)
    kf = k.float()
    vf = v.float()
    # [B, Hkv, G, Tq, Tk]
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qf, kf) * scale
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    sink = sinks.float().view(1, Hkv, G, 1, 1).expand(B, Hkv, G, Tq, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, vf)
    return out.reshape(B, Tq, Hq, D).to(q.dtype)


def sink_attention(q, k, v, sinks, allowed, *, scale):
    """The model's one attention entry point. The GPU kernels plug in here (issue: GPU attention)."""
    return sink_attention_reference(q, k, v, sinks, allowed, scale=scale)
