"""GRPOConfig: every knob of a GRPO run, named after TRL's GRPOConfig where TRL has the concept.

Read from TOML with `load_config(GRPOConfig, path, overrides)` (unknown keys get a nearest-name
hint). Differences from TRL worth knowing: `prompts_per_step` prompts are sampled per optimiser
step (the generation batch is prompts_per_step * num_generations completions, split into
`gradient_accumulation_steps` micro-batches for the loss); dynamic sampling and the importance
correction are first-class options. Losses (`ossrl.rl.loss`): grpo, bnpo, dr_grpo, dapo, gspo, sapo
and cispo (epsilon_high is then the importance weight's cap, as in TRL), two-sided clipping (`delta`)
and the high-entropy token mask (`top_entropy_quantile`, its quantile taken over each micro-batch's
trained tokens on each rank, where TRL's also gathers the other ranks').
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ossrl.model.lora import LoRAConfig
from ossrl.rl.loss import LOSS_TYPES


@dataclass
class GRPOConfig:
    # what to train, on what
    model: str = ""
    dataset: str = ""  # a JSONL path (or pass train_dataset to GRPOTrainer)
    reward_funcs: list[str] = field(default_factory=list)  # "module:function" or a registered name
    reward_weights: list[float] | None = None
    output_dir: str = "runs/grpo"
    resume_from: str | None = None  # a checkpoint directory, or "latest"
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    # optimisation
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int = 100
    prompts_per_step: int = 8
    num_generations: int = 8
    gradient_accumulation_steps: int = 1
    num_iterations: int = 1

    # loss
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # (cispo: the importance weight's cap itself, e.g. 5.0)
    delta: float | None = None  # two-sided clipping: the unclipped ratio capped at delta (> 1; INTELLECT-2)
    top_entropy_quantile: float = 1.0  # the policy term on the top fraction of tokens by entropy (1.0: all)
    sapo_temperature_pos: float = 1.0  # sapo's gate temperature where the advantage is positive (TRL's default)
    sapo_temperature_neg: float = 1.05  # ... and where it is not
    beta: float = 0.0
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False
    importance_sampling_correction: bool = True
    importance_sampling_level: str = "token"
    importance_sampling_cap: float = 2.0

    # dynamic sampling: drop groups whose rewards are all equal and top the batch up
    dynamic_sampling: bool = False
    max_dynamic_sampling_retries: int = 3

    # generation
    max_prompt_length: int = 512
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    reasoning_effort: str = "low"

    # evaluation on held-out prompts (a JSONL path like `dataset`, or GRPOTrainer(eval_dataset=)): every
    # eval_steps optimiser steps and after the last (0: after the last only), eval_num_generations
    # completions a prompt at eval_temperature (0: greedy, the same seeds each time), rewarded by the
    # training's reward functions; "eval/..." metrics in that step's line, completions in eval_samples.jsonl.
    # (On a GPU, an eval_temperature other than `temperature` recaptures the rollout CUDA graphs around
    # each evaluation: a few seconds each time.)
    eval_dataset: str = ""
    eval_steps: int = 0
    eval_on_start: bool = False  # also before the first step (a step-0 line), on a fresh run
    eval_num_generations: int = 1
    eval_temperature: float = 0.0
    eval_max_prompts: int = 0  # the first this many eval rows (0: all)

    # runtime, logging, checkpoints
    seed: int = 42
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU; float16: GPUs without bf16 (loss scaling on)
    experts: str = "auto"
    # true: recompute every layer in backward; "auto": only the layers whose activations do not fit
    # in free memory (measured each step); false: keep all activations
    gradient_checkpointing: bool | str = "auto"
    activation_budget_gb: float | None = None  # "auto": GiB for kept activations (default: measured)
    offload_activations: bool = False  # checkpointed layer inputs in pinned CPU memory
    offload_embeddings: bool = False  # the embedding table stays on the CPU (no CUDA graphs in rollouts)
    offload_optimizer: bool = False  # AdamW's states in pinned CPU memory, streamed through the GPU per step
    # GiB of bf16 copies of the frozen MXFP4 experts (layers in order), read by training-sized MoE
    # calls instead of a decode per call (ossrl.train.memory); 0: none
    dense_experts_gb: float = 0.0
    # CUDA: each micro-batch shape up to 4,096 tokens has its training forward and backward captured
    # in CUDA graphs the second time it comes, then replayed (ossrl.train.graphed; the host then
    # queues a few launches instead of thousands: a 1K-token 20b step 0.154 -> 0.103 s on an H100).
    # The graphs' memory (about one micro-batch's activations, shared by the shapes) stays reserved
    # between steps. Larger micro-batches, where the GPU sets the pace, and those with layers
    # checkpointed, LoRA dropout or the embedding offloaded run eagerly.
    capture_training: bool = False
    # The rollout engine sleeps during each training phase: its KV pool, CUDA graphs and the experts'
    # tile-contiguous copies (`RolloutEngine(tile_experts=)`, as large as the MXFP4 blocks) are freed
    # (TRL's vllm_enable_sleep_mode; on by default here, memory being the scarce thing). False keeps
    # them across steps, which saves re-allocating and re-capturing each step where memory allows
    # (the tiled copies then stay through training too: 9.6 GB for 20b).
    enable_sleep_mode: bool = True
    # Under torchrun: shard the frozen base and the adapters over the ranks (FSDP2, ossrl.train.sharding)
    # for models one GPU cannot hold; rollouts then decode in lockstep. False: every rank holds the model.
    fsdp: bool = False
    prefill_tokens: int = 16384  # prompts prefilled together per forward (at most this many tokens)
    logging_steps: int = 1
    save_steps: int = 0
    save_total_limit: int | None = None
    stop_on_reward_error: bool = False
    progress_bar: bool = True
    report_to: list[str] = field(default_factory=list)  # "tensorboard", "wandb", "trackio"

    def __post_init__(self):
        def check(cond, message):
            if not cond:
                raise ValueError(message)

        check(self.loss_type in LOSS_TYPES, f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        check(self.scale_rewards in ("group", "batch", "none"),
              f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}")
        check(self.importance_sampling_level in ("token", "sequence"),
              f"importance_sampling_level must be 'token' or 'sequence', got {self.importance_sampling_level!r}")
        check(self.lr_scheduler_type in ("constant", "linear", "cosine"),
              f"lr_scheduler_type must be constant, linear or cosine, got {self.lr_scheduler_type!r}")
        check(self.reasoning_effort in ("low", "medium", "high"),
              f"reasoning_effort must be low, medium or high, got {self.reasoning_effort!r}")
        for name in ("max_steps", "prompts_per_step", "num_generations", "gradient_accumulation_steps",
                     "num_iterations", "max_prompt_length", "max_completion_length", "logging_steps",
                     "prefill_tokens"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        check(self.num_generations >= 2, f"num_generations must be >= 2 (GRPO compares samples of a "
              f"prompt), got {self.num_generations}")
        total = self.prompts_per_step * self.num_generations
        check(total % self.gradient_accumulation_steps == 0,
              f"prompts_per_step * num_generations ({total}) must be divisible by gradient_accumulation_steps "
              f"({self.gradient_accumulation_steps})")
        check(self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}")
        check(self.epsilon > 0, f"epsilon must be positive, got {self.epsilon}")
        check(self.epsilon_high is None or self.epsilon_high > 0, f"epsilon_high must be positive, got {self.epsilon_high}")
        check(self.loss_type != "cispo" or self.epsilon_high is not None,
              "loss_type 'cispo' caps the importance weight at epsilon_high: set it (TRL's docs recommend 5.0)")
        check(self.delta is None or (self.delta > 1 and self.loss_type not in ("cispo", "sapo")),
              f"delta (two-sided clipping) must be above 1 (recommended above 1 + epsilon_high) and needs a "
              f"clipped loss, not cispo or sapo; got {self.delta!r} with loss_type {self.loss_type!r}")
        check(self.sapo_temperature_pos > 0 and self.sapo_temperature_neg > 0,
              f"sapo temperatures must be positive, got {self.sapo_temperature_pos}, {self.sapo_temperature_neg}")
        check(0.0 <= self.top_entropy_quantile <= 1.0,
              f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")
        check(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        check(self.importance_sampling_cap >= 1, f"importance_sampling_cap must be >= 1, got {self.importance_sampling_cap}")
        check(self.temperature > 0, f"temperature must be > 0 for GRPO sampling, got {self.temperature}")
        for name in ("eval_steps", "eval_max_prompts"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(self.eval_num_generations > 0, f"eval_num_generations must be positive, got {self.eval_num_generations}")
        check(self.eval_temperature >= 0, f"eval_temperature must be >= 0 (0: greedy), got {self.eval_temperature}")
        check(self.max_dynamic_sampling_retries >= 0, "max_dynamic_sampling_retries must be >= 0")
        check(self.save_total_limit is None or self.save_total_limit > 0, "save_total_limit must be positive")
        check(self.dtype in ("auto", "bfloat16", "float32", "float16"), f"dtype: unknown {self.dtype!r}")
        check(isinstance(self.gradient_checkpointing, bool) or self.gradient_checkpointing == "auto",
              f"gradient_checkpointing must be true, false or 'auto', got {self.gradient_checkpointing!r}")
        check(self.activation_budget_gb is None or self.activation_budget_gb >= 0,
              f"activation_budget_gb must be >= 0, got {self.activation_budget_gb}")
        check(self.dense_experts_gb >= 0, f"dense_experts_gb must be >= 0, got {self.dense_experts_gb}")
        check(not self.offload_activations or self.gradient_checkpointing,
              "offload_activations needs gradient_checkpointing (it offloads the checkpoints)")
        check(self.experts in ("auto", "bf16", "mxfp4"), f"experts must be auto, bf16 or mxfp4, got {self.experts!r}")
        check(not (self.fsdp and self.activation_budget_gb is not None),
              "activation_budget_gb applies to gradient_checkpointing = 'auto', which fsdp replaces by "
              "checkpointing every layer (the same on every rank); remove one of them")
        check(not (self.fsdp and self.dense_experts_gb), "dense_experts_gb with fsdp is not supported: the "
              "ranks hold shards of the experts (the copies are of a whole layer's); remove one of them")
        check(not (self.fsdp and self.offload_optimizer),
              "offload_optimizer with fsdp is not supported: fsdp shards the optimizer states over the ranks "
              "already; remove one of them")
        check(not (self.fsdp and self.dtype == "float16"),
              "fsdp with dtype float16 is not supported (loss scaling over sharded gradients is untested); "
              "use bfloat16 or float32")
        if self.reward_weights is not None and self.reward_funcs:
            check(len(self.reward_weights) == len(self.reward_funcs),
                  f"reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} reward_funcs")
        unknown = [r for r in self.report_to if r not in ("tensorboard", "wandb", "trackio")]
        check(not unknown, f"report_to: unknown {unknown}; choose from tensorboard, wandb, trackio")
