"""Tiny gpt-oss checkpoints for tests and the CPU demo, written in the Hugging Face layout.

`write_tiny_checkpoint(path)` writes a complete model directory (config.json,
generation_config.json, model.safetensors, tokenizer.json) that both ossrl and transformers'
`GptOssForCausalLM` load. The architecture is exactly gpt-oss (sinks, sliding windows on even
layers, YaRN, MoE with clamped SwiGLU); only the sizes are small. Weights are random but scaled so
that activations stay O(1) and routing is not degenerate. Float tensors are stored in bf16 like
the real release, so an fp32 load on either side starts from identical values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from ossrl.model.config import GptOssConfig
from ossrl.model.gptoss import GptOssForCausalLM
from ossrl.model.loading import save_model
from ossrl.model.lora import init_lora_weights, is_lora_name

TINY_DEFAULTS = dict(
    vocab_size=320,  # 256 byte tokens + the harmony special tokens, padded
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=8,
    max_position_embeddings=4096,
    eos_token_id=None,
    pad_token_id=None,
    bos_token_id=None,
)


def tiny_config(**overrides) -> GptOssConfig:
    """A small gpt-oss config; any field may be overridden."""
    return GptOssConfig(**{**TINY_DEFAULTS, **overrides})


def _fill_random(model: GptOssForCausalLM, normal, randint) -> None:
    """Random weights in place, scaled so activations stay O(1) and routing is not degenerate.

    normal(shape, std) and randint(low, high, shape, dtype) draw from the caller's generator;
    parameters and then MXFP4 buffers are visited in registration order. Adapters are left alone
    (`init_lora_weights`); a sharded parameter (a DTensor) gets random values in its own shard.
    """
    for name, p in model.named_parameters():
        if is_lora_name(name):
            continue
        leaf = name.rpartition(".")[2]
        local = p.to_local() if isinstance(p, DTensor) else p
        if name.endswith("norm.weight"):
            local.copy_(1.0 + normal(local.shape, 0.1))
        elif leaf == "sinks" or name.endswith("embed_tokens.weight"):
            local.copy_(normal(local.shape, 1.0))
        elif leaf in ("bias", "gate_up_proj_bias", "down_proj_bias"):
            local.copy_(normal(local.shape, 0.1))
        else:  # [out, in] linear weights and [E, in, out] experts: 1/sqrt(fan-in)
            local.copy_(normal(local.shape, p.shape[1] ** -0.5))
    for name, b in model.named_buffers():
        if name.endswith("_blocks"):
            b.copy_(randint(0, 256, b.shape, torch.uint8))
        elif name.endswith("_scales"):
            # FP4 magnitudes average ~2.3, so 2^-(log2(in)/2 + 2) keeps outputs O(1).
            fan_in = b.shape[-1] * 32
            centre = 127 - int(round(0.5 * torch.log2(torch.tensor(float(fan_in))).item())) - 2
            b.copy_(randint(centre - 1, centre + 2, b.shape, torch.int64).to(torch.uint8))


@torch.no_grad()
def random_model(config: GptOssConfig, *, seed: int = 0, expert_format: str = "bf16",
                 dtype: torch.dtype = torch.float32) -> GptOssForCausalLM:
    """A gpt-oss model with random weights whose values are exactly representable in bf16
    (CPU generator: the same values on every machine; the demo's build script relies on it)."""
    gen = torch.Generator().manual_seed(seed)
    model = GptOssForCausalLM(config, expert_format=expert_format, dtype=dtype)
    _fill_random(model,
                 lambda shape, std: (torch.randn(shape, generator=gen) * std).to(torch.bfloat16).to(dtype),
                 lambda low, high, shape, dt: torch.randint(low, high, shape, generator=gen, dtype=dt))
    return model


def write_tiny_checkpoint(path: str | os.PathLike, *, seed: int = 0, mxfp4: bool = False,
                          **config_overrides) -> Path:
    """Write a complete tiny Hugging Face gpt-oss model directory and return its path."""
    from ossrl.model.tokenizer import write_byte_level_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = write_byte_level_tokenizer(path)
    ids = {name: tokenizer.token_id(name) for name in ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|call|>")}
    overrides = dict(config_overrides)
    overrides.setdefault("vocab_size", max(TINY_DEFAULTS["vocab_size"], len(tokenizer)))
    if overrides["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {overrides['vocab_size']} is smaller than the tokenizer ({len(tokenizer)})")
    config = tiny_config(
        eos_token_id=ids["<|return|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|startoftext|>"],
        quantization="mxfp4" if mxfp4 else None, **overrides,
    )
    model = random_model(config, seed=seed, expert_format="mxfp4" if mxfp4 else "bf16", dtype=torch.bfloat16)
    save_model(model, path)
    generation_config = {
        "bos_token_id": ids["<|startoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
    (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return path


def ascii_fraction_reward(prompts, completions, completion_ids, **columns) -> list[float]:
    """A cheap, deterministic reward for tests and smoke runs: the fraction of completion tokens
    that are ASCII byte tokens (ids 0..127 in the tiny tokenizer)."""
    return [sum(1 for t in ids if t < 128) / max(len(ids), 1) for ids in completion_ids]


def ascii_fraction_unless_flat(prompts, completions, completion_ids, flat=None, **columns) -> list[float]:
    """`ascii_fraction_reward`, but 0 for every completion of a row whose `flat` column is true:
    such groups have zero reward variance (tests of dynamic sampling)."""
    flat = flat or [False] * len(completion_ids)
    return [0.0 if f else r for f, r in zip(flat, ascii_fraction_reward(prompts, completions, completion_ids))]


@torch.no_grad()
def random_model_on_device(config: GptOssConfig, *, device: str | torch.device = "cuda",
                           dtype: torch.dtype = torch.bfloat16, expert_format: str = "mxfp4",
                           seed: int = 0, prepare=None) -> GptOssForCausalLM:
    """A full-size model with random weights made directly on `device` (benchmarks: 20b/120b
    shapes without 13+ GB of host traffic). Same scales as `random_model`; deterministic per seed
    and device. `prepare(model)` runs on the meta device first, as in `load_model` (adapters,
    sharding: each rank then draws only its shards' shapes from the same generator, so every rank
    holds the same whole tensors and shards repeat across ranks; a benchmark's model, not the
    unsharded model's values)."""
    with torch.device("meta"):
        model = GptOssForCausalLM(config, expert_format=expert_format, dtype=dtype)
    model.requires_grad_(False)
    if prepare is not None:
        prepare(model)
    model.to_empty(device=device)
    model.model.reset_rope()
    gen = torch.Generator(device=device).manual_seed(seed)
    _fill_random(model,
                 lambda shape, std: torch.randn(shape, generator=gen, device=device) * std,
                 lambda low, high, shape, dt: torch.randint(low, high, shape, generator=gen, device=device, dtype=dt))
    if getattr(model, "lora_config", None) is not None:  # adapters added by `prepare`
        init_lora_weights(model)
    return model.eval()


def tiny_grpo_config(model_dir, output_dir, **overrides):
    """A GRPOConfig for 2-step GRPO runs of a tiny checkpoint in tests (2 prompts x 3 completions of
    up to 12 tokens, no checkpointing, no progress bar); `overrides` replace any field."""
    from ossrl.rl.config import GRPOConfig

    base = dict(model=str(model_dir), output_dir=str(output_dir), max_steps=2, prompts_per_step=2,
                num_generations=3, max_completion_length=12, max_prompt_length=400, learning_rate=5e-3,
                progress_bar=False, gradient_checkpointing=False, seed=1)
    return GRPOConfig(**{**base, **overrides})


def fp16_outlier_models(expert_format: str, lora_seed: int = 0):
    """(fp32 model, fp16-mode copy, packed batch) on the CPU: one tiny model whose expert outputs
    exceed fp16's 65,504 (down projection x 2^15), both with the same non-zero LoRA weights, and
    three short sequences. The fp16 mode's tests compare the two."""
    from ossrl.model.lora import LoRAConfig, apply_lora, lora_parameters
    from ossrl.train.logprobs import pack_sequences

    config = tiny_config()
    reference = random_model(config, seed=12, expert_format=expert_format)
    with torch.no_grad():
        for layer in reference.model.layers:
            experts = layer.mlp.experts
            if expert_format == "bf16":
                experts.down_proj.mul_(32768.0)  # a power of two: exact in fp16
            else:
                experts.down_proj_scales.add_(15)  # E8M0 exponents: x 2^15
    apply_lora(reference, LoRAConfig(r=4, alpha=8))
    gen = torch.Generator().manual_seed(lora_seed)
    with torch.no_grad():
        for p in lora_parameters(reference):  # B is zero at init: give the adapter something to differentiate
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    half = random_model(config, seed=12, expert_format=expert_format, dtype=torch.float16)
    apply_lora(half, LoRAConfig(r=4, alpha=8))
    half.load_state_dict({k: v.to(half.state_dict()[k].dtype) for k, v in reference.state_dict().items()})
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (17, 9, 30)]
    batch = pack_sequences(seqs, [[True] * len(s) for s in seqs], max_tokens=64)
    return reference, half, batch
