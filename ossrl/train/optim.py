"""Optimizer and learning-rate schedules for the trainable (LoRA, or all) parameters.

AdamW (fused on CUDA when every parameter is there), global-norm gradient clipping, and the
schedules TRL users know: constant, linear decay, cosine decay, each with linear warmup.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "linear", "cosine")


def make_optimizer(params, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                   eps: float = 1e-8) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: apply LoRA or enable full fine-tuning first")
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                             fused=fused or None)


def lr_factor(step: int, *, kind: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {kind!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, *, kind: str = "constant", warmup_steps: int = 0, total_steps: int = 1):
    lr_factor(0, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps)  # validate early
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps))


def clip_gradients(params, max_norm: float | None) -> float:
    """Clip to max_norm (None or <= 0: no clipping); returns the total norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None or max_norm <= 0:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
