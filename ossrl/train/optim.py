"""Optimizer, learning-rate schedules and loss scaling for the trainable (LoRA, or all) parameters.

AdamW (fused on CUDA when every parameter is there; with `offload=True` its states in CPU memory,
`ossrl.train.offloaded_adamw`), global-norm gradient clipping, the schedules
TRL users know (constant, linear decay, cosine decay, each with linear warmup), and dynamic loss
scaling for the fp16 compute mode. `optimizer_step` is the one place a training loop goes from
gradients to updated weights: unscale, clip, step (or skip on overflow), advance the schedule.
"""

from __future__ import annotations

import math

import torch

from ossrl.model.sharded import whole_tensor
from ossrl.train.offloaded_adamw import OffloadedAdamW

SCHEDULES = ("constant", "linear", "cosine")


def make_optimizer(params, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                   eps: float = 1e-8, offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over the parameters that require gradients. offload: its two states (8 bytes per
    fp32 parameter) in CPU memory, streamed through the GPU at each step (OffloadedAdamW)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: apply LoRA or enable full fine-tuning first")
    if offload:
        return OffloadedAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
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
        norm = torch.nn.utils.get_total_norm([p.grad.detach() for p in params])
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(whole_tensor(norm))  # a sharded model's norm is a DTensor over the ranks


def make_loss_scaler(model, *, init_scale: float = 2.0 ** 16) -> torch.amp.GradScaler:
    """Dynamic loss scaling when the model computes in fp16; a disabled (pass-through) scaler for
    bf16 and fp32, which changes no number and costs nothing.

    Why fp16 needs it: with outliers like gpt-oss's the residual stream is large, its RMSNorms shrink
    the gradients entering each block into or below fp16's subnormal range (a tiny model with 2^15
    outliers, mean loss: LoRA gradients 87-113% off fp32 unscaled, 0.3-0.5% scaled; docs/notes.md).
    The scale starts at 2^16, halves on an overflow and doubles after 2,000 clean steps (torch's
    defaults: an overflow costs one skipped step, a scale one halving lower than needed costs one
    bit at the bottom of fp16's range). An overflowing step logs its gradient norm as inf or NaN.
    """
    return torch.amp.GradScaler(model.device.type, init_scale=init_scale,
                                enabled=model.dtype == torch.float16)


def optimizer_step(optimizer, scheduler, scaler: torch.amp.GradScaler, params, max_grad_norm: float | None) -> dict:
    """Unscale the gradients, clip them, step the optimizer (skipped if any gradient is inf or NaN)
    and advance the schedule. Call after any data-parallel all-reduce: that is a sum, so an inf or
    NaN on one rank is one on every rank, and all ranks skip together with the same scale.

    Returns {"grad_norm": the unscaled norm before clipping} and, with loss scaling on,
    "loss_scale" (the scale this step's backward used) and "overflow" (1: the step was skipped and
    the scale halved). The schedule advances on a skipped step too, as on GRPO's steps without a
    learning signal: the learning rate at step N depends on N alone and the run ends on schedule.
    """
    scaler.unscale_(optimizer)
    grad_norm = clip_gradients(params, max_grad_norm)
    if not scaler.is_enabled():
        optimizer.step()
        scheduler.step()
        return {"grad_norm": grad_norm}
    scale = scaler.get_scale()
    scaler.step(optimizer)  # skips optimizer.step() when unscale_ found an inf or NaN
    scaler.update()
    scheduler.step()
    return {"grad_norm": grad_norm, "loss_scale": scale, "overflow": int(scaler.get_scale() < scale)}
