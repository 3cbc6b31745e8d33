"""The gpt-oss model against Hugging Face transformers' GptOssForCausalLM (the reference no one here wrote).

fp32 on CPU, several tiny configs, relative error of logits <= 1e-4; both dense-expert and
MXFP4-expert checkpoints; incremental decoding with the cache equals the full forward.
"""

import pytest
import torch

from ossrl.model.gptoss import KVCache
from ossrl.model.loading import load_model, save_model
from ossrl.testing import random_model, tiny_config

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "base": dict(),
    "three_layers_8_experts_top4": dict(num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=4),
    "mha_window5": dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=5),
    "gqa4_head32_window16_top1": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                      sliding_window=16, num_experts_per_tok=1, num_hidden_layers=4),
    "wide_experts": dict(hidden_size=96, intermediate_size=128, num_local_experts=6, num_experts_per_tok=3),
}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def load_hf(path, mxfp4: bool):
    kwargs = {}
    if mxfp4:
        kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    # transformers keeps dequantized experts in bf16 even for dtype=float32 (spec 3.3);
    # .float() upcasts them exactly (MXFP4 values are exact in bf16).
    hf = transformers.GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    return hf.float().eval()


@pytest.mark.parametrize("mxfp4", [False, True], ids=["dense", "mxfp4"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_in_fp32(tmp_path, name, mxfp4):
    config = tiny_config(quantization="mxfp4" if mxfp4 else None, **CONFIGS[name])
    model = random_model(config, seed=3, expert_format="mxfp4" if mxfp4 else "bf16", dtype=torch.bfloat16)
    save_model(model, tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)
    hf = load_hf(tmp_path, mxfp4)
    seq = 2 * config.sliding_window + 7  # odd, longer than the window
    ids = torch.randint(0, config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits = ours(ids)
        hf_logits = hf(ids).logits
    assert ours_logits.shape == (2, seq, config.vocab_size)
    assert rel_err(ours_logits, hf_logits) <= 1e-4


def test_mxfp4_checkpoint_decoded_at_load_matches_packed_model(tmp_path):
    config = tiny_config(quantization="mxfp4")
    save_model(random_model(config, seed=5, expert_format="mxfp4"), tmp_path)
    packed = load_model(tmp_path, dtype=torch.float32, experts="auto")
    dense = load_model(tmp_path, dtype=torch.float32, experts="bf16")
    assert packed.expert_format == "mxfp4" and dense.expert_format == "bf16"
    ids = torch.randint(0, config.vocab_size, (1, 19))
    with torch.no_grad():
        # Same weights (decode is exact); only the matmul grouping differs.
        torch.testing.assert_close(packed(ids), dense(ids), rtol=1e-5, atol=1e-5)


def test_dequantized_experts_equal_transformers_dequantization(tmp_path):
    config = tiny_config(quantization="mxfp4", num_hidden_layers=1)
    save_model(random_model(config, seed=7, expert_format="mxfp4"), tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32, experts="bf16")
    hf = transformers.GptOssForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True))
    for name in ("gate_up_proj", "down_proj"):
        a = getattr(ours.model.layers[0].mlp.experts, name)
        b = getattr(hf.model.layers[0].mlp.experts, name)
        assert a.shape == b.shape
        assert torch.equal(a, b.float()), name  # bit-identical


def test_incremental_decoding_with_cache_matches_full_forward():
    config = tiny_config(num_hidden_layers=3, sliding_window=4)
    model = random_model(config, seed=11)
    ids = torch.randint(0, config.vocab_size, (2, 15))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache()
        pieces = [model(ids[:, :6], cache=cache)]  # prefill, then one token at a time
        for t in range(6, 15):
            pieces.append(model(ids[:, t:t + 1], cache=cache))
    stepped = torch.cat(pieces, dim=1)
    assert len(cache) == 15
    assert rel_err(stepped, full) <= 1e-5


def test_packed_documents_equal_separate_forwards():
    config = tiny_config(sliding_window=4)
    model = random_model(config, seed=2)
    a = torch.randint(0, config.vocab_size, (1, 7))
    b = torch.randint(0, config.vocab_size, (1, 10))
    packed = torch.cat((a, b), dim=1)
    positions = torch.cat((torch.arange(7), torch.arange(10))).unsqueeze(0)
    doc_ids = torch.tensor([[0] * 7 + [1] * 10])
    with torch.no_grad():
        together = model(packed, positions=positions, doc_ids=doc_ids)
        torch.testing.assert_close(together[:, :7], model(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together[:, 7:], model(b), rtol=1e-5, atol=1e-5)


def test_each_spec_detail_changes_the_logits():
    """Guards against a test that cannot fail: the parity above must be sensitive to the details."""
    config = tiny_config()
    model = random_model(config, seed=4)
    ids = torch.randint(0, config.vocab_size, (1, 20))
    with torch.no_grad():
        base = model(ids)
        model.model.layers[0].self_attn.sinks.zero_()
        assert rel_err(model(ids), base) > 1e-3
