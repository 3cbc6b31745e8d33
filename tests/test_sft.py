"""SFT end to end on a tiny checkpoint; strict TOML configs; adapters save and load."""

import json

import pytest
import torch

import ossrl
from ossrl.cli import main
from ossrl.configs import ConfigValueError, load_config
from ossrl.model.lora import apply_lora
from ossrl.model.adapters import load_adapter, read_adapter_config
from ossrl.train.sft import SFTConfig, train_sft
from ossrl.testing import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture
def data(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"say {w}"},
                          {"role": "assistant", "thinking": "easy", "content": w}]}
            for w in ("up", "down", "left", "right")]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lora_sft_lowers_the_loss_and_saves_a_loadable_adapter(tiny, data, tmp_path):
    config = SFTConfig(model=str(tiny), data=str(data), output_dir=str(tmp_path / "run"), max_steps=30,
                       learning_rate=3e-3, per_device_train_batch_size=4, max_length=256,
                       lr_scheduler_type="constant", logging_steps=100)
    final = train_sft(config, log=lambda *_: None)
    values = losses(tmp_path / "run")
    assert len(values) == 30
    assert sum(values[-5:]) / 5 < 0.7 * sum(values[:5]) / 5
    lora_config = read_adapter_config(final / "adapter")
    assert lora_config.r == 16 and "experts" in lora_config.targets
    # Reload: base + adapter reproduces the trained model's loss on the data.
    model = ossrl.load_model(tiny, dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        base_logits = model(ids)
    apply_lora(model, lora_config)
    load_adapter(model, final / "adapter")
    with torch.no_grad():
        assert not torch.allclose(model(ids), base_logits)


def test_offloaded_optimizer_trains_exactly_like_adamw(tiny, data, tmp_path):
    """`offload_optimizer = true` keeps AdamW's states in CPU memory (on this CPU-only machine
    nothing moves), with AdamW's maths: the same losses, step by step, as the plain optimizer."""
    runs = []
    for offload in (False, True):
        config = SFTConfig(model=str(tiny), data=str(data), output_dir=str(tmp_path / f"run-{offload}"), max_steps=5,
                           learning_rate=3e-3, per_device_train_batch_size=4, max_length=256, weight_decay=0.01,
                           lr_scheduler_type="cosine", logging_steps=100, offload_optimizer=offload)
        train_sft(config, log=lambda *_: None)
        runs.append(losses(tmp_path / f"run-{offload}"))
    assert len(runs[0]) == 5 and runs[0][-1] != runs[0][0]
    assert runs[1] == pytest.approx(runs[0], rel=1e-6)


def test_full_finetune_sft_saves_a_checkpoint_that_loads(tiny, data, tmp_path):
    config = SFTConfig(model=str(tiny), data=str(data), output_dir=str(tmp_path / "full"), max_steps=12,
                       learning_rate=1e-3, full_finetune=True, per_device_train_batch_size=2,
                       max_length=256, gradient_checkpointing=True)
    final = train_sft(config, log=lambda *_: None)
    values = losses(tmp_path / "full")
    assert values[-1] < values[0]
    assert (final / "tokenizer.json").is_file() and (final / "config.json").is_file()
    reloaded = ossrl.load_model(final, dtype=torch.float32)
    assert reloaded.expert_format == "bf16"


def test_unknown_config_key_suggests_the_nearest(tmp_path):
    path = tmp_path / "sft.toml"
    path.write_text('model = "x"\ndata = "y"\nlearning_rat = 0.1\n')
    with pytest.raises(ConfigValueError, match="unknown key 'learning_rat'.*did you mean 'learning_rate'"):
        load_config(SFTConfig, path)
    path.write_text('model = "x"\n[lora]\nrank = 4\n')
    with pytest.raises(ConfigValueError, match="lora.rank"):
        load_config(SFTConfig, path)
    path.write_text('model = "x"\nmax_length = "long"\n')
    with pytest.raises(ConfigValueError, match="max_length"):
        load_config(SFTConfig, path)
    path.write_text('model = "x"\nlr_scheduler_type = "warm"\n')
    with pytest.raises(ConfigValueError, match="lr_scheduler_type"):
        load_config(SFTConfig, path)
    path.write_text('model = "x"\ndense_experts_gb = -2\n')
    with pytest.raises(ConfigValueError, match="dense_experts_gb must be >= 0"):
        load_config(SFTConfig, path)


def test_sft_cli_with_overrides(tiny, data, tmp_path):
    path = tmp_path / "sft.toml"
    path.write_text(f'model = "{tiny}"\ndata = "{data}"\noutput_dir = "{tmp_path / "cli"}"\n[lora]\nr = 4\n')
    assert main(["sft", str(path), "max_steps=2", "lora.alpha=8"]) == 0
    assert read_adapter_config(tmp_path / "cli" / "final" / "adapter").alpha == 8
    assert len(losses(tmp_path / "cli")) == 2


def test_auto_checkpointing_out_of_memory_redoes_the_step_with_every_layer_checkpointed(tiny, data, tmp_path,
                                                                                      monkeypatch):
    """A simulated OOM in the third step (a refill of the shuffled order happens inside it) under
    "auto": the step is redone from zeroed gradients and the order it started with, and the run
    equals one checkpointed from the start."""
    import ossrl.train.sft as sft

    real, calls = sft.sequence_logprobs, []

    def fails_once(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5 and model.model.gradient_checkpointing == "auto":
            lp, _ = real(model, *args, **kwargs)
            lp.sum().backward()  # partial gradients left behind
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, *args, **kwargs)

    def run(name, checkpointing):
        config = SFTConfig(model=str(tiny), data=str(data), output_dir=str(tmp_path / name), max_steps=4,
                           learning_rate=3e-3, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                           max_length=256, gradient_checkpointing=checkpointing)
        logged = []
        final = train_sft(config, log=logged.append)
        return final, logged

    monkeypatch.setattr(sft, "sequence_logprobs", fails_once)
    auto, logged = run("auto", "auto")
    monkeypatch.setattr(sft, "sequence_logprobs", real)
    full, _ = run("full", True)
    assert any("ran out of memory" in line for line in logged)
    records = [json.loads(x) for x in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("oom_fallbacks", 0) for r in records] == [0, 0, 1, 0]
    assert losses(tmp_path / "auto") == pytest.approx(losses(tmp_path / "full"), rel=1e-5)
    from safetensors.torch import load_file
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (auto, full))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)
