"""The rollout engine: GRPO's shape (a few prompts, n samples each) from the trainer's own model.

    engine = RolloutEngine(model)
    groups = engine.generate(prompt_ids_list, n=8, params=SamplingParams(max_new_tokens=512, seed=1))
    groups[i][j]  # Completion j of prompt i: token_ids, logprobs, sampling_logprobs, finish_reason

Each distinct prompt is prefilled once; its KV is shared by its n sample slots; all active slots
of a prompt decode together, and a slot leaves the active set the step it finishes (no compute on
finished rows, no padding rows). The engine holds no copy of the weights: LoRA adapters apply
unmerged, so rollouts sample from exactly the policy being trained.

Seeds: completion j of prompt i is sampled with seed `seed + i*n + j` (the sampling rule in
ossrl.engine.sampling keys its noise on the row's seed and step only), so a batched request equals
the same samples requested one by one (`seed + k` for the k-th).

Two backends: "slots" (ossrl.engine.slots: a slot-indexed KV pool, batched decode over every
active slot, CUDA graphs; the default on CUDA) and "simple" (the model's growing KVCache, one
prompt's group at a time; the default on CPU, and the readable reference). `release()` frees what
the engine holds between rollouts (the trainer calls it before its phase). A model sharded over
ranks (ossrl.train.sharding) always takes the slots backend, in lockstep with the other ranks:
every rank must then call `generate` as often as the others, with no prompts if it has none.
"""

from __future__ import annotations

import torch

from ossrl.engine.sampling import SamplingParams, sample_tokens
from ossrl.engine.types import Completion
from ossrl.model.gptoss import (GptOssForCausalLM, KVCache, check_scales_fold, inference_kernels, lay_out_qkv,
                                weight_storage)
from ossrl.model.lora import release_rollout_copies, rollout_copies


# The slots backend's default for `RolloutEngine(share_prefixes=...)`. On since session 11: the GPU
# test gave the same completions, and the GRPO step's generate phase went 9.44 -> 9.09 s on an H100
# (benchmarks/results/grpo_step.json; grpo_step.py takes --no-share-prefixes).
SHARE_PREFIXES = True

# MXFP4 experts on a GPU: rollouts read copies of the blocks laid out tile by tile
# (`ossrl.model.gptoss.tile_experts`; as much memory as the blocks, while the GPU has it to spare;
# freed by `release`). Measured: benchmarks/results/moe_tiled.json (see docs/benchmarks.md).
TILE_EXPERTS = True


class RolloutEngine:
    def __init__(self, model: GptOssForCausalLM, *, backend: str = "auto", cuda_graphs: bool = True,
                 sync_every: int = 8, prefill_tokens: int = 16384, fold_scales: bool = True,
                 share_prefixes: bool | None = None, tile_experts: bool | None = None):
        if backend not in ("auto", "simple", "slots"):
            raise ValueError(f"backend must be 'auto', 'simple' or 'slots', got {backend!r}")
        self.model = model
        self.backend = backend
        self.lockstep = bool(getattr(model, "sharded", False))  # forwards gather shards: ranks step together
        self._slots = None
        self._storage = None  # where the weights were at the last generate (`weight_storage`)
        if prefill_tokens <= 0:
            raise ValueError(f"prefill_tokens must be positive, got {prefill_tokens}")
        # The slots backend's n samples of a prompt read its KV from one slot (full-attention layers;
        # the same outputs, n - 1 fewer copies read per step). Default: SHARE_PREFIXES (on).
        self._slot_options = dict(cuda_graphs=cuda_graphs, sync_every=sync_every, prefill_tokens=prefill_tokens,
                                  share_prefixes=SHARE_PREFIXES if share_prefixes is None else share_prefixes)
        # MXFP4 experts on a GPU whose scales are all <= 128 decode with one multiply a pair
        # instead of two (the same bits, tests/test_moe_gpu.py; `check_scales_fold`). About 1% of a
        # decode step on an H100 (session 9: LoRA batch 64 9.18 -> 9.06 ms, batch 1 3.95 -> 3.91 ms).
        self.fold_scales = fold_scales
        # The slots backend's rollouts read tile-contiguous copies of the MXFP4 blocks, made after
        # its KV pool took its memory, where what is left allows (TILE_EXPERTS by default)
        self._slot_options["tile_experts"] = TILE_EXPERTS if tile_experts is None else tile_experts

    def _use_slots(self) -> bool:
        return (self.lockstep or self.backend == "slots"
                or (self.backend == "auto" and self.model.device.type == "cuda"))

    def release(self) -> None:
        """Standby: free the KV pool, captured graphs, the experts' tiled copies and the adapters'
        rollout copies (the next generate takes them again)."""
        if self._slots is not None:
            self._slots.release()
        release_rollout_copies(self.model)
        if self.model.device.type == "cuda":
            # The destroyed graphs' private pools are only freed here (or by an allocation that
            # would fail without them); until then the "auto" checkpointing budget, which counts
            # the default pool's free blocks only, would not see them.
            torch.cuda.empty_cache()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int = 1,
                 params: SamplingParams | None = None) -> list[list[Completion]]:
        params = params or SamplingParams()
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        if isinstance(params.max_new_tokens, list) and len(params.max_new_tokens) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(params.max_new_tokens)} entries for {len(prompts)} prompts")
        vocab = self.model.config.vocab_size
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            low, high = min(prompt), max(prompt)  # (an id past the table fails in the embedding: on a
            if low < 0 or high >= vocab:           # GPU, a device-side assert that ends the process's CUDA)
                bad = low if low < 0 else high
                raise ValueError(f"prompt {i}: token id {bad} (at {prompt.index(bad)}) is outside the "
                                 f"vocabulary [0, {vocab})")
        # q, k, v weights side by side: one matmul for the three in every forward. A model whose
        # parameters moved since (new storage) is laid out again, and graphs captured on the old
        # addresses are dropped with the KV pool; so are they when any other weight moved (graphs
        # would read freed memory), or when their MoE kernels were built for another answer of
        # the MXFP4 scale check.
        moved = lay_out_qkv(self.model)
        refolded = check_scales_fold(self.model, self.fold_scales)
        storage = weight_storage(self.model)
        if (moved or refolded or storage != self._storage) and self._slots is not None:
            self._slots.release()
        self._storage = storage
        was_training = self.model.training
        self.model.eval()
        try:
            # One-launch glue kernels on CUDA (ossrl.model.gptoss.inference_kernels); LoRA weights
            # cast once per call, not in every forward (ossrl.model.lora.rollout_copies).
            with inference_kernels(), rollout_copies(self.model):
                return self._generate(prompts, n, params)
        finally:
            self.model.train(was_training)

    def _generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        if self._use_slots():
            if self._slots is None:
                from ossrl.engine.slots import SlotDecoder

                self._slots = SlotDecoder(self.model, lockstep=self.lockstep, **self._slot_options)
            return self._slots.generate(prompts, n, params)
        return [self._generate_group(prompt, i, n, params) for i, prompt in enumerate(prompts)]

    def _generate_group(self, prompt: list[int], index: int, n: int, params: SamplingParams) -> list[Completion]:
        model, device = self.model, self.model.device
        base_seed = 0 if params.seed is None else params.seed
        seeds = torch.arange(n, device=device) + base_seed + index * n
        cache = KVCache()
        logits = model(torch.tensor([prompt], device=device), cache=cache, last_only=True)[:, -1]  # prefill once
        _select_rows(cache, torch.zeros(n, dtype=torch.long, device=device))  # n slots share it
        logits = logits.expand(n, -1)
        out = [Completion([], [], [], "length") for _ in range(n)]
        active = list(range(n))  # slot -> sample index
        stops = set(params.stop_token_ids)
        for step in range(params.max_new_tokens_for(index)):
            steps = torch.full((len(active),), step, device=device)
            tokens, plain, sampled = sample_tokens(logits, params, seeds, steps)
            tokens_list, plain_list, sampled_list = tokens.tolist(), plain.tolist(), sampled.tolist()
            keep = []
            for slot, j in enumerate(active):
                c = out[j]
                c.token_ids.append(tokens_list[slot])
                c.logprobs.append(plain_list[slot])
                c.sampling_logprobs.append(sampled_list[slot])
                if tokens_list[slot] in stops:
                    c.finish_reason = "stop"
                else:
                    keep.append(slot)
            if not keep:
                break
            if len(keep) < len(active):  # compact: finished slots leave the batch now
                index_t = torch.tensor(keep, device=device)
                _select_rows(cache, index_t)
                tokens, seeds = tokens[index_t], seeds[index_t]
                active = [active[s] for s in keep]
            logits = model(tokens.view(-1, 1), cache=cache)[:, -1]
        return out


def _select_rows(cache: KVCache, rows: torch.Tensor) -> None:
    for layer in cache.keys:
        cache.keys[layer] = cache.keys[layer].index_select(0, rows)
        cache.values[layer] = cache.values[layer].index_select(0, rows)
    cache.positions = cache.positions.index_select(0, rows)
