"""FSDP2 sharding of the model, for data-parallel training of models one GPU cannot hold.

    torchrun --nproc-per-node N ossrl train CONFIG.toml --set fsdp=true
    shard_model(model)   # in Python: after apply_lora, inside an initialised process group

Each decoder layer is one FSDP unit (torch.distributed.fsdp.fully_shard): its parameters, the
frozen base (attention, router, bf16 experts) and its LoRA pairs, are split across the ranks along
their first dimension, gathered for the layer's forward (and again for its backward), and freed
after. MXFP4 expert blocks and scales are buffers, which FSDP does not shard: they stay whole on
every rank (gpt-oss-120b in MXFP4 is 61 GiB; sharding is for its bf16 experts, 215 GiB of layers).
`GptOssModel` is the root unit (the final norm). The embedding table and the lm_head stay whole
on every rank: the embedding's rows are gathered and the chunked log-probs run the lm_head outside
any layer's forward, and together they are 1.2 of 120b's 117 billion parameters. Gradients are reduce-scattered as sums (divide factor 1): the trainer's losses already
carry the global batch's normalisers, exactly as under plain data parallelism
(ossrl.train.distributed), so N sharded ranks train like one process with the global batch.

The one thing to know: every rank must run the same sequence of layer forwards and backwards,
because each gathers its parameters with a collective. The trainer's micro-batches are equal in
number on every rank; gradient checkpointing must be the same on every rank, so "auto" (which
measures free memory per rank) becomes True (every layer recomputed); the rollout engine decodes in
lockstep (ossrl.engine.slots: ranks step together until all are done, a finished rank stepping a
scratch slot) and without CUDA graphs. Checkpoints gather full tensors on every rank and rank 0
writes them, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ossrl.model.sharded import shaped_like, whole_tensor


def shard_model(model, *, reshard_after_forward: bool = True) -> None:
    """Shard `model` (a GptOssForCausalLM, adapters already applied) over the default process
    group. Parameters become DTensors: collect trainable parameters (and build optimizers) after."""
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group (run under torchrun)")
    if getattr(model, "sharded", False):
        raise ValueError("the model is already sharded")
    inner = model.model
    if inner.gradient_checkpointing == "auto":
        inner.gradient_checkpointing = True  # the same recompute on every rank (module docstring)
    inner.dense_experts_cap = 0  # (kept expert copies are not made for sharded models)
    # The rows `lay_out_qkv` reserved for rollout copies of A (`lora_rows`, views of the whole q/k/v
    # and o buffers) would keep those unsharded buffers alive beside the shards; sharded rollouts
    # gather adapters per layer and never read them (nor rollout copies, released here too).
    from ossrl.model.lora import release_rollout_copies

    release_rollout_copies(model)
    for module in model.modules():
        if getattr(module, "lora_rows", None) is not None:
            module.lora_rows = None
    units = []
    for layer in inner.layers:
        units.append(fully_shard(layer, reshard_after_forward=reshard_after_forward))
    units.append(fully_shard(inner, reshard_after_forward=reshard_after_forward,
                             ignored_params=set(inner.embed_tokens.parameters())))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sums, like DistContext.all_reduce_grads
        if hasattr(unit, "set_force_sum_reduction_for_comms"):  # plain SUM: gloo has no PREMUL_SUM
            unit.set_force_sum_reduction_for_comms(True)
    model.sharded = True


def is_sharded(model) -> bool:
    return bool(getattr(model, "sharded", False))


def sharding_summary(model) -> str:
    """One line for the log: what this rank holds of the layers, and what stays whole."""
    params = list(model.model.layers.parameters())
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in params)
    whole = sum(p.numel() * p.element_size() for p in params)
    buffers = sum(b.numel() * b.element_size() for name, b in model.model.layers.named_buffers()
                  if name.endswith(("_blocks", "_scales")))
    line = (f"FSDP over {dist.get_world_size()} ranks: this rank holds {_size(held)} of {_size(whole)} of layer "
            f"parameters")
    if buffers:
        line += f"; MXFP4 expert blocks and scales ({_size(buffers)}) stay whole on every rank"
    return line + "; rollouts decode in lockstep"


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1024:.1f} KiB"


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor gathered whole, on the CPU (a
    collective). Loadable by `load_optimizer_state` on any number of ranks, or by a plain optimizer."""
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
    state["state"] = {i: {key: whole_tensor(v) for key, v in values.items()}
                      for i, values in state["state"].items()}
    return state


_IMPLEMENTATION = ("fused", "foreach", "capturable")  # how a torch optimizer runs, not what it learned


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state saved by `full_optimizer_state` (or a plain optimizer's), sharding each state
    tensor shaped like its parameter as the parameter is. The optimizer keeps its own
    implementation (fused, foreach, capturable): a checkpoint written with the states offloaded
    (OffloadedAdamW) resumes into a fused AdamW as a fused AdamW, its step counts on the device."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in state["param_groups"] for i in group["params"]]
    if len(ids) != len(params):
        raise ValueError(f"optimizer state holds {len(ids)} parameters, the optimizer {len(params)}")
    if len(state["param_groups"]) == len(optimizer.param_groups):
        state = {**state, "param_groups": [
            {**saved, **{k: group[k] for k in _IMPLEMENTATION if k in group}}
            for saved, group in zip(state["param_groups"], optimizer.param_groups)]}
    if not any(isinstance(p, DTensor) for p in params):  # nothing to shard; an offloaded AdamW
        optimizer.load_state_dict(state)  # copies the states straight into its host memory
        return
    by_id = dict(zip(ids, params))
    state = {**state, "state": {
        i: {key: shaped_like(v, by_id[i]) if torch.is_tensor(v) and tuple(v.shape) == tuple(by_id[i].shape) else v
            for key, v in values.items()}
        for i, values in state["state"].items()}}
    optimizer.load_state_dict(state)
