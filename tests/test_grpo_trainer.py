"""GRPO end to end on a tiny checkpoint (CPU): every loss type, resume, crash safety, garbage rewards."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from ossrl.cli import main
from ossrl.model.lora import LoRAConfig, lora_state_dict
from ossrl.rl.config import GRPOConfig
from ossrl.rl.trainer import GRPOTrainer
from ossrl.testing import ascii_fraction_reward, tiny_grpo_config, write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


ROWS = [{"prompt": f"Task {i}: write something", "difficulty": i % 3} for i in range(10)]


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss_type,extra", [("grpo", {}), ("bnpo", {}), ("dr_grpo", {}), ("dapo", {}), ("gspo", {}),
                                             ("cispo", {"epsilon_high": 5.0}), ("sapo", {}),
                                             ("dapo", {"delta": 1.5, "top_entropy_quantile": 0.2})],
                         ids=["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "sapo", "dapo-delta-entropy-mask"])
def test_every_loss_type_runs_and_changes_the_lora_weights(tiny, tmp_path, loss_type, extra):
    trainer = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS,
                          config=tiny_grpo_config(tiny, tmp_path / "run", loss_type=loss_type, beta=0.05,
                                        num_iterations=2, **extra), log=lambda *_: None)
    before = {k: v.clone() for k, v in lora_state_dict(trainer.model).items()}
    final = trainer.train()
    after = lora_state_dict(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in ("reward", "loss", "grad_norm", "entropy", "kl", "completions/mean_length",
                    "clip_ratio/region_mean", "importance_ratio/mean", "time/generate", "tokens_per_second"):
            assert m[key] is not None and torch.isfinite(torch.tensor(float(m[key]))), key
        if "top_entropy_quantile" in extra:  # about a fifth of the trained tokens keep their policy term
            assert 0.1 < m["entropy_mask/kept_fraction"] < 0.35
    samples = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 2 * 3
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert (final / "trainer_state.pt").is_file() and (tmp_path / "run" / "config.toml").is_file()


@pytest.mark.parametrize("extra", [{}, {"lora": LoRAConfig(r=4, alpha=8, dropout=0.3), "lr_scheduler_type": "cosine",
                                       "warmup_steps": 1}, {"dtype": "float16"}, {"offload_optimizer": True}],
                         ids=["plain", "dropout-cosine", "fp16-loss-scaled", "offloaded-optimizer"])
def test_resume_continues_exactly(tiny, tmp_path, extra):
    straight = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS,
                           config=tiny_grpo_config(tiny, tmp_path / "a", max_steps=4, **extra), log=lambda *_: None)
    straight.train()
    # the same 4-step run, stopped after step 2 (its schedule spans 4 steps)
    first = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS,
                        config=tiny_grpo_config(tiny, tmp_path / "b", max_steps=4, **extra), log=lambda *_: None)
    first.train_step()
    first.train_step()
    first.save_checkpoint()
    # a crash while logging leaves half a line behind: resume drops it
    (tmp_path / "b" / "samples.jsonl").write_text('{"step": 3, "prompt": "cut he')
    resumed = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS,
                          config=tiny_grpo_config(tiny, tmp_path / "b", max_steps=4, resume_from="latest", **extra),
                          log=lambda *_: None)
    resumed.train()
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [3, 4]
    for x, y in zip(a[2:], b):
        assert x["reward"] == y["reward"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-7)
        assert x["learning_rate"] == pytest.approx(y["learning_rate"])
    sa, sb = lora_state_dict(straight.model), lora_state_dict(resumed.model)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-7)


def test_save_total_limit_keeps_the_newest_checkpoints(tiny, tmp_path):
    GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS,
                config=tiny_grpo_config(tiny, tmp_path / "r", max_steps=4, save_steps=1, save_total_limit=2),
                log=lambda *_: None).train()
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["step-3", "step-4"]  # the last step is always saved


KILL_SCRIPT = r"""
import os, signal, sys, torch
from ossrl.rl.config import GRPOConfig
from ossrl.rl.config import GRPOConfig
from ossrl.rl.trainer import GRPOTrainer
from ossrl.testing import ascii_fraction_reward
import ossrl.model.adapters as ck
original = ck.save_file
def dying_save(tensors, path, metadata=None):
    original(tensors, path, metadata=metadata)
    if "step-2" in str(path) or "step-2" in os.path.dirname(os.path.dirname(str(path))):
        os.kill(os.getpid(), signal.SIGKILL)  # die in the middle of writing checkpoint 2
ck.save_file = dying_save
rows = [{"prompt": f"Task {i}"} for i in range(10)]
cfg = GRPOConfig(model=sys.argv[1], output_dir=sys.argv[2], max_steps=3, prompts_per_step=2, num_generations=3,
                 max_completion_length=8, progress_bar=False, save_steps=1, gradient_checkpointing=False)
GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=rows, config=cfg, log=lambda *_: None).train()
"""


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_resumable(tiny, tmp_path):
    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tiny), str(run)], capture_output=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    dirs = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert dirs == ["step-1"]  # step-2 never appeared under its final name
    trainer = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=[{"prompt": f"Task {i}"} for i in range(10)],
                          config=tiny_grpo_config(tiny, run, max_steps=3, resume_from="latest", max_completion_length=8),
                          log=lambda *_: None)
    trainer.train()
    assert trainer.step == 3


def test_a_raising_reward_function_is_reported_and_the_step_goes_on(tiny, tmp_path):
    def broken_reward(prompts, completions, **kw):
        raise RuntimeError("boom")

    messages = []
    trainer = GRPOTrainer(reward_funcs=[ascii_fraction_reward, broken_reward], train_dataset=ROWS,
                          config=tiny_grpo_config(tiny, tmp_path / "r", max_steps=1), log=messages.append)
    trainer.train()
    assert any("broken_reward" in m and "boom" in m for m in messages)
    m = read_metrics(tmp_path / "r")[0]
    assert m["reward_errors"] == 1 and m["rewards/broken_reward/mean"] is None
    sample = json.loads((tmp_path / "r" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["rewards"]["broken_reward"] is None


def test_dataset_columns_reach_the_reward_function(tiny, tmp_path):
    seen = []

    def column_reward(prompts, completions, completion_ids, difficulty, **kw):
        seen.append((len(prompts), list(difficulty)))
        return [float(d) for d in difficulty]

    GRPOTrainer(reward_funcs=[column_reward], train_dataset=ROWS, config=tiny_grpo_config(tiny, tmp_path / "r", max_steps=1),
                log=lambda *_: None).train()
    n, difficulty = seen[0]
    assert n == 6 and len(difficulty) == 6 and difficulty[0] == difficulty[1] == difficulty[2]


def test_dynamic_sampling_drops_zero_variance_groups(tiny, tmp_path):
    def constant_for_even_tasks(prompts, completions, completion_ids, difficulty, **kw):
        return [0.0 if d == 0 else ascii_fraction_reward(None, None, [ids])[0]
                for d, ids in zip(difficulty, completion_ids)]

    GRPOTrainer(reward_funcs=[constant_for_even_tasks], train_dataset=ROWS,
                config=tiny_grpo_config(tiny, tmp_path / "r", max_steps=3, dynamic_sampling=True,
                              max_dynamic_sampling_retries=4), log=lambda *_: None).train()
    for m in read_metrics(tmp_path / "r"):
        assert m["groups_used"] == 2
    assert sum(m["dynamic_sampling/retries"] for m in read_metrics(tmp_path / "r")) > 0
    trained = [json.loads(x) for x in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()]
    assert len(trained) == 3 * 2 * 3
    assert all(not x["prompt"].startswith(("Task 0:", "Task 3:", "Task 6:", "Task 9:")) for x in trained)


def test_train_cli_with_overrides_as_words_and_set_options(tiny, tmp_path):
    cfg = tmp_path / "run.toml"
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    cfg.write_text(f'model = "{tiny}"\ndataset = "{data}"\noutput_dir = "{tmp_path / "out"}"\n'
                   f'reward_funcs = ["ossrl.testing:ascii_fraction_reward"]\nprompts_per_step = 2\n'
                   f'num_generations = 2\nmax_completion_length = 6\nprogress_bar = false\n')
    assert main(["train", str(cfg), "max_steps=1", "--set", "loss_type=bnpo"]) == 0
    saved = (tmp_path / "out" / "config.toml").read_text()
    assert 'loss_type = "bnpo"' in saved and "max_steps = 1" in saved
    assert main(["train", str(cfg), "--set", "los_type=grpo"]) == 2  # clear error, no traceback


def test_plot_writes_pngs_of_a_run(tiny, tmp_path):
    GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS,
                config=tiny_grpo_config(tiny, tmp_path / "r", max_steps=2), log=lambda *_: None).train()
    assert main(["plot", str(tmp_path / "r")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "r" / "plots").iterdir())
    assert "rewards.png" in pngs and "loss.png" in pngs
    assert all((tmp_path / "r" / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_a_single_pass_is_on_policy_even_with_lora_dropout(tiny, tmp_path):
    GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS,
                config=tiny_grpo_config(tiny, tmp_path / "r", max_steps=3, lora=LoRAConfig(r=4, dropout=0.5)),
                log=lambda *_: None).train()
    for m in read_metrics(tmp_path / "r"):
        assert m["ratio/mean"] == pytest.approx(1.0) and m["clip_ratio/region_mean"] == 0


def test_grpo_continues_from_a_saved_adapter_and_records_the_real_base(tiny, tmp_path):
    first = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS,
                        config=tiny_grpo_config(tiny, tmp_path / "a", max_steps=1), log=lambda *_: None)
    final = first.train()
    second = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS,
                         config=tiny_grpo_config(final, tmp_path / "b", max_steps=1), log=lambda *_: None)
    start = {k: v.clone() for k, v in lora_state_dict(second.model).items()}
    for k, v in lora_state_dict(first.model).items():
        torch.testing.assert_close(start[k], v)  # it starts where the first run ended
    second.train()
    assert any(not torch.equal(start[k], v) for k, v in lora_state_dict(second.model).items())
    adapter_cfg = json.loads((tmp_path / "b" / "final" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny)


def test_a_bad_dataset_row_is_named(tiny, tmp_path):
    rows = [{"prompt": "fine"}, {"prompt": None}] * 3
    trainer = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=rows,
                          config=tiny_grpo_config(tiny, tmp_path / "r", max_steps=2), log=lambda *_: None)
    with pytest.raises(ValueError, match=r"train_dataset: row [135] has no usable 'prompt'"):
        trainer.train()


def test_shared_prompt_packing_trains_exactly_like_whole_sequences(tiny, tmp_path, monkeypatch):
    """A GRPO step forwards each prompt once for its completions (branches); the LoRA weights after
    two steps equal those of packing every completion with its own prompt copy."""
    import ossrl.rl.step as step_module

    real = step_module.pack_sequences
    branches = []

    def packing(share):
        def pack(*args, **kwargs):
            batch = real(*args, **{**kwargs, "share_prefixes": share})
            branches.append(0 if batch.branch_ids is None else int(batch.branch_ids.max()))
            return batch
        return pack

    weights = []
    for share in (True, False):
        monkeypatch.setattr(step_module, "pack_sequences", packing(share))
        trainer = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS,
                              config=tiny_grpo_config(tiny, tmp_path / f"run-{share}"), log=lambda *_: None)
        trainer.train()
        weights.append(lora_state_dict(trainer.model))
    assert max(branches) >= 3  # sharing happened (these prompts differ in one digit: groups may span both)
    for name, value in weights[1].items():
        assert ((weights[0][name] - value).norm() / value.norm().clamp(min=1e-12)).item() < 1e-4, name


def test_enable_sleep_mode_off_keeps_the_pool_and_trains_the_same(tiny, tmp_path, monkeypatch):
    """enable_sleep_mode=False skips the release between phases; the training is unchanged."""
    from ossrl.engine.engine import RolloutEngine

    releases = []
    real_release = RolloutEngine.release
    monkeypatch.setattr(RolloutEngine, "release", lambda self: (releases.append(1), real_release(self)))
    weights = []
    for standby in (True, False):
        releases.clear()
        trainer = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS,
                              config=tiny_grpo_config(tiny, tmp_path / f"run-{standby}", enable_sleep_mode=standby,
                                            prefill_tokens=64), log=lambda *_: None)
        trainer.train()
        assert len(releases) == (2 if standby else 0)
        weights.append(lora_state_dict(trainer.model))
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
    with pytest.raises(ValueError, match="prefill_tokens must be positive"):
        tiny_grpo_config(tiny, tmp_path / "bad", prefill_tokens=0)


def test_memory_options_are_validated(tiny, tmp_path):
    for bad, match in (({"gradient_checkpointing": "always"}, "gradient_checkpointing must be true, false or 'auto'"),
                       ({"activation_budget_gb": -1.0}, "activation_budget_gb must be >= 0"),
                       ({"gradient_checkpointing": False, "offload_activations": True}, "offload_activations needs"),
                       ({"fsdp": True, "offload_optimizer": True}, "offload_optimizer with fsdp is not supported"),
                       ({"dense_experts_gb": -1.0}, "dense_experts_gb must be >= 0"),
                       ({"fsdp": True, "dense_experts_gb": 8.0}, "dense_experts_gb with fsdp is not supported")):
        with pytest.raises(ValueError, match=match):
            tiny_grpo_config(tiny, tmp_path / "bad", **bad)
    assert GRPOConfig().gradient_checkpointing == "auto"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_auto_checkpointing_out_of_memory_redoes_the_pass_with_every_layer_checkpointed(tiny, tmp_path, monkeypatch,
                                                                                      dropout):
    """An OOM in the training pass under gradient_checkpointing "auto" (simulated: the first log-prob
    forward of step 1 raises) is not the end of the run: the pass is redone from zeroed gradients
    (and, with LoRA dropout, the same random masks) with every layer checkpointed, and the run
    trains exactly like one checkpointed from the start."""
    import ossrl.rl.step as step

    real, raised = step.sequence_logprobs, []

    def fails_once(model, *args, **kwargs):
        if kwargs.get("with_entropy") and model.model.gradient_checkpointing == "auto" and not raised:
            raised.append(1)
            lp, _ = real(model, *args, **kwargs)  # a pass that got partway, as a real OOM would
            lp.sum().backward()  # leaves gradients behind: the retry must start from zero
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(step, "sequence_logprobs", fails_once)
    logged = []
    trainer = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS,
                          config=tiny_grpo_config(tiny, tmp_path / "auto", gradient_checkpointing="auto",
                                                  lora=LoRAConfig(r=8, dropout=dropout)),
                          log=logged.append)
    trainer.train()
    monkeypatch.setattr(step, "sequence_logprobs", real)
    full = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS,
                       config=tiny_grpo_config(tiny, tmp_path / "full", gradient_checkpointing=True,
                                               lora=LoRAConfig(r=8, dropout=dropout)),
                       log=lambda *_: None)
    full.train()
    assert raised and trainer.model.model.gradient_checkpointing is True
    assert any("ran out of memory" in line for line in logged)
    metrics = [json.loads(x) for x in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["oom_fallbacks"] == 1 and "oom_fallbacks" not in metrics[1]
    a, b = lora_state_dict(trainer.model), lora_state_dict(full.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(torch.OutOfMemoryError):  # not "auto": an OOM is the user's to see
        monkeypatch.setattr(step, "sequence_logprobs", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError()))
        GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS,
                    config=tiny_grpo_config(tiny, tmp_path / "true", gradient_checkpointing=True),
                    log=lambda *_: None).train()


EVAL_ROWS = [{"prompt": f"Held-out {i}: write something else", "difficulty": i} for i in range(3)]


def test_evaluation_on_held_out_prompts_at_start_every_eval_steps_and_at_the_end(tiny, tmp_path):
    seen_columns = []

    def reward(prompts, completions, completion_ids, difficulty=None, **columns):
        seen_columns.append(list(difficulty))
        return ascii_fraction_reward(prompts, completions, completion_ids)

    config = tiny_grpo_config(tiny, tmp_path / "run", max_steps=3, eval_steps=2, eval_on_start=True,
                              eval_num_generations=2, eval_temperature=0.0)
    trainer = GRPOTrainer(reward_funcs=[reward], train_dataset=ROWS, eval_dataset=EVAL_ROWS, config=config,
                          log=lambda *_: None)
    trainer.train()
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert "reward" not in metrics[0] and "eval/reward" in metrics[0]  # before training: eval only
    assert ["eval/reward" in m for m in metrics] == [True, False, True, True]  # every 2 steps, and the last
    evals = [json.loads(x) for x in (tmp_path / "run" / "eval_samples.jsonl").read_text().splitlines()]
    assert [x["step"] for x in evals] == [0] * 6 + [2] * 6 + [3] * 6
    assert [x["prompt"] for x in evals[:6]] == [r["prompt"] for r in EVAL_ROWS for _ in range(2)]
    assert [0, 0, 1, 1, 2, 2] in seen_columns  # the eval rows' columns reach the reward function
    for m, step in zip((metrics[0], metrics[2], metrics[3]), (0, 2, 3)):
        rows = [x for x in evals if x["step"] == step]
        assert m["eval/completions"] == 6
        assert m["eval/reward"] == pytest.approx(sum(x["reward"] for x in rows) / 6)
        assert m["eval/rewards/reward/mean"] == pytest.approx(m["eval/reward"])
        assert m["eval/completions/mean_length"] == pytest.approx(sum(x["length"] for x in rows) / 6)
    # greedy: both completions of a prompt are the same, and the same policy evaluates the same
    assert all(evals[i]["completion"] == evals[i + 1]["completion"] for i in range(0, 18, 2))
    again, samples = trainer.evaluate()
    assert [x["completion"] for x in samples] == [x["completion"] for x in evals[12:]]
    assert again["eval/reward"] == pytest.approx(metrics[3]["eval/reward"])
    from ossrl.rl.plots import plot_run

    assert "eval.png" in [p.name for p in plot_run(tmp_path / "run")]


def test_sampled_evaluation_repeats_its_draws_and_bad_eval_options_are_refused(tiny, tmp_path):
    config = tiny_grpo_config(tiny, tmp_path / "run", eval_num_generations=3, eval_temperature=1.0,
                              eval_max_prompts=2)
    trainer = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS, eval_dataset=EVAL_ROWS,
                          config=config, log=lambda *_: None)
    first, a = trainer.evaluate()
    trainer.step = 5  # (the eval seeds do not follow the step)
    second, b = trainer.evaluate()
    assert first["eval/completions"] == 6 and [x["completion"] for x in a] == [x["completion"] for x in b]
    assert first["eval/reward_errors"] == 0
    assert len({x["completion"] for x in a}) > 2  # sampled, not greedy
    # the three prompts in calls of 2 + 1 (a step generates 2 x 3 completions: 2 prompts a call at
    # 3 samples each) or in one call (4 x 3): the same draws
    chunked = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS, eval_dataset=EVAL_ROWS,
                          log=lambda *_: None, config=tiny_grpo_config(tiny, tmp_path / "c", eval_num_generations=3,
                                                                       eval_temperature=1.0))
    whole = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS, eval_dataset=EVAL_ROWS,
                        log=lambda *_: None, config=tiny_grpo_config(tiny, tmp_path / "w", eval_num_generations=3,
                                                                     eval_temperature=1.0, prompts_per_step=4))
    calls = []
    generate = chunked.engine.generate
    chunked.engine.generate = lambda prompts, **kw: calls.append(len(prompts)) or generate(prompts, **kw)
    assert [x["completion"] for x in chunked.evaluate()[1]] == [x["completion"] for x in whole.evaluate()[1]]
    assert calls == [2, 1]
    for bad in ({"eval_num_generations": 0}, {"eval_temperature": -1.0}, {"eval_steps": -1}):
        with pytest.raises(ValueError, match="eval_"):
            tiny_grpo_config(tiny, tmp_path / "x", **bad)
    with pytest.raises(ValueError, match="no eval prompt fits"):
        GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS, eval_dataset=EVAL_ROWS,
                    config=tiny_grpo_config(tiny, tmp_path / "y", max_prompt_length=5), log=lambda *_: None)


def test_eval_cli_scores_a_trained_run_on_held_out_prompts(tiny, tmp_path):
    data, held_out = tmp_path / "data.jsonl", tmp_path / "held_out.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    held_out.write_text("\n".join(json.dumps(r) for r in EVAL_ROWS))
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{tiny}"\ndataset = "{data}"\noutput_dir = "{tmp_path / "run"}"\n'
                   f'reward_funcs = ["ossrl.testing:ascii_fraction_reward"]\nprompts_per_step = 2\n'
                   f'num_generations = 2\nmax_completion_length = 6\nprogress_bar = false\nmax_steps = 1\n'
                   f'learning_rate = 0.05\n')
    assert main(["train", str(cfg)]) == 0
    assert main(["eval", str(cfg), f"model={tmp_path / 'run' / 'final'}", f"eval_dataset={held_out}",
                 "eval_num_generations=2", "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    samples = [json.loads(x) for x in (tmp_path / "ev" / "eval_samples.jsonl").read_text().splitlines()]
    assert report["eval/completions"] == 6 == len(samples) and report["model"].endswith("final")
    assert report["eval/reward"] == pytest.approx(sum(x["reward"] for x in samples) / 6)
    # the trained adapter is what was evaluated: the base model (adapters fresh) decodes otherwise
    assert main(["eval", str(cfg), f"eval_dataset={held_out}", "eval_num_generations=2",
                 "--out", str(tmp_path / "base")]) == 0
    base = [json.loads(x) for x in (tmp_path / "base" / "eval_samples.jsonl").read_text().splitlines()]
    assert [x["completion"] for x in base] != [x["completion"] for x in samples]
    assert main(["eval", str(cfg), "dataset=", "--out", str(tmp_path / "none")]) == 2  # no prompts: a clear error


def test_cispo_on_one_pass_has_dapos_gradient(tiny, tmp_path):
    """With the ratio exactly 1 (one pass), cispo's -sg(min(r, cap)) A logp and dapo's clipped
    surrogate have the same gradient, with the same normaliser (the generation batch's tokens,
    not divided per micro-batch): the same grad_norm."""
    norms = []
    for loss_type, extra in (("dapo", {}), ("cispo", {"epsilon_high": 5.0})):
        trainer = GRPOTrainer(reward_funcs=[ascii_fraction_reward], train_dataset=ROWS, log=lambda *_: None,
                              config=tiny_grpo_config(tiny, tmp_path / loss_type, max_steps=1, loss_type=loss_type,
                                                      gradient_accumulation_steps=2, **extra))
        trainer.train()
        norms.append(read_metrics(tmp_path / loss_type)[0]["grad_norm"])
    assert norms[0] > 0 and norms[1] == pytest.approx(norms[0], rel=1e-5)


def test_policy_phase_metrics_cover_exactly_the_trained_tokens_of_every_micro_batch(tmp_path):
    """optimise_policy reads its metrics back once, at the phase's end: the importance ratios'
    statistics are over every trained token of every micro-batch (completions of unequal lengths:
    no padding counted), and the entropy and loss are those of the micro-batches."""
    from types import SimpleNamespace

    from ossrl.model.lora import apply_lora
    from ossrl.rl.step import optimise_policy
    from ossrl.testing import random_model, tiny_config
    from ossrl.train.logprobs import pack_sequences, sequence_logprobs

    config = tiny_config()
    model = random_model(config, seed=3, dtype=torch.float32)
    apply_lora(model, LoRAConfig(r=4))
    model.train()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (5,), generator=gen).tolist()
    rollouts, shifts = [], []
    for n in (3, 7, 1, 5):  # completion lengths
        completion = torch.randint(0, config.vocab_size, (n,), generator=gen).tolist()
        seq = prompt + completion
        with torch.no_grad():
            lp, _ = sequence_logprobs(model, pack_sequences([seq], [[False] * 5 + [True] * n], max_tokens=len(seq)))
        shift = torch.linspace(-0.3, 0.4, n) if n > 1 else torch.tensor([0.25])
        shifts.append(shift)
        rollouts.append(SimpleNamespace(prompt_ids=prompt, completion_ids=completion, finish_reason="stop",
                                        sampling_logprobs=(lp - shift).tolist()))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    c = GRPOConfig(model="unused", gradient_accumulation_steps=2, importance_sampling_cap=1.2, loss_type="dapo")
    out = optimise_policy(model, optimizer, scheduler, params, c, rollouts, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    ratios = torch.cat(shifts).exp()  # the training pass's log-probs over the sampling ones
    assert out["importance_ratio/mean"] == pytest.approx(float(ratios.mean()), rel=1e-5)
    assert out["importance_ratio/min"] == pytest.approx(float(ratios.min()), rel=1e-5)
    assert out["importance_ratio/max"] == pytest.approx(float(ratios.max()), rel=1e-5)
    assert out["importance_ratio/capped_frac"] == pytest.approx(float((ratios > 1.2).float().mean()))
    assert out["ratio/mean"] == pytest.approx(1.0) and out["clip_ratio/region_mean"] == 0
    assert all(isinstance(v, float) for v in out.values())
    assert out["entropy"] > 0 and out["loss"] != 0
