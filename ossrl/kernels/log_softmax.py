"""Fused log-softmax statistics of logit rows for the chunked log-probs (Triton, CUDA).

`ossrl.train.logprobs` computes each chunk's logits z = h W^T ([rows, vocab], the model's dtype)
and needs, per row, the target's log-prob and the entropy at temperature t, and in the backward
the gradient with respect to z. In PyTorch that is a dozen passes over a [rows, vocab] fp32 buffer
(the cast, log_softmax, exp, the entropy's product and sum, then in the backward the recomputed
log_softmax and six in-place passes): about 150 bytes moved per logit, at 201,088 logits a token.
Here it is one read of the logits forward and one read and one write backward (4 to 6 bytes a
logit), in fp32 inside like the PyTorch code:

    row_stats(z, targets, t)          -> log p(target), entropy, row max, log of the shifted sum
    softmax_grad_(z, targets, top, log_total, entropy, g_logp, g_entropy, t)
        z <- (g_logp * (onehot(target) - p) - g_entropy * p * (log p + H)) / t   (in place)

with y = z / t, log p = (y - top) - log_total (top: the row's max). The forward is an online
softmax per row: each lane keeps its running max, sum of exp(y - max) and sum of exp(y - max) *
(y - max), rebased when its max moves, and the lanes combine at the end; so H = log_total -
sum(p (y - top)) needs no second pass, and every difference is taken against the max (confident
rows keep the precision PyTorch's log_softmax has: a logsumexp-based log p would lose |lse| x 6e-8
to rounding, against 1 - p of order 1e-4 for a near-certain target). -inf logits are visible to
nobody, as in PyTorch. The PyTorch code in `ossrl.train.logprobs` is the reference (and the CPU
path); the interpreter tests and the GPU tests compare the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

STATS_BLOCK = 2048  # logits per lane-vector step of the forward (8 warps: 8 per thread)
GRAD_BLOCK = 4096  # logits per program of the backward


@triton.jit
def _row_stats_kernel(Z, Targets, LogP, Ent, Top, LogTotal, V, stride_z, temperature,
                      WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = Z + row.to(tl.int64) * stride_z
    cols = tl.arange(0, BLOCK)
    # per lane: the running max m, the sum of exp(y - m) and the sum of exp(y - m) (y - m)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    w = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + cols
        y = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, y)
        live = m_new > float("-inf")  # (a lane that has seen only -inf holds nothing yet)
        alpha = tl.where(live, tl.exp(m - m_new), 0.0)
        e = tl.where(live, tl.exp(y - m_new), 0.0)
        if WITH_ENTROPY:
            w = tl.where(m > float("-inf"), alpha * (w + s * (m - m_new)), 0.0) + tl.where(e > 0, e * (y - m_new), 0.0)
        s = s * alpha + e
        m = m_new
    top = tl.max(m, 0)
    held = m > float("-inf")
    scale = tl.where(held, tl.exp(m - top), 0.0)
    total = tl.sum(s * scale, 0)
    log_total = tl.log(total)
    target = tl.load(Targets + row)
    y_target = tl.load(base + target).to(tl.float32) / temperature
    tl.store(LogP + row, (y_target - top) - log_total)
    tl.store(Top + row, top)
    tl.store(LogTotal + row, log_total)
    if WITH_ENTROPY:
        shifted = tl.sum(tl.where(held, scale * (w + s * (m - top)), 0.0), 0)  # sum exp(y - top) (y - top)
        tl.store(Ent + row, log_total - shifted / total)


@triton.jit
def _softmax_grad_kernel(Z, Targets, Top, LogTotal, Ent, GLogP, GEnt, V, stride_z, temperature,
                         WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < V
    ptr = Z + row.to(tl.int64) * stride_z + idx
    y = tl.load(ptr, mask=mask, other=0.0).to(tl.float32) / temperature
    logp = (y - tl.load(Top + row)) - tl.load(LogTotal + row)
    p = tl.exp(logp)
    g_logp = tl.load(GLogP + row)
    g = -g_logp * p  # d log p(target) / d y_j = onehot_j - p_j
    g = tl.where(idx == tl.load(Targets + row), g + g_logp, g)
    if WITH_ENTROPY:  # H = -sum p log p:  dH / dy_j = -p_j (log p_j + H); 0 where p_j = 0 (y_j = -inf)
        g -= tl.load(GEnt + row) * tl.where(p > 0, p * (logp + tl.load(Ent + row)), 0.0)
    tl.store(ptr, (g / temperature).to(Z.dtype.element_ty), mask=mask)


def _check(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The targets as the kernels read them (contiguous), after checking the shapes."""
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"logits must be [rows, vocab] with unit column stride, got {tuple(z.shape)} "
                         f"strides {z.stride()}")
    if targets.shape != (z.shape[0],) or targets.device != z.device:
        raise ValueError(f"targets must be [{z.shape[0]}] on {z.device}, "
                         f"got {tuple(targets.shape)} on {targets.device}")
    return targets.contiguous()


def row_stats(z: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """z [rows, V] logits, targets [rows] (each in [0, V): not checked here, a read) -> (log
    p(target), entropy or an empty tensor, row max, log of the shifted sum), each fp32 [rows], of
    softmax(z / temperature) computed in fp32. The last two are what `softmax_grad_` takes."""
    targets = _check(z, targets)
    rows, V = z.shape
    logp = torch.empty(rows, device=z.device, dtype=torch.float32)
    top, log_total = torch.empty_like(logp), torch.empty_like(logp)
    ent = torch.empty(rows if with_entropy else 0, device=z.device, dtype=torch.float32)
    if rows:
        _row_stats_kernel[(rows,)](z, targets, logp, ent if with_entropy else logp, top, log_total, V, z.stride(0),
                                   float(temperature), WITH_ENTROPY=with_entropy, BLOCK=STATS_BLOCK, num_warps=8)
    return logp, ent, top, log_total


def softmax_grad_(z: torch.Tensor, targets: torch.Tensor, top: torch.Tensor, log_total: torch.Tensor,
                  entropy: torch.Tensor | None, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
                  temperature: float) -> torch.Tensor:
    """Overwrite z [rows, V] (the logits `row_stats` read) with the gradient of
    sum(grad_logp * log p(target) + grad_entropy * H) with respect to z, in z's dtype; returns z.
    `grad_entropy` None: no entropy term (then `entropy` may be None)."""
    targets = _check(z, targets)
    rows, V = z.shape
    with_entropy = grad_entropy is not None
    if with_entropy and (entropy is None or entropy.shape != (rows,)):
        raise ValueError("softmax_grad_: a gradient for the entropy needs the entropy row_stats returned")
    if rows:
        grid = (rows, triton.cdiv(V, GRAD_BLOCK))
        _softmax_grad_kernel[grid](z, targets, top, log_total, entropy if with_entropy else top,
                                   grad_logp.contiguous(), grad_entropy.contiguous() if with_entropy else top,
                                   V, z.stride(0), float(temperature),
                                   WITH_ENTROPY=with_entropy, BLOCK=GRAD_BLOCK, num_warps=8)
    return z
