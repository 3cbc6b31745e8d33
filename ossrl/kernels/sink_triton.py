"""The sinks' rescale of FlexAttention's output, one pass each way (Triton), for `attention._SinkRescale` on CUDA.

    y = out * w                                  w = sigmoid(lse - sink), [B, H, T] fp32
    d out = g * w,   s = sum over D of g * out   (the caller finishes d lse = s * w (1 - w))

Its twin is the PyTorch code in `_SinkRescale` (the CPU path and the test oracle), which makes
fp32 copies of out and g and runs a pass per operation: it moves about 10 times the bytes of
one bf16 [B, H, T, D] tensor in the forward and 21 in the backward, these kernels 2 and 3 (at an
8K-token micro-batch of gpt-oss-20b one such tensor is 71 MB per layer). Rows are (b, h, t)
with any strides; D (a power of two, as FlexAttention needs) is contiguous. Arithmetic in fp32,
as in the twin; only the order of the D-sum differs.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

ROW_ELEMENTS = 4096  # elements per program: 64 rows at gpt-oss's D = 64 (37 / 64 registers, sm_90)


@triton.jit
def _row_offsets(rows, H, T, sb, sh, st):
    t = rows % T
    h = (rows // T) % H
    b = rows // (T * H)
    return b.to(tl.int64) * sb + h.to(tl.int64) * sh + t.to(tl.int64) * st


@triton.jit
def _scale_kernel(x_ptr, w_ptr, y_ptr, n_rows, H, T, sxb, sxh, sxt, syb, syh, syt,
                  D: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = rows < n_rows
    d = tl.arange(0, D)
    x = tl.load(x_ptr + _row_offsets(rows, H, T, sxb, sxh, sxt)[:, None] + d[None, :], mask=live[:, None], other=0.0)
    w = tl.load(w_ptr + rows, mask=live, other=0.0)
    y = x.to(tl.float32) * w[:, None]
    tl.store(y_ptr + _row_offsets(rows, H, T, syb, syh, syt)[:, None] + d[None, :], y.to(y_ptr.dtype.element_ty),
             mask=live[:, None])


@triton.jit
def _backward_kernel(g_ptr, x_ptr, w_ptr, dx_ptr, s_ptr, n_rows, H, T, sgb, sgh, sgt, sxb, sxh, sxt,
                     sdb, sdh, sdt, D: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = rows < n_rows
    d = tl.arange(0, D)
    g = tl.load(g_ptr + _row_offsets(rows, H, T, sgb, sgh, sgt)[:, None] + d[None, :], mask=live[:, None],
                other=0.0).to(tl.float32)
    x = tl.load(x_ptr + _row_offsets(rows, H, T, sxb, sxh, sxt)[:, None] + d[None, :], mask=live[:, None],
                other=0.0).to(tl.float32)
    w = tl.load(w_ptr + rows, mask=live, other=0.0)
    tl.store(dx_ptr + _row_offsets(rows, H, T, sdb, sdh, sdt)[:, None] + d[None, :],
             (g * w[:, None]).to(dx_ptr.dtype.element_ty), mask=live[:, None])
    tl.store(s_ptr + rows, tl.sum(g * x, axis=1), mask=live)


def supported(out: torch.Tensor) -> bool:
    """Whether these kernels take `out` [B, H, T, D]: D a power of two, contiguous."""
    D = out.shape[-1]
    return out.dim() == 4 and D >= 16 and D & (D - 1) == 0 and out.stride(-1) == 1


def _launch(out: torch.Tensor, w: torch.Tensor):
    """(rows, grid, rows per program) after checking w: [B, H, T] fp32, contiguous, on out's device."""
    B, H, T, D = out.shape
    if w.shape != (B, H, T) or w.dtype != torch.float32 or not w.is_contiguous() or w.device != out.device:
        raise ValueError(f"sink weights must be contiguous fp32 {(B, H, T)} on {out.device}, got "
                         f"{w.dtype} {tuple(w.shape)} strides {w.stride()} on {w.device}")
    block = max(1, ROW_ELEMENTS // D)
    n = B * H * T
    return n, (triton.cdiv(n, block),), block


def _on(out: torch.Tensor):
    """Triton launches on the current CUDA device: make it out's (nothing to do in the interpreter)."""
    return torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext()


def scale(out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out [B, H, T, D] * w [B, H, T] (fp32, contiguous) -> out's dtype and strides."""
    n, grid, block = _launch(out, w)
    y = torch.empty_like(out)  # dense: keeps out's stride order (FlexAttention's is q's)
    with _on(out):
        _scale_kernel[grid](out, w, y, n, out.shape[1], out.shape[2], *out.stride()[:3], *y.stride()[:3],
                            D=out.shape[3], BLOCK=block, num_warps=4)
    return y


def scale_backward(grad: torch.Tensor, out: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad * w in out's dtype and strides, sum over D of grad * out in fp32 [B, H, T]); grad
    any strides with its last one 1."""
    n, grid, block = _launch(out, w)
    grad_out = torch.empty_like(out)
    s = torch.empty(w.shape, device=out.device, dtype=torch.float32)
    with _on(out):
        _backward_kernel[grid](grad, out, w, grad_out, s, n, out.shape[1], out.shape[2], *grad.stride()[:3],
                               *out.stride()[:3], *grad_out.stride()[:3], D=out.shape[3], BLOCK=block, num_warps=4)
    return grad_out, s
