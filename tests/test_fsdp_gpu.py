"""FSDP2 sharding on CUDA with NCCL, over one rank (the device machine has one GPU; tests/test_fsdp.py
covers two ranks under gloo on CPU): the sharded model's unsharded parameters through the Triton MoE
kernels, FlexAttention and the fused glue, the lockstep engine's NCCL all-reduce, and the gradients,
against the same model unsharded (run: pytest -m gpu tests/test_fsdp_gpu.py)."""

import socket

import pytest
import torch
import torch.distributed as dist

from ossrl.engine.engine import RolloutEngine
from ossrl.engine.sampling import SamplingParams
from ossrl.model.lora import LoRAConfig, apply_lora, lora_parameters, lora_state_dict
from ossrl.testing import random_model, tiny_config
from ossrl.train.logprobs import pack_sequences, sequence_logprobs
from ossrl.train.sharding import shard_model

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


@pytest.fixture(scope="module")
def nccl_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def lora_model(expert_format):
    model = random_model(tiny_config(head_dim=64), seed=3, expert_format=expert_format,
                         dtype=torch.bfloat16).cuda()
    apply_lora(model, LoRAConfig(r=8, seed=1))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.02, generator=torch.Generator("cuda").manual_seed(p.numel()))
    return model


@pytest.mark.parametrize("expert_format", ["bf16", "mxfp4"])
def test_sharded_model_on_cuda_generates_and_trains_like_the_unsharded_one(nccl_group, expert_format):
    plain, sharded = lora_model(expert_format), lora_model(expert_format)
    shard_model(sharded)
    assert RolloutEngine(sharded).lockstep
    params = SamplingParams(temperature=0.0, max_new_tokens=12, seed=0)
    prompts = [[1, 5, 9, 14, 2], [7, 3, 3, 8]]
    a = RolloutEngine(plain).generate(prompts, n=2, params=params)
    b = RolloutEngine(sharded).generate(prompts, n=2, params=params)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]

    seqs = [p + [c for c in g[0].token_ids] for p, g in zip(prompts, a)]
    trained = [[False] * len(p) + [True] * (len(s) - len(p)) for p, s in zip(prompts, seqs)]
    batch = pack_sequences(seqs, trained, max_tokens=256, pad_to=256).to("cuda")
    grads = []
    for model in (plain, sharded):
        model.train()
        lp, _ = sequence_logprobs(model, batch)
        (-lp.sum()).backward()
        grads.append({n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                      for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        error = float((grads[1][name].float() - g.float()).norm() / g.float().norm().clamp(min=1e-12))
        assert error < 1e-2, (name, error)
    state = lora_state_dict(sharded)
    assert all(not hasattr(t, "full_tensor") for t in state.values())  # whole tensors for saving
