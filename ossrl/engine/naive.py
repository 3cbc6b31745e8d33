"""Naive incremental decoding: one prompt, the model's simple KVCache, one token per forward.

The readable reference for the rollout engine (which batches samples, shares the prompt's KV and,
on GPUs, captures CUDA graphs): engine tests compare against it token for token.
"""

from __future__ import annotations

import torch

from ossrl.engine.sampling import SamplingParams, sample_tokens
from ossrl.engine.types import Completion
from ossrl.model.gptoss import GptOssForCausalLM, KVCache


@torch.no_grad()
def generate_naive(model: GptOssForCausalLM, prompt_ids: list[int], params: SamplingParams | None = None,
                   **kwargs) -> Completion:
    """Sample one completion. `kwargs` build SamplingParams when `params` is not given."""
    params = params or SamplingParams(**kwargs)
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    device = model.device
    seed = torch.tensor([0 if params.seed is None else params.seed], device=device)
    cache = KVCache()
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache, last_only=True)[:, -1]
    out = Completion([], [], [], "length")
    stops = set(params.stop_token_ids)
    for step in range(params.max_new_tokens_for(0)):
        token, plain, sampled = sample_tokens(logits, params, seed, torch.tensor([step], device=device))
        out.token_ids.append(int(token))
        out.logprobs.append(float(plain))
        out.sampling_logprobs.append(float(sampled))
        if out.token_ids[-1] in stops:
            out.finish_reason = "stop"
            break
        logits = model(token.view(1, 1), cache=cache)[:, -1]
    return out
