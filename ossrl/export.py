"""Export a trained policy: a PEFT adapter, a merged bf16 checkpoint, or a merged re-quantised MXFP4 one.

    ossrl export CHECKPOINT --format adapter|merged-bf16|merged-mxfp4 OUT_DIR

CHECKPOINT is a run's checkpoint or final directory (it holds `adapter/`, whose
adapter_config.json names the base model directory), or an adapter directory itself.

- adapter: the PEFT adapter as is (attention LoRA plus expert LoRA through PEFT's
  target_parameters), loadable with `PeftModel.from_pretrained(GptOssForCausalLM...)`.
- merged-bf16: every LoRA target merged (W + scaling * delta, computed in fp32), written as a
  sharded Hugging Face checkpoint without a quantization_config.
- merged-mxfp4: the same, with the merged experts re-quantised to MXFP4 (spec 3.5: blocks of 32
  along the input dimension, power-of-two scale rounded up, round-to-nearest-even E2M1); all else
  bf16; quantization_config as in the release.

Streaming: the base checkpoint is read one input shard at a time and output shards are written as
they fill, so exporting 20b or 120b needs about one shard in memory, not the model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ossrl.kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from ossrl.model.config import GptOssConfig
from ossrl.model.loading import INDEX, _weight_map, resolve_checkpoint
from ossrl.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, from_peft_names, read_adapter_config
from ossrl.train.checkpoint import atomic_directory

FORMATS = ("adapter", "merged-bf16", "merged-mxfp4")
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                "chat_template.jinja")


def find_adapter(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    for candidate in (checkpoint, checkpoint / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise FileNotFoundError(f"{checkpoint}: no {ADAPTER_CONFIG} here or in {checkpoint / 'adapter'}")


def export(checkpoint: str | Path, out_dir: str | Path, *, format: str, base_model: str | Path | None = None,
           dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 4 << 30) -> Path:
    """Write the export into out_dir (atomically) and return it. `dtype` is the dtype of the
    merged non-expert weights (bf16 by default; float32 keeps the merge exact for checks)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    adapter = find_adapter(checkpoint)
    adapter_cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    base = resolve_checkpoint(base_model or adapter_cfg.get("base_model_name_or_path") or "")
    with atomic_directory(out_dir) as tmp:
        if format == "adapter":
            shutil.copyfile(adapter / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
            # ossrl_* keys (training-only facts) are dropped: PEFT warns about unknown keys.
            cfg = {k: v for k, v in adapter_cfg.items() if not k.startswith("ossrl_")}
            cfg["base_model_name_or_path"] = str(base)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        else:
            _export_merged(base, adapter, tmp, mxfp4=format == "merged-mxfp4", dtype=dtype,
                           max_shard_bytes=max_shard_bytes)
        for name in COPIED_FILES:
            source = checkpoint_file(Path(checkpoint), base, name)
            if source is not None:
                shutil.copyfile(source, tmp / name)
    return Path(out_dir)


def checkpoint_file(checkpoint: Path, base: Path, name: str) -> Path | None:
    for d in (checkpoint, base):
        if (d / name).is_file():
            return d / name
    return None


class _ShardWriter:
    """Collects output tensors and writes model-0000k-of-0000N.safetensors files as they fill."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.max_bytes:
            self.flush()
        self.current[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if self.current:
            tmp_name = f"shard-{len(self.files):05d}.safetensors"
            save_file(self.current, self.out / tmp_name, metadata={"format": "pt"})
            self.files.append((tmp_name, list(self.current)))
            self.current, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.files)
        if n == 1:
            (self.out / self.files[0][0]).rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, (tmp_name, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / tmp_name).rename(self.out / final)
            weight_map.update({name: final for name in names})
        (self.out / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                  "weight_map": weight_map}, indent=2) + "\n")


def _export_merged(base: Path, adapter: Path, out: Path, *, mxfp4: bool, dtype: torch.dtype,
                   max_shard_bytes: int) -> None:
    config = GptOssConfig.from_json_file(base / "config.json")
    lora_cfg = read_adapter_config(adapter)
    scaling = lora_cfg.scaling
    lora = from_peft_names(load_file(adapter / ADAPTER_WEIGHTS), config.num_local_experts)
    lora = {k: v.float() for k, v in lora.items()}
    files = _weight_map(base)
    writer = _ShardWriter(out, max_shard_bytes)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file in sorted(by_file):
        with safe_open(file, "pt") as f:
            for name in sorted(by_file[file]):
                prefix, _, leaf = name.rpartition(".")
                if leaf.endswith("_scales"):
                    continue  # handled with its blocks
                if leaf.endswith("_blocks"):
                    param = leaf[: -len("_blocks")]
                    scales = _read(files, f"{prefix}.{param}_scales", f, file)
                    blocks = f.get_tensor(name)
                    # [E, out, in] -> [E, in, out] dense, exactly (spec 3.3)
                    dense = torch.stack([dequantize_mxfp4(blocks[e], scales[e], torch.float32).T
                                         for e in range(blocks.shape[0])])
                    _add_expert(writer, prefix, param, dense, lora, scaling, mxfp4, dtype)
                elif leaf in ("gate_up_proj", "down_proj") and prefix.endswith("mlp.experts"):
                    _add_expert(writer, prefix, leaf, f.get_tensor(name).float(), lora, scaling, mxfp4, dtype)
                else:
                    tensor = f.get_tensor(name)
                    module = name[: -len(".weight")] if name.endswith(".weight") else None
                    if module is not None and f"{module}.lora_A.weight" in lora:
                        delta = lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"]
                        tensor = tensor.float() + scaling * delta
                    writer.add(name, tensor.to(dtype))
    writer.finish()
    merged = dataclasses.replace(config, quantization="mxfp4" if mxfp4 else None)
    (out / "config.json").write_text(json.dumps(merged.to_hf_dict(), indent=2) + "\n")


def _read(files: dict, name: str, open_file, open_path: Path) -> torch.Tensor:
    if name not in files:
        raise ValueError(f"{open_path}: tensor '{name}' is missing from the checkpoint")
    if files[name] == open_path:
        return open_file.get_tensor(name)
    with safe_open(files[name], "pt") as g:  # the partner tensor lives in another shard
        return g.get_tensor(name)


def _add_expert(writer: _ShardWriter, prefix: str, param: str, dense: torch.Tensor, lora: dict, scaling: float,
                mxfp4: bool, dtype: torch.dtype) -> None:
    """dense [E, in, out] (fp32) + the expert LoRA delta; written dense or re-quantised."""
    a, b = lora.get(f"{prefix}.lora.{param.replace('_proj', '')}_A"), lora.get(f"{prefix}.lora.{param.replace('_proj', '')}_B")
    if a is not None:
        dense = dense + scaling * torch.bmm(a, b)  # [E, in, r] @ [E, r, out]
    if mxfp4:
        blocks, scales = zip(*(quantize_mxfp4(dense[e].T) for e in range(dense.shape[0])))
        writer.add(f"{prefix}.{param}_blocks", torch.stack(blocks))
        writer.add(f"{prefix}.{param}_scales", torch.stack(scales))
    else:
        writer.add(f"{prefix}.{param}", dense.to(dtype))
