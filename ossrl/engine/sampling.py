"""Sampling parameters and the logit processing shared by every decoder.

`SamplingParams` follows vLLM/TRL names. `processed_logprobs(logits, params)` applies temperature,
then top-k, top-p and min-p filters, and returns the log-probabilities of the distribution that is
actually sampled (filtered tokens at -inf). GRPO's importance correction needs both numbers per
sampled token: the plain temperature-1 log-prob (`Completion.logprobs`) and this one
(`Completion.sampling_logprobs`). Temperature 0 means greedy (the sampled token has log-prob 0
under the sampling distribution).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0: off
    max_new_tokens: int | list[int] = 256  # one value, or one per prompt
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        lengths = self.max_new_tokens if isinstance(self.max_new_tokens, list) else [self.max_new_tokens]
        if any(n <= 0 for n in lengths):
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")

    def max_new_tokens_for(self, prompt_index: int) -> int:
        if isinstance(self.max_new_tokens, list):
            return self.max_new_tokens[prompt_index]
        return self.max_new_tokens


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[B, V] raw logits -> [B, V] log-probs of the sampling distribution (fp32; -inf where filtered)."""
    logits = logits.float()
    if params.temperature == 0:
        greedy = torch.full_like(logits, float("-inf"))
        return greedy.scatter(-1, logits.argmax(-1, keepdim=True), 0.0)
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token).
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return torch.log_softmax(logits, -1)


def sample(logprobs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of [B, V] sampling log-probs; row b draws from generators[b]."""
    probs = logprobs.exp()
    return torch.cat([torch.multinomial(probs[b], 1, generator=generators[b]) for b in range(probs.shape[0])])
