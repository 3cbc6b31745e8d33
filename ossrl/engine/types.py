"""What the rollout engine returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # the model's plain temperature-1 log-prob of each sampled token
    sampling_logprobs: list[float]  # log-prob under the distribution actually sampled
    finish_reason: str  # "stop" (a stop token, included in token_ids) or "length"
