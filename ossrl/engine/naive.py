"""Naive incremental decoding: one prompt, the model's simple KVCache, one token per forward.

This is the readable reference for the rollout engine (which batches, shares prefixes and
captures CUDA graphs) and the sampler behind `ossrl generate` until the engine lands. It is
deliberately plain: greedy when temperature is 0, otherwise temperature / top-k / top-p sampling
from a seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ossrl.model.gptoss import GptOssForCausalLM, KVCache


@dataclass
class NaiveCompletion:
    token_ids: list[int]
    logprobs: list[float]  # plain temperature-1 log-prob of each sampled token
    finish_reason: str  # "stop" or "length"


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [V] -> a token id tensor []. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax()
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator)[0]


@torch.no_grad()
def generate_naive(model: GptOssForCausalLM, prompt_ids: list[int], *, max_new_tokens: int = 64,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   stop_token_ids: tuple[int, ...] | list[int] = (), seed: int | None = None) -> NaiveCompletion:
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = model.device
    generator = torch.Generator(device=device)
    generator.manual_seed(0 if seed is None else seed)
    cache = KVCache()
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache)[0, -1]
    tokens, logprobs = [], []
    stops = set(stop_token_ids)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        tokens.append(int(token))
        logprobs.append(float(torch.log_softmax(logits.float(), -1)[token]))
        if tokens[-1] in stops:
            return NaiveCompletion(tokens, logprobs, "stop")
        logits = model(token.view(1, 1), cache=cache)[0, -1]
    return NaiveCompletion(tokens, logprobs, "length")
