"""Loading errors name the file and the tensor or field; config forms of transformers 4.x and 5.x."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ossrl.kernels.mxfp4 import FP4_VALUES, dequantize_mxfp4, quantize_mxfp4
from ossrl.model.config import ConfigError, GptOssConfig
from ossrl.model.loading import CheckpointError, load_model, save_model
from ossrl.testing import random_model, tiny_config


@pytest.fixture
def ckpt(tmp_path):
    save_model(random_model(tiny_config(), seed=0), tmp_path / "m")
    return tmp_path / "m"


def test_truncated_safetensors_names_the_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ckpt)


def test_a_model_with_q_k_v_laid_out_saves_each_tensor_alone(tmp_path, monkeypatch):
    """After the rollout engine's `lay_out_qkv` the q/k/v weights are views of one buffer: each is
    written as its own tensor (safetensors refuses shared memory in some versions) and loads back."""
    from ossrl.model import loading
    from ossrl.model.gptoss import lay_out_qkv

    model = random_model(tiny_config(num_hidden_layers=2), seed=0)
    assert lay_out_qkv(model) == 2
    written = {}
    monkeypatch.setattr(loading, "save_file",
                        lambda tensors, *args, **kwargs: written.update(tensors) or save_file(tensors, *args, **kwargs))
    save_model(model, tmp_path)
    q = written["model.layers.0.self_attn.q_proj.weight"]
    assert q.untyped_storage().nbytes() == q.numel() * q.element_size()
    loaded = load_model(tmp_path, dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_missing_shard_names_the_shard(tmp_path):
    save_model(random_model(tiny_config(), seed=0), tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    (tmp_path / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[1]):
        load_model(tmp_path)


def test_sharded_checkpoint_loads_through_the_index_not_file_names(tmp_path):
    model = random_model(tiny_config(), seed=0)
    save_model(model, tmp_path, max_shard_bytes=20_000)
    # Rename the shards the way the 20b release misnames them ("of" one less than the count).
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    renamed = {s: f"model-{i:05d}-of-{len(shards) - 1:05d}.safetensors" for i, s in enumerate(shards)}
    for old, new in renamed.items():
        (tmp_path / old).rename(tmp_path / new)
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    loaded = load_model(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))


def test_wrong_shape_names_the_tensor(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*shape"):
        load_model(ckpt)


def test_missing_tensor_is_named(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.0.self_attn.sinks"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.0\.self_attn\.sinks"):
        load_model(ckpt)


def test_wrong_dtype_is_named(tmp_path):
    save_model(random_model(tiny_config(quantization="mxfp4"), seed=0, expert_format="mxfp4"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.mlp.experts.down_proj_scales"
    tensors[name] = tensors[name].float()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="down_proj_scales.*uint8"):
        load_model(tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("hidden_size", "wide", "hidden_size"),
    ("num_experts_per_tok", 99, "num_experts_per_tok"),
    ("layer_types", ["sliding_attention"], "layer_types"),
    ("rms_norm_eps", -1.0, "rms_norm_eps"),
    ("model_type", "llama", "model_type"),
])
def test_bad_config_value_names_file_and_field(ckpt, field, value, match):
    path = ckpt / "config.json"
    d = json.loads(path.read_text())
    d[field] = value
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=match) as info:
        load_model(ckpt)
    assert "config.json" in str(info.value)


def test_malformed_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json.*not valid JSON"):
        load_model(ckpt)


def test_missing_directory_and_offline_hub_id_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_model(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="local directory"):
        load_model("openai/gpt-oss-20b-does-not-exist")


def test_config_reads_4x_and_5x_rope_forms():
    four = {"model_type": "gpt_oss", "rope_theta": 150000, "rope_scaling": {
        "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 4096, "truncate": False}}
    five = {"model_type": "gpt_oss", "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 4096, "truncate": False}}
    a, b = GptOssConfig.from_hf_dict(four), GptOssConfig.from_hf_dict(five)
    assert a.rope == b.rope
    assert a.rope.theta == 150000 and a.rope.truncate is False
    # A file without "truncate" means transformers' default (True); we keep what the file says.
    del four["rope_scaling"]["truncate"]
    assert GptOssConfig.from_hf_dict(four).rope.truncate is True


def test_presets_match_the_release():
    c20, c120 = GptOssConfig.gpt_oss_20b(), GptOssConfig.gpt_oss_120b()
    assert (c20.num_hidden_layers, c20.num_local_experts) == (24, 32)
    assert (c120.num_hidden_layers, c120.num_local_experts) == (36, 128)
    assert c20.layer_types[0] == "sliding_attention" and c20.layer_types[1] == "full_attention"
    assert GptOssConfig.from_hf_dict(c20.to_hf_dict()) == c20


def test_yarn_constants_from_the_spec():
    from ossrl.model.gptoss import yarn_inv_freq

    inv_freq, conc = yarn_inv_freq(64, GptOssConfig().rope)
    assert conc == pytest.approx(1.3465735902799727, abs=1e-15)
    base = 150000.0 ** (torch.arange(0, 64, 2).float() / 64)
    assert torch.allclose(inv_freq[:8], 1 / base[:8])  # dims 0..8 keep the original frequency
    assert torch.allclose(inv_freq[18:], 1 / (32 * base[18:]))  # 18..31 interpolated


def test_mxfp4_decode_follows_the_lut_and_scale_rule():
    blocks = torch.tensor([[[0x71] + [0] * 15]], dtype=torch.uint8)  # low nibble 1 (0.5), high 7 (6.0)
    scales = torch.tensor([[129]], dtype=torch.uint8)  # 2^2
    w = dequantize_mxfp4(blocks, scales, torch.float32)
    assert w.shape == (1, 32)
    assert w[0, 0].item() == 0.5 * 4 and w[0, 1].item() == 6.0 * 4 and w[0, 2:].abs().sum() == 0


def test_mxfp4_quantize_round_trips_representable_values():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 64), generator=gen)
    exps = torch.randint(-4, 3, (8, 2, 1), generator=gen).float()
    values = (torch.tensor(FP4_VALUES)[codes].view(8, 2, 32) * 2.0 ** exps).view(8, 64)
    blocks, scales = quantize_mxfp4(values)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), values)


def test_mxfp4_quantize_rounds_to_nearest_even_and_saturates():
    x = torch.zeros(1, 32)
    x[0, :6] = torch.tensor([6.0, 5.0, 0.75, 0.25, -2.5, 1.25])  # amax 6 -> scale 1
    w = dequantize_mxfp4(*quantize_mxfp4(x), torch.float32)
    assert w[0, :6].tolist() == [6.0, 4.0, 1.0, 0.0, -2.0, 1.0]


def test_experts_quantized_at_load_from_a_dense_checkpoint(tmp_path):
    model = random_model(tiny_config(), seed=0)
    save_model(model, tmp_path)
    packed = load_model(tmp_path, dtype=torch.float32, experts="mxfp4")
    assert packed.expert_format == "mxfp4"
    dense_w = model.model.layers[0].mlp.experts.down_proj[1]  # [in, out]
    ex = packed.model.layers[0].mlp.experts
    decoded = dequantize_mxfp4(ex.down_proj_blocks[1], ex.down_proj_scales[1], torch.float32).T
    assert rel(decoded, dense_w) < 0.2  # 4-bit: close, not equal
    blocks, scales = quantize_mxfp4(dense_w.T)
    assert torch.equal(blocks, ex.down_proj_blocks[1]) and torch.equal(scales, ex.down_proj_scales[1])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()
