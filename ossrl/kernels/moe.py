"""Routed mixture-of-experts: routing and the plain-PyTorch expert loop (CPU path and oracle).

Routing is top-k on the raw (biased) router logits, then a softmax over the k selected values
only (spec 2.4). Each token's output is the routing-weighted sum of its k experts' outputs, each
expert's down bias included (spec 2.5). The loop below visits only experts that received tokens:
it never computes an expert for a token that was not routed to it.
"""

from __future__ import annotations

from typing import Callable

import torch


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, E] logits -> (weights [N, k] in the logits' dtype, expert ids [N, k]), top-k then softmax."""
    values, ids = torch.topk(router_logits, k, dim=-1)
    weights = torch.softmax(values, dim=-1, dtype=values.dtype)
    return weights, ids


def clamped_swiglu(gate_up: torch.Tensor, *, limit: float, alpha: float) -> torch.Tensor:
    """[..., 2I] interleaved (even = gate, odd = up) -> [..., I]: gate*sigmoid(alpha*gate)*(up+1)."""
    gate = gate_up[..., 0::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1)


def routed_experts_reference(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: Callable[[int, torch.Tensor], torch.Tensor],
    down: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    limit: float,
    alpha: float,
) -> torch.Tensor:
    """x [N, H]; weights, ids [N, k]. `gate_up(e, x_e)` returns x_e @ W1_e + b1_e ([n, 2I]) and
    `down(e, a_e)` returns a_e @ W2_e + b2_e ([n, H]); the caller owns the weight format
    (dense or MXFP4) and any LoRA. Returns [N, H] in x's dtype."""
    out = torch.zeros_like(x)
    num_experts_hit = torch.bincount(ids.flatten(), minlength=1)
    for e in torch.nonzero(num_experts_hit).flatten().tolist():
        token_idx, slot = torch.nonzero(ids == e, as_tuple=True)
        a = clamped_swiglu(gate_up(e, x[token_idx]), limit=limit, alpha=alpha)
        y = down(e, a) * weights[token_idx, slot].unsqueeze(-1)
        out.index_add_(0, token_idx, y.to(x.dtype))
    return out
