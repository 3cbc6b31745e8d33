"""Sampling parameters and the one sampling rule every decoder uses.

`SamplingParams` follows vLLM/TRL names. A token is drawn by the Gumbel-max trick,

    token = argmax_v (logp_v + G_v),   G_v = -log(-log(u_v)),   u_v = hash(seed, step, v)

where `logp` are the log-probs of the distribution actually sampled (temperature, then top-k,
top-p, min-p filters) and `u` is a counter-based hash of the row's seed, the row's step and the
token id. No generator state: a row's noise depends only on its own (seed, step), so a completion
is the same whether it is decoded alone or in a batch, on CPU or GPU, and a CUDA graph can
replay the step (seeds and steps are device tensors). `ossrl.kernels.sampling` fuses this rule
into one Triton pass over the logits for the temperature-only case and holds the hash.

GRPO needs two numbers per sampled token: the plain temperature-1 log-prob
(`Completion.logprobs`) and the log-prob under the sampled distribution
(`Completion.sampling_logprobs`). Temperature 0 is greedy (sampling log-prob 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ossrl.kernels.sampling import fold_seed, gumbel_argmax, sample_temperature


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

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0


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


def sample_tokens(logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor, steps: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V]; seeds, steps [B] int64. -> (tokens [B], plain log-probs [B], sampling log-probs [B]).

    The plain log-prob is at temperature 1 without filters; the sampling one is under the
    distribution sampled. Temperature-only sampling runs fused on CUDA (ossrl.kernels.sampling).
    """
    keys = fold_seed(seeds)
    if not params.filtered:
        return sample_temperature(logits, params.temperature, keys, steps)
    lp = processed_logprobs(logits, params)
    tokens = gumbel_argmax(lp, keys, steps) if params.temperature > 0 else logits.float().argmax(-1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    plain = torch.log_softmax(logits.float(), -1)[rows, tokens]
    return tokens, plain, lp[rows, tokens]
