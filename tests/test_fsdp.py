"""FSDP2-sharded GRPO on CPU (gloo, 2 processes under torchrun) equals one process with the same global batch.

The model's layers are sharded over the ranks (ossrl.train.sharding): every forward gathers each
layer's shards, the rollout engine decodes in lockstep, gradients are reduce-scattered as sums and
checkpoints hold whole tensors. Gradients differ from one process's in their last bits (summation
order, the slot engine's sampling log-probs against the simple engine's: grad norms agree to 1e-6),
and Adam divides each gradient element by its own magnitude, so an element whose gradient is near
zero can move by a visible fraction of a step (one of 3,072 by 15% of lr, seen). Adapters are
therefore compared per tensor by relative norm; summing wrongly (FSDP's default average) is 50% off.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ossrl.testing import write_tiny_checkpoint
from test_grpo_distributed import free_port, write_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tiny_mxfp4(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny4"), seed=0, mxfp4=True)


def single(cfg, *extra):
    run = subprocess.run([sys.executable, "-m", "ossrl.cli", "train", str(cfg), "--set", "gradient_accumulation_steps=2",
                          *extra], env=ENV, capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    return run


def sharded(cfg, *extra):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "ossrl.cli", "train", str(cfg),
                          "--set", "fsdp=true", *extra], env=ENV, capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    return run


def adapters_close(a_dir, b_dir):
    a = load_file(a_dir / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(b_dir / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        error = float((b[name] - a[name]).norm() / a[name].norm().clamp(min=1e-12))
        assert error < 1e-3, (name, error)
    assert any("lora_B" in name and float(a[name].abs().max()) > 1e-3 for name in a)  # training moved B off zero


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def prompts(tmp_path, count=8, **columns) -> tuple:
    """(the JSONL dataset of `count` tasks, the run config path); columns: name -> fn(i)."""
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Task {i}", **{k: f(i) for k, f in columns.items()}})
                              for i in range(count)))
    return data, tmp_path / "run.toml"


def test_sharded_ranks_train_like_one_process_with_mxfp4_experts_and_checkpointing(tiny_mxfp4, tmp_path):
    data, cfg = prompts(tmp_path)
    write_config(cfg, tiny_mxfp4, data, tmp_path / "single", "dapo")
    single(cfg, "--set", "gradient_checkpointing=true")
    write_config(cfg, tiny_mxfp4, data, tmp_path / "fsdp", "dapo")
    run = sharded(cfg, "--set", "gradient_checkpointing=true")
    summary = next(line for line in run.stdout.decode().splitlines() if line.startswith("FSDP over 2 ranks"))
    held, whole = summary.split("holds ")[1].split(" of layer")[0].split(" of ")
    assert held != whole and "MXFP4 expert blocks" in summary  # (the shares: test_loading_sharded_...)

    adapters_close(tmp_path / "single", tmp_path / "fsdp")
    ms, mf = lines(tmp_path / "single" / "metrics.jsonl"), lines(tmp_path / "fsdp" / "metrics.jsonl")
    assert [m["reward"] for m in mf] == pytest.approx([m["reward"] for m in ms])
    assert [m["grad_norm"] for m in mf] == pytest.approx([m["grad_norm"] for m in ms], rel=1e-4)
    # the lockstep engine sampled exactly what one process sampled
    ss, sf = lines(tmp_path / "single" / "samples.jsonl"), lines(tmp_path / "fsdp" / "samples.jsonl")
    assert sorted(s["completion"] for s in sf) == sorted(s["completion"] for s in ss)


def test_sharded_ranks_with_a_kl_reference_and_two_optimisation_passes(tiny_mxfp4, tmp_path):
    """beta > 0 (reference log-probs with the adapters switched off), num_iterations = 2 (old
    log-probs, two optimizer steps per batch) and LoRA dropout (its masks keyed on the global
    micro-batch, not the rank): more no-grad forwards, each gathering shards."""
    data, cfg = prompts(tmp_path)
    extra = ["--set", "beta=0.04", "--set", "num_iterations=2", "--set", "lora.dropout=0.2"]
    write_config(cfg, tiny_mxfp4, data, tmp_path / "single", "grpo")
    single(cfg, *extra)
    write_config(cfg, tiny_mxfp4, data, tmp_path / "fsdp", "grpo")
    sharded(cfg, *extra)
    ms, mf = lines(tmp_path / "single" / "metrics.jsonl"), lines(tmp_path / "fsdp" / "metrics.jsonl")
    assert [m["kl"] for m in mf] == pytest.approx([m["kl"] for m in ms], rel=1e-4, abs=1e-9)
    assert any(m["kl"] > 0 for m in ms)  # the second pass and step moved the policy off the reference
    adapters_close(tmp_path / "single", tmp_path / "fsdp")


def test_sharded_dynamic_sampling_keeps_idle_ranks_in_lockstep(tiny_mxfp4, tmp_path):
    """Top-up rounds where one rank has no prompts: it still takes part in every gathered forward."""
    data, cfg = prompts(tmp_path, 12, flat=lambda i: i % 3 == 0)
    extra = ["--set", "dynamic_sampling=true", "--set", "max_dynamic_sampling_retries=4", "--set", "max_steps=3",
             "--set", 'reward_funcs=["ossrl.testing:ascii_fraction_unless_flat"]']
    write_config(cfg, tiny_mxfp4, data, tmp_path / "single", "grpo")
    single(cfg, *extra)
    write_config(cfg, tiny_mxfp4, data, tmp_path / "fsdp", "grpo")
    sharded(cfg, *extra)
    ms, mf = lines(tmp_path / "single" / "metrics.jsonl"), lines(tmp_path / "fsdp" / "metrics.jsonl")
    assert sum(m["dynamic_sampling/retries"] for m in ms) > 0
    for a, b in zip(ms, mf):
        assert b["groups_used"] == a["groups_used"] == 2
        assert b["reward"] == pytest.approx(a["reward"])
    adapters_close(tmp_path / "single", tmp_path / "fsdp")


def test_sharded_checkpoints_resume_in_one_process_and_back(tiny_mxfp4, tmp_path):
    """Checkpoints hold whole tensors: steps 1-2 sharded, 3-4 in one process, 5-6 sharded again
    == 6 steps in one process (adapter, optimizer moments, schedule, data position)."""
    data, cfg = prompts(tmp_path)
    write_config(cfg, tiny_mxfp4, data, tmp_path / "straight", "grpo")
    single(cfg, "--set", "max_steps=6")
    write_config(cfg, tiny_mxfp4, data, tmp_path / "moved", "grpo")
    sharded(cfg, "--set", "save_steps=2")
    single(cfg, "--set", "max_steps=4", "--set", "resume_from=latest", "--set", "save_steps=2")
    sharded(cfg, "--set", "max_steps=6", "--set", "resume_from=latest")
    adapters_close(tmp_path / "straight", tmp_path / "moved")
    ma, mb = lines(tmp_path / "straight" / "metrics.jsonl"), lines(tmp_path / "moved" / "metrics.jsonl")
    assert [m["step"] for m in mb] == [1, 2, 3, 4, 5, 6]
    assert [m["reward"] for m in mb] == pytest.approx([m["reward"] for m in ma])


def test_fsdp_needs_several_processes(tiny_mxfp4, tmp_path):
    data, cfg = prompts(tmp_path, 1)
    write_config(cfg, tiny_mxfp4, data, tmp_path / "one", "grpo")
    run = subprocess.run([sys.executable, "-m", "ossrl.cli", "train", str(cfg), "--set", "fsdp=true"],
                         env=ENV, capture_output=True, timeout=600)
    assert run.returncode != 0
    assert "torchrun --nproc-per-node" in run.stderr.decode()


@pytest.mark.parametrize("experts", ["bf16", "mxfp4"])
def test_loading_sharded_keeps_only_each_ranks_part_and_computes_the_same_model(tiny_mxfp4, tmp_path, experts):
    """The MXFP4 checkpoint loaded sharded (bf16: experts decoded at load, the case FSDP is for), and
    a saved adapter loaded over it: each rank holds about half of the layers, and the logits and
    adapter equal an unsharded load's."""
    from ossrl.model.adapters import write_adapter
    from ossrl.model.loading import load_model
    from ossrl.model.lora import LoRAConfig, apply_lora, lora_state_dict

    probe = os.path.join(os.path.dirname(__file__), "fsdp_load_probe.py")
    tokens = torch.arange(3, 19)[None]
    plain = load_model(tiny_mxfp4, device="cpu", dtype=torch.float32, experts=experts)
    apply_lora(plain, LoRAConfig(r=4, seed=5))
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_B" in name or name.endswith("_B"):
                p.normal_(0, 0.05)  # an adapter that changes the output
        expected = plain(tokens)
    adapter_dir = tmp_path / "adapter"
    write_adapter(plain, adapter_dir, base_model=str(tiny_mxfp4))
    for source in (tiny_mxfp4, adapter_dir):  # the base alone (fresh adapters), then base + saved adapter
        out = tmp_path / "probe.pt"
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-port", str(free_port()), probe, str(source), experts, str(out)],
                             env=ENV, capture_output=True, timeout=600)
        assert run.returncode == 0, run.stderr.decode()[-3000:]
        got = torch.load(out)
        assert got["held"] < 0.55 * got["whole"]  # dim-0 shards, padded at most a row per tensor
        state = lora_state_dict(plain)
        if source == adapter_dir:
            torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-5)
            for name, t in state.items():
                torch.testing.assert_close(got["adapter"][name], t)
        else:  # fresh adapters: the same A as apply_lora draws unsharded, B zero, so the base model's logits
            with torch.no_grad(), plain.adapters_disabled():
                base = plain(tokens)
            torch.testing.assert_close(got["logits"], base, rtol=1e-5, atol=1e-5)
            for name, t in state.items():
                if "lora_A" in name or name.endswith("_A"):
                    torch.testing.assert_close(got["adapter"][name], t)
                else:
                    assert not got["adapter"][name].any()


def test_sharding_drops_the_rows_lay_out_qkv_reserved(tmp_path):
    """configure_memory lays q, k and v out (with rows reserved for the rollout copies of A, views of
    the whole buffers); shard_model drops them, so the unsharded buffers do not outlive the shards
    (one process, world size 1)."""
    script = tmp_path / "probe.py"
    script.write_text(f"""
import torch, torch.distributed as dist
from ossrl.model.lora import LoRAConfig, apply_lora
from ossrl.testing import random_model, tiny_config
from ossrl.train.distributed import exit_distributed_process
from ossrl.train.memory import configure_memory
from ossrl.train.sharding import shard_model
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
model = random_model(tiny_config(), seed=0)
apply_lora(model, LoRAConfig(r=4, seed=0))
configure_memory(model, gradient_checkpointing=False)
assert sum(getattr(m, "lora_rows", None) is not None for m in model.modules()) == 2 * model.config.num_hidden_layers
shard_model(model)
assert not any(getattr(m, "lora_rows", None) is not None for m in model.modules())
print("ok", flush=True)
exit_distributed_process()
""")
    run = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, timeout=300)
    assert run.returncode == 0 and b"ok" in run.stdout, run.stderr.decode()[-3000:]


def test_multigpu_benchmark_runs_on_cpu_processes(tmp_path):
    """benchmarks/multigpu.py (written for several GPUs) on a tiny model under gloo: the FSDP memory
    mode on 2 ranks and the GRPO mode in one process, merged with a scaling-efficiency table."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "multigpu.py")
    fsdp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), script, "fsdp", "--model", "tiny", "--device", "cpu",
                           "--tokens", "64,128", "--out", str(tmp_path / "fsdp_2.json")],
                          env=ENV, capture_output=True, timeout=600)
    assert fsdp.returncode == 0, fsdp.stderr.decode()[-3000:]
    grpo = subprocess.run([sys.executable, script, "grpo", "--model", "tiny", "--device", "cpu", "--steps", "2",
                           "--max-completion-length", "8", "--out", str(tmp_path / "grpo_1.json")],
                          env=ENV, capture_output=True, timeout=600)
    assert grpo.returncode == 0, grpo.stderr.decode()[-3000:]
    merged = tmp_path / "multigpu.json"
    subprocess.run([sys.executable, script, "merge", str(tmp_path / "fsdp_2.json"), str(tmp_path / "grpo_1.json"),
                    "--out", str(merged)], env=ENV, check=True, capture_output=True, timeout=600)
    result = json.loads(merged.read_text())
    assert [r["tokens_per_rank"] for r in result["fsdp"][0]["rows"]] == [64, 128]
    assert result["fsdp"][0]["gpus"] == 2
    assert result["grpo_scaling_efficiency"]["1"]["time/step"] == 1.0


@pytest.mark.parametrize("fsdp", [False, True])
def test_sft_on_two_ranks_equals_one_process_with_twice_the_micro_batches(tiny_mxfp4, tmp_path, fsdp):
    """`ossrl sft` under torchrun: each rank trains every other micro-batch of the global order
    (plain data parallelism: gradients all-reduced; fsdp: the layers sharded), against one process
    with twice the gradient accumulation; 12 conversations, so steps cross an epoch's reshuffle;
    LoRA dropout, whose masks follow the global micro-batch, not the rank."""
    words = ["up", "down", "left", "right", "red", "blue", "one", "two", "cat", "dog", "yes", "no"]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                       {"role": "assistant", "thinking": "easy", "content": w}]})
                              for w in words))

    def config(name, accum):
        path = tmp_path / f"{name}.toml"
        path.write_text(f'model = "{tiny_mxfp4}"\ndata = "{data}"\noutput_dir = "{tmp_path / name}"\n'
                        f"max_steps = 4\nper_device_train_batch_size = 2\ngradient_accumulation_steps = {accum}\n"
                        f"learning_rate = 5e-3\nmax_length = 256\ngradient_checkpointing = true\n"
                        f"[lora]\nr = 4\ndropout = 0.2\n")
        return path

    one = subprocess.run([sys.executable, "-m", "ossrl.cli", "sft", str(config("single", 4))], env=ENV,
                         capture_output=True, timeout=600)
    assert one.returncode == 0, one.stderr.decode()[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "ossrl.cli", "sft", str(config("dp", 2)),
                          f"fsdp={'true' if fsdp else 'false'}"], env=ENV, capture_output=True, timeout=600)
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    ms, md = lines(tmp_path / "single" / "metrics.jsonl"), lines(tmp_path / "dp" / "metrics.jsonl")
    assert [m["step"] for m in md] == [1, 2, 3, 4]  # rank 0 alone logged
    assert [m["loss"] for m in md] == pytest.approx([m["loss"] for m in ms], rel=1e-5)
    assert [m["tokens"] for m in md] == [m["tokens"] for m in ms]
    assert [m["grad_norm"] for m in md] == pytest.approx([m["grad_norm"] for m in ms], rel=1e-4)
    adapters_close(tmp_path / "single", tmp_path / "dp")


def _all_reduce_in_buckets(rank, init_file, out):
    import torch.distributed as dist

    from ossrl.train.distributed import DistContext, exit_distributed_process

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n, dtype in ((3, torch.float32), (7, torch.bfloat16),
                                                                              (1, torch.float32), (5, torch.float32))]
    for i, p in enumerate(params):
        if not (rank == 1 and i == 2):  # rank 1 has no gradient for one parameter
            p.grad = (torch.arange(p.numel()) + 10 * i + 100 * rank).to(p.dtype)
    DistContext(rank=rank, world_size=2).all_reduce_grads(params, bucket_elements=4)  # several buckets
    if rank == 0:
        torch.save([p.grad for p in params], out)
    exit_distributed_process()  # not interpreter teardown: a gloo rank can abort there (exit -6)


def test_gradient_all_reduce_sums_in_buckets_in_place(tmp_path):
    """Buckets of about 4 elements over gradients of 3, 7 (bf16), 1 and 5: each gradient is the sum
    over ranks, in its own dtype, and a gradient missing on one rank counts as zero there."""
    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    mp.spawn(_all_reduce_in_buckets, args=(str(tmp_path / "init"), str(out)), nprocs=2)
    grads = torch.load(out)
    for i, (n, dtype) in enumerate(((3, torch.float32), (7, torch.bfloat16), (1, torch.float32), (5, torch.float32))):
        expected = (torch.arange(n) + 10 * i) + (0 if i == 2 else torch.arange(n) + 10 * i + 100)
        assert grads[i].dtype == dtype
        torch.testing.assert_close(grads[i].float(), expected.float())
