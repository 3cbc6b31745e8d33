"""Data parallelism through torch.distributed (torchrun) for the trainers: one process per GPU,
or gloo on CPU.

    torchrun --nproc-per-node N ossrl train CONFIG.toml     # GRPO (ossrl.rl.trainer)
    torchrun --nproc-per-node N ossrl sft CONFIG.toml       # SFT (ossrl.train.sft)

Each rank computes its share of the step (GRPO: the groups of its share of the prompts, a prompt's
group never spanning ranks, so advantages stay per group; SFT: its share of the micro-batches) with
the normalisers of the global batch, and the trained gradients are summed across ranks before the
optimiser step, so every rank applies the same update to the same weights. W ranks each with
gradient_accumulation_steps A compute what one process computes with W*A micro-batches. Only rank 0
logs and writes checkpoints.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_grads(self, params, bucket_elements: int = 1 << 25) -> None:
        """Sum the gradients of `params` across ranks, in fp32, in buckets of about
        `bucket_elements` (128 MiB of fp32: the extra memory is one bucket, not a copy of every
        gradient), written back in place. Sharded parameters (DTensors: ossrl.train.sharding) are
        skipped: FSDP already reduce-scattered their sums."""
        params = [p for p in params if not isinstance(p, DTensor)]
        if not self.enabled or not params:
            return
        for p in params:
            if p.grad is None:  # a parameter another rank may have a gradient for
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for i, p in enumerate(params):
            bucket.append(p.grad)
            size += p.grad.numel()
            if size >= bucket_elements or i == len(params) - 1:
                flat = torch.cat([g.reshape(-1).float() for g in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
                bucket, size = [], 0

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable plain data), in rank order."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


@contextlib.contextmanager
def micro_batch_rng(seed: int, step: int, index: int, enabled: bool = True):
    """Within the block torch's random state (LoRA dropout masks) is keyed on the global
    micro-batch (the run's seed, the optimizer step, the micro-batch's index in the global batch),
    not on the rank that trains it or on what ran before: the same masks in one process and on N
    ranks. The state outside the block is left as it was. A no-op unless `enabled`."""
    if not enabled:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 1_000_003 + step) * 10_007 + index)
        yield


def init_distributed() -> DistContext:
    """From torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def exit_distributed_process() -> None:
    """Under torchrun (a process group is up): leave the group together, then end the process
    without interpreter finalisation. On CPU (gloo) a rank aborted during teardown in 3 of 5 full CI
    runs ("terminate called without an active exception", exit -6) after its work had finished
    and been saved. The caller's files must be closed; sandbox workers exit when their pipes close.
    Returns (doing nothing) in a single process."""
    if dist.is_available() and dist.is_initialized():
        shutdown_distributed()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def shutdown_distributed() -> None:
    """Leave the process group in order (all ranks, then destroy). A gloo rank that exited with its
    group alive could abort at interpreter teardown ("terminate called without an active
    exception", exit -6), failing a run that had finished."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
