"""The optimisation phase of a GRPO step: packed sequences, old/reference log-probs, the policy loss.

`optimise_policy` takes a step's rollouts and advantages and runs `num_iterations` optimiser steps
over them in `gradient_accumulation_steps` micro-batches. Log-probs come from the chunked lm_head
on packed sequences (ossrl.train.logprobs); `_unflatten` turns a pack's flat per-target values
back into the [B, T] layout `policy_loss` takes.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.profiler import record_function

from ossrl.kernels.attention import flex_supported
from ossrl.kernels.transfer import host_to_device
from ossrl.train.distributed import DistContext, micro_batch_rng
from ossrl.train.graphed import CapturedLogprobs
from ossrl.rl.loss import TOKEN_SUM_LOSSES, high_entropy_mask, importance_sampling_weights, policy_loss
from ossrl.train.logprobs import pack_sequences, sequence_logprobs
from ossrl.train.memory import with_checkpointing_fallback
from ossrl.train.optim import optimizer_step


def optimise_policy(model, optimizer, scheduler, params, config, rollouts, advantages: torch.Tensor,
                    dist: DistContext | None = None, scaler: torch.amp.GradScaler | None = None,
                    captured: CapturedLogprobs | None = None) -> dict:
    """rollouts: objects with prompt_ids, completion_ids, sampling_logprobs, finish_reason;
    advantages [len(rollouts)]. Returns the phase's metrics (means over micro-batches).

    Under data parallelism (`dist`), this rank's micro-batches are W-th of the global ones: losses
    use the global normalisers and the gradients are summed across ranks before the step.
    `scaler` (ossrl.train.optim.make_loss_scaler; None: no loss scaling) scales the losses in the
    fp16 mode; the metrics then hold `loss_scale` and `overflow_steps` (optimizer steps skipped).
    `captured` (ossrl.train.graphed): the training forwards and backwards replayed from CUDA graphs;
    it owns the gradients' buffers.
    """
    c = config
    dist = dist or DistContext()
    scaler = scaler if scaler is not None else torch.amp.GradScaler(model.device.type, enabled=False)
    n = len(rollouts)
    size = -(-n // c.gradient_accumulation_steps)  # micro-batches of at most this many completions
    chunks = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    max_tokens = c.max_prompt_length + c.max_completion_length
    pad_to = 256 if model.device.type == "cuda" else 1  # a few shapes for compiled FlexAttention
    flex_path = model.device.type == "cuda" and flex_supported(model.config.head_dim)  # else the dense twin
    packs, masks_out = [], []
    for chunk in chunks:
        seqs, trained = [], []
        for i in chunk:
            r = rollouts[i]
            train_this = not (c.mask_truncated_completions and r.finish_reason == "length")
            seqs.append(r.prompt_ids + r.completion_ids)
            trained.append([False] * len(r.prompt_ids) + [train_this] * len(r.completion_ids))
        # A prompt's completions share its tokens: the prompt is forwarded once for all of them
        # (ossrl.train.logprobs.pack_sequences). On CUDA the micro-batch is one row (FlexAttention
        # skips the blocks documents hide, so a long row costs no more), making room for whole groups;
        # the CPU twin's dense attention is quadratic in the row, so there rows stay max_tokens long
        # (the demo's micro-batch: 5.3 s as one row against 1.8 s in rows of 1,152).
        row = max_tokens
        if flex_path:
            row = max(max_tokens, -(-sum(len(q) for q in seqs) // pad_to) * pad_to)  # rounded: few flex shapes
        packs.append(pack_sequences(seqs, trained, max_tokens=row, pad_to=pad_to,
                                    share_prefixes=True).to(model.device))
        masks_out.append(trained)
    completion_len = [len(r.completion_ids) for r in rollouts]
    total_tokens = sum(sum(t[len(rollouts[i].prompt_ids):]) for chunk, tr in zip(chunks, masks_out)
                       for i, t in zip(chunk, tr))
    total_tokens = dist.sum(total_tokens)  # dapo and cispo normalise by the whole generation batch's tokens
    global_chunks = len(chunks) * dist.world_size
    # Each micro-batch's advantages and sampling log-probs, built on the host and copied without
    # waiting: the micro-batches below read nothing back from the device, the first read being the
    # optimizer step's gradient norm (a copy from pageable memory, or a value read for a metric,
    # would wait for every queued kernel and leave the device idle while the host queued the next
    # ones).
    chunk_advantages = [host_to_device(advantages[chunk].cpu(), model.device) for chunk in chunks]
    chunk_sampling = []
    if c.importance_sampling_correction:
        for chunk in chunks:
            samp = torch.zeros(len(chunk), max(max(completion_len[i] for i in chunk), 1))
            for row, i in enumerate(chunk):
                samp[row, :completion_len[i]] = torch.tensor(rollouts[i].sampling_logprobs, dtype=samp.dtype)
            chunk_sampling.append(host_to_device(samp, model.device))

    # The policy as it sampled: no dropout. With one optimisation pass and no LoRA dropout it
    # equals the training pass's own log-probs, and no extra forward is run.
    dropout = getattr(getattr(model, "lora_config", None), "dropout", 0.0)
    old_pass = c.num_iterations > 1 or (c.importance_sampling_correction and dropout > 0)
    old, ref = {}, {}
    if old_pass or c.beta > 0:
        model.eval()
        with torch.no_grad():
            for k, (chunk, pack) in enumerate(zip(chunks, packs)):
                if old_pass:
                    lp, _ = sequence_logprobs(model, pack, temperature=c.temperature)
                    old[k] = _unflatten(lp, pack, chunk, completion_len)
                if c.beta > 0:
                    with model.adapters_disabled():
                        lp, _ = sequence_logprobs(model, pack, temperature=c.temperature)
                    ref[k] = _unflatten(lp, pack, chunk, completion_len)

    sums: dict[str, float] = {}
    counts = 0
    loss_total = 0.0  # this rank's share of the loss, summed over micro-batches and averaged over passes
    grad_norm = 0.0
    update: dict = {}
    overflow_steps = 0
    is_stats = []
    model.train()

    def micro_batches() -> tuple[dict, int, torch.Tensor, list]:
        """One pass over this rank's micro-batches from zeroed gradients: (metric sums, count,
        loss, importance ratios with their masks), on the device (read at the phase's end)."""
        if captured is not None:
            captured.zero_grad()  # (its own buffers, which its graphs write)
        else:
            optimizer.zero_grad(set_to_none=True)
        forward = captured or partial(sequence_logprobs, model)
        sums, counts, loss_total, is_stats = {}, 0, torch.zeros((), device=model.device), []
        for k, (chunk, pack) in enumerate(zip(chunks, packs)):
            # LoRA dropout masks keyed on the global micro-batch, whichever rank trains it (a
            # checkpointed layer's recompute restores the same state by itself)
            # (record_function: the phases by name in a profile, e.g. benchmarks/grpo_step.py --profile-train)
            with micro_batch_rng(c.seed, scheduler.last_epoch, dist.rank * len(chunks) + k, enabled=dropout > 0), \
                    record_function("grpo/forward"):
                lp, ent = forward(pack, temperature=c.temperature, with_entropy=True,
                                  entropy_grad=False)  # (logged only)
            logprobs, mask = _unflatten(lp, pack, chunk, completion_len, with_mask=True)
            entropy = _unflatten(ent.detach(), pack, chunk, completion_len)
            behaviour = old[k] if old_pass else logprobs.detach()  # for the importance weights
            # PPO's ratio is exactly 1 on a single pass (TRL's on-policy case), dropout or not.
            old_lp = old[k] if c.num_iterations > 1 else logprobs.detach()
            weights = None
            if c.importance_sampling_correction:
                samp = chunk_sampling[k]
                weights = importance_sampling_weights(behaviour, samp, mask, level=c.importance_sampling_level,
                                                      cap=c.importance_sampling_cap)
                raw = importance_sampling_weights(behaviour, samp, mask, level=c.importance_sampling_level,
                                                  cap=float("inf"))
                is_stats.append((raw.expand_as(mask).flatten(), mask.flatten() > 0))
            # (over this micro-batch's trained tokens on this rank; TRL's quantile also gathers the ranks')
            entropy_mask = high_entropy_mask(entropy, mask, c.top_entropy_quantile) \
                if c.top_entropy_quantile < 1.0 else None
            loss, m = policy_loss(
                logprobs, old_lp, chunk_advantages[k], mask, loss_type=c.loss_type,
                epsilon=c.epsilon, epsilon_high=c.epsilon_high, ref_logprobs=ref.get(k), beta=c.beta,
                max_completion_length=c.max_completion_length, importance_weights=weights,
                num_items_in_batch=total_tokens, delta=c.delta, entropy_mask=entropy_mask,
                sapo_temperatures=(c.sapo_temperature_pos, c.sapo_temperature_neg))
            if c.loss_type not in TOKEN_SUM_LOSSES:
                loss = loss / global_chunks
            with record_function("grpo/backward"):
                scaler.scale(loss).backward()
            loss_total += loss.detach() / c.num_iterations
            # The micro-batch's autograd graph goes now, not at the next forward: alive at a CUDA
            # graph capture (`captured`), it would keep its parameters' gradient nodes bound to the
            # default stream, and the capture fails.
            del lp, logprobs, loss
            m["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
            for key, v in m.items():
                sums[key] = sums.get(key, 0.0) + v
            counts += 1
        return sums, counts, loss_total, is_stats

    oom_fallbacks = 0
    for _ in range(c.num_iterations):
        # "auto" checkpointing that runs out of memory redoes the pass with every layer checkpointed
        part, fell_back = with_checkpointing_fallback(model, micro_batches)
        oom_fallbacks += fell_back
        for key, v in part[0].items():
            sums[key] = sums.get(key, 0.0) + v
        counts += part[1]
        loss_total += part[2]
        is_stats += part[3]
        dist.all_reduce_grads(params)  # scaled gradients: an overflow on any rank reaches every rank
        with record_function("grpo/optimizer_step"):
            update = optimizer_step(optimizer, scheduler, scaler, params, c.max_grad_norm)
        grad_norm = update["grad_norm"]
        overflow_steps += update.get("overflow", 0)
    # (read after the optimizer steps, whose gradient norm waited for the device already)
    out = {key: float(v) / max(counts, 1) for key, v in sums.items()}
    out["loss"] = float(loss_total)  # summed over data-parallel ranks by the trainer
    out["grad_norm"] = grad_norm
    oom_fallbacks = int(dist.sum(oom_fallbacks))  # on any rank: rank 0 logs it
    if oom_fallbacks:
        out["oom_fallbacks"] = oom_fallbacks  # "auto" checkpointing ran out of memory: now every layer
    if scaler.is_enabled():
        out["loss_scale"] = update["loss_scale"]  # the last optimizer step's
        out["overflow_steps"] = overflow_steps
    allr = torch.cat([ratio[trained] for ratio, trained in is_stats]) if is_stats else None
    if allr is not None and allr.numel():
        out.update({"importance_ratio/mean": float(allr.mean()), "importance_ratio/min": float(allr.min()),
                    "importance_ratio/max": float(allr.max()),
                    "importance_ratio/capped_frac": float((allr > c.importance_sampling_cap).float().mean())})
    return out


def _unflatten(flat: torch.Tensor, pack, chunk: list[int], completion_len: list[int], with_mask: bool = False):
    """Flat per-target values (row-major over the pack) -> [len(chunk), max completion length]."""
    b = len(chunk)
    L = max(max(completion_len[i] for i in chunk), 1)
    seq = pack.per_target(pack.sequence_index)  # [N], sequence index within the chunk
    N = seq.numel()
    arange = torch.arange(N, device=flat.device)
    starts = torch.full((b,), N, device=flat.device, dtype=torch.long).scatter_reduce(0, seq, arange, "amin")
    col = arange - starts[seq]
    out = torch.zeros(b, L, device=flat.device, dtype=flat.dtype).index_put((seq, col), flat)
    if not with_mask:
        return out
    mask = torch.zeros(b, L, device=flat.device, dtype=torch.float32).index_put(
        (seq, col), torch.ones(N, device=flat.device))
    return out, mask
