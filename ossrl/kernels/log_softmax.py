"""Fused log-softmax statistics of logit rows for the chunked log-probs (Triton, CUDA).

`ossrl.train.logprobs` computes each chunk's logits z = h W^T ([rows, vocab], the model's dtype)
and needs, per row, the target's log-prob and the entropy at temperature t, and in the backward
the gradient with respect to z. In PyTorch that is a dozen passes over a [rows, vocab] fp32 buffer
(the cast, log_softmax, exp, the entropy's product and sum, then in the backward the recomputed
log_softmax and six in-place passes): about 150 bytes moved per logit, at 201,088 logits a token.
Here it is one read of the logits forward and one read and one write backward (4 to 6 bytes a
logit), in fp32 inside like the PyTorch code:

    row_stats(z, targets, t)          -> log p(target), entropy, logsumexp   (y = z / t)
    softmax_grad_(z, targets, lse, entropy, g_logp, g_entropy, t)
        z <- (g_logp * (onehot(target) - p) - g_entropy * p * (log p + H)) / t   (in place)

The forward is an online softmax per row (each lane keeps its running max, sum of exp and sum of
exp * y; the lanes combine at the end), so H = lse - sum(p y) needs no second pass. The PyTorch
code in `ossrl.train.logprobs` is the reference (and the CPU path); the interpreter tests and the
GPU tests compare the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

STATS_BLOCK = 2048  # logits per lane-vector step of the forward (8 warps: 8 per thread)
GRAD_BLOCK = 4096  # logits per program of the backward


@triton.jit
def _row_stats_kernel(Z, Targets, LogP, Ent, Lse, V, stride_z, temperature,
                      WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = Z + row.to(tl.int64) * stride_z
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)  # each lane's running max, sum of exp, sum of exp * y
    s = tl.zeros([BLOCK], tl.float32)
    w = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + cols
        mask = idx < V
        y = tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, y)
        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))  # (a lane with nothing yet)
        e = tl.where(mask, tl.exp(y - m_new), 0.0)
        s = s * alpha + e
        if WITH_ENTROPY:
            w = w * alpha + e * tl.where(mask, y, 0.0)  # (masked lanes: e = 0, y = -inf)
        m = m_new
    top = tl.max(m, 0)
    scale = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
    total = tl.sum(s * scale, 0)
    lse = top + tl.log(total)
    target = tl.load(Targets + row)
    y_target = tl.load(base + target).to(tl.float32) / temperature
    tl.store(LogP + row, y_target - lse)
    tl.store(Lse + row, lse)
    if WITH_ENTROPY:
        tl.store(Ent + row, lse - tl.sum(w * scale, 0) / total)


@triton.jit
def _softmax_grad_kernel(Z, Targets, Lse, Ent, GLogP, GEnt, V, stride_z, temperature,
                         WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < V
    ptr = Z + row.to(tl.int64) * stride_z + idx
    y = tl.load(ptr, mask=mask, other=0.0).to(tl.float32) / temperature
    logp = y - tl.load(Lse + row)
    p = tl.exp(logp)
    g_logp = tl.load(GLogP + row)
    g = -g_logp * p  # d log p(target) / d y_j = onehot_j - p_j
    g = tl.where(idx == tl.load(Targets + row), g + g_logp, g)
    if WITH_ENTROPY:  # H = -sum p log p:  dH / dy_j = -p_j (log p_j + H)
        g -= tl.load(GEnt + row) * p * (logp + tl.load(Ent + row))
    tl.store(ptr, (g / temperature).to(Z.dtype.element_ty), mask=mask)


def _check(z: torch.Tensor, targets: torch.Tensor) -> None:
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"logits must be [rows, vocab] with unit column stride, got {tuple(z.shape)} "
                         f"strides {z.stride()}")
    if targets.shape != (z.shape[0],):
        raise ValueError(f"targets must be [{z.shape[0]}], got {tuple(targets.shape)}")


def row_stats(z: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """z [rows, V] logits, targets [rows] -> (log p(target), entropy or an empty tensor, logsumexp),
    each fp32 [rows], of softmax(z / temperature) computed in fp32."""
    _check(z, targets)
    rows, V = z.shape
    logp = torch.empty(rows, device=z.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty(rows if with_entropy else 0, device=z.device, dtype=torch.float32)
    if rows:
        _row_stats_kernel[(rows,)](z, targets, logp, ent if with_entropy else logp, lse, V, z.stride(0),
                                   float(temperature), WITH_ENTROPY=with_entropy, BLOCK=STATS_BLOCK, num_warps=8)
    return logp, ent, lse


def softmax_grad_(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
                  grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Overwrite z [rows, V] (the logits the stats came from) with the gradient of
    sum(grad_logp * log p(target) + grad_entropy * H) with respect to z, in z's dtype; returns z.
    `grad_entropy` None (or `entropy` None): the entropy term is left out."""
    _check(z, targets)
    rows, V = z.shape
    with_entropy = grad_entropy is not None and entropy is not None and entropy.numel() > 0
    if rows:
        grid = (rows, triton.cdiv(V, GRAD_BLOCK))
        _softmax_grad_kernel[grid](z, targets, lse, entropy if with_entropy else lse, grad_logp,
                                   grad_entropy if with_entropy else grad_logp, V, z.stride(0), float(temperature),
                                   WITH_ENTROPY=with_entropy, BLOCK=GRAD_BLOCK, num_warps=8)
    return z
