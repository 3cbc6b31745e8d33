"""Memory options of the training step, set on a model in one place (SFT and GRPO share them).

- gradient_checkpointing: each decoder layer saves only its input and recomputes in backward.
- offload_activations: with checkpointing, those saved inputs wait in pinned CPU memory
  (torch.autograd.graph.save_on_cpu) instead of on the GPU.
- offload_embeddings: the embedding table (201088 x 2880 bf16, 1.16 GB for gpt-oss) stays on the
  CPU; rows are gathered there and only they move to the GPU. The table is frozen (LoRA does not
  touch it). Rollouts then cannot use CUDA graphs (a CPU gather is not captured): the engine falls
  back to eager decoding and says so in its graph_failures.
"""

from __future__ import annotations

import torch


def configure_memory(model, *, gradient_checkpointing: bool, offload_activations: bool = False,
                     offload_embeddings: bool = False) -> None:
    if offload_activations and not gradient_checkpointing:
        raise ValueError("offload_activations needs gradient_checkpointing (it offloads the checkpoints)")
    model.model.gradient_checkpointing = gradient_checkpointing
    model.model.offload_activations = offload_activations
    if offload_embeddings and model.device.type == "cuda":
        model.model.embed_tokens.to(torch.device("cpu"))
