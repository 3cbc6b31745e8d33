"""Routed mixture-of-experts: routing, token grouping, and the plain-PyTorch expert loop (the twin).

Routing is top-k on the raw (biased) router logits, then a softmax over the k selected values
only (spec 2.4). Each token's output is the routing-weighted sum of its k experts' outputs, each
expert's down bias included (spec 2.5). Nothing here computes an expert for a token that was not
routed to it.

Two paths compute the same function:
- `routed_experts_reference` (this file): a loop over the experts that received tokens. It is the
  CPU path and the test oracle (run it in fp32).
- `ossrl.kernels.moe_triton.routed_experts_triton`: grouped Triton matmuls over tokens sorted by
  expert, bf16 or native MXFP4 weights, forward and exact input gradients. `routed_experts` picks
  it for bf16 activations on CUDA and falls back to the twin everywhere else.

The one thing to know: a "slot" is one (token, choice) pair, slot = token * k + j. Grouping sorts
the N*k slots by expert (`group_by_expert`, no host sync); kernels work in that sorted order and
write results back by slot, so the k-sum per token is a plain deterministic reduction.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ossrl.kernels.mxfp4 import dequantize_mxfp4


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, E] logits -> (weights [N, k] in the logits' dtype, expert ids [N, k]), top-k then softmax."""
    values, ids = torch.topk(router_logits, k, dim=-1)
    weights = torch.softmax(values, dim=-1, dtype=values.dtype)
    return weights, ids


def clamped_swiglu(gate_up: torch.Tensor, *, limit: float, alpha: float) -> torch.Tensor:
    """[..., 2I] interleaved (even = gate, odd = up) -> [..., I]: gate*sigmoid(alpha*gate)*(up+1)."""
    gate = gate_up[..., 0::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1)


def routed_experts_reference(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: Callable[[int, torch.Tensor], torch.Tensor],
    down: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    limit: float,
    alpha: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [N, H]; weights, ids [N, k]. `gate_up(e, x_e)` returns x_e @ W1_e + b1_e ([n, 2I]) and
    `down(e, a_e)` returns a_e @ W2_e + b2_e ([n, H]); the caller owns the weight format
    (dense or MXFP4) and any LoRA. Returns [N, H] in out_dtype (default: x's dtype)."""
    out = torch.zeros_like(x, dtype=out_dtype or x.dtype)
    num_experts_hit = torch.bincount(ids.flatten(), minlength=1)
    for e in torch.nonzero(num_experts_hit).flatten().tolist():
        token_idx, slot = torch.nonzero(ids == e, as_tuple=True)
        a = clamped_swiglu(gate_up(e, x[token_idx]), limit=limit, alpha=alpha)
        y = down(e, a) * weights[token_idx, slot].unsqueeze(-1)
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def clamped_swiglu_backward(z: torch.Tensor, da: torch.Tensor, *, limit: float, alpha: float) -> torch.Tensor:
    """d(clamped_swiglu)/dz: z [..., 2I] interleaved pre-activation, da [..., I] -> dz [..., 2I].

    fp32 arithmetic, result in z's dtype. Clamp edges follow torch.clamp's backward (the gradient
    passes where the input equals the bound), so it matches autograd through `clamped_swiglu`.
    """
    zf = z.float()
    gate, up = zf[..., 0::2], zf[..., 1::2]
    gc, uc = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    s = torch.sigmoid(gc * alpha)
    daf = da.float()
    dgate = daf * (uc + 1) * (s + alpha * gc * s * (1 - s)) * (gate <= limit)
    dup = daf * (gc * s) * ((up >= -limit) & (up <= limit))
    return torch.stack((dgate, dup), dim=-1).flatten(-2).to(z.dtype)


@dataclass
class ExpertGroups:
    """The N*k slots of a batch sorted by expert (all on the device of `ids`, built without syncs)."""

    order: torch.Tensor    # [S] int64: slot id (token*k + j) at each sorted position
    token: torch.Tensor    # [S] int64: token of each sorted position
    expert: torch.Tensor   # [S] int64: expert of each sorted position (non-decreasing)
    offsets: torch.Tensor  # [E+1] int64: expert e owns sorted positions offsets[e]:offsets[e+1]
    k: int
    # [S] int64: the sorted position of each slot id (order's inverse), where the grouping kernel
    # wrote it (`ossrl.kernels.fused.group_small`, the router's grouping); None from the sort
    position: torch.Tensor | None = None

    @property
    def counts(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @functools.cached_property
    def ends_int32(self) -> torch.Tensor:
        """offsets[1:] as int32, torch._grouped_mm's `offs` (converted once per grouping, not per call)."""
        return self.offsets[1:].to(torch.int32)


def group_by_expert(ids: torch.Tensor, num_experts: int) -> ExpertGroups:
    """ids [N, k] expert choices -> the slots grouped by expert (stable: by token within an expert)."""
    k = ids.shape[-1]
    expert, order = torch.sort(ids.reshape(-1), stable=True)
    bounds = torch.arange(num_experts + 1, device=ids.device, dtype=expert.dtype)
    offsets = torch.searchsorted(expert, bounds)
    return ExpertGroups(order=order, token=order // k, expert=expert, offsets=offsets, k=k)


@dataclass
class ExpertWeights:
    """The frozen base of E experts, as the Experts module holds it (spec 3.1 and 3.3).

    bf16 (dense, any float dtype): gate_up [E, H, 2I] and down [E, I, H], used as x @ W[e].
    mxfp4: gate_up = blocks [E, 2I, H/32, 16] uint8 with gate_up_scales [E, 2I, H/32] uint8, and
    down = blocks [E, H, I/32, 16] with down_scales [E, H, I/32]; rows are outputs, the 32-blocks
    run along the input. Biases are [E, 2I] and [E, H] in every format.
    """

    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor
    down: torch.Tensor
    down_bias: torch.Tensor
    gate_up_scales: torch.Tensor | None = None
    down_scales: torch.Tensor | None = None
    limit: float = 7.0
    alpha: float = 1.702
    scales_fold: bool = False  # every E8M0 scale checked <= 128 (`Experts.scales_fold`): see `mxfp4_words`
    # mxfp4 on CUDA (rollouts): copies of the two projections' blocks in the tile-contiguous layout
    # `mxfp4_triton.tile_blocks(blocks, *tiled)` (rows, words), read by the word decode wherever its K
    # tile divides a chunk (`ossrl.model.gptoss.tile_experts`); every other path reads the blocks above
    gate_up_tiled: torch.Tensor | None = None
    down_tiled: torch.Tensor | None = None
    tiled: tuple[int, int] | None = None
    # mxfp4 on CUDA: both projections decoded to bf16 once, dense [E, in, out]
    # (`ossrl.model.expert_copies.dense_experts`), read where the kernels would decode a transient
    # copy per call (`TileConfig.dequant`: compute-bound sizes)
    gate_up_dense: torch.Tensor | None = None
    down_dense: torch.Tensor | None = None

    @property
    def format(self) -> str:
        return "bf16" if self.gate_up_scales is None else "mxfp4"

    @property
    def num_experts(self) -> int:
        return self.gate_up_bias.shape[0]

    def gate_up_of(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, H] -> x @ W1_e + b1_e [n, 2I] (the twin's per-expert step)."""
        if self.gate_up_scales is None:
            return x @ self.gate_up[e] + self.gate_up_bias[e]
        w = dequantize_mxfp4(self.gate_up[e], self.gate_up_scales[e], x.dtype)  # [2I, H]
        return F.linear(x, w, self.gate_up_bias[e])

    def down_of(self, e: int, a: torch.Tensor) -> torch.Tensor:
        """a [n, I] -> a @ W2_e + b2_e [n, H]."""
        if self.down_scales is None:
            return a @ self.down[e] + self.down_bias[e]
        w = dequantize_mxfp4(self.down[e], self.down_scales[e], a.dtype)  # [H, I]
        return F.linear(a, w, self.down_bias[e])


def _grouped_mm_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch._grouped_mm serves bf16 on CUDA (`grouped_mm` pads sizes it does not take)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and all(w.dtype == torch.bfloat16 for w in weights))


def grouped_mm(x: torch.Tensor, W: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(x [S, k], W [E, k, n], offs): rows offs[e-1]:offs[e] times W[e]. It takes
    inner sizes of whole 16 bytes only, so a k or n that is not a multiple of 8 (a LoRA rank of 4 or
    12) is padded with zeros and the product sliced back: the same numbers, and gradients reach the
    unpadded entries only. (Without it such ranks fell back to a loop over the experts that read
    the offsets back from the device and copied the whole output once per expert.)"""
    k_pad, n_pad = -W.shape[-2] % 8, -W.shape[-1] % 8
    if k_pad:
        x, W = F.pad(x, (0, k_pad)), F.pad(W, (0, 0, 0, k_pad))
    if n_pad:
        W = F.pad(W, (0, n_pad))
    out = torch._grouped_mm(x, W, offs=offs)
    return out[:, :out.shape[1] - n_pad].contiguous() if n_pad else out


def grouped_lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, groups: ExpertGroups,
                       scaling: float, *, loop: bool = False) -> torch.Tensor:
    """Per-expert low-rank delta on sorted rows: x [S, in] (rows of expert e at its offsets),
    A [E, in, r], B [E, r, out] -> (x_e @ A[e] * scaling) @ B[e] [S, out]. Differentiable.

    Uses torch._grouped_mm on CUDA (bf16; `grouped_mm`); else, on CUDA at decode sizes,
    one batched product per slot against its expert's gathered weights (`_per_slot`: no host sync,
    so it captures in a CUDA graph); else a loop over experts (one host sync to read the offsets),
    or when `loop` is set.
    """
    if _grouped_mm_ok(x, A, B) and not loop:
        offs = groups.ends_int32
        return grouped_mm(scaled(grouped_mm(x, A, offs), scaling), B, offs)
    if not loop and _per_slot_ok(x, A) and _per_slot_ok(x, B):
        return _per_slot(scaled(_per_slot(x, A, groups), scaling), B, groups)
    return _grouped_rows(x, groups, lambda e, rows: scaled(rows @ A[e], scaling) @ B[e], B.shape[-1])


def scaled(u: torch.Tensor, scaling: float) -> torch.Tensor:
    """u * scaling, with no kernel where scaling is 1 (rollout copies carry it in A)."""
    return u if scaling == 1 else u * scaling


TOKEN_LORA_MAX_COLUMNS = 1024  # token_lora_delta multiplies by all experts' A at once up to E * r columns


def token_lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, groups: ExpertGroups,
                     scaling: float, *, loop: bool = False, A_flat: torch.Tensor | None = None) -> torch.Tensor:
    """The gate_up delta of `grouped_lora_delta` from the unsorted token rows x [N, in]: with few
    experts times rank (E * r <= 1024) the down-projection to rank r runs for every token against
    all experts' A at once ([N, in] @ [in, E * r], one dense matmul) and each slot picks its expert's
    r columns; no [S, in] gather of the inputs (and no scatter-add of its gradient) is needed.
    Otherwise the rows are gathered and `grouped_lora_delta` runs. `A_flat`, if given, is A already
    in that [in, E * r] layout (the adapters' rollout copies keep it so)."""
    E, _, r = A.shape
    if E * r > TOKEN_LORA_MAX_COLUMNS:
        return grouped_lora_delta(x[groups.token], A, B, groups, scaling, loop=loop)
    if A_flat is None:
        A_flat = all_experts_A(A)
    u = scaled((x @ A_flat).view(-1, E, r)[groups.token, groups.expert], scaling)
    return grouped_product(u, B, groups, loop=loop)


def all_experts_A(A: torch.Tensor) -> torch.Tensor:
    """Every expert's LoRA A [E, in, r] side by side as [in, E * r] (expert e's r columns from e * r)."""
    E, H, r = A.shape
    return A.permute(1, 0, 2).reshape(H, E * r)


def grouped_product(x: torch.Tensor, W: torch.Tensor, groups: ExpertGroups, *, loop: bool = False) -> torch.Tensor:
    """x [S, in] sorted rows -> x_e @ W[e] [S, out]: torch._grouped_mm where it serves, else one
    batched product per slot (CUDA, decode sizes, no autograd), else the loop over experts."""
    if _grouped_mm_ok(x, W) and not loop:
        return grouped_mm(x, W, groups.ends_int32)
    if not loop and _per_slot_ok(x, W):
        return _per_slot(x, W, groups)
    return _grouped_rows(x, groups, lambda e, rows: rows @ W[e], W.shape[-1])


def grouped_weight_grad(u: torch.Tensor, g: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """The weight gradient of a grouped product: u [S, r] and g [S, out] sorted rows -> [E, r, out]
    with expert e's u_e^T @ g_e (zeros for an expert without rows). torch._grouped_mm's
    contraction-grouped form where it serves (a rank that is not a multiple of 8 padded with zero
    columns, an output width that is not one padded too), else the loop over experts (one host sync)."""
    E, r, out = groups.offsets.numel() - 1, u.shape[1], g.shape[1]
    if _grouped_mm_ok(u, g):
        r_pad, out_pad = -r % 8, -out % 8
        up = F.pad(u, (0, r_pad)) if r_pad else u.contiguous()
        gp = F.pad(g, (0, out_pad)) if out_pad else g.contiguous()
        dW = torch._grouped_mm(up.t(), gp, offs=groups.ends_int32)[:, :r, :out]
        # (an expert without rows gets no product; Hopper writes zeros there, other parts may not)
        return torch.where(groups.counts[:, None, None] > 0, dW, 0)
    dW = u.new_zeros(E, r, out)
    bounds = groups.offsets.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            dW[e] = u[lo:hi].t() @ g[lo:hi]
    return dW


PER_SLOT_MAX_BYTES = 64 << 20  # the gathered [S, in, out] weights of `_per_slot`


def _per_slot_ok(x: torch.Tensor, W: torch.Tensor) -> bool:
    """`_per_slot` serves CUDA forwards without autograd (rollouts, which capture CUDA graphs)
    where its gathered weights stay small (decode sizes). Training keeps the loop over experts,
    whose weight gradients are summed in a fixed order (the gather's backward accumulates by
    atomics)."""
    return (x.is_cuda and not torch.is_grad_enabled()
            and x.shape[0] * W[0].numel() * W.element_size() <= PER_SLOT_MAX_BYTES)


def _per_slot(x: torch.Tensor, W: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """x [S, in] sorted rows -> x[s] @ W[expert of s] [S, out], one batched product over the slots'
    gathered weights: no host sync (graph capture), where torch._grouped_mm does not serve."""
    return torch.bmm(x.unsqueeze(1), W[groups.expert]).squeeze(1)


def _grouped_rows(x: torch.Tensor, groups: ExpertGroups, fn, width: int) -> torch.Tensor:
    """fn(e, rows of expert e) for each expert with rows, placed at its offsets (one host sync)."""
    out = x.new_zeros(x.shape[0], width)
    bounds = groups.offsets.tolist()
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out = out.index_copy(0, torch.arange(lo, hi, device=x.device), fn(e, x[lo:hi]))
    return out


def routed_experts_twin(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights,
                        lora=None) -> torch.Tensor:
    """The reference loop over `experts` (plus LoRA, see `routed_experts`). The oracle: run in fp32."""
    def gate_up(e, xe):
        z = experts.gate_up_of(e, xe)
        if lora is None:
            return z
        return z + (lora_input(lora, xe) @ lora.gate_up_A[e] * lora.scaling) @ lora.gate_up_B[e]

    def down(e, a):
        y = experts.down_of(e, a)
        if lora is None:
            return y
        return y + (lora_input(lora, a) @ lora.down_A[e] * lora.scaling) @ lora.down_B[e]

    return routed_experts_reference(x, weights, ids, gate_up, down, limit=experts.limit, alpha=experts.alpha)


def lora_input(lora, x: torch.Tensor) -> torch.Tensor:
    """The LoRA branch's input: x through the adapter's dropout, if it has one."""
    dropout = getattr(lora, "dropout", None)
    return dropout(x) if dropout is not None else x


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def use_moe_kernels(x: torch.Tensor, experts: ExpertWeights) -> bool:
    """The Triton path serves bf16 activations on CUDA with bf16 or MXFP4 experts; fp32 uses the twin."""
    return moe_kernels_serve(x, experts.format, experts.gate_up.dtype)


def moe_kernels_serve(x: torch.Tensor, fmt: str, weight_dtype: torch.dtype) -> bool:
    """`use_moe_kernels` from the experts' format and weight dtype (no ExpertWeights built)."""
    return x.is_cuda and x.dtype == torch.bfloat16 and (fmt == "mxfp4" or weight_dtype == torch.bfloat16) \
        and triton_available()


def routed_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights,
                   lora=None) -> torch.Tensor:
    """x [N, H], routing weights and expert ids [N, k] -> [N, H] = sum_j w_j * expert_{ids_j}(x).

    `lora` (optional) is any object with `gate_up_A [E, H, r]`, `gate_up_B [E, r, 2I]`,
    `down_A [E, I, r]`, `down_B [E, r, H]` and `scaling`: the delta (x @ A[e] * scaling) @ B[e]
    is added, unmerged, to expert e's gate_up pre-activation and to its down output (before the
    routing weight); an adapter's `dropout` module, if any, applies to the LoRA input only.
    Gradients reach x, the routing weights and the LoRA pairs, never the base.
    """
    if use_moe_kernels(x, experts):
        from ossrl.kernels.moe_triton import routed_experts_triton

        return routed_experts_triton(x, weights, ids, experts, lora)
    return routed_experts_twin(x, weights, ids, experts, lora)
