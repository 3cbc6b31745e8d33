"""Load and save gpt-oss checkpoints in the Hugging Face layout.

`load_model` reads `config.json` and `model.safetensors` or the shards named by
`model.safetensors.index.json` (shard names are never counted: the 20b release has three files
"of-00002"). The model is built on the meta device, materialised once on the target device, and
each tensor is copied in place, so peak memory is about one copy of the model plus one tensor.
Experts are kept as stored ("auto"), decoded to dense ("bf16") or kept/quantized as MXFP4.

Every problem a user can hit names the file and the tensor or field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from ossrl.kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from ossrl.model.config import GptOssConfig
from ossrl.model.gptoss import GptOssForCausalLM
from ossrl.model.lora import apply_lora, init_lora_weights, is_lora_name
from ossrl.model.sharded import shaped_like

SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
EXPERT_DENSE = ("gate_up_proj", "down_proj")


class CheckpointError(ValueError):
    """A checkpoint that does not match what its config.json describes."""


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hugging Face hub id fetched with huggingface_hub."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint directory, found a file")
    name = str(path_or_id)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"{name}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja"],
                                      ignore_patterns=["original/*", "metal/*"]))
    except Exception as e:  # offline, unknown repo, no auth: all end here with one clear message
        raise FileNotFoundError(
            f"{name}: not a local directory, and fetching it from the Hugging Face hub failed "
            f"({type(e).__name__}: {e}). When offline, download the checkpoint elsewhere and pass "
            f"its local directory."
        ) from None


def _weight_map(ckpt: Path) -> dict[str, Path]:
    """tensor name -> shard file."""
    index = ckpt / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({type(e).__name__}: {e})") from None
        files = {name: ckpt / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"{shard}: shard listed in {index} is missing")
        return files
    single = ckpt / SAFETENSORS
    if not single.is_file():
        raise FileNotFoundError(f"{ckpt}: neither {SAFETENSORS} nor {INDEX} found")
    try:
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{single}: unreadable safetensors file ({e})") from None


def _stored_expert_format(config: GptOssConfig) -> str:
    return "mxfp4" if config.quantization == "mxfp4" else "bf16"


def load_model(
    path_or_id: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    experts: str = "auto",
    prepare=None,
) -> GptOssForCausalLM:
    """Load a Hugging Face gpt-oss checkpoint.

    experts: "auto" (as stored), "bf16" (dense in `dtype`; MXFP4 decoded at load, exactly) or
    "mxfp4" (kept packed; dense checkpoints are quantized per spec 3.5).
    prepare: called with the model while it is still on the meta device (no memory yet), before it
    is materialised and filled: e.g. to add adapters and shard it over ranks (ossrl.train.sharding),
    so that a rank only ever holds its shards (each checkpoint tensor is read whole on the CPU, one
    at a time, and each rank keeps its part). Adapters it adds are initialised after the load.
    """
    if experts not in ("auto", "bf16", "mxfp4"):
        raise ValueError(f"experts must be 'auto', 'bf16' or 'mxfp4', got {experts!r}")
    ckpt = resolve_checkpoint(path_or_id)
    adapter = _adapter_dir(ckpt)
    if adapter is not None:
        return _load_with_adapter(adapter, device=device, dtype=dtype, experts=experts, prepare=prepare)
    config = GptOssConfig.from_json_file(ckpt / "config.json")
    stored = _stored_expert_format(config)
    target = stored if experts == "auto" else experts
    files = _weight_map(ckpt)

    with torch.device("meta"):
        model = GptOssForCausalLM(config, expert_format=target, dtype=dtype)
    model.requires_grad_(False)
    if prepare is not None:
        prepare(model)
    model.to_empty(device=device)
    model.model.reset_rope()  # non-persistent buffer: not in the checkpoint, left empty by to_empty
    expected = {name: t for name, t in model.state_dict().items() if not is_lora_name(name)}
    loaded: set[str] = set()

    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, file in files.items():
        by_file[file].append(name)
    for file in sorted(by_file):
        try:
            handle = safe_open(file, "pt")
        except Exception as e:
            raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
        with handle as f:
            available = set(f.keys())
            for name in sorted(by_file[file]):
                if name not in available:
                    raise CheckpointError(f"{file}: tensor '{name}' is listed in the index but not in the file")
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{file}: tensor '{name}' cannot be read ({e})") from None
                loaded |= _load_tensor(expected, name, tensor, stored, target, config, file)
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{ckpt}: missing tensors: {shown}")
    if getattr(model, "lora_config", None) is not None:  # adapters added by `prepare`
        init_lora_weights(model)
    return model.eval()


def base_checkpoint(path: str | os.PathLike) -> Path:
    """The base model directory of a checkpoint: itself, or the base an adapter directory names."""
    path = Path(path)
    adapter = _adapter_dir(path)
    if adapter is None:
        return path
    return resolve_checkpoint(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])


def _adapter_dir(ckpt: Path) -> Path | None:
    """A LoRA adapter directory (or a training checkpoint holding one in adapter/) without its own model."""
    if (ckpt / "config.json").is_file():
        return None
    for candidate in (ckpt, ckpt / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def _load_with_adapter(adapter: Path, *, prepare=None, **kwargs) -> GptOssForCausalLM:
    from ossrl.model.adapters import load_adapter, read_adapter_config

    config_file = adapter / "adapter_config.json"
    try:
        base = json.loads(config_file.read_text())["base_model_name_or_path"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{config_file}: cannot read base_model_name_or_path ({e})") from None
    if not base:
        raise CheckpointError(f"{config_file}: base_model_name_or_path is empty; load the base and the adapter separately")
    lora_config = read_adapter_config(adapter)

    def add_adapter(model):  # on the meta device: the adapter's layout, then the caller's `prepare`
        apply_lora(model, lora_config)
        if prepare is not None:
            prepare(model)

    model = load_model(base, prepare=add_adapter, **kwargs)
    load_adapter(model, adapter)
    model.requires_grad_(False)
    return model


def _check(name: str, tensor: torch.Tensor, shape, float_expected: bool, file: Path) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"{file}: tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    if float_expected and not tensor.is_floating_point():
        raise CheckpointError(f"{file}: tensor '{name}' has dtype {tensor.dtype}, expected a floating type")
    if not float_expected and tensor.dtype != torch.uint8:
        raise CheckpointError(f"{file}: tensor '{name}' has dtype {tensor.dtype}, expected uint8 (MXFP4)")


def _load_tensor(expected, name, tensor, stored, target, config, file) -> set[str]:
    """Copy one checkpoint tensor into the model, converting the expert format if asked."""
    prefix, _, leaf = name.rpartition(".")
    is_packed = leaf.endswith(("_blocks", "_scales"))
    if stored == target or not (is_packed or leaf in EXPERT_DENSE):
        if name not in expected:
            raise CheckpointError(f"{file}: unexpected tensor '{name}' (not part of a gpt-oss model "
                                  f"with this config.json)")
        dest = expected[name]
        _check(name, tensor, dest.shape, dest.is_floating_point(), file)
        dest.copy_(shaped_like(tensor, dest))
        return {name}

    if stored == "mxfp4" and target == "bf16":
        # Decode [E, out, in/32, 16] + [E, out, in/32] -> [E, out, in], then transpose to [E, in, out].
        if leaf.endswith("_scales"):
            return set()  # consumed together with its blocks
        base = leaf[: -len("_blocks")]
        dest_name = f"{prefix}.{base}"
        if dest_name not in expected:
            raise CheckpointError(f"{file}: unexpected tensor '{name}'")
        dest = expected[dest_name]
        E, n_in, n_out = dest.shape
        _check(name, tensor, (E, n_out, n_in // 32, 16), False, file)
        with safe_open(file, "pt") as f:
            scales_name = f"{prefix}.{base}_scales"
            if scales_name not in set(f.keys()):
                raise CheckpointError(f"{file}: tensor '{scales_name}' missing (needed with '{name}')")
            scales = f.get_tensor(scales_name)
        _check(scales_name, scales, (E, n_out, n_in // 32), False, file)
        _fill_per_expert(dest, E, lambda e: dequantize_mxfp4(tensor[e], scales[e], torch.float32).T)
        return {dest_name}

    # stored dense, target mxfp4: quantize [E, in, out] -> blocks over `in`.
    dest_blocks = f"{prefix}.{leaf}_blocks"
    if dest_blocks not in expected:
        raise CheckpointError(f"{file}: unexpected tensor '{name}'")
    blocks, scales = expected[dest_blocks], expected[f"{prefix}.{leaf}_scales"]
    E, n_out, groups, _ = blocks.shape
    _check(name, tensor, (E, groups * 32, n_out), True, file)
    for e in range(E):  # buffers: never sharded
        b, s = quantize_mxfp4(tensor[e].T.float())
        blocks[e].copy_(b)
        scales[e].copy_(s)
    return {dest_blocks, f"{prefix}.{leaf}_scales"}


def _fill_per_expert(dest: torch.Tensor, num_experts: int, value_of) -> None:
    """dest[e] = value_of(e) for every expert, one at a time (a small temporary); a sharded `dest`
    is filled from the whole tensor assembled on the CPU (120b's gate_up in bf16: 4.2 GB of host
    memory for a moment), each rank keeping its part."""
    if isinstance(dest, DTensor):
        whole = torch.empty(dest.shape, dtype=dest.dtype)
        for e in range(num_experts):
            whole[e] = value_of(e)
        dest.copy_(shaped_like(whole, dest))
        return
    for e in range(num_experts):
        dest[e].copy_(value_of(e))


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it where it is a view of a larger storage (q/k/v laid out side by side by
    `lay_out_qkv`): safetensors refuses tensors that share memory in some versions."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_model(model: GptOssForCausalLM, path: str | os.PathLike, *, max_shard_bytes: int = 4 << 30) -> Path:
    """Write config.json and safetensors (sharded with an index past max_shard_bytes)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(model.config, quantization="mxfp4" if model.expert_format == "mxfp4" else None)
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    state = {k: _own_storage(v.detach().contiguous().cpu()) for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], path / SAFETENSORS, metadata={"format": "pt"})
        return path
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / fname, metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path
