"""Data-parallel GRPO on CPU (gloo, 2 processes under torchrun) equals one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ossrl.testing import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path, tiny, data, out, loss_type, eval_data=None):
    path.write_text(
        f'model = "{tiny}"\ndataset = "{data}"\noutput_dir = "{out}"\n'
        f'reward_funcs = ["ossrl.testing:ascii_fraction_reward"]\nprompts_per_step = 2\nnum_generations = 3\n'
        f'max_completion_length = 8\nmax_steps = 2\nlearning_rate = 0.005\nprogress_bar = false\n'
        f'gradient_checkpointing = false\nloss_type = "{loss_type}"\nseed = 3\n'
        + (f'eval_dataset = "{eval_data}"\neval_steps = 1\neval_num_generations = 2\neval_temperature = 1.0\n'
           if eval_data else ''))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(tiny, tmp_path, loss_type):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Task {i}"}) for i in range(8)))
    # three held-out prompts: two ranks evaluate two and one (sampled, with the same seeds as one process)
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text("\n".join(json.dumps({"prompt": f"Held out {i}"}) for i in range(3)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cfg = tmp_path / "run.toml"

    # one process: the two prompts' groups as two micro-batches
    write_config(cfg, tiny, data, tmp_path / "single", loss_type, eval_data)
    single = subprocess.run([sys.executable, "-m", "ossrl.cli", "train", str(cfg),
                             "--set", "gradient_accumulation_steps=2"], env=env, capture_output=True, timeout=600)
    assert single.returncode == 0, single.stderr.decode()[-3000:]

    # two processes: one group each
    write_config(cfg, tiny, data, tmp_path / "dp", loss_type, eval_data)
    dp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                         "--master-port", str(free_port()), "-m", "ossrl.cli", "train", str(cfg)],
                        env=env, capture_output=True, timeout=600)
    assert dp.returncode == 0, dp.stderr.decode()[-3000:]

    a = load_file(tmp_path / "single" / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "dp" / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    moved = 0
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
        moved += "lora_B" in name and bool(a[name].abs().sum() > 0)
    assert moved  # training changed the adapter (B starts at zero)
    # rank 0 logged the whole batch: both ranks' samples, rewards over all six completions
    metrics = [json.loads(x) for x in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    single_metrics = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward"] for m in metrics] == pytest.approx([m["reward"] for m in single_metrics])
    assert len((tmp_path / "dp" / "samples.jsonl").read_text().splitlines()) == 2 * 6
    # the evaluation after each step: every rank's share, the same completions as one process
    assert [m["eval/completions"] for m in metrics] == [6, 6]
    evals = [[json.loads(x) for x in (tmp_path / run / "eval_samples.jsonl").read_text().splitlines()]
             for run in ("single", "dp")]
    assert [(x["step"], x["prompt"], x["completion"]) for x in evals[1]] == \
        [(x["step"], x["prompt"], x["completion"]) for x in evals[0]]
    assert [m["eval/reward"] for m in metrics] == pytest.approx([m["eval/reward"] for m in single_metrics])


def test_resume_with_a_different_world_size(tiny, tmp_path):
    """Steps 1-2 on two gloo ranks, steps 3-4 resumed in one process == 4 steps in one process.

    The checkpoint holds the global state only (adapter, optimizer, schedule, step, data position;
    seeds are global), so the world size may change at a resume as long as the global batch stays
    the same (here: 2 ranks x 1 micro-batch, then 1 process x 2 micro-batches)."""
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Task {i}"}) for i in range(8)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cfg = tmp_path / "run.toml"
    single_cmd = [sys.executable, "-m", "ossrl.cli", "train", str(cfg), "--set", "gradient_accumulation_steps=2"]

    write_config(cfg, tiny, data, tmp_path / "straight", "grpo")
    straight = subprocess.run(single_cmd + ["--set", "max_steps=4"], env=env, capture_output=True, timeout=600)
    assert straight.returncode == 0, straight.stderr.decode()[-3000:]

    write_config(cfg, tiny, data, tmp_path / "moved", "grpo")
    dp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                         "--master-port", str(free_port()), "-m", "ossrl.cli", "train", str(cfg),
                         "--set", "save_steps=2"], env=env, capture_output=True, timeout=600)
    assert dp.returncode == 0, dp.stderr.decode()[-3000:]
    assert (tmp_path / "moved" / "checkpoints" / "step-2").is_dir()
    resumed = subprocess.run(single_cmd + ["--set", "max_steps=4", "--set", "resume_from=latest"],
                             env=env, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]

    a = load_file(tmp_path / "straight" / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "moved" / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    ma = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in mb] == [1, 2, 3, 4]
    assert [m["reward"] for m in mb] == pytest.approx([m["reward"] for m in ma])


def test_dynamic_sampling_across_ranks_equals_one_process(tiny, tmp_path):
    """Groups with equal rewards are dropped and topped up from the global prompt stream: two gloo
    ranks end with the same adapter and per-step rewards as one process (every third task is flat)."""
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Task {i}", "flat": i % 3 == 0}) for i in range(12)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cfg = tmp_path / "run.toml"
    extra = ["--set", "dynamic_sampling=true", "--set", "max_dynamic_sampling_retries=4", "--set", "max_steps=3",
             "--set", 'reward_funcs=["ossrl.testing:ascii_fraction_unless_flat"]']

    write_config(cfg, tiny, data, tmp_path / "single", "grpo")
    single = subprocess.run([sys.executable, "-m", "ossrl.cli", "train", str(cfg),
                             "--set", "gradient_accumulation_steps=2", *extra],
                            env=env, capture_output=True, timeout=600)
    assert single.returncode == 0, single.stderr.decode()[-3000:]
    write_config(cfg, tiny, data, tmp_path / "dp", "grpo")
    dp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                         "--master-port", str(free_port()), "-m", "ossrl.cli", "train", str(cfg), *extra],
                        env=env, capture_output=True, timeout=600)
    assert dp.returncode == 0, dp.stderr.decode()[-3000:]

    ms = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    md = [json.loads(x) for x in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["dynamic_sampling/retries"] for m in ms) > 0  # the top-up path ran
    for a, b in zip(ms, md):
        assert b["groups_used"] == a["groups_used"] == 2
        assert b["dynamic_sampling/retries"] == a["dynamic_sampling/retries"]
        assert b["reward"] == pytest.approx(a["reward"])
        assert b["frac_reward_zero_std"] == pytest.approx(a["frac_reward_zero_std"])
    trained = [json.loads(x)["prompt"] for x in (tmp_path / "dp" / "samples.jsonl").read_text().splitlines()]
    assert not any(p in ("Task 0", "Task 3", "Task 6", "Task 9") for p in trained)
    a = load_file(tmp_path / "single" / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "dp" / "final" / "adapter" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
