"""GRPO-family policy losses as plain functions of [B, T] tensors (TRL's documented formulas).

Per token, with ratio r = exp(logp - old_logp) and advantage A of the sequence:

    per_token = -min(r' * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A)  [+ beta * KL_k3]
    r'        = r, or min(r, delta) with two-sided clipping (`delta`, INTELLECT-2)
    KL_k3     = exp(ref - logp) - (ref - logp) - 1
    cispo     per_token = -sg(min(r, epsilon_high)) * A * logp   [+ beta * KL_k3]
              (MiniMax-M1's clipped importance weight, stop-gradient; epsilon_high is the weight's
              cap itself, as in TRL: its docs recommend 5.0)
    sapo      per_token = -sigmoid(tau * (r - 1)) * 4 / tau * A   [+ beta * KL_k3]
              (a soft gate in place of the clip; tau = sapo_temperature_pos where A > 0, else
              sapo_temperature_neg; at r = 1 its gradient is the plain policy gradient's)

`entropy_mask` ([B, T], the `top_entropy_quantile` rule of "Beyond the 80/20 Rule", see
`high_entropy_mask`) keeps the policy term only on the tokens it marks; the KL term stays on every
token.

Normalisation by loss_type (mask m, B sequences):
    grpo     mean over sequences of (sum_t per_token * m / sum_t m)
    bnpo     sum(per_token * m) / sum(m)                     (this batch's tokens)
    dapo     sum(per_token * m) / num_items_in_batch           (tokens of the whole generation batch;
                                                                defaults to this batch's)
    cispo    as dapo
    sapo     as grpo
    dr_grpo  sum(per_token * m) / (B * max_completion_length)
    gspo     grpo's normalisation with a sequence-level ratio
             r_i = exp(sum_t m (logp - old) / sum_t m), the same for every token of sequence i

`importance_weights` ([B, T] or [B, 1], no gradient) multiply the per-token loss: the truncated
importance-sampling correction between the rollout engine's sampling distribution and the trainer.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "sapo")
TOKEN_SUM_LOSSES = ("dapo", "cispo")  # normalised by the generation batch's tokens, not per micro-batch


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "grpo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    importance_weights: torch.Tensor | None = None,
    num_items_in_batch: int | float | None = None,
    delta: float | None = None,
    entropy_mask: torch.Tensor | None = None,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logprobs (with grad), old_logprobs, ref_logprobs, mask, entropy_mask: [B, T]; advantages: [B].
    Returns (scalar loss, metrics: kl, clip ratios, ratio stats). The metrics are 0-dim tensors on
    the loss's device: reading one (`float`) waits for the device, so a training loop reads them once
    its backward is queued."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    if loss_type == "cispo" and epsilon_high is None:
        raise ValueError("loss_type 'cispo' caps the importance weight at epsilon_high; give it (TRL recommends 5.0)")
    if loss_type == "sapo" and not min(sapo_temperatures) > 0:
        raise ValueError(f"sapo_temperatures (positive, negative advantages) must be positive, got {sapo_temperatures}")
    if delta is not None and (loss_type in ("cispo", "sapo") or not delta > 1):
        raise ValueError(f"delta (two-sided clipping) needs a clipped loss and a value above 1, got {delta!r} "
                         f"with loss_type {loss_type!r}")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logprobs.dtype)
    tokens_per_seq = mask.sum(-1).clamp(min=1.0)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)  # [B, 1]

    log_ratio = logprobs - old_logprobs
    if loss_type == "gspo":
        log_ratio = ((log_ratio * mask).sum(-1) / tokens_per_seq).unsqueeze(-1)  # [B, 1]
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=eps_high).detach() * adv * logprobs
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperatures[0], sapo_temperatures[1]).to(ratio.dtype)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * (4.0 / tau) * adv
    else:
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token = -torch.min(unclipped * adv, clipped * adv)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask.to(per_token.dtype)
    if importance_weights is not None:
        per_token = per_token * importance_weights.detach()
    kl = None
    if beta > 0:
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    per_token = per_token.expand_as(mask)

    if loss_type in ("grpo", "gspo", "sapo"):
        loss = ((per_token * mask).sum(-1) / tokens_per_seq).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type in TOKEN_SUM_LOSSES:
        denom = mask.sum() if num_items_in_batch is None else torch.as_tensor(float(num_items_in_batch))
        loss = (per_token * mask).sum() / denom.clamp(min=1.0)
    else:  # dr_grpo
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        loss = (per_token * mask).sum() / (mask.shape[0] * max_completion_length)

    with torch.no_grad():
        r = ratio.expand_as(mask)
        if loss_type == "cispo":  # the weight's cap reached where it limits an increase (TRL's count)
            low = torch.zeros_like(mask)
            high = ((r > eps_high) & (adv > 0)).to(mask.dtype)
        elif loss_type == "sapo":  # (no clip: a soft gate)
            low = high = torch.zeros_like(mask)
        else:
            low = ((r < 1 - eps_low) & (adv < 0)).to(mask.dtype)
            high = ((r > 1 + eps_high) & (adv > 0)).to(mask.dtype)
        n = mask.sum().clamp(min=1.0)
        metrics = {
            "clip_ratio/low_mean": (low * mask).sum() / n,
            "clip_ratio/high_mean": (high * mask).sum() / n,
            "clip_ratio/region_mean": ((low + high) * mask).sum() / n,
            "ratio/mean": (r * mask).sum() / n,
        }
        if kl is not None:
            metrics["kl"] = (kl.expand_as(mask) * mask).sum() / n
        if entropy_mask is not None:
            metrics["entropy_mask/kept_fraction"] = (entropy_mask.to(mask.dtype) * mask).sum() / n
    return loss, metrics


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """TRL's `top_entropy_quantile` rule ("Beyond the 80/20 Rule"): True on the trained tokens (mask
    > 0) whose entropy is at least the (1 - top_quantile) quantile of the trained tokens' entropies
    (torch.quantile, linear interpolation), so about the top `top_quantile` of them; 1.0 keeps every
    trained token, 0.0 only the highest. entropy, mask: [B, T] -> bool [B, T]."""
    if not 0.0 <= top_quantile <= 1.0:
        raise ValueError(f"top_quantile must be in [0, 1], got {top_quantile}")
    valid = mask > 0
    # (the untrained tokens as NaN, which nanquantile leaves out: no selection whose size the host
    # would read back; with no trained token the threshold is NaN and nothing is kept)
    values = torch.where(valid, entropy.float(), float("nan"))
    threshold = torch.nanquantile(values.flatten(), 1.0 - top_quantile)
    return (entropy.float() >= threshold) & valid


def group_advantages(rewards: torch.Tensor, num_generations: int, *, scale_rewards: str = "group",
                     eps: float = 1e-4, batch_std: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [P * G] (groups contiguous) -> (advantages [P * G], per-group std [P]).

    A = r - mean(group); divided by the group's std ("group"), the whole batch's std ("batch";
    `batch_std` overrides it, e.g. the std over every data-parallel rank's rewards), or not at all
    ("none", Dr. GRPO), plus eps.
    """
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)
    centred = grouped - grouped.mean(-1, keepdim=True)
    group_std = grouped.std(-1) if num_generations > 1 else torch.zeros(grouped.shape[0])
    if scale_rewards == "group":
        centred = centred / (group_std.unsqueeze(-1) + eps)
    elif scale_rewards == "batch":
        std = batch_std if batch_std is not None else (float(rewards.std()) if rewards.numel() > 1 else 0.0)
        centred = centred / (std + eps)
    return centred.reshape(-1), group_std


def importance_sampling_weights(trainer_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor,
                                mask: torch.Tensor, *, level: str = "token", cap: float = 2.0) -> torch.Tensor:
    """Truncated importance weights min(pi_trainer / pi_sampler, cap), token level [B, T] or
    sequence level [B, 1] (product of token ratios over the completion)."""
    if level not in ("token", "sequence"):
        raise ValueError(f"importance sampling level must be 'token' or 'sequence', got {level!r}")
    log_ratio = (trainer_logprobs - sampling_logprobs) * mask
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True)
    return torch.exp(log_ratio).clamp(max=cap)
