"""The gpt-oss model in plain PyTorch, written as the specification (docs: gpt-oss-spec.md, section 2).

Parameter names equal the Hugging Face checkpoint keys (`model.layers.N.self_attn.q_proj.weight`,
`model.layers.N.mlp.experts.gate_up_proj_blocks`, ...), so loading and saving are a name-for-name
copy. Experts are held either dense ([E, in, out], as transformers holds them) or as MXFP4
(`*_blocks`/`*_scales` buffers, decoded per call on the CPU path).

The one thing to know: attention sees keys by *position* (see ossrl.kernels.attention), so the
same forward serves full sequences, packed documents and incremental decoding with `KVCache`.

fp16 weights (GPUs without bf16) switch on the fp16 compute mode: the residual stream and the
experts' down projection (whose outputs exceed fp16's 65,504 on real weights) run in fp32; every
other matmul runs in fp16.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ossrl.kernels.attention import AttentionMask, sink_attention
from ossrl.kernels.moe import (
    ExpertWeights, moe_kernels_serve, route, routed_experts_reference, triton_available, use_moe_kernels,
)
from ossrl.kernels.mxfp4 import dequantize_mxfp4
from ossrl.kernels.transfer import host_to_device
from ossrl.kernels.varlen_attention import host_segments
from ossrl.model.checkpointing import (
    activation_budget, activations_then_copies, measure_saved_bytes, plain_layer_count,
)
from ossrl.model.config import GptOssConfig, YarnRope
from ossrl.model.expert_copies import blocks_stamp, dense_experts, tile_experts, tiled_epoch  # noqa: F401 (re-exported)
from ossrl.model.expert_copies import dense_bytes_kept, fit_dense_copies

EXPERT_FORMATS = ("bf16", "mxfp4")  # "bf16" means dense in the model's dtype (fp32 too)


_INFERENCE_KERNELS = threading.local()


@contextlib.contextmanager
def inference_kernels():
    """Within this context (the rollout engine's), CUDA forwards that need no gradient use the
    one-launch kernels of `ossrl.kernels.fused`. Outside it, RMSNorm and rotary use the same kernels
    with a backward (`training_kernels`) and the rest runs PyTorch's code, so the trainer's no-grad
    passes (old and reference log-probs) compute exactly what its training pass computes."""
    previous = getattr(_INFERENCE_KERNELS, "on", False)
    _INFERENCE_KERNELS.on = True
    try:
        yield
    finally:
        _INFERENCE_KERNELS.on = previous


def inference_kernels_on() -> bool:
    """Whether this thread is inside `inference_kernels` (the rollout engine's forwards)."""
    return getattr(_INFERENCE_KERNELS, "on", False)


def fused_kernels(*tensors: torch.Tensor):
    """`ossrl.kernels.fused` when its kernels may serve these tensors (inside `inference_kernels`,
    CUDA, Triton, no gradient needed), else None (the PyTorch code runs)."""
    if not inference_kernels_on() or not tensors[0].is_cuda or not triton_available():
        return None
    from ossrl.kernels import fused

    return fused if fused.fused_ok(*tensors) else None


def training_kernels(x: torch.Tensor):
    """`ossrl.kernels.fused` outside `inference_kernels` on CUDA with Triton: RMSNorm and rotary
    run as one kernel forward and one backward (autograd Functions whose forward is the inference
    kernel), in the trainer's gradient and no-gradient passes alike; else None (PyTorch)."""
    if not x.is_cuda or not triton_available():
        return None
    from ossrl.kernels import fused

    return fused


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * w, all in fp32, cast back at the end (spec 2.2)."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (fused := fused_kernels(x, self.weight)) is not None:
            return fused.rms_norm(x, self.weight, self.eps)
        if (kernels := training_kernels(x)) is not None:
            return kernels.rms_norm_autograd(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


def yarn_inv_freq(head_dim: int, rope: YarnRope) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies [head_dim/2] (fp32, computed on CPU with transformers' op order so
    the tables match bit for bit) and the concentration that multiplies cos and sin (spec 2.3)."""
    d = head_dim
    base, factor = rope.theta, rope.factor

    def correction_dim(rotations: float) -> float:
        return (d * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, d, 2).to(dtype=torch.float) / d)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # weight of the original (extrapolated) frequency
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    concentration = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, concentration


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x [B, T, H, D]; cos, sin [B, T, D/2] already in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.window = c.window(layer_idx)
        self.head_dim = c.head_dim
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.scale = c.head_dim ** -0.5
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=True, **kw)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=True, **kw)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=True, **kw)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=True, **kw)
        self.sinks = nn.Parameter(torch.zeros(c.num_attention_heads, **kw))

    def input_projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.q_proj, self.k_proj, self.v_proj

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The q, k and v weights [q+k+v, hidden] and biases as single tensors (views, no copy) when
        `lay_out_qkv` put them side by side and they need no gradient here; else None."""
        ps = self.input_projections()
        if any(p.bias is None for p in ps) or (torch.is_grad_enabled() and any(
                p.weight.requires_grad or p.bias.requires_grad for p in ps)):
            return None
        weight, bias = _side_by_side([p.weight for p in ps]), _side_by_side([p.bias for p in ps])
        return None if weight is None or bias is None else (weight, bias)

    def project_qkv(self, h: torch.Tensor):
        """q, k, v for h. In rollouts (inside `inference_kernels`, no autograd) with the weights laid
        out by `lay_out_qkv`: one matmul for the three (with adapters, that matmul also gives the
        rank-r intermediates, from the A copies in the rows reserved after the weights, and one
        addmm adds all three B products: `ossrl.model.lora.SharedRolloutA`)."""
        fused = self.fused_qkv() if inference_kernels_on() and not torch.is_grad_enabled() else None
        shared = getattr(self, "shared_lora_a", None)  # rollouts with LoRA: one A matmul for q, k, v
        if shared is not None and shared.serves(h):
            return shared(h, fused)
        ps = self.input_projections()
        if fused is not None and not any(getattr(p, "switch", None) is not None and p.switch.enabled for p in ps):
            return F.linear(h, *fused).split([p.weight.shape[0] for p in ps], dim=-1)
        from ossrl.model.lora import training_qkv

        return training_qkv(self, h) or tuple(p(h) for p in ps)

    def forward(self, h, cos, sin, masks, cache: KVCache | None = None):
        B, T, _ = h.shape
        q, k, v = self.project_qkv(h)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        fused = fused_kernels(q, k)
        if fused is not None and ROTARY_APPEND and hasattr(cache, "attend_rotary"):
            # decode steps: the rotary and the KV append in one launch, then the decode kernel
            out = cache.attend_rotary(self.layer_idx, q, k, v, cos, sin, self.sinks, scale=self.scale, fused=fused)
            return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))
        if fused is not None:
            q, k = fused.rotary_qk(q, k, cos, sin)
        elif (kernels := training_kernels(q)) is not None:
            q, k = kernels.rotary_qk_autograd(q, k, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # the cache stores k, v and attends (the engine's uses the decode kernel)
            out = cache.attend(self.layer_idx, q, k, v, self.sinks, masks[self.window], scale=self.scale)
        else:
            out = sink_attention(q, k, v, self.sinks, masks[self.window], scale=self.scale)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))


# Rollout decode steps rotate q and k and append k and v to the KV pool in one launch
# (`ossrl.kernels.fused.rotary_append`, the same bits as `rotary_qk` then `append_kv`; GPU tests
# passed in session 15). On since session 15: with ROUTER_GROUPS and static FlexAttention, rollouts
# went 314.6 -> 317.6 tok/s at batch 1 and 7,414 -> 7,516 at batch 64 on an H100, in one A/B of
# the three together (benchmarks/results/generate_switches_s15_h100.json; --no-rotary-append).
ROTARY_APPEND = True


def _side_by_side(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors as one [sum of rows, ...] view of their storage when they lie there back to back
    (contiguous, same dtype and device, each starting where the previous ends); else None."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.dtype != first.dtype or t.device != first.device
                or t.shape[1:] != first.shape[1:] or t.storage_offset() != offset
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows,) + tuple(first.shape[1:]), first.stride(), first.storage_offset())


def _movable(params: list) -> bool:
    """Whether `lay_out_qkv` may move these tensors into one buffer: ordinary parameters (not
    DTensor shards, not made in inference mode, not on the meta device) of one dtype, device and
    width."""
    first = params[0]
    if any(t is None or type(t) is not nn.Parameter for t in params) or first.device.type == "meta":
        return False
    return not any(t.is_inference() or t.dtype != first.dtype or t.device != first.device
                   or t.shape[1:] != first.shape[1:] for t in params)


def _lora_rank_rows(projections) -> int:
    """Rows to reserve after these projections' weights for their LoRA A copies (rollouts compute
    x A^T in the base matmul): the adapters' ranks summed, rounded up to 8 (aligned rows); 0
    without adapters."""
    ranks = sum(p.lora_A.weight.shape[0] for p in projections if hasattr(p, "lora_A"))
    return -(-ranks // 8) * 8


def _laid_out(params: list, spare: tuple[torch.Tensor, torch.Tensor] | None, rows: int, name: str) -> bool:
    """Whether `params` lie back to back, followed (when `rows` > 0) by `spare`'s `rows` rows."""
    if _side_by_side(params) is None:
        return False
    if rows == 0:
        return True
    tail = None if spare is None else spare[0 if name == "weight" else 1]
    return tail is not None and tail.shape[0] == rows and _side_by_side(params + [tail]) is not None


def weight_storage(model: nn.Module) -> tuple | None:
    """Address, dtype and shape of every parameter and buffer: what a captured CUDA graph reads.
    Values written in place (an optimizer step, a loaded adapter) keep it; new storage (a
    `load_state_dict(assign=True)`, a move and back) changes it. None for a sharded model, whose
    forwards gather shards and capture no graphs."""
    if getattr(model, "sharded", False):
        return None
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def lay_out_qkv(model: nn.Module) -> int:
    """Put each attention layer's q, k and v weights, and their biases, back to back in one buffer
    (values and Parameter objects unchanged; the old storage is freed), so that rollouts compute the
    three projections with one matmul (`Attention.project_qkv`). The rollout engine calls it. Layers
    already laid out, on the meta device, sharded, created in inference mode (their storage cannot
    be swapped) or whose three tensors differ in dtype, device or width are left alone; moving
    parameters later (`.to`, `to_empty`) undoes it harmlessly (three matmuls again).

    With LoRA adapters, the buffers also keep zeroed rows after the weights and biases for the
    adapters' A copies (`lora_rows`, on the Attention module for q/k/v and on o_proj for its own):
    a rollout forward then gets x A^T from the base matmul's extra columns instead of a separate
    rank-r matmul (`ossrl.model.lora`). `lora_rows` holds its buffer: a model moved afterwards keeps
    the old buffers allocated until the next call lays it out again (the engine calls it on every
    generate). Returns the number of layers whose weights or biases moved."""
    if getattr(model, "sharded", False):
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        moved = False
        for owner, projections in ((module, list(module.input_projections())), (module.o_proj, [module.o_proj])):
            weights, biases = [p.weight for p in projections], [p.bias for p in projections]
            # rows for the A copies only where both weights and biases can take them (x A^T needs a
            # zeroed bias tail): a half-done layout would be redone, and reported moved, every call
            rows = _lora_rank_rows(projections) if _movable(weights) and _movable(biases) else 0
            spare = getattr(owner, "lora_rows", None)
            tails = {}
            for name, params in (("weight", weights), ("bias", biases)):
                if not _movable(params) or (rows == 0 and len(params) == 1) or _laid_out(params, spare, rows, name):
                    continue
                first = params[0]
                with torch.inference_mode(False):  # normal tensors and views, whatever mode the caller is in
                    n = sum(t.shape[0] for t in params)
                    buffer = torch.zeros((n + rows,) + tuple(first.shape[1:]), dtype=first.dtype, device=first.device)
                    row = 0
                    for t in params:
                        buffer[row:row + t.shape[0]].copy_(t)
                        t.data = buffer[row:row + t.shape[0]]
                        row += t.shape[0]
                tails[name] = buffer[n:]
                moved = True
            if rows == 0:
                if spare is not None:
                    owner.lora_rows = None
            elif tails:  # (a part laid out already keeps its rows)
                owner.lora_rows = (tails.get("weight", spare and spare[0]), tails.get("bias", spare and spare[1]))
        count += moved
    return count


@torch.no_grad()
def check_scales_fold(model: nn.Module, enabled: bool = True) -> int:
    """Set, for each MXFP4 experts module, whether its rollout forwards may fold 2^126 into the
    scales (`Experts.scales_fold`: every E8M0 scale at most 128; one reduction per module and one
    host sync for all, about 0.2 ms for 20b on a GPU; only the GPU kernels use the answer). The
    rollout engine calls it at the start of each generate, outside graph capture, so the answer
    is fresh for that generate whatever was written to the scales before; `enabled=False` clears
    it; sharded and meta-device modules get False. Returns the number of modules whose answer
    changed (graphs captured with the old one must go)."""
    modules = [m for m in model.modules() if isinstance(m, Experts) and m.format == "mxfp4"]
    fold = [False] * len(modules)
    if enabled and not getattr(model, "sharded", False):
        live = [i for i, m in enumerate(modules) if m.gate_up_proj_scales.device.type != "meta"]
        if live:
            peaks = torch.stack([torch.maximum(modules[i].gate_up_proj_scales.max(), modules[i].down_proj_scales.max())
                                 .to(modules[live[0]].gate_up_proj_scales.device) for i in live]).tolist()
            for i, peak in zip(live, peaks):
                fold[i] = peak <= 128
    changed = sum(m.scales_fold != f for m, f in zip(modules, fold))
    for m, f in zip(modules, fold):
        m.scales_fold = f
    return changed


class Router(nn.Module):
    def __init__(self, config: GptOssConfig, device=None, dtype=None):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(config.num_local_experts, config.hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(config.num_local_experts, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, group_bm: int | None = None):
        """x [N, H] -> (weights [N, k], ids [N, k], grouping): grouping is the slots grouped by expert
        with a tile table of `group_bm` rows (`fused.router_topk_grouped`, with ROUTER_GROUPS at
        decode sizes), else None."""
        fused = fused_kernels(x, self.weight, self.bias)
        # decode: the logits by Triton (bf16/fp16: tl.dot on fp32 would run in TF32, unlike F.linear)
        if fused is not None and x.shape[0] <= fused.ROUTER_TOPK_MAX_TOKENS and x.dtype != torch.float32:
            if group_bm is not None and fused.ROUTER_GROUPS and 0 < x.shape[0] <= fused.ROUTER_GROUP_MAX_TOKENS:
                return fused.router_topk_grouped(x, self.weight, self.bias, self.top_k, group_bm)
            return (*fused.router_topk(x, self.weight, self.bias, self.top_k), None)
        logits = F.linear(x, self.weight, self.bias)
        return (*(route(logits, self.top_k) if fused is None else fused.route_topk(logits, self.top_k)), None)


class Experts(nn.Module):
    """E expert MLPs, dense ([E, in, out] parameters) or MXFP4 ([E, out, in/32, 16] + scales buffers).

    Gate and up are interleaved columns of gate_up (even = gate). The base weights are frozen
    in RL; gradients still flow through them to the input.
    """

    def __init__(self, config: GptOssConfig, fmt: str = "bf16", device=None, dtype=None):
        super().__init__()
        if fmt not in EXPERT_FORMATS:
            raise ValueError(f"expert format must be one of {EXPERT_FORMATS}, got {fmt!r}")
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.format = fmt
        self.limit, self.alpha = config.swiglu_limit, config.swiglu_alpha
        kw = dict(device=device, dtype=dtype)
        if fmt == "bf16":
            self.gate_up_proj = nn.Parameter(torch.zeros(E, H, 2 * I, **kw))
            self.down_proj = nn.Parameter(torch.zeros(E, I, H, **kw))
        else:
            u8 = dict(device=device, dtype=torch.uint8)
            self.register_buffer("gate_up_proj_blocks", torch.zeros(E, 2 * I, H // 32, 16, **u8))
            self.register_buffer("gate_up_proj_scales", torch.zeros(E, 2 * I, H // 32, **u8))
            self.register_buffer("down_proj_blocks", torch.zeros(E, H, I // 32, 16, **u8))
            self.register_buffer("down_proj_scales", torch.zeros(E, H, I // 32, **u8))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I, **kw))
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H, **kw))
        self.lora = None  # an ossrl.model.lora.ExpertLoRA once adapters are applied
        # Every MXFP4 scale <= 128, as `check_scales_fold` found at the start of the running
        # generate: rollout forwards (inside `inference_kernels`) may then decode with one
        # multiply by 2^126 x scale instead of two (`ossrl.kernels.mxfp4_triton.mxfp4_words`).
        self.scales_fold = False
        # Rollouts on a GPU: copies of the blocks in the word decode's tile-contiguous layout
        # (`tile_experts`), with the (address, version) of the blocks they were made from
        self.tiled: dict | None = None
        # On a GPU: both projections decoded to bf16 once (`dense_experts`), read by the
        # compute-bound MoE calls instead of a transient copy per call; stamped likewise
        self.dense: dict | None = None

    def _lora_on(self) -> bool:
        return self.lora is not None and self.lora.enabled

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.format == "bf16":
            z = x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        else:
            w = dequantize_mxfp4(self.gate_up_proj_blocks[e], self.gate_up_proj_scales[e], x.dtype)  # [2I, H]
            z = F.linear(x, w, self.gate_up_proj_bias[e])
        return z + self.lora.gate_up_delta(e, x) if self._lora_on() else z

    def down(self, e: int, a: torch.Tensor) -> torch.Tensor:
        if a.dtype == torch.float16:  # fp16 mode: down-projection outputs overflow fp16, so fp32
            return self._down_fp32(e, a)
        if self.format == "bf16":
            y = a @ self.down_proj[e] + self.down_proj_bias[e]
        else:
            w = dequantize_mxfp4(self.down_proj_blocks[e], self.down_proj_scales[e], a.dtype)  # [H, I]
            y = F.linear(a, w, self.down_proj_bias[e])
        return y + self.lora.down_delta(e, a) if self._lora_on() else y

    def _down_fp32(self, e: int, a: torch.Tensor) -> torch.Tensor:
        if self.format == "bf16":
            w = self.down_proj[e].float().T
        else:
            w = dequantize_mxfp4(self.down_proj_blocks[e], self.down_proj_scales[e], torch.float32)
        y = F.linear(a.float(), w, self.down_proj_bias[e].float())
        return y + self.lora.down_delta(e, a).float() if self._lora_on() else y

    def expert_weights(self) -> ExpertWeights:
        """The base as the kernels take it (views, no copies)."""
        if self.format == "bf16":
            return ExpertWeights(self.gate_up_proj, self.gate_up_proj_bias, self.down_proj, self.down_proj_bias,
                                 limit=self.limit, alpha=self.alpha)
        inference = inference_kernels_on()
        stamp = blocks_stamp(self) if self.tiled is not None or self.dense is not None else None
        # copies are read while they hold the blocks' current values: the tiled ones by rollouts
        # (`tile_experts`), the dense ones by every forward and backward (`dense_experts`)
        tiled = self.tiled if inference and self.tiled is not None and self.tiled["stamp"] == stamp else {}
        if self.dense is not None and self.dense["stamp"] != stamp:  # the blocks were written since
            self.dense = None
            warnings.warn("an MXFP4 experts module's bf16 copies no longer match its blocks and were freed; "
                          "ossrl.model.expert_copies.dense_experts (configure_memory) remakes them", RuntimeWarning,
                          stacklevel=2)
        dense = self.dense or {}
        return ExpertWeights(self.gate_up_proj_blocks, self.gate_up_proj_bias, self.down_proj_blocks,
                             self.down_proj_bias, self.gate_up_proj_scales, self.down_proj_scales,
                             limit=self.limit, alpha=self.alpha, scales_fold=self.scales_fold and inference,
                             gate_up_tiled=tiled.get("gate_up"), down_tiled=tiled.get("down"),
                             tiled=tiled.get("layout"), gate_up_dense=dense.get("gate_up"),
                             down_dense=dense.get("down"))

    def kernels_serve(self, x: torch.Tensor) -> bool:
        """Whether forward runs the grouped Triton kernels for x (`use_moe_kernels`)."""
        weight = self.gate_up_proj_blocks if self.format == "mxfp4" else self.gate_up_proj
        return moe_kernels_serve(x, self.format, weight.dtype)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, grouping=None) -> torch.Tensor:
        """grouping (optional): the slots of ids grouped by expert (`fused.SlotGrouping`), for the kernels."""
        experts = self.expert_weights()
        if use_moe_kernels(x, experts):  # CUDA, bf16 activations: grouped Triton matmuls, same function
            from ossrl.kernels.moe_triton import routed_experts_triton

            lora = self.lora.in_dtype(x.dtype) if self._lora_on() else None
            return routed_experts_triton(x, weights, ids, experts, lora, lora_epilogue=inference_kernels_on(),
                                         grouping=grouping)
        out_dtype = torch.float32 if x.dtype == torch.float16 else None  # fp16 mode: fp32 combine
        return routed_experts_reference(x, weights, ids, self.gate_up, self.down, limit=self.limit, alpha=self.alpha,
                                        out_dtype=out_dtype)


# The rows of the MoE decode tiles (every `default_config` up to 16 slots an expert has BM 16): the
# router's kernel builds its tile table for them (another BM builds its own from the grouping).
DECODE_TILE_ROWS = 16


class MLP(nn.Module):
    def __init__(self, config: GptOssConfig, expert_format: str, device=None, dtype=None):
        super().__init__()
        self.router = Router(config, device=device, dtype=dtype)
        self.experts = Experts(config, expert_format, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        # (a grouping only where the experts' kernels will read it)
        weights, ids, grouping = self.router(x, group_bm=DECODE_TILE_ROWS if self.experts.kernels_serve(x) else None)
        return self.experts(x, weights, ids, grouping).reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, config: GptOssConfig, layer_idx: int, expert_format: str, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.self_attn = Attention(config, layer_idx, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.mlp = MLP(config, expert_format, device, dtype)

    def forward(self, x, cos, sin, masks, cache=None, pending=None, defer=False):
        """x + attention and MLP (the residual stream after this layer). With `defer` (rollout
        forwards, `GptOssModel.forward` decides) the MLP output is returned beside x instead of
        added, and `pending`, the previous layer's, is added here in one launch with this layer's
        input norm (`add_rms_norm`: the same rounding as the add, then the norm): (x, mlp output)."""
        compute = cos.dtype  # the weights' dtype; x is fp32 in the fp16 mode (no-op casts otherwise)
        x, h = _add_and_norm(x, pending, self.input_layernorm)
        a = self.self_attn(h.to(compute), cos, sin, masks, cache)
        x, h = _add_and_norm(x, a, self.post_attention_layernorm)
        out = self.mlp(h.to(compute))
        return (x, out) if defer else x + out


# Training forwards on CUDA: each residual add and the norm after it in one autograd Function whose
# backward adds the residual stream's gradient in the norm's backward kernel (`_add_and_norm`);
# False: the add and `rms_norm_autograd` apart, autograd adding the two gradients (benchmarks'
# --fused-residual-backward switch).
FUSED_RESIDUAL_BACKWARD = True

# Rollout forwards add each layer's MLP output in the next layer's input norm (`DecoderLayer.forward`'s
# `defer`); False: in its own launch, as training forwards do (benchmarks' --defer-residual-add switch).
DEFER_RESIDUAL_ADD = True


def _add_and_norm(x, a, norm: RMSNorm):
    """(x + a, norm(x + a)); a may be None (x, norm(x)). One launch where the fused kernels serve
    (`add_rms_norm`: x + a's rounding, rms_norm's math); in training on CUDA one launch each way
    (`add_rms_norm_autograd`: the residual stream's gradient to x + a is added in the norm's
    backward kernel)."""
    one_dtype = x.dtype == norm.weight.dtype and (a is None or a.dtype == x.dtype)
    if a is not None and one_dtype and (fused := fused_kernels(x, a, norm.weight)) is not None:
        return fused.add_rms_norm(x, a, norm.weight, norm.eps)
    if one_dtype and FUSED_RESIDUAL_BACKWARD and not inference_kernels_on() and \
            (kernels := training_kernels(x)) is not None:
        return kernels.add_rms_norm_autograd(x, a, norm.weight, norm.eps)
    if a is None:
        return x, norm(x)
    x = x + a
    return x, norm(x)


class KVCache:
    """A simple growing cache (CPU-friendly; the rollout engine has its own slot cache).

    Holds, per layer, rotated keys and values [B, T, Hkv, D], plus the positions of the cached
    keys [B, T] so masks are computed from positions like everywhere else.

    The cache protocol the model uses (ossrl.engine.kv_pool implements it too):
    `next_positions(B, T, device)`, `key_positions(positions)` (positions of all keys the new
    queries may see), `attend(layer_idx, q, k, v, sinks, mask, scale)` (store k, v and return the
    attention output) and `advance(key_positions)` after the forward.
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def next_positions(self, batch: int, length: int, device) -> torch.Tensor:
        start = 0 if self.positions is None else int(self.positions[:, -1].max()) + 1
        return torch.arange(start, start + length, device=device).expand(batch, length)

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions if self.positions is None else torch.cat((self.positions, positions), 1)

    def attend(self, layer_idx: int, q, k, v, sinks, mask, *, scale: float) -> torch.Tensor:
        if layer_idx in self.keys:
            k = torch.cat((self.keys[layer_idx], k), dim=1)
            v = torch.cat((self.values[layer_idx], v), dim=1)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return sink_attention(q, k, v, sinks, mask, scale=scale)

    def advance(self, key_positions: torch.Tensor) -> None:
        self.positions = key_positions


class GptOssModel(nn.Module):
    def __init__(self, config: GptOssConfig, expert_format: str = "bf16", device=None, dtype=None):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, expert_format, device, dtype) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        # Recompute layers in backward (ossrl.train.memory): False, True (every layer) or "auto" (only
        # the layers whose activations do not fit in memory); `checkpointed_layers` says how many the
        # last training forward recomputed.
        self.gradient_checkpointing: bool | str = False
        self.offload_activations = False  # with checkpointing: layer inputs wait in pinned CPU memory
        self.activation_budget: int | None = None  # "auto": bytes for kept activations (None: measured)
        # "auto" with a measured budget: bytes of kept bf16 expert copies allowed (`configure_memory`'s
        # dense_experts_gb); each training forward refits them to what the activations leave
        self.dense_experts_cap = 0
        # Set while CUDA graphs read the kept copies by address (ossrl.train.graphed): they stay as
        # they are, and the activations' budget counts them as taken.
        self.dense_copies_frozen = False
        self.checkpointed_layers = 0
        self.layer_activation_bytes = 0  # "auto": what a layer keeps, as estimated for the last forward
        self._measured: tuple[int, int] | None = None  # "auto": (tokens, bytes a layer kept) when measured
        # Not a checkpoint tensor: computed on CPU, like transformers does (spec 2.3, 5.13).
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2, device=device), persistent=False)
        self.reset_rope()

    def reset_rope(self) -> None:
        inv_freq, self.rope_concentration = yarn_inv_freq(self.config.head_dim, self.config.rope)
        if self.inv_freq.device.type != "meta":
            self.inv_freq.copy_(inv_freq)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [B, T, D/2] in `dtype` for integer positions [B, T]."""
        angles = positions[..., None].float() * self.inv_freq.to(positions.device)
        return ((angles.cos() * self.rope_concentration).to(dtype),
                (angles.sin() * self.rope_concentration).to(dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        branch_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segments=None,
    ) -> torch.Tensor:
        """Hidden states [B, T, H] after the final norm.

        positions [B, T]: absolute positions (default: continue the cache, or 0..T-1).
        doc_ids [B, T]: packed documents; a token attends only within its document. Positions
        should restart at 0 for each document. Not combinable with a cache, except one that
        prefills packed prompts (`packed_documents`, the engine's PrefillWriter).
        branch_ids [B, T] (with doc_ids): sequences of a document that share a prefix hold it once as
        branch 0, each continuation as branch 1, 2, ... (positions continuing from the prefix); a
        token sees branch 0 and its own branch (ossrl.kernels.attention.AttentionMask).
        positions, doc_ids and branch_ids may be given on the host for a model on a GPU: they are
        copied over without waiting, and the attention masks' block tables are built from the host
        copies (no kernel launches; the engine's prefills and training batches do this; an FSDP
        root moves them to the device before this runs).
        segments: this layout's FlashAttention varlen `Segments` already on the device (a CUDA graph's
        buffers: `ossrl.train.graphed`), for `attention.VARLEN_ATTENTION`; else, without a cache, made
        from the host copies when attention first asks.
        """
        B, T = input_ids.shape
        device = input_ids.device
        host = None
        given = [t for t in (positions, doc_ids, branch_ids) if t is not None]
        if device.type != "cpu" and any(t.device.type == "cpu" for t in given):
            if positions is None or not all(t.device.type == "cpu" for t in given):
                raise ValueError(f"positions, doc_ids and branch_ids must all be on the host or all on {device}; "
                                 f"got {[str(t.device) for t in given]}")
            host = (positions, doc_ids, branch_ids)
            positions, doc_ids, branch_ids = (None if t is None else host_to_device(t, device) for t in host)
        if positions is None:
            positions = cache.next_positions(B, T, device) if cache is not None else \
                torch.arange(T, device=device).expand(B, T)
        if cache is not None and doc_ids is not None and not getattr(cache, "packed_documents", False):
            raise ValueError("doc_ids (packed documents) cannot be combined with this KV cache")
        if branch_ids is not None and (doc_ids is None or cache is not None):
            raise ValueError("branch_ids need doc_ids and no KV cache (they describe a packed training batch)")
        k_pos = positions if cache is None else cache.key_positions(positions)
        # One mask per layer type, shared by its layers (and by recomputation under checkpointing);
        # each builds its dense bool (CPU) or FlexAttention BlockMask (CUDA) once, on first use.
        masks = {}
        if segments is None and host is not None and cache is None:  # (made once, for every layer type)
            segments = functools.cache(lambda: host_segments(host, device))
        for window in {self.config.window(i) for i in range(self.config.num_hidden_layers)}:
            # (a cache that adds keys before these queries' has no host copy of their positions)
            twin = None if host is None or k_pos is not positions else \
                AttentionMask(host[0], host[0], window=window, q_doc=host[1], k_doc=host[1], q_branch=host[2],
                              k_branch=host[2])
            masks[window] = AttentionMask(positions, k_pos, window=window, q_doc=doc_ids, k_doc=doc_ids,
                                          q_branch=branch_ids, k_branch=branch_ids, host=twin, varlen=segments)
        # The table may live on the CPU (embedding offload): gather rows there, move only those.
        x = self.embed_tokens(input_ids.to(self.embed_tokens.weight.device)).to(device)
        cos, sin = self.rope_tables(positions, x.dtype)
        if x.dtype == torch.float16:
            x = x.float()  # fp16 mode: the residual stream is fp32
        mode = self.gradient_checkpointing if torch.is_grad_enabled() and cache is None else False
        plain = len(self.layers) if not mode else 0  # layers that keep their activations (no recompute)
        if mode == "auto":
            # A forward captured in a CUDA graph (ossrl.train.graphed) keeps the plan of the eager
            # forward before it: measuring and making or freeing kept expert copies cannot be captured.
            capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
            plain = len(self.layers) - self.checkpointed_layers if capturing else \
                self._layers_that_fit(x, cos, sin, masks)
        # rollouts (fused kernels, no gradient): each layer's MLP output is added to the residual
        # stream by the next layer's input norm (one launch for the add and the norm, not two)
        defer = DEFER_RESIDUAL_ADD and not torch.is_grad_enabled() and fused_kernels(x) is not None \
            and x.dtype == self.norm.weight.dtype
        pending = None
        for i, layer in enumerate(self.layers):
            if defer:
                x, pending = layer(x, cos, sin, masks, cache, pending=pending, defer=True)
            elif i < plain:
                x = layer(x, cos, sin, masks, cache)
            else:
                with torch.autograd.graph.save_on_cpu(pin_memory=True) if self.offload_activations \
                        else contextlib.nullcontext():
                    # Saves only the layer input; the recomputation reuses the same masks.
                    x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, masks, use_reentrant=False)
        if mode:
            self.checkpointed_layers = len(self.layers) - plain
        if cache is not None:
            cache.advance(k_pos)
        return _add_and_norm(x, pending, self.norm)[1]

    def _layers_that_fit(self, x, cos, sin, masks) -> int:
        """Checkpointing "auto": how many layers (the first ones) keep their activations within the
        activation budget; the others are recomputed in backward. The bytes per token a layer keeps
        are measured on the first layer (a forward whose saved tensors are counted and dropped) once,
        and again when a forward has more than twice the tokens last measured."""
        tokens = x.shape[0] * x.shape[1]
        if self._measured is None or tokens > 2 * self._measured[0]:
            # The embedding output needs no gradient, but every later layer's input does, and a layer
            # whose input needs one keeps more (its attention's tensors when LoRA is on experts only).
            probe = x.detach().requires_grad_(True)
            self._measured = (tokens, measure_saved_bytes(self.layers[0], probe, cos, sin, masks, None))
        layer_bytes = -(-self._measured[1] * tokens // self._measured[0])
        self.layer_activation_bytes = layer_bytes
        input_bytes = x.numel() * x.element_size()  # what a checkpointed layer still keeps: its input
        if self.activation_budget is not None:
            return plain_layer_count(layer_bytes, len(self.layers), self.activation_budget, input_bytes)
        # kept expert copies (a cap) take only what this forward's activations leave (made or freed
        # here, before any layer reads them; the values are the per-call decode's: only speed changes)
        cap = 0 if self.dense_copies_frozen else self.dense_experts_cap
        budget = activation_budget(x.device, layer_bytes, also_free=dense_bytes_kept(self) if cap else 0)
        plain, allowed = activations_then_copies(layer_bytes, len(self.layers), budget, input_bytes, cap)
        if cap:
            fit_dense_copies(self, allowed)
        return plain


class GptOssForCausalLM(nn.Module):
    """gpt-oss with its (untied) unembedding. `model(input_ids)` returns logits [B, T, vocab]."""

    def __init__(self, config: GptOssConfig, expert_format: str = "bf16", device=None, dtype=None):
        super().__init__()
        self.config = config
        self.expert_format = expert_format
        self.model = GptOssModel(config, expert_format, device, dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def adapters_disabled(self):
        """Context manager: the base model (LoRA off), e.g. the KL reference policy. No copy."""
        from ossrl.model.lora import adapters_disabled

        return adapters_disabled(self)

    def forward(self, input_ids, *, positions=None, doc_ids=None, branch_ids=None, cache=None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab]; `last_only` returns [B, 1, vocab] for the last position only (a
        prefill needs one row, not T x 201088)."""
        hidden = self.model(input_ids, positions=positions, doc_ids=doc_ids, branch_ids=branch_ids, cache=cache)
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden.to(self.lm_head.weight.dtype))
