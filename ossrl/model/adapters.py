"""LoRA adapter files in PEFT's own format (model layer: used by loading, training and export).

Loadable by `PeftModel.from_pretrained` onto transformers' `GptOssForCausalLM`: attention LoRA as
`base_model.model.<module>.lora_A.weight` [r, in] / `lora_B.weight` [out, r]; expert LoRA through
PEFT's `target_parameters` (3-D expert parameters): gate_up_proj is the inner wrapper
(`mlp.experts.base_layer.lora_A.weight` [E*r, H], `...lora_B.weight` [2I, r*E]) and down_proj the
outer one (`mlp.experts.lora_A.weight` [E*r, I], `lora_B.weight` [H, r*E]). PEFT cannot apply
dropout to expert parameters, so an adapter with expert LoRA declares lora_dropout 0 for PEFT and
keeps the training value in `ossrl_lora_dropout`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ossrl.model.lora import ATTENTION_TARGETS, LoRAConfig, load_lora_state_dict, lora_state_dict

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


EXPERT_PAIRS = {  # ossrl name -> (PEFT module suffix, A or B)
    "gate_up_A": ("mlp.experts.base_layer", "lora_A"),
    "gate_up_B": ("mlp.experts.base_layer", "lora_B"),
    "down_A": ("mlp.experts", "lora_A"),
    "down_B": ("mlp.experts", "lora_B"),
}


def to_peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ossrl LoRA tensors -> PEFT adapter tensors (names with the base_model.model. prefix)."""
    out = {}
    for name, t in state.items():
        prefix, _, leaf = name.rpartition(".lora.")
        if leaf in EXPERT_PAIRS:
            module, which = EXPERT_PAIRS[leaf]
            layer_prefix = prefix[: -len(".mlp.experts")]
            if which == "lora_A":  # [E, in, r] -> [E*r, in]
                E, n_in, r = t.shape
                t = t.permute(0, 2, 1).reshape(E * r, n_in)
            else:  # [E, r, out] -> [out, r*E] (PEFT reshapes it as [out, r, E])
                E, r, n_out = t.shape
                t = t.permute(2, 1, 0).reshape(n_out, r * E)
            out[f"{PEFT_PREFIX}{layer_prefix}.{module}.{which}.weight"] = t.contiguous()
        else:
            out[PEFT_PREFIX + name] = t.contiguous()
    return out


def from_peft_names(tensors: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Inverse of to_peft_names."""
    out = {}
    by_module = {v: k for k, v in EXPERT_PAIRS.items()}
    for name, t in tensors.items():
        name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        head, _, weight = name.rpartition(".")
        module_path, _, which = head.rpartition(".")
        for suffix in ("mlp.experts.base_layer", "mlp.experts"):
            if module_path.endswith("." + suffix) and (suffix, which) in by_module:
                layer_prefix = module_path[: -len(suffix) - 1]
                leaf = by_module[(suffix, which)]
                E = num_experts
                if which == "lora_A":  # [E*r, in] -> [E, in, r]
                    t = t.reshape(E, t.shape[0] // E, t.shape[1]).permute(0, 2, 1)
                else:  # [out, r*E] -> [E, r, out]
                    t = t.reshape(t.shape[0], t.shape[1] // E, E).permute(2, 1, 0)
                out[f"{layer_prefix}.mlp.experts.lora.{leaf}"] = t.contiguous()
                break
        else:
            out[name] = t
    return out


def adapter_config_dict(config: LoRAConfig, base_model: str | None) -> dict:
    experts = "experts" in config.targets
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": 0.0 if experts else config.dropout,
        "ossrl_lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "bias": "none",
        "target_modules": [t for t in config.targets if t in ATTENTION_TARGETS],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts else None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "ossrl_seed": config.seed,
    }


def write_adapter(model, path: str | os.PathLike, *, base_model: str | None = None,
                  state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors into an existing directory.
    `state`: the tensors of `lora_state_dict(model)` when the caller gathered them already (a
    sharded model's rank 0 writes what every rank gathered)."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model) if state is None else state
    tensors = to_peft_names({name: t.detach().cpu() for name, t in state.items()})
    save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config_dict(config, base_model), indent=2) + "\n")
    return path


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: adapter config not found")
    try:
        d = json.loads(file.read_text())
        targets = tuple(d["target_modules"]) + (("experts",) if d.get("target_parameters") else ())
        dropout = d.get("ossrl_lora_dropout", d.get("lora_dropout", 0.0))
        return LoRAConfig(r=d["r"], alpha=d["lora_alpha"], dropout=dropout,
                          targets=targets, rslora=d.get("use_rslora", False), seed=d.get("ossrl_seed", 0))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: malformed adapter config ({type(e).__name__}: {e})") from None


def load_adapter(model, path: str | os.PathLike) -> None:
    """Load adapter weights into a model that already has matching adapters (see apply_lora)."""
    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{file}: adapter weights not found")
    # On the CPU: each tensor moves (a sharded model's: only its rank's part) as it is copied in.
    state = from_peft_names(load_file(file), model.config.num_local_experts)
    try:
        load_lora_state_dict(model, state)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
