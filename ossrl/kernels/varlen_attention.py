"""Sink attention over packed documents through FlashAttention-2's variable-length kernels (CUDA).

The training step's usual mask (documents packed end to end, positions restarting at 0 in each,
causal, optionally a sliding window) is exactly what FlashAttention's varlen kernels compute from
the documents' offsets (`cu_seqlens`), with no mask function evaluated per block. The sinks enter
as in `attention._SinkRescale`, y = out * w with w = sigmoid(lse - sink), and the backward needs no
gradient of lse from the kernel: with g the gradient of y,

    d out = g * w,      d lse = (sum_D g * out) * w (1 - w) = (sum_D d out * out) (1 - w)

and the lse term only changes the softmax backward's row term D = sum_D d out * out to D - d lse
= sum_D d out * (w * out) = sum_D d out * y. FlashAttention's backward computes D from the `out` it
is given, so passing y instead of out yields the exact gradients of q, k and v (and d sink is
-sum over tokens of d lse). Memory stays linear in T.

`varlen_sink_attention` takes the tokens flattened ([N, H, D]); its twin for CPU tests and the
oracle is `varlen_sink_attention_reference` (the dense fp32 reference of `ossrl.kernels.attention`).
"""

from __future__ import annotations

import torch

from ossrl.kernels.attention import attention_mask, sink_attention_reference


def varlen_available(q: torch.Tensor) -> bool:
    """Whether FlashAttention's varlen kernels serve q: CUDA, bf16/fp16, head size a multiple of 8
    up to 256, and torch built with them."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and hasattr(torch.ops.aten, "_flash_attention_forward")
            and torch.backends.cuda.is_flash_attention_available())


def _window_sizes(window: int | None) -> tuple[int, int]:
    """FlashAttention's (left, right): the window counts the query itself, FlashAttention's left
    size the keys before it."""
    return (-1, 0) if window is None else (window - 1, 0)


class _VarlenSinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, cu_seqlens, max_len: int, window: int | None, scale: float):
        from ossrl.kernels import sink_triton

        left, right = _window_sizes(window)
        res = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False, scale=scale,
            window_size_left=left, window_size_right=right)
        out, lse, rng, unused = res[0], res[1], res[2], res[3]  # out [N, H, D]; lse [H, N] fp32
        w = torch.sigmoid(lse - sinks.float()[:, None]).contiguous()
        y = sink_triton.scale(out.unsqueeze(0).transpose(1, 2), w[None]).transpose(1, 2)[0]  # [N, H, D]
        ctx.save_for_backward(q, k, v, y, lse, w, cu_seqlens, rng, unused)
        ctx.max_len, ctx.window, ctx.scale, ctx.sinks_dtype = max_len, window, scale, sinks.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        from ossrl.kernels import sink_triton

        q, k, v, y, lse, w, cu_seqlens, rng, unused = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        # d out = g * w, and s = sum_D g * y (= w * sum_D g * out)
        dout, s = sink_triton.scale_backward(grad.unsqueeze(0).transpose(1, 2), y.unsqueeze(0).transpose(1, 2), w[None])
        dout = dout.transpose(1, 2)[0]
        left, right = _window_sizes(ctx.window)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, y, lse, cu_seqlens, cu_seqlens, ctx.max_len, ctx.max_len, 0.0, True, rng, unused,
            scale=ctx.scale, window_size_left=left, window_size_right=right)
        grad_sinks = -(s[0] * (1 - w)).sum(-1).to(ctx.sinks_dtype)  # d lse = s (1 - w); d sink = -sum d lse
        return dq, dk, dv, grad_sinks, None, None, None, None


def varlen_sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                          cu_seqlens: torch.Tensor, max_len: int, *, window: int | None,
                          scale: float) -> torch.Tensor:
    """Causal sink attention within each document of a packed token stream.

    q [N, Hq, D], k and v [N, Hkv, D] (Hq a multiple of Hkv; each with its last stride 1), sinks
    [Hq], cu_seqlens int32 [S + 1] on q's device (document s is tokens cu_seqlens[s] to
    cu_seqlens[s + 1]; every token in some document), max_len at least the longest document (a
    host int: it sizes the launch). window: keys seen including the query itself, or None.
    Returns [N, Hq, D] in q's dtype. CUDA only (`varlen_available`)."""
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.device != q.device:
        raise ValueError(f"varlen_sink_attention: cu_seqlens must be int32 on {q.device}, got "
                         f"{cu_seqlens.dtype} on {cu_seqlens.device}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_sink_attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key heads")
    return _VarlenSinkAttention.apply(q, k, v, sinks, cu_seqlens, int(max_len), window, float(scale))


def document_segments(positions: torch.Tensor, doc_ids: torch.Tensor | None) -> tuple[torch.Tensor, int] | None:
    """The packed layout of a self-attention mask as FlashAttention's varlen offsets, if it has one.

    positions, doc_ids [B, T] (doc_ids None: one document per row), on the host. Eligible when every
    row is a run of documents, each document one contiguous run of tokens whose positions count up
    by one (from any start): the mask "same document, key position <= query position (within the
    window)" is then causal attention within each run. Returns (cu_seqlens int32 [S + 1] over the
    B * T tokens flattened row-major, the longest run), or None (the mask needs the general path)."""
    if positions.device.type != "cpu" or (doc_ids is not None and doc_ids.device.type != "cpu"):
        raise ValueError("document_segments reads the layout on the host")
    B, T = positions.shape
    if B * T == 0:
        return None
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[:, 0] = True
    if doc_ids is not None:
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    if not bool(((positions[:, 1:] - positions[:, :-1] == 1) | starts[:, 1:]).all()):
        return None  # positions that do not count up by one inside a run
    if doc_ids is not None:  # a document in two runs of a row would see across the run between
        ordered = doc_ids.sort(1).values
        distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(1) + 1
        if not torch.equal(distinct, starts.sum(1)):
            return None
    first = starts.flatten().nonzero().squeeze(1)
    cu = torch.cat((first, torch.tensor([B * T]))).to(torch.int32)
    return cu, int(cu.diff().max())


def varlen_sink_attention_reference(q, k, v, sinks, cu_seqlens, *, window: int | None, scale: float) -> torch.Tensor:
    """`varlen_sink_attention` by the dense fp32 reference (any device; O(N^2) memory)."""
    N = q.shape[0]
    bounds = cu_seqlens.to("cpu", torch.int64)
    doc = torch.repeat_interleave(torch.arange(len(bounds) - 1), bounds.diff())
    if doc.numel() != N:
        raise ValueError(f"varlen_sink_attention_reference: cu_seqlens covers {doc.numel()} tokens, q has {N}")
    pos = torch.arange(N) - bounds[doc]
    allowed = attention_mask(pos[None], pos[None], window=window, q_doc=doc[None], k_doc=doc[None]).to(q.device)
    return sink_attention_reference(q[None], k[None], v[None], sinks, allowed, scale=scale)[0]
