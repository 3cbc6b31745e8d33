"""Gradient checkpointing "auto": recompute only the layers whose activations do not fit.

Full checkpointing saves each decoder layer's input and runs every layer's forward twice, about a
third more compute than a step that keeps all activations. Where memory allows (short and medium
contexts on a large GPU, or after the rollout engine has released its KV pool) that recompute buys
nothing. "auto" runs the first layer keeping its activations, measures what it kept, and lets as
many layers as fit within the activation budget keep theirs; the rest are checkpointed. Layers of
one model keep about the same bytes per token (sliding and full attention differ only in the mask),
so one measurement per forward suffices.

The budget, unless given: what the device has free after the first layer (CUDA: free device memory
plus what the caching allocator holds unused; CPU: MemAvailable), less a headroom for what the
step still allocates (the recompute and backward of one layer, about twice the layer's activations,
the loss, the LoRA gradients and optimizer states, allocator fragmentation): twice the layer's bytes
plus the larger of 2 GiB and 10% of the device's memory.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import torch

GiB = 1 << 30


class _Measured:
    bytes = 0


@contextlib.contextmanager
def saved_bytes(module: torch.nn.Module, device: torch.device):
    """Measure the bytes a forward of `module` inside the block keeps alive for backward (its
    output included, the counterpart of the input a checkpoint would save). CUDA: the allocator's
    growth across the block. Elsewhere: the distinct storages autograd saves that are not the
    module's own parameters or buffers, plus nothing for tensors kept outside autograd's hooks."""
    measured = _Measured()
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        yield measured
        measured.bytes = max(torch.cuda.memory_allocated(device) - before, 0)
        return
    own = {t.untyped_storage().data_ptr() for t in itertools.chain(module.parameters(), module.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own and t.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield measured
    measured.bytes = sum(seen.values())


def device_memory(device: torch.device) -> tuple[int, int]:
    """(bytes free for new tensors, bytes in total) on `device`."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total
    info = {}
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    if "MemAvailable" in info:
        return info["MemAvailable"], info["MemTotal"]
    pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return pages * size, os.sysconf("SC_PHYS_PAGES") * size


def activation_budget(device: torch.device, first_layer_bytes: int) -> int:
    """Bytes all kept activations may take (the first layer's, already allocated, included)."""
    free, total = device_memory(device)
    headroom = 2 * first_layer_bytes + max(2 * GiB, total // 10)
    return first_layer_bytes + max(free - headroom, 0)


def plain_layer_count(layer_bytes: int, num_layers: int, budget: int) -> int:
    """How many layers keep their activations: as many as fit in `budget`, at least the measured
    first one, at most all."""
    if layer_bytes <= 0:
        return num_layers
    return max(1, min(num_layers, budget // layer_bytes))
