"""Saving and loading what training produces: LoRA adapters (PEFT-style files) and full models.

Directories are written atomically: into a temporary sibling, then renamed, so a crash never
leaves a half-written checkpoint where a resume would look for one.

Adapter files: `adapter_config.json` (PEFT's LoRA fields) and `adapter_model.safetensors` whose
attention names are PEFT's (`base_model.model.<module>.lora_A.weight`). Expert LoRA pairs are
stored as ossrl's per-expert tensors (`...mlp.experts.lora.gate_up_A` [E, H, r], ...); the export
command converts them for PEFT/transformers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ossrl.model.lora import ATTENTION_TARGETS, LoRAConfig, load_lora_state_dict, lora_state_dict

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary directory that becomes `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def adapter_config_dict(config: LoRAConfig, base_model: str | None) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "bias": "none",
        "target_modules": [t for t in config.targets if t in ATTENTION_TARGETS],
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        # Not a PEFT field: which experts carry ossrl per-expert LoRA pairs.
        "ossrl_expert_lora": "experts" in config.targets,
        "ossrl_seed": config.seed,
    }


def save_adapter(model, path: str | os.PathLike, *, base_model: str | None = None) -> Path:
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters to save")
    with atomic_directory(path) as tmp:
        tensors = {PEFT_PREFIX + name: t.detach().contiguous().cpu() for name, t in lora_state_dict(model).items()}
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config_dict(config, base_model), indent=2) + "\n")
    return Path(path)


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: adapter config not found")
    try:
        d = json.loads(file.read_text())
        targets = tuple(d["target_modules"]) + (("experts",) if d.get("ossrl_expert_lora") else ())
        return LoRAConfig(r=d["r"], alpha=d["lora_alpha"], dropout=d.get("lora_dropout", 0.0),
                          targets=targets, rslora=d.get("use_rslora", False), seed=d.get("ossrl_seed", 0))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: malformed adapter config ({type(e).__name__}: {e})") from None


def load_adapter(model, path: str | os.PathLike) -> None:
    """Load adapter weights into a model that already has matching adapters (see apply_lora)."""
    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{file}: adapter weights not found")
    state = load_file(file)
    device = next(model.parameters()).device
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v.to(device) for k, v in state.items()}
    try:
        load_lora_state_dict(model, state)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def save_training_state(path: Path, *, optimizer, scheduler, step: int, rng: dict | None = None) -> None:
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "rng": rng or rng_state()}, path / "trainer_state.pt")


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
