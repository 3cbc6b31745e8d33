"""Export: PEFT adapter, merged bf16 and merged MXFP4, checked against transformers and PEFT (CPU, fp32)."""

import json

import pytest
import torch

import ossrl
from ossrl.cli import main
from ossrl.export import export
from ossrl.kernels.mxfp4 import dequantize_mxfp4
from ossrl.model.lora import LoRAConfig, apply_lora, lora_parameters
from ossrl.train.checkpoint import save_adapter
from ossrl.testing import write_tiny_checkpoint

transformers = pytest.importorskip("transformers")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module", params=[False, True], ids=["dense-base", "mxfp4-base"])
def trained(request, tmp_path_factory):
    """A tiny base checkpoint and a run checkpoint with non-zero LoRA on attention and experts."""
    root = tmp_path_factory.mktemp("export")
    base = write_tiny_checkpoint(root / "base", seed=1, mxfp4=request.param, num_hidden_layers=2)
    model = ossrl.load_model(base, dtype=torch.float32)
    apply_lora(model, LoRAConfig(r=4, alpha=8, seed=3))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    save_adapter(model, root / "run" / "final" / "adapter", base_model=str(base))
    ids = torch.randint(0, 256, (2, 21), generator=gen)
    with torch.no_grad():
        reference = model(ids)
        with model.adapters_disabled():
            base_logits = model(ids)
    assert rel(reference, base_logits) > 1e-2  # the adapter really changes the model
    return dict(base=base, checkpoint=root / "run" / "final", ids=ids, reference=reference,
                mxfp4=request.param, root=root)


def load_hf(path, mxfp4):
    kwargs = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if mxfp4 else {}
    return transformers.GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).float().eval()


def test_peft_loads_the_adapter_onto_transformers_with_the_same_logits(trained, tmp_path):
    peft = pytest.importorskip("peft")
    out = export(trained["checkpoint"], tmp_path / "adapter", format="adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    hf = load_hf(trained["base"], trained["mxfp4"])
    model = peft.PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        logits = model(trained["ids"]).logits
    assert rel(logits, trained["reference"]) <= 1e-4


def test_merged_export_matches_ossrl_with_adapters(trained, tmp_path):
    # float32 merge: the merge itself must be exact to fp32 rounding
    out = export(trained["checkpoint"], tmp_path / "merged32", format="merged-bf16", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    with torch.no_grad():
        hf_logits = load_hf(out, False)(trained["ids"]).logits
        ossrl_logits = ossrl.load_model(out, dtype=torch.float32)(trained["ids"])
    assert rel(hf_logits, trained["reference"]) <= 1e-4
    assert rel(ossrl_logits, trained["reference"]) <= 1e-4


def test_merged_bf16_export_is_sharded_bf16_within_rounding(trained, tmp_path):
    out = export(trained["checkpoint"], tmp_path / "merged16", format="merged-bf16", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = load_hf(out, False)
    with torch.no_grad():
        logits = hf(trained["ids"]).logits
    assert rel(logits, trained["reference"]) <= 3e-2  # bf16 weights: rounding, not a wrong merge


def test_merged_mxfp4_requantizes_experts(trained, tmp_path):
    out = export(trained["checkpoint"], tmp_path / "mx", format="merged-mxfp4", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    ours = ossrl.load_model(out, dtype=torch.float32)
    assert ours.expert_format == "mxfp4"
    hf = load_hf(out, True)
    with torch.no_grad():
        a, b = ours(trained["ids"]), hf(trained["ids"]).logits
    assert rel(a, b) <= 1e-4  # the same MXFP4 bytes decoded by both
    err = rel(a, trained["reference"])
    assert 0 < err <= 0.3  # within the 4-bit quantisation error of the merged experts
    # The LoRA delta on the experts survived quantisation (not the base bytes copied back).
    base = ossrl.load_model(trained["base"], dtype=torch.float32, experts="mxfp4")
    ex_new, ex_old = ours.model.layers[0].mlp.experts, base.model.layers[0].mlp.experts
    assert not torch.equal(ex_new.gate_up_proj_blocks, ex_old.gate_up_proj_blocks)


def test_load_model_reads_an_adapter_directory(trained):
    model = ossrl.load_model(trained["checkpoint"], dtype=torch.float32)
    with torch.no_grad():
        assert rel(model(trained["ids"]), trained["reference"]) <= 1e-6


def test_export_cli(trained, tmp_path):
    assert main(["export", str(trained["checkpoint"]), str(tmp_path / "a"), "--format", "adapter"]) == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "b"), "--format", "adapter"]) == 2


def test_requantizing_representable_experts_changes_no_value(tmp_path):
    """merged-mxfp4 of a zero adapter reproduces the base expert values exactly."""
    base = write_tiny_checkpoint(tmp_path / "base", seed=2, mxfp4=True, num_hidden_layers=1)
    model = ossrl.load_model(base, dtype=torch.float32)
    apply_lora(model, LoRAConfig(r=2))  # B = 0: a zero delta
    save_adapter(model, tmp_path / "ad", base_model=str(base))
    out = export(tmp_path / "ad", tmp_path / "mx", format="merged-mxfp4")
    a = ossrl.load_model(out, dtype=torch.float32, experts="mxfp4").model.layers[0].mlp.experts
    b = ossrl.load_model(base, dtype=torch.float32, experts="mxfp4").model.layers[0].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        va = dequantize_mxfp4(getattr(a, f"{name}_blocks"), getattr(a, f"{name}_scales"), torch.float32)
        vb = dequantize_mxfp4(getattr(b, f"{name}_blocks"), getattr(b, f"{name}_scales"), torch.float32)
        assert torch.equal(va, vb), name
