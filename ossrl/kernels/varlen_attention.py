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

import functools
from dataclasses import dataclass

import torch

from ossrl.kernels.attention import attention_mask, sink_attention_reference


def varlen_available(q: torch.Tensor) -> bool:
    """Whether these kernels serve q (`varlen_serves` of its device, dtype and head size)."""
    return varlen_serves(q.device, q.dtype, q.shape[-1])


def varlen_serves(device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether these kernels serve attention of this kind: NVIDIA CUDA from sm_80 (T4s and older have
    no FlashAttention-2; ROCm builds are not served), bf16 (the fp16 mode keeps FlexAttention, as
    measured there), a head size that is a power of two from 16 to 256 (FlashAttention wants a
    multiple of 8, the sinks' Triton kernels a power of two), a torch whose FlashAttention takes a
    window (2.5 and later), and Triton."""
    device = torch.device(device)
    D = head_dim
    if not (device.type == "cuda" and dtype == torch.bfloat16 and 16 <= D <= 256 and D & (D - 1) == 0
            and torch.version.hip is None and _flash_takes_windows()
            and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(device) >= (8, 0)):
        return False
    from ossrl.kernels.moe import triton_available

    return triton_available()


@functools.cache
def _flash_takes_windows() -> bool:
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    try:
        return op is not None and "window_size_left" in str(op.default._schema)
    except (AttributeError, RuntimeError):
        return False


def _window_sizes(window: int | None) -> tuple[int, int]:
    """FlashAttention's (left, right): the window counts the query itself, FlashAttention's left
    size the keys before it. The right size is 0, not -1, even without a window: with -1 and one
    query in every segment FlashAttention takes its grouped-query decode path, which assumes no
    empty segments and lays out lse otherwise (a graph's buffers end with empty segments)."""
    if window is not None and window < 1:
        raise ValueError(f"varlen_sink_attention: a window sees at least the query itself, got {window}")
    return (-1, 0) if window is None else (window - 1, 0)


class _VarlenSinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, cu_q, cu_k, max_q: int, max_k: int, window: int | None, scale: float):
        from ossrl.kernels import sink_triton

        left, right = _window_sizes(window)
        res = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale,
            window_size_left=left, window_size_right=right)
        out, lse, rng, unused = res[0], res[1], res[2], res[3]  # out [N, H, D]; lse [H, N] fp32
        if lse.shape != (q.shape[1], q.shape[0]):  # (older FlashAttention builds: [S, H, max_q])
            raise RuntimeError(f"varlen_sink_attention: this torch's FlashAttention returns the varlen "
                               f"logsumexp as {tuple(lse.shape)}, not [heads, tokens] {(q.shape[1], q.shape[0])}")
        w = torch.sigmoid(lse - sinks.float()[:, None]).contiguous()
        y = sink_triton.scale(out.unsqueeze(0).transpose(1, 2), w[None]).transpose(1, 2)[0]  # [N, H, D]
        ctx.save_for_backward(q, k, v, y, lse, w, cu_q, cu_k, rng, unused)
        ctx.max_q, ctx.max_k, ctx.window, ctx.scale, ctx.sinks_dtype = max_q, max_k, window, scale, sinks.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        from ossrl.kernels import sink_triton

        q, k, v, y, lse, w, cu_q, cu_k, rng, unused = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        # d out = g * w, and s = sum_D g * y (= w * sum_D g * out)
        dout, s = sink_triton.scale_backward(grad.unsqueeze(0).transpose(1, 2), y.unsqueeze(0).transpose(1, 2), w[None])
        dout = dout.transpose(1, 2)[0]
        left, right = _window_sizes(ctx.window)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, y, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, 0.0, True, rng, unused,
            scale=ctx.scale, window_size_left=left, window_size_right=right)
        grad_sinks = -(s[0] * (1 - w)).sum(-1).to(ctx.sinks_dtype)  # d lse = s (1 - w); d sink = -sum d lse
        return dq, dk, dv, grad_sinks, None, None, None, None, None, None


class _GatherRows(torch.autograd.Function):
    """x[index] along dim 0, its backward summed in fp32 (index_add_ in x's bf16 would round each
    of a shared prefix's several contributions). `count` (a device scalar, or None: every row):
    only the first `count` gathered rows pass a gradient back (a graph's buffers past the keys in
    use, which FlashAttention's backward leaves unwritten)."""

    @staticmethod
    def forward(ctx, x, index, count):
        ctx.save_for_backward(index, count)
        ctx.shape = x.shape
        return x.index_select(0, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        index, count = ctx.saved_tensors
        if count is not None:
            live = torch.arange(grad.shape[0], device=grad.device) < count
            grad = torch.where(live[:, None, None], grad, 0)  # (not a product: unwritten rows may hold NaN)
        out = torch.zeros(ctx.shape, device=grad.device, dtype=torch.float32)
        return out.index_add_(0, index, grad.float()).to(grad.dtype), None, None


@dataclass(frozen=True)
class Segments:
    """Packed queries as FlashAttention varlen segments: segment s is queries cu_q[s]:cu_q[s + 1]
    of the flattened tokens against keys cu_k[s]:cu_k[s + 1] of the keys' layout, causal aligned at
    the end (the last query sees the last key). The keys' layout is the tokens themselves
    (key_index None, cu_k is cu_q) or the tokens gathered by key_index: a shared prefix's keys
    repeated before each of its branches. Offsets and index on the queries' device."""

    cu_q: torch.Tensor  # int32 [S + 1]
    cu_k: torch.Tensor  # int32 [S + 1]
    max_q: int
    max_k: int
    key_index: torch.Tensor | None = None  # int64 [keys]
    # fixed buffers (`SegmentBuffers`): segments past the last are empty, key_index rows past
    # cu_k[-1] are not keys (their gradient is dropped)
    padded: bool = False

    def to(self, device) -> Segments:
        from ossrl.kernels.transfer import host_to_device

        cu_q = host_to_device(self.cu_q, device)
        return Segments(cu_q, cu_q if self.cu_k is self.cu_q else host_to_device(self.cu_k, device), self.max_q,
                        self.max_k, None if self.key_index is None else host_to_device(self.key_index, device),
                        self.padded)

    def capacity(self, row_length: int) -> tuple[int, int, int, int]:
        """Fixed sizes that hold these segments and others like them (a CUDA graph's buffers): the
        segments rounded up to 8, the longest query and key runs to 512 (at most the row length),
        the gathered keys to 1,024 (0: not gathered). The longest runs size FlashAttention's grid, so
        they are rounded, not set to the row length (every empty block of every segment would be
        launched); the price is a bucket per rounded layout (a padding document is a run too)."""
        def up(n: int, m: int) -> int:
            return -(-n // m) * m

        keys = 0 if self.key_index is None else up(self.key_index.numel(), 1024)
        return (up(self.cu_q.numel() - 1, 8), min(up(self.max_q, 512), row_length),
                min(up(self.max_k, 512), row_length), keys)


class SegmentBuffers:
    """Device buffers of one `Segments.capacity` that a CUDA graph reads: `fill` copies a layout's
    host segments in without waiting, the empty segments after its last ending where it ends."""

    def __init__(self, capacity: tuple[int, int, int, int], device):
        count, max_q, max_k, keys = capacity
        cu_q = torch.zeros(count + 1, dtype=torch.int32, device=device)
        cu_k = torch.zeros(count + 1, dtype=torch.int32, device=device) if keys else cu_q
        key_index = torch.zeros(keys, dtype=torch.long, device=device) if keys else None
        self.capacity = capacity
        self.segments = Segments(cu_q, cu_k, max_q, max_k, key_index, padded=True)

    def fill(self, host: Segments) -> None:
        """Copies `host` (of this capacity) in; the device need not be idle (the copies queue)."""
        s = self.segments
        n = host.cu_q.numel()

        def pinned(t):  # (a copy from pageable memory would wait for the device)
            return t.pin_memory() if s.cu_q.is_cuda else t

        for buffer, t in ((s.cu_q, host.cu_q), (s.cu_k, host.cu_k))[:2 if s.key_index is not None else 1]:
            buffer[:n].copy_(pinned(t), non_blocking=True)
            buffer[n:].fill_(int(t[-1]))  # (a host int: no read-back)
        if s.key_index is not None:
            k = host.key_index.numel()
            s.key_index[:k].copy_(pinned(host.key_index), non_blocking=True)
            s.key_index[k:].zero_()


def varlen_sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                          segments: Segments, *, window: int | None, scale: float) -> torch.Tensor:
    """Causal sink attention within each segment of a packed token stream (`Segments`).

    q [N, Hq, D], k and v [N, Hkv, D] (Hq a multiple of Hkv; each with its last stride 1), sinks
    [Hq], segments on q's device. window: keys seen including the query itself, or None. Returns
    [N, Hq, D] in q's dtype. CUDA only (`varlen_available`)."""
    for name in ("cu_q", "cu_k"):
        t = getattr(segments, name)
        if t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"varlen_sink_attention: segments.{name} must be int32 on {q.device}, got "
                             f"{t.dtype} on {t.device}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_sink_attention: {q.shape[1]} query heads are not a multiple of "
                         f"{k.shape[1]} key heads")
    if segments.key_index is not None:
        count = segments.cu_k[-1] if segments.padded else None
        k, v = (_GatherRows.apply(x, segments.key_index, count) for x in (k, v))
    return _VarlenSinkAttention.apply(q, k, v, sinks, segments.cu_q, segments.cu_k, segments.max_q, segments.max_k,
                                      window, float(scale))


def _runs(values: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of the runs of equal values in a 1-D host tensor."""
    n = values.numel()
    if n == 0:
        return []
    edges = (values[1:] != values[:-1]).nonzero().squeeze(1).add(1).tolist()
    bounds = [0] + edges + [n]
    return list(zip(bounds[:-1], bounds[1:]))


def document_segments(positions: torch.Tensor, doc_ids: torch.Tensor | None,
                      branch_ids: torch.Tensor | None = None) -> Segments | None:
    """The packed layout of a self-attention mask as FlashAttention varlen `Segments`, if it has one
    (on the host).

    positions, doc_ids, branch_ids [B, T] (doc_ids None: one document a row; branch_ids None: no
    shared prefixes), on the host. Eligible when each document is one contiguous run of a row
    whose positions count up by one (from any start); with branches, each document is its prefix
    (branch 0, possibly empty) followed by its branches, each a contiguous run whose positions
    continue from the prefix's end. The mask "same document, key position <= query position
    (within the window), key in branch 0 or the query's branch" is then causal attention within
    each segment: a document without branches, a prefix against itself, or a branch against the
    prefix's keys and its own. Returns None for any other layout (the general path serves it)."""
    if any(t is not None and t.device.type != "cpu" for t in (positions, doc_ids, branch_ids)):
        raise ValueError("document_segments reads the layout on the host")
    if branch_ids is not None and doc_ids is None:
        raise ValueError("document_segments: branch ids need document ids")
    B, T = positions.shape
    if B * T == 0:
        return None
    pos = positions.long()
    # cheap vectorised refusal first: inside a run of one document and branch, positions count up by one
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[:, 0] = True
    for ids in (doc_ids, branch_ids):
        if ids is not None:
            starts[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    if not bool(((pos[:, 1:] - pos[:, :-1] == 1) | starts[:, 1:]).all()):
        return None
    if branch_ids is None or not bool((branch_ids != 0).any()):
        if doc_ids is not None:  # a document in two runs of a row would see across the run between
            ordered = doc_ids.sort(1).values
            if not torch.equal((ordered[:, 1:] != ordered[:, :-1]).sum(1) + 1, starts.sum(1)):
                return None
        first = starts.flatten().nonzero().squeeze(1)
        cu = torch.cat((first, torch.tensor([B * T]))).to(torch.int32)
        longest = int(cu.diff().max())
        return Segments(cu, cu, longest, longest)
    cu_q, cu_k, key_index = [0], [0], []
    for r in range(B):
        seen = set()
        for d0, d1 in _runs(doc_ids[r]):
            doc = int(doc_ids[r, d0])
            if doc in seen:
                return None
            seen.add(doc)
            prefix = None  # (start, end) of branch 0 in the row
            branches = set()
            for b0, b1 in _runs(branch_ids[r, d0:d1]):
                b0, b1 = d0 + b0, d0 + b1
                branch = int(branch_ids[r, b0])
                first = int(pos[r, b0])
                if branch == 0:
                    if prefix is not None or branches:  # branch 0 once, before every branch
                        return None
                    prefix = (b0, b1)
                    keys = [(b0, b1)]
                else:
                    expected = int(pos[r, prefix[1] - 1]) + 1 if prefix is not None else first
                    if branch in branches or first != expected:
                        return None
                    branches.add(branch)
                    keys = [prefix, (b0, b1)] if prefix is not None else [(b0, b1)]
                cu_q.append(r * T + b1)
                for k0, k1 in keys:
                    key_index.append(torch.arange(r * T + k0, r * T + k1))
                cu_k.append(cu_k[-1] + sum(k1 - k0 for k0, k1 in keys))
    cu_q_t, cu_k_t = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    return Segments(cu_q_t, cu_k_t, int(cu_q_t.diff().max()), int(cu_k_t.diff().max()), torch.cat(key_index))


def host_segments(layout: tuple, device) -> Segments | None:
    """`document_segments` of a forward's host (positions, doc_ids, branch_ids), moved to `device`."""
    found = document_segments(*layout)
    return None if found is None else found.to(device)


def varlen_sink_attention_reference(q, k, v, sinks, segments: Segments, *, window: int | None,
                                    scale: float) -> torch.Tensor:
    """`varlen_sink_attention` by the dense fp32 reference, segment by segment (any device)."""
    cu_q, cu_k = segments.cu_q.tolist(), segments.cu_k.tolist()
    if cu_q[-1] != q.shape[0]:
        raise ValueError(f"varlen_sink_attention_reference: the segments cover {cu_q[-1]} queries, q has {q.shape[0]}")
    if segments.key_index is not None:
        k, v = k[segments.key_index.to(k.device)], v[segments.key_index.to(v.device)]
    out = []
    for q0, q1, k0, k1 in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        qp = torch.arange(q1 - q0) + (k1 - k0) - (q1 - q0)  # aligned at the end
        allowed = attention_mask(qp[None], torch.arange(k1 - k0)[None], window=window).to(q.device)
        out.append(sink_attention_reference(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], sinks, allowed,
                                            scale=scale)[0])
    return torch.cat(out)
