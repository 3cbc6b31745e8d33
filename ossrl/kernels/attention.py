"""Attention with per-head sinks: FlexAttention on CUDA, a plain-PyTorch twin on CPU (and as oracle).

gpt-oss appends one learned logit per query head (the "sink") to every softmax row; it has no
value vector, so each row's weights sum to less than one (spec 2.3 item 6). Equivalently,

    out = softmax_attention(q, k, v) * sigmoid(lse - sink)        (lse: natural-log row logsumexp)

which is what the CUDA path computes: compiled FlexAttention returns `out` and `lse`, and a small
autograd function applies the rescale, so gradients reach q, k, v *and* the sinks (through lse).
Memory is linear in T: no [heads x T x T] tensor exists on that path.

Which keys a query sees is described by positions, not by a fixed triangle, so one mask serves
training on packed sequences (document ids, positions restarting per document), prefill that
appends to a cache (query positions offset) and incremental decoding:

    key j is visible to query i  iff  doc[i] == doc[j]  and  k_pos[j] <= q_pos[i]
                                      and (window is None or q_pos[i] - k_pos[j] < window)

The window counts the query itself: a 128-window sees the current token and 127 before it.

`AttentionMask` holds those positions; the model builds one per layer type per forward and every
layer of that type (and the recomputation under gradient checkpointing) reuses it. It lazily
builds what the device needs, once: a dense bool [B, Tq, Tk] for the twin, or a FlexAttention
BlockMask (heads always broadcast, batch broadcast when all rows share positions; built by
`ossrl.kernels.block_mask` in O((T/128)^2), never O(T^2)) for CUDA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ossrl.kernels.block_mask import _FAR, BLOCK, _shared_across_batch, build_block_mask


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    window: int | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    k_valid: torch.Tensor | None = None,
    q_branch: torch.Tensor | None = None,
    k_branch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean visibility [B, Tq, Tk] from positions [B, Tq], [B, Tk] (and optional doc ids and
    branch ids: a key of branch 0 is seen by every branch of its document, any other key only by
    its own branch)."""
    qp = q_pos.unsqueeze(-1)
    kp = k_pos.unsqueeze(-2)
    allowed = kp <= qp
    if window is not None:
        allowed = allowed & (qp - kp < window)
    if q_doc is not None and k_doc is not None:
        allowed = allowed & (q_doc.unsqueeze(-1) == k_doc.unsqueeze(-2))
    if q_branch is not None and k_branch is not None:
        kb = k_branch.unsqueeze(-2)
        allowed = allowed & ((kb == 0) | (kb == q_branch.unsqueeze(-1)))
    if k_valid is not None:
        allowed = allowed & k_valid.unsqueeze(-2)
    return allowed


@dataclass(eq=False)
class AttentionMask:
    """Which keys each query sees, by position (module docstring). Build once, use in every layer.

    q_pos [B, Tq], k_pos [B, Tk] integer positions; q_doc/k_doc [B, Tq]/[B, Tk] document ids (both
    or neither); window: the sliding window in keys including the current one, or None (causal).
    q_branch/k_branch (with documents): a document whose sequences share a prefix holds the prefix
    once as branch 0 and each continuation as branch 1, 2, ...; a query sees its own branch and
    branch 0 (positions continue from the prefix, so the causal rule is unchanged).
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    window: int | None = None
    q_doc: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None
    q_branch: torch.Tensor | None = None
    k_branch: torch.Tensor | None = None
    # The same mask with its tensors on the host, where the caller has them (a prefill's positions and
    # documents): the BlockMask's tables and mask_mod are then built from it and copied over once,
    # instead of by a few hundred tiny kernel launches on the device while it waits for the first
    # layer's attention. It must hold the same values (only shapes and window are checked; the
    # dense twin path still reads the device tensors).
    host: AttentionMask | None = field(default=None, repr=False)
    # The FlashAttention varlen segments of this layout where the caller has them on the device
    # already (a CUDA graph's fixed buffers, `ossrl.train.graphed`), or a function that makes them
    # once for several masks (a forward's layer types): `segments` returns what it gives.
    varlen: object = field(default=None, repr=False)
    _dense: torch.Tensor | None = field(default=None, init=False, repr=False)
    _block_mask: object = field(default=None, init=False, repr=False)
    _padded: tuple | None = field(default=None, init=False, repr=False)  # ((Tq, Tk), mask): `_padded_to`

    def __post_init__(self):
        if (self.q_doc is None) != (self.k_doc is None):
            raise ValueError("AttentionMask: give both q_doc and k_doc, or neither")
        if (self.q_branch is None) != (self.k_branch is None) or (self.q_branch is not None and self.q_doc is None):
            raise ValueError("AttentionMask: branch ids need both q_branch and k_branch, and document ids")
        if self.host is not None and (self.host.q_pos.shape != self.q_pos.shape or self.host.window != self.window
                                      or self.host.k_pos.shape != self.k_pos.shape):
            raise ValueError("AttentionMask: the host mask must have the same shapes and window")

    def dense(self) -> torch.Tensor:
        """Boolean visibility [B, Tq, Tk] (the twin's mask), built on first use."""
        if self._dense is None:
            self._dense = attention_mask(self.q_pos, self.k_pos, window=self.window, q_doc=self.q_doc,
                                         k_doc=self.k_doc, q_branch=self.q_branch, k_branch=self.k_branch)
        return self._dense

    def segments(self):
        """The FlashAttention varlen `Segments` its creator gave (`varlen`: the segments, or a function
        that makes them), or None. `GptOssModel.forward` gives them for forwards without a KV cache
        (training and log-prob passes) whose layout has them (`varlen_attention.document_segments`)."""
        if self.varlen is None:
            return None
        return self.varlen() if callable(self.varlen) else self.varlen

    def block_mask(self):
        """FlexAttention BlockMask on the positions' device, built on first use (from `host` if given)."""
        if self._block_mask is None:
            self._block_mask = build_block_mask(self)
        return self._block_mask


def sink_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    allowed: torch.Tensor,
    *,
    scale: float,
) -> torch.Tensor:
    """Exact sink attention in fp32 with an explicit sink column.

    q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D] with Hq a multiple of Hkv (query head h uses KV head
    h // (Hq/Hkv)); sinks [Hq]; allowed bool [B, Tq, Tk]. Returns [B, Tq, Hq, D] in q's dtype.
    A row with no visible key returns zeros (only the sink is left), never NaN.
    """
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    qf = q.float().view(B, Tq, Hkv, G, D)
    kf = k.float()
    vf = v.float()
    # [B, Hkv, G, Tq, Tk]
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qf, kf) * scale
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    sink = sinks.float().view(1, Hkv, G, 1, 1).expand(B, Hkv, G, Tq, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, vf)
    return out.reshape(B, Tq, Hq, D).to(q.dtype)


# The one-pass Triton kernels for `_SinkRescale` on CUDA (ossrl.kernels.sink_triton). On since
# session 11: their GPU test passed (tests/test_attention_gpu.py) and, with shared prefixes, the
# GRPO step's training phase went 5.09 -> 4.92 s on an H100 (benchmarks/results/grpo_step.json).
SINK_KERNELS = True


def _sink_kernels(out: torch.Tensor):
    """`ossrl.kernels.sink_triton` where it serves `_SinkRescale` for `out` (SINK_KERNELS, CUDA,
    Triton, a supported layout), else None (the PyTorch twin)."""
    if not (SINK_KERNELS and out.is_cuda):
        return None
    from ossrl.kernels.moe import triton_available

    if not triton_available():
        return None
    from ossrl.kernels import sink_triton

    return sink_triton if sink_triton.supported(out) else None


class _SinkRescale(torch.autograd.Function):
    """out * sigmoid(lse - sink) with fp32 arithmetic, saving only what flex already keeps.

    out [B, H, T, D] (input dtype), lse [B, H, T] fp32, sinks [H]. d lse = sum(g * out) * w(1-w);
    d sink = -sum over batch and time of d lse. On CUDA with SINK_KERNELS each way is one Triton
    pass over the [B, H, T, D] tensors (ossrl.kernels.sink_triton). The PyTorch twin makes its
    fp32 temporaries a few heads at a time (at most `chunk_elements` each), so at 128K tokens of
    20b they take 1 GiB, not 6 GiB, while short sequences stay one chunk.
    """

    @staticmethod
    def forward(ctx, out, lse, sinks, chunk_elements: int = 2**26):
        B, H, T, D = out.shape
        step = max(1, chunk_elements // (B * T * D))
        w = torch.sigmoid(lse - sinks.float()[:, None]).contiguous()  # [B, H, T]
        ctx.save_for_backward(out, w)
        kernels = _sink_kernels(out)  # (kept: the backward runs as the forward ran)
        ctx.sinks_dtype, ctx.step, ctx.kernels = sinks.dtype, step, kernels
        if kernels is not None:
            return kernels.scale(out, w)
        if step >= H:
            return (out.float() * w[..., None]).to(out.dtype)
        scaled = torch.empty_like(out)
        for h in range(0, H, step):
            scaled[:, h:h + step] = out[:, h:h + step].float() * w[:, h:h + step, :, None]
        return scaled

    @staticmethod
    @torch.autograd.function.once_differentiable  # w was made without a graph: no double backward
    def backward(ctx, grad):
        out, w = ctx.saved_tensors
        step = ctx.step
        if ctx.kernels is not None:
            grad_out, grad_lse = ctx.kernels.scale_backward(grad if grad.stride(-1) == 1 else grad.contiguous(), out, w)
        elif step >= out.shape[1]:
            g = grad.float()
            grad_out = (g * w[..., None]).to(out.dtype)
            grad_lse = (g * out.float()).sum(-1)
        else:
            grad_out = torch.empty_like(out)
            grad_lse = torch.empty_like(w)
            for h in range(0, out.shape[1], step):
                g = grad[:, h:h + step].float()
                grad_out[:, h:h + step] = g * w[:, h:h + step, :, None]
                grad_lse[:, h:h + step] = (g * out[:, h:h + step].float()).sum(-1)
        grad_lse *= w * (1 - w)
        grad_sinks = (-grad_lse.sum((0, 2))).to(ctx.sinks_dtype)
        return grad_out, grad_lse, grad_sinks, None


# FlexAttention compiled for fixed lengths (`dynamic=False`) rather than torch's default, which
# recompiles with symbolic lengths at the second length it meets; that kernel is slower at short
# lengths (session 5: 4.4-5.9 against 3.0 ms fwd+bwd at 4K; the same from 16K up). With it on,
# self-attention (as many queries as keys: training, prefills) up to STATIC_MAX_TOKENS is padded
# to `static_length` (a few dozen kernels in all), the padding masked out; longer ones and
# queries against a cache run the dynamic kernel. True: every such call; "training": only calls
# under autograd (training forwards and their recompute, every layer alike, even one whose q needs
# no gradient), not those under no_grad (rollouts' prefills, reference log-probs); False: none.
# "training" since session 19 (H100, 20b shapes): an 8K training step 0.5154 -> 0.4564 s with the
# static kernel (fwd + bwd 102 against 161 ms, results/train_interleaved_static_s19_h100.json; 4K
# unchanged: torch's first length is compiled static anyway), and a GRPO step's training phase 4.74
# -> 4.18 s (results/grpo_step_flex_*_s19_h100.json) for 12 s more compiling in its first three steps.
# Prefills keep the dynamic kernel: static ones did not speed them (session 17: batch-64 prefill
# 0.211 against 0.174 s).
FLEX_STATIC: bool | str = "training"
STATIC_MAX_TOKENS = 16384
# Triton tile options for compiled FlexAttention calls (torch's `kernel_options`: "fwd_BLOCK_M",
# "bwd_BLOCK_N1", "num_warps", ...). FLEX_KERNEL_OPTIONS, when set, serves every call; otherwise
# FLEX_TUNED's entry for the GPU (compute capability), head size and dtype, else torch's defaults.
# `benchmarks/flex_tune.py` times candidates on the training shape. A change recompiles (dynamo
# guards on the options).
FLEX_KERNEL_OPTIONS: dict = {}
FLEX_TUNED: dict = {}


def _kernel_options(q: torch.Tensor) -> dict | None:
    """The `kernel_options` a compiled FlexAttention call on q gets (a copy), or None (torch's)."""
    if FLEX_KERNEL_OPTIONS:
        return dict(FLEX_KERNEL_OPTIONS)
    tuned = FLEX_TUNED.get((torch.cuda.get_device_capability(q.device), q.shape[-1], q.dtype)) if FLEX_TUNED else None
    return dict(tuned) if tuned else None


# Kernels compiled static at most (lengths x batch x window x mask kind x dtype); past that, new
# kinds run the dynamic kernel. Dynamo's recompile limit (process-wide, raised to hold these and
# the dynamic ones) would otherwise fall back to eager flex, which builds [T x T] scores.
STATIC_KINDS = 96
_STATIC_RECOMPILE_LIMIT = 256
_static_kinds: set = set()


def static_length(T: int) -> int:
    """The length a static kernel runs for T tokens: a power of two from 128 up to 1,024, then the
    next multiple of a quarter of the power of two at or below T (1,280, 1,536, 1,792, 2,048, 2,560,
    ...): at most a quarter more tokens."""
    if T <= 1024:
        return max(BLOCK, 1 << (T - 1).bit_length())
    quarter = (1 << (T.bit_length() - 1)) // 4
    return -(-T // quarter) * quarter


@functools.cache
def _compiled_flex_attention(static: bool = False):
    """torch.compile(flex_attention), created on first CUDA use (compiling at import is a side effect).
    The static one raises dynamo's recompile limit (process-wide) to hold a kernel per length."""
    from torch.nn.attention.flex_attention import flex_attention

    if not static:
        return torch.compile(flex_attention)
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",  # (names vary by
                 "accumulated_cache_size_limit"):                                           # torch version)
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), _STATIC_RECOMPILE_LIMIT))
    return torch.compile(flex_attention, dynamic=False)


def _wants_static() -> bool:
    """Whether FLEX_STATIC asks for a static kernel for this call (True; "training": under autograd)."""
    if FLEX_STATIC is not True and FLEX_STATIC is not False and FLEX_STATIC != "training":
        raise ValueError(f"attention.FLEX_STATIC must be True, False or 'training', got {FLEX_STATIC!r}")
    return FLEX_STATIC is True or (FLEX_STATIC == "training" and torch.is_grad_enabled())


def _static_kind(q, k, mask: AttentionMask) -> bool:
    """Whether this call may run a static kernel: its kind (what dynamo would recompile for) is one
    of the first STATIC_KINDS."""
    shared = _shared_across_batch(mask.q_pos, mask.k_pos, mask.q_doc, mask.k_doc, mask.q_branch, mask.k_branch)
    kind = (static_length(q.shape[1]), q.shape[0], q.shape[2], k.shape[2], q.shape[3], q.dtype, mask.window,
            mask.q_doc is None, mask.q_branch is None, shared, torch.is_grad_enabled() and q.requires_grad)
    if kind not in _static_kinds and len(_static_kinds) < STATIC_KINDS:
        _static_kinds.add(kind)
    return kind in _static_kinds


def _padded_to(mask: AttentionMask, Tq: int, Tk: int) -> AttentionMask:
    """`mask` over Tq queries and Tk keys, the added ones never seeing or seen (queries at position
    -1, keys at 2^30, documents and branches -1, as `block_layout` pads to whole blocks); cached on
    the mask, so each layer of a forward reuses one BlockMask. Rows shared across the batch (stride
    0) stay shared, so the tables keep one row."""
    key = (Tq, Tk)
    if mask._padded is None or mask._padded[0] != key:
        def pad(t, T, value):
            if t is None:
                return None
            if t.shape[0] > 1 and t.stride(0) == 0:
                return F.pad(t[:1], (0, T - t.shape[1]), value=value).expand(t.shape[0], -1)
            return F.pad(t, (0, T - t.shape[1]), value=value)

        def padded(m, host=None):
            return AttentionMask(pad(m.q_pos, Tq, -1), pad(m.k_pos, Tk, _FAR), m.window, pad(m.q_doc, Tq, -1),
                                 pad(m.k_doc, Tk, -1), pad(m.q_branch, Tq, -1), pad(m.k_branch, Tk, -1), host=host)
        mask._padded = (key, padded(mask, None if mask.host is None else padded(mask.host)))
    return mask._padded[1]


def _flex_sink_attention(q, k, v, sinks, mask: AttentionMask, *, scale, compiled: bool = True):
    """The CUDA path. `compiled=False` runs flex's eager (dense, inference-only) version: CPU tests."""
    from torch.nn.attention import flex_attention as flex_module

    Tq, Tk = q.shape[1], k.shape[1]
    # static kernels for self-attention without a cache (training, prefills): a query block against
    # a cache would pad the whole cache in every layer
    static = _wants_static() and Tq == Tk <= STATIC_MAX_TOKENS and _static_kind(q, k, mask)
    if static and static_length(Tq) != Tq:
        if (mask.q_pos.shape[1], mask.k_pos.shape[1]) != (Tq, Tk):  # (padded, flex could not tell)
            raise ValueError(f"sink_attention: the mask is for {mask.q_pos.shape[1]} queries and "
                             f"{mask.k_pos.shape[1]} keys, got {Tq} and {Tk}")
        P = static_length(Tq)
        mask = _padded_to(mask, P, P)
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, P - Tq)) for x in (q, k, v))  # [B, T, H, D]: zeros after the last token
    flex = _compiled_flex_attention(static) if compiled else flex_module.flex_attention
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D] views
    kwargs = dict(block_mask=mask.block_mask(), scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    if compiled and (options := _kernel_options(q)):
        kwargs["kernel_options"] = options
    if hasattr(flex_module, "AuxRequest"):  # torch >= 2.9
        out, aux = flex(qt, kt, vt, return_aux=flex_module.AuxRequest(lse=True), **kwargs)
        lse = aux.lse
    else:
        out, lse = flex(qt, kt, vt, return_lse=True, **kwargs)
    out, lse = out[:, :, :Tq], lse[:, :, :Tq]  # (the padded queries dropped: no gradient reaches them)
    return _SinkRescale.apply(out, lse, sinks).transpose(1, 2)  # [B, Tq, Hq, D]


def flex_supported(head_dim: int) -> bool:
    """Whether CUDA attention of this head size runs on FlexAttention (else the dense twin)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _flex_supports(q: torch.Tensor) -> bool:
    return q.is_cuda and flex_supported(q.shape[-1])


# Self-attention over documents packed end to end, shared prefixes included (forwards without a KV
# cache whose layout is on the host: training batches, SFT, old and reference log-probs; the engine's
# prefills keep FlexAttention, and so does a model sharded with FSDP, whose root moves the layout to
# the device before the forward), through FlashAttention-2's varlen kernels in bf16
# (`ossrl.kernels.varlen_attention`) instead of FlexAttention: no mask function per block. On since
# session 23 (H100, 20b shapes, kept expert copies): eager steps 0.2220 -> 0.2109 s at 4K and
# 0.4330 -> 0.4169 s at 8K in one process (results/train_varlen_ab_s23_h100.json); a GRPO step's
# training phase 3.97 -> 3.74 s, peak 48.1 -> 46.5 GB (results/grpo_step_*_s23_h100.json);
# steps replayed from CUDA graphs about the same (0.2092 / 0.4265 s against session 22's 0.2100 / 0.4313).
# FlashAttention's backward sums dq with atomics, so gradients are not bitwise repeatable run to run
# (FlexAttention's were) unless torch.use_deterministic_algorithms(True), which torch passes on to it.
VARLEN_ATTENTION = True


def sink_attention(q, k, v, sinks, mask: AttentionMask | torch.Tensor, *, scale: float) -> torch.Tensor:
    """The model's one attention entry point; picks the kernel by device.

    q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]; sinks [Hq]; mask an AttentionMask (or a dense bool
    [B, Tq, Tk], which always takes the twin). Returns [B, Tq, Hq, D] in q's dtype.
    CUDA (head_dim a power of two >= 16): compiled FlexAttention, or with VARLEN_ATTENTION and a
    mask of packed documents (`AttentionMask.segments`) FlashAttention's varlen kernels.
    Elsewhere: the fp32 twin.
    """
    if isinstance(mask, torch.Tensor):
        return sink_attention_reference(q, k, v, sinks, mask, scale=scale)
    if VARLEN_ATTENTION and q.is_cuda and q.shape[1] == k.shape[1]:
        from ossrl.kernels.varlen_attention import varlen_available, varlen_sink_attention

        if varlen_available(q) and (segments := mask.segments()) is not None:
            B, T, H, D = q.shape
            out = varlen_sink_attention(q.reshape(B * T, H, D), k.reshape(B * T, *k.shape[2:]),
                                        v.reshape(B * T, *v.shape[2:]), sinks, segments, window=mask.window,
                                        scale=scale)
            return out.view(B, T, H, D)
    if _flex_supports(q):
        return _flex_sink_attention(q, k, v, sinks, mask, scale=scale)
    return sink_attention_reference(q, k, v, sinks, mask.dense(), scale=scale)

