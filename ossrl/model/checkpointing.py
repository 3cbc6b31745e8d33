"""Gradient checkpointing "auto": recompute only the layers whose activations do not fit.

Full checkpointing saves each decoder layer's input and runs every layer's forward twice, about a
third more compute than a step that keeps all activations. Where memory allows (short and medium
contexts on a large GPU, or after the rollout engine has released its KV pool) that recompute buys
nothing. "auto" measures the bytes a layer keeps for backward (`measure_saved_bytes`: one forward of
the first layer, its input marked as needing a gradient as every later layer's does, before any
activation is held, whose saved tensors are counted and then dropped; it holds one layer's
activations for a moment, less than the recompute of a checkpointed layer holds later in backward)
and lets as many layers as fit within the activation budget keep theirs, counting the inputs the
checkpointed rest still keep. Layers of one model keep about the same bytes per token (sliding and
full attention differ only in the mask), so one layer speaks for all, and the figure scales with the
token count until a forward has more than twice the tokens last measured (the model measures again
then).

The budget, unless given: what the device has free before the layers run (CUDA: free device memory
plus what the caching allocator holds unused outside private pools such as CUDA graphs'; CPU:
MemAvailable), less a headroom for what the step still allocates (the recompute and backward of one
layer, about twice the layer's activations, the loss, the LoRA gradients and optimizer states,
allocator fragmentation): twice the layer's bytes plus the larger of 2 GiB and 10% of the device's
memory.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import torch

GiB = 1 << 30


class _Dropped:
    """What a measuring forward saved instead of a tensor: there is no backward through it."""


def _unpack(_):
    raise RuntimeError("a measuring forward (gradient checkpointing 'auto') has no backward")


def measure_saved_bytes(module: torch.nn.Module, *args) -> int:
    """Bytes that `module(*args)` keeps for backward: the distinct storages autograd saves, other
    than the module's own parameters and buffers and the inputs (a checkpoint keeps those anyway),
    plus the output (the counterpart of the saved input). The saved tensors and the output are
    dropped once counted; there is no backward through this forward."""
    own = {t.untyped_storage().data_ptr() for t in itertools.chain(module.parameters(), module.buffers())}
    own |= {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    held: dict[int, torch.Tensor] = {}  # alive until counted, so that no address is reused meanwhile

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and t.device.type != "meta":
            held[ptr] = t
        return _Dropped

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            out = module(*args)
        held[out.untyped_storage().data_ptr()] = out
        return sum(t.untyped_storage().nbytes() for t in held.values())
    finally:
        # The graph keeps the hook, whose closure keeps `held`, which keeps the output and with it
        # the graph: a cycle through C++ that gc cannot break. Emptying `held` frees everything.
        held.clear()


def device_memory(device: torch.device) -> tuple[int, int]:
    """(bytes free for new tensors, bytes in total) on `device`."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free + _default_pool_unused(device), total
    info = {}
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    if "MemAvailable" in info:
        return info["MemAvailable"], info["MemTotal"]
    pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return pages * size, os.sysconf("SC_PHYS_PAGES") * size


def _default_pool_unused(device: torch.device) -> int:
    """Bytes the caching allocator holds unused in its default pool. Blocks of private pools (the
    rollout engine's CUDA graphs, kept between phases when sleep mode is off) are not counted:
    ordinary allocations cannot use them. Without private pools this is reserved - allocated."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    unused = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    if unused == 0:
        return 0
    try:
        segments = torch.cuda.memory_snapshot(include_traces=False)  # no allocation history: cheap
    except TypeError:  # torch without include_traces
        segments = torch.cuda.memory_snapshot()
    private = 0
    for segment in segments:  # an estimate: a snapshot without the fields leaves the figure as it was
        if segment.get("device") == index and tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0):
            private += segment.get("total_size", 0) - segment.get("allocated_size", 0)
    return max(unused - private, 0)


def headroom(total: int) -> int:
    """What a device of `total` bytes keeps free for allocations no one budgets for (allocator
    fragmentation, small buffers, graph pools): the larger of 2 GiB and a tenth of it."""
    return max(2 * GiB, total // 10)


def activation_budget(device: torch.device, layer_bytes: int, also_free: int = 0) -> int:
    """Bytes all kept activations may take: free memory (plus `also_free`: memory held now that the
    caller would give up for them, e.g. kept expert copies) less the headroom (module docstring)."""
    free, total = device_memory(device)
    return max(free + also_free - 2 * layer_bytes - headroom(total), 0)


def activations_then_copies(layer_bytes: int, num_layers: int, budget: int, input_bytes: int,
                            copies_cap: int) -> tuple[int, int]:
    """Checkpointing "auto" with kept bf16 expert copies (`expert_copies.dense_experts`): `budget` is
    the memory activations and copies share (the copies' current bytes included). Activations come
    first: (layers that keep their activations, `plain_layer_count`; the bytes the copies may
    keep: what the activations leave, at most `copies_cap`). Per GiB, kept activations save far
    more than copies: a 20b layer at 8K tokens keeps about 1.2 GB and its recompute costs about 8
    ms, while 1.6 GB of copies save 1.4 ms (session 17, H100: 35.6 GiB of copies at 8K left 8
    layers recomputed, 0.550 -> 0.577 s a step)."""
    plain = plain_layer_count(layer_bytes, num_layers, budget, input_bytes)
    kept = plain * layer_bytes + (num_layers - plain) * input_bytes
    return plain, max(0, min(copies_cap, budget - kept))


def plain_layer_count(layer_bytes: int, num_layers: int, budget: int, input_bytes: int = 0) -> int:
    """How many layers keep their activations: the most p with p * layer_bytes plus the
    (num_layers - p) * input_bytes the checkpointed layers still keep (their inputs) within
    `budget`, at most all."""
    if layer_bytes <= input_bytes:
        return num_layers
    return max(0, min(num_layers, (budget - num_layers * input_bytes) // (layer_bytes - input_bytes)))
