"""Fused inference kernels for the per-layer glue of a forward (Triton, CUDA only, no autograd).

A decode step of gpt-oss-20b at batch 1 ran about 2,000 CUDA kernels, most of them the small
elementwise pieces of RMSNorm, rotary embeddings, the KV-cache write, top-k routing and the
token-by-expert sort (`benchmarks/profile_decode.py`). Each piece here is one launch:

    rms_norm         y = x * rsqrt(mean(x^2) + eps) * w            (fp32 inside, spec 2.2)
    rotary_qk        q, k rotated in one launch                    (rotate-half, spec 2.3)
    append_kv        one token per row into a slot cache or ring   (ossrl.engine.kv_pool)
    route_topk       top-k of the router logits, softmax over the k (spec 2.4)
    group_small      the slots sorted by expert + the MoE kernels' tile table, in one program

The model calls them inside `ossrl.model.gptoss.inference_kernels()` (the rollout engine's
forwards) when nothing needs a gradient. Training (and the trainer's no-grad passes, so that they
compute what the training pass computes) uses `rms_norm_autograd` and `rotary_qk_autograd`: the
same forward kernels with a one-kernel backward (RMSNorm's recomputes the row's rms; rotary's is
the rotation by -angle); the other pieces keep the PyTorch code there. `append_kv` serves `ossrl.kernels.decode_attention.append_kv` on CUDA. Each has a PyTorch reference
in the module that owns the maths (`ossrl.model.gptoss`, `ossrl.kernels.moe`,
`ossrl.kernels.decode_attention`), which the GPU tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


def fused_ok(*tensors: torch.Tensor) -> bool:
    """True when the fused kernels may replace the PyTorch code: CUDA tensors and no gradient needed."""
    if not all(t.is_cuda for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


# ---------------------------------------------------------------------------------------- RMSNorm
@triton.jit
def _rms_normed(x, W, cols, mask, H, eps):
    """One fp32 row x (zero past H) -> RMSNorm(x) * w in fp32 (spec 2.2)."""
    r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return w * (x * r)


@triton.jit
def _rms_norm_kernel(X, W, Y, H, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, _rms_normed(x, W, cols, mask, H, eps).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(X, A, W, S, Y, H, stride_x, stride_a, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    s = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32) + \
        tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    s = s.to(S.dtype.element_ty)  # the residual stream as `x + a` rounds it
    tl.store(S + row * H + cols, s, mask=mask)
    tl.store(Y + row * H + cols, _rms_normed(s.to(tl.float32), W, cols, mask, H, eps).to(Y.dtype.element_ty),
             mask=mask)


@triton.jit
def _rms_norm_backward_kernel(X, W, DY, DS, DX, H, stride_x, stride_dy, stride_ds, stride_dx, eps,
                              BLOCK: tl.constexpr, HAS_DS: tl.constexpr):
    """dx = r * (g - xhat * mean(g * xhat)) (+ ds), g = dy * w, xhat = x * r (r recomputed from x).
    ds: the gradient that reaches x by the residual stream, added here instead of in a launch of
    its own (`add_rms_norm_autograd`)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32) * w
    xhat = x * r
    dx = r * (g - xhat * (tl.sum(g * xhat, 0) / H))
    if HAS_DS:
        dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _row_launch(H: int) -> dict:
    """Launch options of the one-program-per-row norm kernels (forward, backward, with the add)."""
    BLOCK = triton.next_power_of_2(H)
    return dict(BLOCK=BLOCK, num_warps=4 if BLOCK <= 4096 else 8)


def add_rms_norm(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float):
    """(s, RMSNorm(s) * weight) for s = x + a (x, a [..., H] of one dtype), in one launch: a decoder
    layer's residual add and the next norm. s is rounded as `x + a` rounds it; the norm is
    `rms_norm`'s code with its launch (the GPU test compares the two to a bf16 rounding)."""
    H = x.shape[-1]
    x2, a2 = _rows(x), _rows(a)
    s = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    y = torch.empty_like(s)
    if x2.shape[0]:
        _add_rms_norm_kernel[(x2.shape[0],)](x2, a2, weight, s, y, H, x2.stride(0), a2.stride(0), float(eps),
                                             **_row_launch(H))
    return s.view(x.shape), y.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] -> RMSNorm(x) * weight in x's dtype (the math of `ossrl.model.gptoss.RMSNorm`)."""
    H = x.shape[-1]
    x2 = _rows(x)
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, H, x2.stride(0), y.stride(0), float(eps), **_row_launch(H))
    return y.view(x.shape)


def _rms_norm_grads(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, eps: float, need_dx: bool,
                    need_dw: bool, ds: torch.Tensor | None = None):
    """(dx, dw) of y = RMSNorm(x) * weight for dy, with ds (the residual stream's gradient to x, or
    None) added to dx in the same kernel; None for what is not needed."""
    x2, dy2 = _rows(x), _rows(dy)
    H = x2.shape[-1]
    dx = dw = None
    if need_dx:
        dx = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
        ds2 = dx if ds is None else _rows(ds)
        if x2.shape[0]:
            _rms_norm_backward_kernel[(x2.shape[0],)](x2, weight, dy2, ds2, dx, H, x2.stride(0), dy2.stride(0),
                                                      ds2.stride(0), dx.stride(0), float(eps), HAS_DS=ds is not None,
                                                      **_row_launch(H))
        dx = dx.view(x.shape)
    if need_dw:  # a trained norm weight (full fine-tuning): PyTorch, off the LoRA path
        xf = x2.float()
        xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        dw = (dy2.float() * xhat).sum(0).to(weight.dtype)
    return dx, dw


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return rms_norm(x, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        return *_rms_norm_grads(x, weight, dy, ctx.eps, *ctx.needs_input_grad[:2]), None


def rms_norm_autograd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` with a backward (one kernel each way): the training path on CUDA."""
    return _RMSNorm.apply(x, weight, eps)


class _AddRMSNorm(torch.autograd.Function):
    """(s, RMSNorm(s) * weight) for s = x + a (or s = x where a is None): `add_rms_norm`'s forward,
    and a backward that gives x (and a) ds + the norm's input gradient from one kernel."""

    @staticmethod
    def forward(ctx, x, a, weight, eps):
        ctx.set_materialize_grads(False)
        if a is None:
            s, y = x, rms_norm(x, weight, eps)  # s returned as is: autograd makes it a view of x
        else:
            s, y = add_rms_norm(x, a, weight, eps)
        ctx.save_for_backward(s, weight)
        ctx.eps, ctx.has_a = eps, a is not None
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        s, weight = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if dy is None:
            dx, dw = ds, None
        else:
            dx, dw = _rms_norm_grads(s, weight, dy, ctx.eps, need_dx, ctx.needs_input_grad[2], ds)
        return dx, dx if ctx.has_a else None, dw, None


def add_rms_norm_autograd(x: torch.Tensor, a: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """`add_rms_norm` with a backward, a = None meaning no add: the training path's residual add and
    norm. s feeds the residual stream and the norm; autograd would add their two gradients to s in a
    launch of its own ([tokens, H] read twice and written), which the norm's backward kernel does
    here as it writes its own. Forward bits as `x + a` then `rms_norm_autograd`."""
    return _AddRMSNorm.apply(x, a, weight, eps)


# ---------------------------------------------------------------------------------------- rotary
@triton.jit
def _round(x, dt: tl.constexpr):
    """fp32 -> dt -> fp32 (round to nearest even, Triton's default, as PyTorch rounds each op)."""
    return x.to(dt).to(tl.float32)


@triton.jit
def _rotary_kernel(Q, K, Cos, Sin, OQ, OK, HQ, HK,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
                   HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_H: tl.constexpr,
                   V=None, KC=None, VC=None, SlotIds=None, Positions=None, ROWS=1, stride_vt=0, stride_vh=0,
                   stride_cs=0, stride_cr=0, stride_vs=0, stride_vr=0, APPEND: tl.constexpr = False):
    """Rotated q heads to OQ and k heads to OK; with APPEND (a decode step, one token a row t) the
    rotated k heads go to row Positions[t] % ROWS of slot SlotIds[t] of the cache KC instead, and a
    third group of head blocks copies v there into VC (`append_kv`'s job, in the same launch)."""
    t = tl.program_id(0).to(tl.int64)  # one (batch, time) row
    hb = tl.program_id(1)  # head block over the q heads, then the k heads (then, APPEND, the v heads)
    d = tl.arange(0, HALF_P)  # HALF padded to a power of two
    dm = d < HALF
    nq = tl.cdiv(HQ, BLOCK_H)
    nk = tl.cdiv(HK, BLOCK_H)
    if APPEND:
        slot = tl.load(SlotIds + t).to(tl.int64)
        row = tl.load(Positions + t).to(tl.int64) % ROWS
        if hb >= nq + nk:  # v: copied as it is
            h = (hb - nq - nk) * BLOCK_H + tl.arange(0, BLOCK_H)
            m = (h < HK)[:, None] & dm[None, :]
            src = V + t * stride_vt + h[:, None] * stride_vh + d[None, :]
            dst = VC + slot * stride_vs + row * stride_vr + h[:, None] * (2 * HALF) + d[None, :]
            tl.store(dst, tl.load(src, mask=m, other=0.0), mask=m)
            tl.store(dst + HALF, tl.load(src + HALF, mask=m, other=0.0), mask=m)
            return
    c = tl.load(Cos + t * stride_ct + d, mask=dm, other=0.0).to(tl.float32)[None, :]  # in q's dtype
    s = tl.load(Sin + t * stride_ct + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    if hb < nq:
        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        m = (h < HQ)[:, None] & dm[None, :]
        src = Q + t * stride_qt + h[:, None] * stride_qh + d[None, :]
        dst = OQ + t * (HQ * 2 * HALF) + h[:, None] * (2 * HALF) + d[None, :]
    else:
        h = (hb - nq) * BLOCK_H + tl.arange(0, BLOCK_H)
        m = (h < HK)[:, None] & dm[None, :]
        src = K + t * stride_kt + h[:, None] * stride_kh + d[None, :]
        if APPEND:
            dst = KC + slot * stride_cs + row * stride_cr + h[:, None] * (2 * HALF) + d[None, :]
        else:
            dst = OK + t * (HK * 2 * HALF) + h[:, None] * (2 * HALF) + d[None, :]
    x1 = tl.load(src, mask=m, other=0.0)
    x2 = tl.load(src + HALF, mask=m, other=0.0)
    # the reference rounds each product to the input dtype before the sum; so does this
    dt = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    o1 = _round(x1 * c, dt) - _round(x2 * s, dt)
    o2 = _round(x2 * c, dt) + _round(x1 * s, dt)
    tl.store(dst, _round(o1, dt).to(dt), mask=m)
    tl.store(dst + HALF, _round(o2, dt).to(dt), mask=m)


def _row_stride(x: torch.Tensor) -> int | None:
    """The stride between consecutive (batch, time) rows of x [B, T, H, D] (row b * T + t), or None
    when they are not evenly spaced or D is not contiguous. A decode step's q and k (T = 1) are
    slices of the fused q/k/v output: rows stride(0) apart, whatever stride the size-1 dim has."""
    B, T = x.shape[:2]
    if x.stride(-1) != 1:
        return None
    if T == 1:
        return x.stride(0)
    return x.stride(1) if B == 1 or x.stride(0) == T * x.stride(1) else None


def _with_row_stride(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x, its row stride), or a contiguous copy and its row stride where rows are not evenly spaced."""
    if (rows := _row_stride(x)) is None:
        x = x.contiguous()
        rows = x.stride(1)
    return x, rows


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, T, Hq, D], k [B, T, Hk, D], cos/sin [B, T, D/2] (in q's dtype) -> rotated (q, k),
    contiguous; the math of `ossrl.model.gptoss.apply_rotary`."""
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    q, q_rows = _with_row_stride(q)
    k, k_rows = _with_row_stride(k)
    cos = cos.expand(B, T, D // 2).contiguous()
    sin = sin.expand(B, T, D // 2).contiguous()
    oq, ok = torch.empty(B, T, HQ, D, device=q.device, dtype=q.dtype), torch.empty(B, T, HK, D, device=k.device,
                                                                                    dtype=k.dtype)
    BLOCK_H = 16
    grid = (B * T, triton.cdiv(HQ, BLOCK_H) + triton.cdiv(HK, BLOCK_H))
    if B * T:
        _rotary_kernel[grid](q, k, cos, sin, oq, ok, HQ, HK, q_rows, q.stride(2), k_rows, k.stride(2),
                             cos.stride(1), HALF=D // 2, HALF_P=triton.next_power_of_2(D // 2), BLOCK_H=BLOCK_H,
                             num_warps=4)
    return oq, ok


def rotary_append(q, k, v, cos, sin, k_cache, v_cache, slot_ids, positions) -> torch.Tensor:
    """A decode step's `rotary_qk` and `append_kv` in one launch: q [B, 1, Hq, D] rotated (returned,
    contiguous); k [B, 1, Hk, D] rotated and v written into row positions % rows of slot slot_ids
    of the caches [slots, rows, Hk, D] (contiguous within a row). The same bits as the two."""
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    if T != 1:
        raise ValueError(f"rotary_append takes one token a row, got {T}")
    _check_cache_rows("rotary_append", k_cache, v_cache)
    (q, q_rows), (k, k_rows), (v, v_rows) = _with_row_stride(q), _with_row_stride(k), _with_row_stride(v)
    cos = cos.expand(B, T, D // 2).contiguous()
    sin = sin.expand(B, T, D // 2).contiguous()
    oq = torch.empty(B, T, HQ, D, device=q.device, dtype=q.dtype)
    BLOCK_H = 16
    grid = (B, triton.cdiv(HQ, BLOCK_H) + 2 * triton.cdiv(HK, BLOCK_H))
    if B:
        _rotary_kernel[grid](q, k, cos, sin, oq, oq, HQ, HK, q_rows, q.stride(2), k_rows, k.stride(2),
                             cos.stride(1), HALF=D // 2, HALF_P=triton.next_power_of_2(D // 2), BLOCK_H=BLOCK_H,
                             V=v, KC=k_cache, VC=v_cache, SlotIds=slot_ids, Positions=positions,
                             ROWS=k_cache.shape[1], stride_vt=v_rows, stride_vh=v.stride(2),
                             stride_cs=k_cache.stride(0), stride_cr=k_cache.stride(1), stride_vs=v_cache.stride(0),
                             stride_vr=v_cache.stride(1), APPEND=True, num_warps=4)
    return oq


class _Rotary(torch.autograd.Function):
    """The rotation is orthogonal per (x1, x2) pair: its backward is the rotation by -angle."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.shapes = q.shape, k.shape
        return rotary_qk(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = dq if dq is not None else cos.new_zeros(ctx.shapes[0])
        dk = dk if dk is not None else cos.new_zeros(ctx.shapes[1])
        dq, dk = rotary_qk(dq, dk, cos, -sin)
        return dq, dk, None, None


def rotary_qk_autograd(q, k, cos, sin):
    """`rotary_qk` with a backward (the same kernel at -angle): the training path on CUDA."""
    return _Rotary.apply(q, k, cos, sin)


# ---------------------------------------------------------------------------------------- KV write
@triton.jit
def _append_kv_kernel(K, V, KC, VC, SlotIds, Positions, ROWS, W,
                      stride_kb, stride_vb, stride_cs, stride_cr, stride_vs, stride_vr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    slot = tl.load(SlotIds + b).to(tl.int64)
    row = (tl.load(Positions + b).to(tl.int64) % ROWS)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < W
    k = tl.load(K + b.to(tl.int64) * stride_kb + offs, mask=m)
    v = tl.load(V + b.to(tl.int64) * stride_vb + offs, mask=m)
    tl.store(KC + slot * stride_cs + row * stride_cr + offs, k, mask=m)
    tl.store(VC + slot * stride_vs + row * stride_vr + offs, v, mask=m)


def _check_cache_rows(caller: str, *caches: torch.Tensor) -> None:
    """The KV caches [slots, rows, Hkv, D] a kernel writes must be contiguous within a row."""
    for cache in caches:
        if cache.stride(3) != 1 or cache.stride(2) != cache.shape[3]:
            raise ValueError(f"{caller} needs caches contiguous within a row, got strides {cache.stride()}")


def append_kv(k_cache, v_cache, k, v, slot_ids, positions) -> None:
    """`ossrl.kernels.decode_attention.append_kv_reference` in one launch: k, v [B, Hkv, D] into row
    positions % rows of slot slot_ids (caches [slots, rows, Hkv, D], contiguous per row)."""
    B = k.shape[0]
    W = k.shape[1] * k.shape[2]
    _check_cache_rows("append_kv", k_cache, v_cache)  # one token's [Hkv, D] is written as W contiguous values
    k2, v2 = k.reshape(B, W), v.reshape(B, W)
    if k2.stride(-1) != 1:
        k2 = k2.contiguous()
    if v2.stride(-1) != 1:
        v2 = v2.contiguous()
    BLOCK = min(1024, triton.next_power_of_2(W))
    _append_kv_kernel[(B, triton.cdiv(W, BLOCK))](
        k2, v2, k_cache, v_cache, slot_ids, positions, k_cache.shape[1], W, k2.stride(0), v2.stride(0),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), BLOCK=BLOCK, num_warps=4)


# ---------------------------------------------------------------------------------------- routing
@triton.jit
def _topk_softmax_store(z, rows, rmask, cols, Weights, Ids, E, K: tl.constexpr, KP: tl.constexpr,
                        EP: tl.constexpr, R: tl.constexpr):
    """z [R, EP] fp32 logits (-inf past E) -> the top K per row, softmaxed, stored [N, K]."""
    kk = tl.arange(0, KP)  # K padded to a power of two; the padding keeps -inf and weight 0
    vals = tl.full([R, KP], float("-inf"), tl.float32)
    ids = tl.zeros([R, KP], tl.int32)
    for j in tl.static_range(K):  # largest first; ties go to the lower expert id
        m = tl.max(z, 1)
        i = tl.min(tl.where(z == m[:, None], cols[None, :], EP), 1)
        i = tl.minimum(i, E - 1)  # a NaN row matches nothing: keep the id in range (its weight is NaN)
        vals = tl.where(kk[None, :] == j, m[:, None], vals)
        ids = tl.where(kk[None, :] == j, i[:, None], ids)
        z = tl.where(cols[None, :] == i[:, None], float("-inf"), z)
    p = tl.exp(vals - tl.max(vals, 1)[:, None])
    w = p / tl.sum(p, 1)[:, None]
    out = rows[:, None].to(tl.int64) * K + kk[None, :]
    omask = rmask[:, None] & (kk[None, :] < K)
    tl.store(Weights + out, w.to(Weights.dtype.element_ty), mask=omask)
    tl.store(Ids + out, ids.to(tl.int64), mask=omask)


@triton.jit
def _route_topk_kernel(Logits, Weights, Ids, N, E, stride_l, K: tl.constexpr, KP: tl.constexpr,
                       EP: tl.constexpr, R: tl.constexpr):
    rows = tl.program_id(0) * R + tl.arange(0, R)
    cols = tl.arange(0, EP)
    rmask = rows < N
    z = tl.load(Logits + rows[:, None].to(tl.int64) * stride_l + cols[None, :],
                mask=rmask[:, None] & (cols[None, :] < E), other=float("-inf")).to(tl.float32)
    _topk_softmax_store(z, rows, rmask, cols, Weights, Ids, E, K, KP, EP, R)


@triton.jit
def _router_partial_kernel(X, W, Part, N, E, H, stride_x, stride_w, H_PER, R: tl.constexpr, EP: tl.constexpr,
                           BH: tl.constexpr):
    """Part[split, row, expert] = x[row, split's columns] . w[expert, split's columns] (fp32)."""
    rows = tl.program_id(0) * R + tl.arange(0, R)
    split = tl.program_id(1)
    cols = tl.arange(0, EP)
    rmask = rows < N
    cmask = cols < E
    acc = tl.zeros([R, EP], tl.float32)
    h_end = tl.minimum((split + 1) * H_PER, H)
    for h0 in range(split * H_PER, h_end, BH):
        hs = h0 + tl.arange(0, BH)
        hm = hs < h_end
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + hs[None, :], mask=rmask[:, None] & hm[None, :],
                    other=0.0)
        w = tl.load(W + cols[:, None] * stride_w + hs[None, :], mask=cmask[:, None] & hm[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    out = Part + (split * N + rows[:, None].to(tl.int64)) * EP + cols[None, :]
    tl.store(out, acc, mask=rmask[:, None])


@triton.jit
def _router_topk_kernel(Part, Bias, Weights, Ids, N, E, Order, Token, Expert, Offsets, Position, TileExpert, TileStart,
                        NUM_TILES,
                        SPLITS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr, R: tl.constexpr,
                        GROUP: tl.constexpr, BM: tl.constexpr, CH: tl.constexpr):
    """The logits' partial sums -> top K (and with GROUP, one program holding every row, the
    slots grouped by expert as `group_small` groups them: one launch a decode step's layer fewer)."""
    rows = tl.program_id(0) * R + tl.arange(0, R)
    cols = tl.arange(0, EP)
    rmask = rows < N
    cmask = cols < E
    z = tl.zeros([R, EP], tl.float32)
    for split in tl.static_range(SPLITS):  # a fixed order: the same logits on every run
        z += tl.load(Part + (split * N + rows[:, None].to(tl.int64)) * EP + cols[None, :], mask=rmask[:, None],
                     other=0.0)
    z += tl.load(Bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    z = z.to(Weights.dtype.element_ty).to(tl.float32)  # the logits in the model's dtype, as F.linear gives them
    z = tl.where(cmask[None, :], z, float("-inf"))
    _topk_softmax_store(z, rows, rmask, cols, Weights, Ids, E, K, KP, EP, R)
    if GROUP:
        tl.debug_barrier()  # the ids just stored, read back by every thread of the program
        _group_slots(Ids, Order, Token, Expert, Offsets, Position, TileExpert, TileStart, N * K, E, NUM_TILES, K, BM,
                     EP, CH)


def route_topk(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`ossrl.kernels.moe.route` in one launch: [N, E] -> (weights [N, k] in the logits' dtype,
    ids [N, k] int64), largest first."""
    N, E = router_logits.shape
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty(N, k, device=router_logits.device, dtype=router_logits.dtype)
    ids = torch.empty(N, k, device=router_logits.device, dtype=torch.long)
    if N:
        R = 16
        _route_topk_kernel[(triton.cdiv(N, R),)](router_logits, weights, ids, N, E, router_logits.stride(0),
                                                 K=k, KP=triton.next_power_of_2(k), EP=triton.next_power_of_2(E),
                                                 R=R, num_warps=4)
    return weights, ids


ROUTER_TOPK_MAX_TOKENS = 256  # decode sizes; prefills keep F.linear (cuBLAS) and route_topk
# Up to this many rows `router_topk_grouped` runs the top-k in one program that also groups the
# slots (the model's decode steps, with ROUTER_GROUPS): batch 1 and 64 save group_small's launch
# (3.4 / 5.0 us a layer on an H100, session 13's profile). On since session 15 (its GPU tests
# passed; timed only together with gptoss.ROTARY_APPEND and static FlexAttention: see there).
ROUTER_GROUP_MAX_TOKENS = 64
ROUTER_GROUPS = True


def router_topk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`route(F.linear(x, weight, bias), k)` for decode-sized bf16 or fp16 x [N, H] (weight [E, H],
    bias [E]; up to ROUTER_TOPK_MAX_TOKENS rows; in fp32 tl.dot would run in TF32) in two launches:
    fp32 partial logits over slices of H by many programs (the 184 KB router of 20b is read faster
    than one SM can: one program per 16 rows looping over H took 9.6 us on an H100, more than
    cuBLAS's GEMV, its split-K reduce and route_topk together), then their sum in a fixed order
    with the bias, rounded to x's dtype as F.linear rounds it, and the top k.
    -> (weights [N, k] in x's dtype, ids [N, k] int64), largest first."""
    weights, ids, _ = _router(x, weight, bias, k, None)
    return weights, ids


def router_topk_grouped(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int,
                        BM: int) -> tuple[torch.Tensor, torch.Tensor, SlotGrouping]:
    """`router_topk` for up to ROUTER_GROUP_MAX_TOKENS rows (at least one) whose last launch also
    groups the slots: -> (weights, ids, the `SlotGrouping` `group_small(ids, E, BM)` gives)."""
    if not 0 < x.shape[0] <= ROUTER_GROUP_MAX_TOKENS:
        raise ValueError(f"router_topk_grouped takes 1 to {ROUTER_GROUP_MAX_TOKENS} rows, got {x.shape[0]}")
    return _router(x, weight, bias, k, BM)


def _router(x, weight, bias, k: int, BM: int | None):
    N, H = x.shape
    E = weight.shape[0]
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    weights = torch.empty(N, k, device=x.device, dtype=x.dtype)
    ids = torch.empty(N, k, device=x.device, dtype=torch.long)
    grouping = None if BM is None else _grouping_buffers(N * k, E, BM, k, x.device)
    if N:
        EP = max(16, triton.next_power_of_2(E))  # tl.dot needs 16 rows and columns
        R = 16 if grouping is None else max(16, triton.next_power_of_2(N))  # grouping: one program, every row
        BH = 256 if EP <= 32 else 64
        splits = triton.cdiv(H, BH)
        part = torch.empty(splits, N, EP, device=x.device, dtype=torch.float32)
        _router_partial_kernel[(triton.cdiv(N, 16), splits)](x, weight, part, N, E, H, x.stride(0), weight.stride(0),
                                                             BH, R=16, EP=EP, BH=BH, num_warps=4)
        g = grouping.groups if grouping is not None else None
        group_args = (g.order, g.token, g.expert, g.offsets, g.position, *grouping.table) if g is not None \
            else (ids, ids, ids, ids, ids, ids, ids, 0)
        _router_topk_kernel[(triton.cdiv(N, R),)](part, bias, weights, ids, N, E, *group_args, SPLITS=splits, K=k,
                                                  KP=triton.next_power_of_2(k), EP=EP, R=R, GROUP=g is not None,
                                                  BM=BM or 16, CH=128, num_warps=4)
    return weights, ids, grouping


# ---------------------------------------------------------------------------------------- grouping
SMALL_GROUP_MAX_SLOTS = 8192  # above this the sort-based grouping is as fast; one program is not


@triton.jit
def _group_small_kernel(Ids, Order, Token, Expert, Offsets, Position, TileExpert, TileStart, n_slots, E, NUM_TILES,
                        K: tl.constexpr, BM: tl.constexpr, EP: tl.constexpr, CH: tl.constexpr):
    _group_slots(Ids, Order, Token, Expert, Offsets, Position, TileExpert, TileStart, n_slots, E, NUM_TILES, K, BM,
                 EP, CH)


@triton.jit
def _group_slots(Ids, Order, Token, Expert, Offsets, Position, TileExpert, TileStart, n_slots, E, NUM_TILES,
                 K: tl.constexpr, BM: tl.constexpr, EP: tl.constexpr, CH: tl.constexpr):
    """One program: the n_slots expert ids sorted stably by expert (Order, Token, Expert), each
    slot's sorted Position (Order's inverse), the experts' Offsets, and the tile table of BM rows
    (TileExpert -1 for spare tiles)."""
    ecols = tl.arange(0, EP)
    evalid = ecols < E
    counts = tl.zeros([EP], tl.int32)
    for c0 in range(0, n_slots, CH):
        s = c0 + tl.arange(0, CH)
        e = tl.load(Ids + s, mask=s < n_slots, other=EP).to(tl.int32)
        counts += tl.sum((e[:, None] == ecols[None, :]).to(tl.int32), 0)
    incl = tl.cumsum(counts, 0)
    excl = incl - counts
    tl.store(Offsets + 1 + ecols, incl.to(tl.int64), mask=evalid)
    tl.store(Offsets + ecols, excl.to(tl.int64), mask=ecols == 0)
    running = excl
    for c0 in range(0, n_slots, CH):  # stable: within an expert, slots keep their order
        s = c0 + tl.arange(0, CH)
        valid = s < n_slots
        e = tl.load(Ids + s, mask=valid, other=EP).to(tl.int32)
        hot = (e[:, None] == ecols[None, :]).to(tl.int32)
        rank = tl.cumsum(hot, 0) - hot
        pos = tl.sum(hot * (rank + running[None, :]), 1)
        running += tl.sum(hot, 0)
        tl.store(Order + pos, s.to(tl.int64), mask=valid)
        tl.store(Token + pos, (s // K).to(tl.int64), mask=valid)
        tl.store(Expert + pos, e.to(tl.int64), mask=valid)
        tl.store(Position + s, pos.to(tl.int64), mask=valid)
    # tiles of BM sorted rows inside one expert: expert e owns tiles [tend - per, tend)
    per = tl.where(evalid, (counts + BM - 1) // BM, 0)
    tend = tl.cumsum(per, 0)
    tend_valid = tl.where(evalid, tend, 2147483647)
    base = excl - (tend - per) * BM  # start of tile t of expert e = base[e] + t * BM
    for t0 in range(0, NUM_TILES, CH):
        t = t0 + tl.arange(0, CH)
        e_of_t = tl.sum((tend_valid[None, :] <= t[:, None]).to(tl.int32), 1)
        ec = tl.minimum(e_of_t, E - 1)
        sel = (ecols[None, :] == ec[:, None]).to(tl.int32)
        start = tl.sum(sel * base[None, :], 1) + t * BM
        tm = t < NUM_TILES
        tl.store(TileExpert + t, tl.where(e_of_t < E, ec, -1), mask=tm)
        tl.store(TileStart + t, start, mask=tm)


@dataclass(frozen=True)
class SlotGrouping:
    """Slots grouped by expert on the device (`ossrl.kernels.moe.ExpertGroups`) and the tile table
    of BM sorted rows (`ossrl.kernels.moe_triton._Plan.tiles(BM)`): (tile_expert, tile_start, num_tiles)."""

    groups: object  # ExpertGroups
    table: tuple
    BM: int


def _grouping_buffers(S: int, num_experts: int, BM: int, k: int, device) -> SlotGrouping:
    from ossrl.kernels.moe import ExpertGroups

    def empty(n, dtype=torch.long):
        return torch.empty(n, dtype=dtype, device=device)

    num_tiles = triton.cdiv(S, BM) + min(num_experts, S)
    groups = ExpertGroups(order=empty(S), token=empty(S), expert=empty(S), offsets=empty(num_experts + 1), k=k,
                          position=empty(S))
    return SlotGrouping(groups, (empty(num_tiles, torch.int32), empty(num_tiles, torch.int32), num_tiles), BM)


def group_small(ids: torch.Tensor, num_experts: int, BM: int) -> SlotGrouping:
    """`ossrl.kernels.moe.group_by_expert` for a few thousand slots in one launch, plus the tile
    table of `ossrl.kernels.moe_triton._Plan.tiles(BM)`."""
    k = ids.shape[-1]
    flat = ids.reshape(-1)
    S = flat.numel()
    out = _grouping_buffers(S, num_experts, BM, k, ids.device)
    g = out.groups
    tile_expert, tile_start, num_tiles = out.table
    _group_small_kernel[(1,)](flat, g.order, g.token, g.expert, g.offsets, g.position, tile_expert, tile_start, S,
                              num_experts, num_tiles, K=k, BM=BM, EP=max(16, triton.next_power_of_2(num_experts)),
                              CH=128, num_warps=4)
    return out
