"""Run under torchrun by tests/test_fsdp.py: load a checkpoint sharded over the ranks (adapters
added and the model sharded on the meta device), then write what rank 0 sees to OUT."""

import sys

import torch
import torch.distributed as dist

from ossrl.model.loading import load_model
from ossrl.model.lora import LoRAConfig, apply_lora, lora_state_dict
from ossrl.train.distributed import exit_distributed_process
from ossrl.train.sharding import shard_model

checkpoint, experts, out = sys.argv[1:4]
dist.init_process_group("gloo")


def prepare(model):
    if getattr(model, "lora_config", None) is None:
        apply_lora(model, LoRAConfig(r=4, seed=5))
    shard_model(model)


model = load_model(checkpoint, device="cpu", dtype=torch.float32, experts=experts, prepare=prepare)
held = sum(p.to_local().numel() for p in model.model.layers.parameters())  # this rank's shards
whole = sum(p.numel() for p in model.model.layers.parameters())
with torch.no_grad():
    logits = model(torch.arange(3, 19)[None])
adapter = lora_state_dict(model)  # a collective: every rank
if dist.get_rank() == 0:
    torch.save({"logits": logits, "held": held, "whole": whole, "adapter": adapter}, out)
exit_distributed_process()  # not interpreter teardown: a gloo rank can abort there (exit -6)
