"""Tensors of a model that may be sharded (FSDP2 parameters are DTensors: ossrl.train.sharding).

Saving needs a parameter whole and loading needs a whole tensor cut like the parameter; these two
helpers do that and are the identity (up to device and dtype) for ordinary tensors, so the code that
saves and loads adapters and optimizer states does not branch on how the model is laid out. Whole
tensors stay on the CPU: a rank's device only ever receives its own shard.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard, on the CPU (a collective: every rank must call it), or `t`
    itself when it is not sharded."""
    return t.full_tensor().cpu() if isinstance(t, DTensor) else t


def shaped_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` on `param`'s device and dtype, sharded as `param` is when it is a DTensor: every rank
    passes the same whole tensor, cuts its own part where the tensor is (the CPU for a checkpoint's
    tensors) and moves only that part (no communication)."""
    if not isinstance(param, DTensor):
        return full.to(param.device, param.dtype)
    local = full
    coordinate = param.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():  # DTensor's Shard(d): torch.chunk along d, missing chunks empty
            pieces = torch.chunk(local, param.device_mesh.size(mesh_dim), dim=placement.dim)
            index = coordinate[mesh_dim]
            local = pieces[index] if index < len(pieces) else local.narrow(placement.dim, 0, 0)
    return DTensor.from_local(local.to(param.device, param.dtype), param.device_mesh, param.placements,
                              run_check=False, shape=param.shape, stride=param.stride())
