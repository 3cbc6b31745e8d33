"""LoRA adapters on attention projections and on every expert, applied unmerged.

`apply_lora(model, LoRAConfig(...))` swaps q/k/v/o projections for `LoRALinear` modules that hold
the *same* base parameters (so base names stay the Hugging Face keys) plus `lora_A`/`lora_B`, and
gives each `Experts` module an `ExpertLoRA` with a low-rank pair per expert for gate_up and for
down. The base is frozen; only LoRA parameters train.

The reference policy for KL is the same model with adapters off: `with model.adapters_disabled():`
flips one shared switch, no copy. Names follow PEFT (`...q_proj.lora_A.weight` [r, in],
`...lora_B.weight` [out, r]; scaling alpha/r, or alpha/sqrt(r) with rslora) so an adapter
exports as a PEFT adapter by adding the `base_model.model.` prefix.

LoRA weights are kept in fp32 whatever the base dtype (bf16 LoRA weights would lose most AdamW
updates to rounding); the forward casts them to the activation dtype, a differentiable cast, so
gradients and optimizer states stay fp32. Rollouts run thousands of forwards on unchanged weights:
inside `with rollout_copies(model):` (the engine's generate) the adapters read copies cast once on
entry instead (for 20b, r=16, the per-forward casts moved about 1 GB per decode step, arithmetic),
with the scaling folded into the copies of A (no multiply per forward): the same outputs bit for
bit where the scaling is a power of two (the default alpha = 2r), to bf16 rounding otherwise.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ossrl.model.sharded import shaped_like, whole_tensor

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS = ("experts",)
ALL_TARGETS = ATTENTION_TARGETS + EXPERT_TARGETS


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default_factory=lambda: ALL_TARGETS)
    rslora: bool = False
    seed: int = 0

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRAConfig.targets: unknown {unknown or 'empty'}; choose from {ALL_TARGETS}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class AdapterSwitch:
    """One flag shared by every adapter of a model, and the dtype of the rollout copies in use
    (`rollout_copies`; None outside it)."""

    def __init__(self):
        self.enabled = True
        self.rollout_dtype: torch.dtype | None = None
        self.rollout_epoch = 0  # counts allocations of rollout copies (captured graphs read their addresses)

    def copies_for(self, dtype: torch.dtype) -> bool:
        """Whether a forward in `dtype` reads the rollout copies: inside `rollout_copies` for that
        dtype and without autograd (the copies carry no gradient to the fp32 weights)."""
        return self.rollout_dtype == dtype and not torch.is_grad_enabled()


class LoRALinear(nn.Module):
    """y = x W^T + b + scaling * B(A(dropout(x))), with W and b the frozen base parameters."""

    def __init__(self, base: nn.Linear, config: LoRAConfig, switch: AdapterSwitch):
        super().__init__()
        self.weight = base.weight  # same Parameter objects: names and storage unchanged
        self.bias = base.bias
        out_features, in_features = base.weight.shape
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(in_features, config.r, bias=False, **kw)
        self.lora_B = nn.Linear(config.r, out_features, bias=False, **kw)
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.switch = switch
        self.rollout_copy: tuple[torch.Tensor, torch.Tensor] | None = None  # (A, B) cast (`rollout_copies`)

    def refresh_rollout_copy(self, dtype: torch.dtype) -> None:
        """Cast scaling * A and B into `rollout_copy`, in place when it exists (CUDA graphs keep its
        address). The scaling rides in the copy of A: one multiply per refresh instead of one kernel
        per forward (bit-identical where scaling is a power of two, as with the default alpha = 2r).
        Where `lay_out_qkv` reserved rows after the base weight (`lora_rows`), the copy of A lives
        there: the base matmul then computes x A^T as extra columns (`_extended`)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        copy = self.rollout_copy
        rows = self._reserved_rows(dtype)
        in_rows = rows is not None and copy is not None and copy[0].data_ptr() == rows.data_ptr()
        if copy is None or copy[0].dtype != dtype or copy[0].device != a.device or (rows is not None) != in_rows:
            with torch.inference_mode(False):  # normal tensors: a later refresh outside inference mode works
                a_copy = rows[:a.shape[0]] if rows is not None else torch.empty_like(a, dtype=dtype)
                self.rollout_copy = (a_copy, torch.empty_like(b, dtype=dtype))
            self.switch.rollout_epoch += 1
        self.rollout_copy[0].copy_(a * self.scaling)
        self.rollout_copy[1].copy_(b)

    def _reserved_rows(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The weight rows `lay_out_qkv` reserved right after this projection's weight (and zeroed
        bias entries after its bias), when they are still there, in `dtype`, and hold rank r."""
        reserved = getattr(self, "lora_rows", None)
        if _with_reserved_rows([self], reserved, dtype, self.lora_A.weight.shape[0]) is None:
            return None
        return reserved[0]

    def _extended(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight, bias) with the reserved rows appended (views, no copy), when the rollout copy of
        A lives in them: F.linear with these gives y and x A^T side by side."""
        reserved = getattr(self, "lora_rows", None)
        copy = self.rollout_copy
        if reserved is None or copy is None or copy[0].data_ptr() != reserved[0].data_ptr():
            return None
        return _with_reserved_rows([self], reserved, copy[0].dtype, copy[0].shape[0])

    def forward(self, x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """`u` (rollouts: `SharedRolloutA`) is the rank-r intermediate, already computed from x with
        the rollout copy of A; the copy of B finishes the delta."""
        rollout = self.switch.enabled and u is None and self.rollout_copy is not None and \
            self.switch.copies_for(x.dtype)
        if rollout and not _dropping(self) and (extended := self._extended()) is not None:
            # y and x A^T from one matmul (A's copy in rows reserved after the weight), then y += u B^T
            # in place: no separate rank-r matmul (a cuBLAS split-K GEMV and its reduce) and no copy
            n, r = self.weight.shape[0], self.rollout_copy[0].shape[0]
            both = F.linear(x, *extended)
            flat = both.view(-1, both.shape[-1])
            flat[:, :n].addmm_(flat[:, n:n + r], self.rollout_copy[1].t())
            return both[..., :n]
        y = F.linear(x, self.weight, self.bias)
        if not self.switch.enabled:
            return y
        if u is not None:
            b = self.rollout_copy[1]
        elif rollout:
            a, b = self.rollout_copy  # scaling already in a
            u = F.linear(self.dropout(x), a)
        else:
            if FUSED_LORA_BACKWARD and not _dropping(self):
                return lora_linear(x, self.weight, self.bias, self.lora_A.weight.to(x.dtype),
                                   self.lora_B.weight.to(x.dtype), self.scaling)
            # The scaling on the rank-r intermediate and the add in the matmul's epilogue: no pass
            # over the [tokens, out] output beyond the two matmuls.
            u = F.linear(self.dropout(x), self.lora_A.weight.to(x.dtype)) * self.scaling
            b = self.lora_B.weight.to(x.dtype)
            return torch.addmm(y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]), b.t()).view(y.shape)
        y.view(-1, y.shape[-1]).addmm_(u.reshape(-1, u.shape[-1]), b.t())  # no autograd here: in place, no copy
        return y


def _with_reserved_rows(projections: list[nn.Module], reserved: tuple[torch.Tensor, torch.Tensor] | None,
                        dtype: torch.dtype, ranks: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The projections' weights and biases with `reserved` (the rows `lay_out_qkv` keeps right
    after them for the A copies) appended, as single views of their buffers: None unless the rows
    are still there, in `dtype`, and hold `ranks` rows."""
    if reserved is None or reserved[0].dtype != dtype or reserved[0].shape[0] < ranks or \
            any(p.bias is None for p in projections):
        return None
    from ossrl.model.gptoss import _side_by_side

    weight = _side_by_side([p.weight for p in projections] + [reserved[0]])
    bias = _side_by_side([p.bias for p in projections] + [reserved[1]])
    return None if weight is None or bias is None else (weight, bias)


# Training forwards (autograd on) of an attention layer whose q, k and v all carry active adapters
# and whose frozen base weights lie side by side (`lay_out_qkv`; `configure_memory` lays them out):
# one base matmul for the three projections, one for their A products ([3r, in]) and one addmm of
# the block-diagonal B's, whose backward gives the input gradient in one matmul each instead of
# three matmuls and two adds. On since session 19 (H100, 20b shapes, LoRA r=16, steps timed in turn
# in one process, benchmarks/results/train_interleaved_s19_h100.json): with EAGER_GRADIENT a 4K step
# 0.2602 -> 0.2533 s and an 8K step 0.5225 -> 0.5150 s; alone 0.2670 -> 0.2622 and 0.5400 -> 0.5317 s.
FUSED_TRAINING_QKV = True


def training_qkv(attention: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """An attention layer's (q, k, v) for x as its projections one by one give them (up to the
    order of a matmul's sums), from three matmuls, where FUSED_TRAINING_QKV applies (see above);
    else None. Dropout keeps the projections one by one (each has its own mask), as do adapters of
    different scalings."""
    projections = list(attention.input_projections())
    if not FUSED_TRAINING_QKV or not torch.is_grad_enabled() or \
            not all(isinstance(p, LoRALinear) for p in projections):
        return None
    if not projections[0].switch.enabled or any(_dropping(p) for p in projections) or \
            len({p.scaling for p in projections}) > 1:  # (one LoRAConfig: one scaling)
        return None
    base = attention.fused_qkv()  # the frozen weights and biases side by side, or None
    if base is None:
        return None
    a = torch.cat([p.lora_A.weight for p in projections]).to(x.dtype)  # [sum of ranks, in]
    b = torch.block_diag(*[p.lora_B.weight for p in projections]).to(x.dtype)  # [sum of outs, sum of ranks]
    if FUSED_LORA_BACKWARD:
        y = lora_linear(x, *base, a, b, projections[0].scaling)
    else:
        y = F.linear(x, *base)
        u = F.linear(x, a) * projections[0].scaling
        y = torch.addmm(y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]), b.t()).view(y.shape)
    *qk, v = y.split([p.weight.shape[0] for p in projections], dim=-1)
    # v copied out: attention keeps its input for the backward, and a view would keep all of y
    # ([T, q + k + v] instead of [T, v]); q and k are rotated into new tensors on CUDA
    return (*qk, v.contiguous())


# Training forwards of LoRA linears without dropout (one projection, or q, k and v fused) through
# `lora_linear`: the same forward, and a backward that gives x's gradient as dy W plus an addmm of
# the rank-r term into it, instead of two products and an add launch ([tokens, in] written twice
# and read twice more). False: autograd through F.linear and addmm (benchmarks'
# --fused-lora-backward switch).
FUSED_LORA_BACKWARD = True


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, weight, bias)
        u = F.linear(x2, a) * scaling  # the rounding of the unfused path: the product, then the scaling
        y.addmm_(u, b.t())
        ctx.save_for_backward(x2, weight, a, b, u)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, a, b, u = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = dbias = da = db = None
        du = (dy2 @ b) * ctx.scaling if need_x or need_a else None
        if need_x:
            dx = torch.mm(dy2, weight)
            dx.addmm_(du, a)  # the rank-r term added by the matmul's epilogue
            dx = dx.view(*dy.shape[:-1], x2.shape[-1])
        if need_w:  # a trained base weight (not the LoRA path's)
            dw = dy2.t() @ x2
        if need_bias and ctx.has_bias:
            dbias = dy2.sum(0)
        if need_a:
            da = du.t() @ x2
        if need_b:
            db = dy2.t() @ u
        return dx, dw, dbias, da, db, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """x W^T + bias + scaling * (x A^T) B^T with A [r, in] and B [out, r] in x's dtype (the
    FUSED_LORA_BACKWARD path, see above)."""
    return _LoRALinear.apply(x, weight, bias, a, b, scaling)


def _dropping(module: nn.Module) -> bool:
    """Whether the module's LoRA dropout is active (training mode, p > 0)."""
    return module.training and isinstance(module.dropout, nn.Dropout)


class ExpertLoRA(nn.Module):
    """Low-rank pairs per expert: gate_up (A [E, H, r], B [E, r, 2I]) and down (A [E, I, r], B [E, r, H]).

    Layout [E, in, r] / [E, r, out] matches the experts' own [E, in, out] convention, so the delta
    of expert e is x @ A[e] @ B[e].
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, config: LoRAConfig,
                 switch: AdapterSwitch, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        r = config.r
        self.gate_up_A = nn.Parameter(torch.zeros(num_experts, hidden, r, **kw))
        self.gate_up_B = nn.Parameter(torch.zeros(num_experts, r, 2 * intermediate, **kw))
        self.down_A = nn.Parameter(torch.zeros(num_experts, intermediate, r, **kw))
        self.down_B = nn.Parameter(torch.zeros(num_experts, r, hidden, **kw))
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.switch = switch
        self.rollout_copy: _RolloutLoRA | None = None  # the pairs cast (`rollout_copies`)

    @property
    def enabled(self) -> bool:
        return self.switch.enabled

    def refresh_rollout_copy(self, dtype: torch.dtype) -> None:
        copy = self.rollout_copy
        if copy is None or copy.dtype != dtype or copy.down_B.device != self.down_B.device:
            with torch.inference_mode(False):  # normal tensors: a later refresh outside inference mode works
                self.rollout_copy = _RolloutLoRA(self, dtype)
            self.switch.rollout_epoch += 1
        self.rollout_copy.refresh(self)

    def _active_copy(self, dtype: torch.dtype) -> _RolloutLoRA | None:
        """The rollout copy when a forward in `dtype` reads it (`AdapterSwitch.copies_for`)."""
        return self.rollout_copy if self.rollout_copy is not None and self.switch.copies_for(dtype) else None

    def _weights(self, dtype: torch.dtype) -> ExpertLoRA | _RolloutLoRA:
        return self._active_copy(dtype) or self

    def gate_up_delta(self, e: int, x: torch.Tensor) -> torch.Tensor:
        w = self._weights(x.dtype)
        return (self.dropout(x) @ w.gate_up_A[e].to(x.dtype) * w.scaling) @ w.gate_up_B[e].to(x.dtype)

    def down_delta(self, e: int, a: torch.Tensor) -> torch.Tensor:
        w = self._weights(a.dtype)
        return (self.dropout(a) @ w.down_A[e].to(a.dtype) * w.scaling) @ w.down_B[e].to(a.dtype)

    def in_dtype(self, dtype: torch.dtype) -> ExpertLoRA | _CastLoRA | _RolloutLoRA:
        """This adapter as the MoE kernels take it, with weights cast (differentiably) to `dtype`,
        or its rollout copy inside `rollout_copies`."""
        copy = self._active_copy(dtype)
        if copy is not None:
            return copy
        return self if self.gate_up_A.dtype == dtype else _CastLoRA(self, dtype)


class _CastLoRA:
    """The attributes the MoE kernels read (routed_experts' `lora` contract), cast to one dtype."""

    def __init__(self, lora: ExpertLoRA, dtype: torch.dtype):
        self.gate_up_A, self.gate_up_B = lora.gate_up_A.to(dtype), lora.gate_up_B.to(dtype)
        self.down_A, self.down_B = lora.down_A.to(dtype), lora.down_B.to(dtype)
        self.scaling, self.dropout = lora.scaling, lora.dropout


class _RolloutLoRA:
    """An ExpertLoRA's pairs cast to one dtype, refreshed in place (the `lora` contract of
    routed_experts), with the scaling in the copies of A (`scaling` is then 1: no multiply per
    forward). With few experts times rank, gate_up_A lives in the [H, E * r] layout that
    `token_lora_delta` multiplies by (`gate_up_A_flat`; gate_up_A is a view of it)."""

    def __init__(self, lora: ExpertLoRA, dtype: torch.dtype):
        from ossrl.kernels.moe import TOKEN_LORA_MAX_COLUMNS

        E, H, r = lora.gate_up_A.shape
        kw = dict(device=lora.gate_up_A.device, dtype=dtype)
        self.dtype = dtype
        self.gate_up_A_flat = None
        if E * r <= TOKEN_LORA_MAX_COLUMNS:
            self.gate_up_A_flat = torch.empty(H, E * r, **kw)
            self.gate_up_A = self.gate_up_A_flat.view(H, E, r).permute(1, 0, 2)
        else:
            self.gate_up_A = torch.empty(E, H, r, **kw)
        self.gate_up_B = torch.empty(lora.gate_up_B.shape, **kw)
        self.down_A = torch.empty(lora.down_A.shape, **kw)
        self.down_B = torch.empty(lora.down_B.shape, **kw)
        self.scaling, self.dropout = 1.0, lora.dropout

    def refresh(self, lora: ExpertLoRA) -> None:
        self.gate_up_A.copy_(lora.gate_up_A * lora.scaling)
        self.down_A.copy_(lora.down_A * lora.scaling)
        self.gate_up_B.copy_(lora.gate_up_B)
        self.down_B.copy_(lora.down_B)


class SharedRolloutA:
    """Rollout copies of the LoRA pairs of several projections of one input (an attention layer's q,
    k and v), kept in two buffers: the A copies as row blocks of one [sum of ranks, in] matrix, so a
    decode step computes all their rank-r intermediates u with one matmul instead of one per
    projection (at batch 1 each was a cuBLAS split-K GEMV plus its reduce, about 6 us, measured),
    and the B copies as the diagonal blocks of one [sum of outputs, sum of ranks] matrix (zeros
    elsewhere; a projection without adapter has zero rows), so that where the base weights lie side
    by side (`Attention.fused_qkv`) the three deltas are one addmm onto the one base matmul.
    Installed on the module as `shared_lora_a` by `rollout_copies` where any of the projections
    has an adapter (with one, its A matmul is the same, and the base still runs as one matmul);
    each member's `rollout_copy` holds views of the buffers and is refreshed in place like any
    copy."""

    def __init__(self, projections: list[nn.Module], dtype: torch.dtype,
                 reserved: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`reserved`: the zeroed weight rows and bias entries `lay_out_qkv` keeps right after the
        projections' weights and biases (the Attention module's `lora_rows`); where they are there
        and fit, the A copies live in them and the base matmul computes the rank-r intermediates as
        extra columns (`extended`: no A matmul at all)."""
        self.projections = projections
        members = [p for p in projections if isinstance(p, LoRALinear)]
        first = members[0].lora_A.weight
        self.sizes = [p.weight.shape[0] for p in projections]
        ranks = sum(m.lora_A.weight.shape[0] for m in members)
        self.reserved = reserved
        self.extended = _with_reserved_rows(projections, reserved, dtype, ranks)
        with torch.inference_mode(False):
            # (reserved rows beyond the ranks stay zero: their columns of u are 0, B's are 0 too)
            self.buffer = reserved[0] if self.extended is not None else \
                torch.empty(ranks, first.shape[1], device=first.device, dtype=dtype)
            self.b_buffer = torch.zeros(sum(self.sizes), self.buffer.shape[0], device=first.device, dtype=dtype)
            col = row = 0
            for p, size in zip(projections, self.sizes):
                if isinstance(p, LoRALinear):
                    r = p.lora_A.weight.shape[0]
                    p.rollout_copy = (self.buffer[col:col + r], self.b_buffer[row:row + size, col:col + r])
                    col += r
                row += size
        self.members = members
        self.copies = [m.rollout_copy for m in members]
        members[0].switch.rollout_epoch += 1

    def holds(self, dtype: torch.dtype) -> bool:
        """Whether the members' copies are still the views of these buffers, in `dtype` on their
        device, and the extended weights still start at the projections' weights."""
        if self.extended is not None and (self.extended[0].data_ptr() != self.projections[0].weight.data_ptr()
                                          or self.extended[1].data_ptr() != self.projections[0].bias.data_ptr()):
            return False
        return self.buffer.dtype == dtype and all(
            m.rollout_copy is c and c[0].device == m.lora_A.weight.device for m, c in zip(self.members, self.copies))

    def serves(self, x: torch.Tensor) -> bool:
        """Whether a forward of x takes the shared path: rollout copies in use for its dtype, and no
        active dropout (each member would draw its own mask)."""
        m = self.members[0]
        return (m.switch.enabled and m.switch.copies_for(x.dtype) and self.holds(x.dtype)
                and all(not (mm.training and isinstance(mm.dropout, nn.Dropout)) for mm in self.members))

    def __call__(self, x: torch.Tensor, fused: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Each projection's output for x, with one matmul for the members' rank-r intermediates; with
        `fused` (the projections' weight and bias side by side) one for the base and one for all B."""
        if fused is not None and self.extended is not None:
            # y and u side by side from one matmul, then y += u B^T in place (rows of stride n + rows)
            n = sum(self.sizes)
            both = F.linear(x, *self.extended)
            flat = both.view(-1, both.shape[-1])
            flat[:, :n].addmm_(flat[:, n:], self.b_buffer.t())
            return list(both[..., :n].split(self.sizes, dim=-1))
        u = F.linear(x, self.buffer)
        if fused is not None:
            y = F.linear(x, *fused)
            y.view(-1, y.shape[-1]).addmm_(u.reshape(-1, u.shape[-1]), self.b_buffer.t())  # in place: no copy
            return list(y.split(self.sizes, dim=-1))
        outputs, col = [], 0
        for p in self.projections:
            if isinstance(p, LoRALinear):
                r = p.rollout_copy[0].shape[0]
                outputs.append(p(x, u[..., col:col + r]))
                col += r
            else:
                outputs.append(p(x))
        return outputs


SHARED_INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # projections of one input (attention's)


@contextlib.contextmanager
def rollout_copies(model: nn.Module, dtype: torch.dtype | None = None):
    """Inside, adapters read copies of their weights cast to `dtype` (default: the model's dtype)
    once on entry, instead of casting them in every forward; without autograd only (training
    forwards inside still cast and differentiate). The weights must not change inside. The copies
    stay allocated, refreshed in place on the next entry (a captured CUDA graph reads them), until
    `release_rollout_copies` (any engine's release: an engine whose graphs read freed copies sees
    `switch.rollout_epoch` move on and captures anew). Nothing to do for fp32 models or models
    without adapters, nor for a sharded model (its adapters are gathered per layer in each
    forward)."""
    switch = getattr(model, "adapter_switch", None)
    dtype = dtype or next(model.parameters()).dtype
    if switch is None or dtype == torch.float32 or getattr(model, "sharded", False):  # set by shard_model
        yield model
        return
    modules = [m for m in model.modules() if isinstance(m, (LoRALinear, ExpertLoRA))]
    with torch.no_grad():
        for module in model.modules():
            projections = [getattr(module, name, None) for name in SHARED_INPUT_PROJECTIONS]
            if all(p is not None for p in projections) and \
                    any(isinstance(p, LoRALinear) for p in projections):
                shared = getattr(module, "shared_lora_a", None)
                reserved = getattr(module, "lora_rows", None)  # (lay_out_qkv)
                if shared is None or not shared.holds(dtype) or shared.reserved is not reserved or \
                        any(a is not b for a, b in zip(shared.projections, projections)):  # adapters added since
                    module.shared_lora_a = SharedRolloutA(projections, dtype, reserved)
        for module in modules:
            module.refresh_rollout_copy(dtype)
    previous, switch.rollout_dtype = switch.rollout_dtype, dtype
    try:
        yield model
    finally:
        switch.rollout_dtype = previous


def release_rollout_copies(model: nn.Module) -> None:
    """Free the copies `rollout_copies` keeps (the engine's standby, with its graphs)."""
    for module in model.modules():
        if isinstance(module, (LoRALinear, ExpertLoRA)):
            module.rollout_copy = None
        if getattr(module, "shared_lora_a", None) is not None:
            module.shared_lora_a = None


def _init_a(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's default for A [r, in]: kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)). B starts at 0."""
    bound = 1.0 / math.sqrt(shape[1])
    return torch.rand(shape, generator=generator) * 2 * bound - bound


@torch.no_grad()
def init_lora_weights(model: nn.Module) -> None:
    """(Re)initialise every adapter as PEFT does (A random, B zero, so LoRA starts as the identity),
    drawing in module order from the LoRA config's seed: the same values on any device and in any
    layout (a model sharded over ranks keeps each rank's shard of them). Called by `apply_lora`, and
    by the loader after a model built on the meta device is materialised."""
    generator = torch.Generator().manual_seed(model.lora_config.seed)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            pairs = [(module.lora_A.weight, module.lora_B.weight, _init_a(module.lora_A.weight.shape, generator))]
        elif isinstance(module, ExpertLoRA):
            E, H, r = module.gate_up_A.shape
            I = module.down_A.shape[1]
            gate_up, down = torch.empty(E, H, r), torch.empty(E, I, r)
            for e in range(E):  # [E, in, r] holds A^T per expert: draw A [r, in] as PEFT would
                gate_up[e] = _init_a((r, H), generator).T
                down[e] = _init_a((r, I), generator).T
            pairs = [(module.gate_up_A, module.gate_up_B, gate_up), (module.down_A, module.down_B, down)]
        else:
            continue
        for a, b, values in pairs:
            a.copy_(shaped_like(values, a))
            b.zero_()


def apply_lora(model: nn.Module, config: LoRAConfig) -> dict[str, int]:
    """Add adapters in place; freeze everything else. Returns trainable-parameter counts by module kind."""
    from ossrl.model.gptoss import Attention, Experts

    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model already has LoRA adapters")
    model.requires_grad_(False)
    switch = AdapterSwitch()
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, Attention):
            for name in ATTENTION_TARGETS:
                if name in config.targets:
                    lora = LoRALinear(getattr(module, name), config, switch)
                    setattr(module, name, lora)
                    counts[name] = counts.get(name, 0) + lora.lora_A.weight.numel() + lora.lora_B.weight.numel()
        elif isinstance(module, Experts) and "experts" in config.targets:
            E, two_i = module.gate_up_proj_bias.shape
            H, I = module.down_proj_bias.shape[1], two_i // 2
            module.lora = ExpertLoRA(E, H, I, config, switch, device=module.gate_up_proj_bias.device,
                                     dtype=torch.float32)
            counts["experts"] = counts.get("experts", 0) + sum(p.numel() for p in module.lora.parameters())
    for p in lora_parameters(model):
        p.requires_grad_(True)
    model.lora_config = config
    model.adapter_switch = switch
    init_lora_weights(model)
    return counts


def lora_parameters(model: nn.Module):
    return [p for name, p in model.named_parameters() if is_lora_name(name)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors by parameter name, whole (a sharded model's are gathered onto the CPU
    one at a time: every rank must call this then)."""
    return {name: whole_tensor(p.detach()) for name, p in model.named_parameters() if is_lora_name(name)}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = {name: p for name, p in model.named_parameters() if is_lora_name(name)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in own.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"adapter tensor '{name}' has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(p.shape)}")
            p.copy_(shaped_like(state[name], p))


def is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora." in name


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    switch = getattr(model, "adapter_switch", None)
    if switch is None:  # no adapters: the model already is the base model
        yield model
        return
    previous, switch.enabled = switch.enabled, False
    try:
        yield model
    finally:
        switch.enabled = previous


def format_trainable_counts(counts: dict[str, int], model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() * 2 for n, b in model.named_buffers()
                                                              if n.endswith("_blocks"))
    trainable = sum(counts.values())
    lines = [f"LoRA trainable parameters: {trainable:,} ({100 * trainable / max(total, 1):.3f}% of {total:,})"]
    lines += [f"  {name:<8} {n:>14,}" for name, n in sorted(counts.items())]
    return "\n".join(lines)
