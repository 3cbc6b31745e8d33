"""Host-to-device copies that do not make the host wait for the GPU."""

from __future__ import annotations

import torch


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`, copied from pinned memory without waiting for the copy (the
    stream orders its use); as `t.to(device)` moves it where no CUDA is involved or t is not on the
    host (a tensor already on `device` is returned as it is). A fresh pinned copy is made (the
    caching host allocator keeps it until the copy is done), except for a tensor already pinned,
    which is read as it is: its owner must not write it before the copy completes."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
