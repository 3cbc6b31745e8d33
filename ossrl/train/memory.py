"""Memory options of the training step, set on a model in one place (SFT and GRPO share them).

- gradient_checkpointing: True recomputes every decoder layer in backward, saving only its input;
  "auto" recomputes only the layers whose activations do not fit in free memory (a layer's bytes
  measured on the first training forward, and again when the token count more than doubles:
  ossrl.model.checkpointing), so short contexts on a large GPU skip the
  recompute (about a third of the step's compute) and long ones fall back to checkpointing;
  False keeps every activation.
- offload_activations: with checkpointing, the checkpointed layers' saved inputs wait in pinned
  CPU memory (torch.autograd.graph.save_on_cpu) instead of on the GPU.
- offload_embeddings: the embedding table (201088 x 2880 bf16, 1.16 GB for gpt-oss) stays on the
  CPU; rows are gathered there and only they move to the GPU. The table is frozen (LoRA does not
  touch it). Rollouts then cannot use CUDA graphs (a CPU gather is not captured): the engine falls
  back to eager decoding and says so in its graph_failures.
- dense_experts_gb: MXFP4 experts on a GPU keep bf16 copies of their frozen projections, layers in
  order up to this many GiB (ossrl.model.expert_copies.dense_experts; 1.59 GB a 20b layer, 38 GB
  for all), so training-sized MoE calls stop decoding a transient copy on every call (four a layer a
  step). Under "auto" (with the measured budget) activations come first: each training forward
  decides its recomputed layers as if the copies' memory were free, then frees or makes copies to
  fit what is left (per GiB, kept activations save several times what copies do; session 17: 35.6
  GiB of copies at 8K tokens left 8 layers recomputed and the step went from 0.550 to 0.577 s).
  With checkpointing on or off, or an explicit activation budget, the copies stay as made here
  (until an out-of-memory fallback under "auto" frees them for the rest of the run).
  Memory the copies take is memory the rollouts' KV pool does not get. 0 (the default) keeps none.
"""

from __future__ import annotations

import gc

import torch

from ossrl.model.expert_copies import dense_experts
from ossrl.model.gptoss import lay_out_qkv


def configure_memory(model, *, gradient_checkpointing: bool | str, offload_activations: bool = False,
                     offload_embeddings: bool = False, activation_budget_gb: float | None = None,
                     dense_experts_gb: float = 0.0) -> None:
    """activation_budget_gb: with "auto", the bytes kept activations may take (default: measured
    free memory less a headroom). dense_experts_gb: see the module docstring."""
    if not (isinstance(gradient_checkpointing, bool) or gradient_checkpointing == "auto"):
        raise ValueError(f"gradient_checkpointing must be true, false or 'auto', got {gradient_checkpointing!r}")
    if offload_activations and not gradient_checkpointing:
        raise ValueError("offload_activations needs gradient_checkpointing (it offloads the checkpoints)")
    if activation_budget_gb is not None and activation_budget_gb < 0:
        raise ValueError(f"activation_budget_gb must be >= 0, got {activation_budget_gb}")
    if not dense_experts_gb >= 0:
        raise ValueError(f"dense_experts_gb must be >= 0, got {dense_experts_gb}")
    if gradient_checkpointing == "auto" and getattr(model, "sharded", False):
        gradient_checkpointing = True  # the same recompute on every rank (ossrl.train.sharding)
    lay_out_qkv(model)  # q, k and v side by side: training forwards may fuse them (lora.FUSED_TRAINING_QKV)
    model.model.gradient_checkpointing = gradient_checkpointing
    model.model.offload_activations = offload_activations
    model.model.activation_budget = None if activation_budget_gb is None else int(activation_budget_gb * (1 << 30))
    if offload_embeddings and model.device.type == "cuda":
        model.model.embed_tokens.to(torch.device("cpu"))
    cap = int(dense_experts_gb * (1 << 30))
    # "auto" with the measured budget refits the copies at every training forward (module docstring)
    model.model.dense_experts_cap = cap if gradient_checkpointing == "auto" and activation_budget_gb is None else 0
    dense_experts(model, max_bytes=cap)


def with_checkpointing_fallback(model, run_pass):
    """run_pass() -> (its result, whether it ran out of memory first). The pass must start from
    zeroed gradients and restore any state of its own (data order); torch's random state (LoRA
    dropout) is restored here. Under gradient_checkpointing "auto" an out-of-memory error (the
    estimate kept more activations than fit) switches the model to checkpointing every layer for
    the rest of the run, frees its kept expert copies (`dense_experts_gb`: memory the retry needs
    more), and the pass runs again; otherwise the error is the caller's."""
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        return run_pass(), False
    except torch.OutOfMemoryError:
        if model.model.gradient_checkpointing != "auto":
            raise
        model.model.gradient_checkpointing = True
        model.model.dense_experts_cap = 0
    dense_experts(model, max_bytes=0)
    gc.collect()  # the failed pass's tensors went with the exception
    if rng[1] is not None:
        torch.cuda.empty_cache()
        torch.cuda.set_rng_state_all(rng[1])
    torch.set_rng_state(rng[0])
    return run_pass(), True
