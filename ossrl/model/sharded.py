"""Tensors of a model that may be sharded (FSDP2 parameters are DTensors: ossrl.train.sharding).

Saving needs a parameter whole and loading needs a whole tensor cut like the parameter; these two
helpers do that and are the identity for ordinary tensors, so the code that saves and loads
adapters and optimizer states does not branch on how the model is laid out.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every rank must call it), or `t` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shaped_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` on `param`'s device and dtype, sharded as `param` is when it is a DTensor. Every rank
    passes the same whole tensor and keeps its own shard: no communication."""
    full = full.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return full
