"""AdamW whose two moment tensors live in CPU memory and pass through the GPU in chunks at each step.

    optimizer = OffloadedAdamW(params, lr=1e-5, weight_decay=0.0)   # or make_optimizer(..., offload=True)

What it is for: AdamW keeps two states per trainable parameter (8 bytes each in fp32). For
gpt-oss-120b with LoRA on every expert that is 8.0 GiB on top of a 73 GiB training step, the
difference between fitting an 80 GB GPU and not (docs/benchmarks.md, Training step). Here the
states stay in pinned host memory; `step()` copies one chunk of them to a GPU staging buffer,
updates the chunk's parameters there, and copies the states back, with the next chunk's upload
and the last chunk's download overlapping the update (two buffers, one copy stream each way).
The GPU holds two chunks (`chunk_numel` elements per state) instead of every state.

The one thing to know: the maths is torch.optim.AdamW's (decoupled weight decay, bias
correction per parameter, the same foreach operations in the same order), and the state dict
has AdamW's format, so a checkpoint moves between the two freely. Parameters stay where they
are (the fp32 LoRA masters on the GPU); on a CPU-only machine nothing moves and the states are
plain CPU tensors. Sharded (DTensor) parameters are refused: their states are sharded already.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

CHUNK_NUMEL = 2**25  # elements per state per staging buffer: 128 MiB in fp32, 4 buffers per dtype
# What this class does not do; refused, rather than accepted and ignored (AdamW's names).
_UNSUPPORTED = {"amsgrad": False, "maximize": False, "differentiable": False, "decoupled_weight_decay": True}


def _check_supported(group: dict, where: str) -> None:
    for key, supported in _UNSUPPORTED.items():
        if key in group and bool(group[key]) != supported:
            raise ValueError(f"OffloadedAdamW: {where} has {key}={group[key]!r}; only {key}={supported} is "
                             f"supported (plain AdamW). Train without offload_optimizer to use it")


class OffloadedAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, chunk_numel: int = CHUNK_NUMEL):
        if chunk_numel <= 0:
            raise ValueError(f"chunk_numel must be positive, got {chunk_numel}")
        # AdamW's own group keys too, so that its state dicts and ours load into each other.
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=False, foreach=None, capturable=False, differentiable=False, fused=None)
        self._chunks = None  # add_param_group refuses groups once the layout exists
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            _check_supported(group, f"parameter group {i}")
        params = [p for group in self.param_groups for p in group["params"]]
        devices = {p.device for p in params}
        if any(isinstance(p, DTensor) for p in params):
            raise ValueError("OffloadedAdamW: sharded (DTensor) parameters are not supported; their optimizer "
                             "states are sharded over the ranks already (drop offload_optimizer or fsdp)")
        if len(devices) != 1 or any(not p.is_floating_point() for p in params):
            raise ValueError(f"OffloadedAdamW: parameters must be floating point on one device, got "
                             f"{sorted({str(p.dtype) for p in params})} on {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.chunk_numel = chunk_numel
        streamed = self.device.type == "cuda"
        # Chunks: runs of one group's parameters of one dtype, at most chunk_numel elements (a larger
        # parameter is a chunk alone). One flat host buffer per state and dtype, laid out in chunk
        # order; each parameter's states are views into it, so a chunk is one contiguous copy each way.
        self._chunks = []  # [group, dtype, host offset, numel, [(param, offset within the chunk)]]
        sizes: dict[torch.dtype, int] = {}
        for group in self.param_groups:
            by_dtype: dict[torch.dtype, list] = {}
            for p in group["params"]:
                by_dtype.setdefault(p.dtype, []).append(p)
            for dtype, members in by_dtype.items():
                for p in members:
                    last = self._chunks[-1] if self._chunks else None
                    if last is None or last[0] is not group or last[1] != dtype or last[3] + p.numel() > chunk_numel:
                        last = [group, dtype, sizes.get(dtype, 0), 0, []]
                        self._chunks.append(last)
                    last[4].append((p, last[3]))
                    last[3] += p.numel()
                    sizes[dtype] = sizes.get(dtype, 0) + p.numel()
        self._host = {dtype: [torch.zeros(n, dtype=dtype, pin_memory=streamed) for _ in range(2)]
                      for dtype, n in sizes.items()}
        for _, dtype, start, _, members in self._chunks:
            for p, at in members:
                exp_avg, exp_avg_sq = (h[start + at:start + at + p.numel()].view_as(p) for h in self._host[dtype])
                self.state[p] = {"step": torch.tensor(0.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        self._staging = None  # two (exp_avg, exp_avg_sq) GPU buffers per dtype, made at the first step
        if streamed:
            self._upload, self._download = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
            self._downloaded = torch.cuda.Event()  # every state is back on the host after this

    def add_param_group(self, param_group: dict) -> None:
        if self._chunks is not None:
            raise RuntimeError("OffloadedAdamW lays its states out once, at construction: pass every parameter "
                               "group to the constructor")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.device.type != "cuda":
            for group, dtype, start, numel, members in self._chunks:
                self._update(group, members, *(h[start:start + numel] for h in self._host[dtype]))
            return loss
        compute = torch.cuda.current_stream(self.device)
        if self._staging is None:
            self._make_staging(compute)
        self._upload.wait_stream(self._download)  # last step's states are on the host again
        used = dict.fromkeys(self._staging, 0)  # chunks of each dtype so far: the slots alternate per dtype
        for group, dtype, start, numel, members in self._chunks:
            if all(p.grad is None for p, _ in members):  # nothing to update: no round trip
                continue
            slot = used[dtype] % 2
            used[dtype] += 1
            buffers = [b[:numel] for b in self._staging[dtype][slot]]
            host = [h[start:start + numel] for h in self._host[dtype]]
            with torch.cuda.stream(self._upload):
                self._upload.wait_event(self._freed[dtype][slot])  # the buffer's last chunk went back
                for b, h in zip(buffers, host):
                    b.copy_(h, non_blocking=True)
                uploaded = torch.cuda.Event()
                uploaded.record(self._upload)
            compute.wait_event(uploaded)
            self._update(group, members, *buffers)
            updated = torch.cuda.Event()
            updated.record(compute)
            with torch.cuda.stream(self._download):
                self._download.wait_event(updated)
                for b, h in zip(buffers, host):
                    h.copy_(b, non_blocking=True)
                self._freed[dtype][slot].record(self._download)
        # The last download may overlap what the caller queues next; the next step's uploads and
        # state_dict() wait for it.
        self._downloaded.record(self._download)
        return loss

    def _make_staging(self, compute: torch.cuda.Stream) -> None:
        biggest: dict[torch.dtype, int] = {}
        for _, dtype, _, numel, _ in self._chunks:
            biggest[dtype] = max(biggest.get(dtype, 0), numel)
        self._staging = {dtype: [[torch.empty(n, dtype=dtype, device=self.device) for _ in range(2)]
                                 for _ in range(2)] for dtype, n in biggest.items()}
        self._freed = {dtype: [torch.cuda.Event(), torch.cuda.Event()] for dtype in biggest}
        # The allocator may hand out memory the compute stream freed with kernels still queued on it
        # (a backward's activations): the first uploads wait for those. And the side streams' use
        # keeps the buffers from being handed out again while a copy still reads them.
        self._upload.wait_stream(compute)
        for pair in self._staging.values():
            for buffers in pair:
                for b in buffers:
                    b.record_stream(self._upload)
                    b.record_stream(self._download)

    def _update(self, group, members, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        """torch.optim.AdamW's multi-tensor update on the chunk's parameters that have gradients;
        `exp_avg` and `exp_avg_sq` are the chunk's states (flat, wherever they are now)."""
        todo = [(p, at) for p, at in members if p.grad is not None]
        if not todo:
            return
        if any(p.grad.is_sparse for p, _ in todo):
            raise RuntimeError("OffloadedAdamW does not support sparse gradients")
        params = [p for p, _ in todo]
        grads = [p.grad for p in params]
        m = [exp_avg[at:at + p.numel()].view_as(p) for p, at in todo]
        v = [exp_avg_sq[at:at + p.numel()].view_as(p) for p, at in todo]
        steps = []
        for p in params:  # a new tensor, not += 1: a state dict handed out keeps its count
            self.state[p]["step"] = self.state[p]["step"] + 1
            steps.append(self.state[p]["step"].item())
        # float(): a learning rate or betas given as 1-element tensors, as AdamW accepts
        lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
        beta1, beta2 = (float(b) for b in group["betas"])
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
        step_size = [(lr / (1 - beta1**s)) * -1 for s in steps]
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [(1 - beta2**s) ** 0.5 for s in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, step_size)

    # ------------------------------------------------------------------ state dicts
    def state_dict(self):
        """AdamW's format. Its state tensors are views of the host buffers, not copies (8 GiB for
        120b's LoRA): valid until the next step, and saved whole by torch.save."""
        if self.device.type == "cuda":
            self._downloaded.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        """AdamW's format (ours or torch.optim.AdamW's): hyperparameters per group, and each saved
        state copied into the host buffers (nothing is staged on the GPU). Parameters without a
        saved state start fresh, as AdamW's would. Everything is checked before anything changes.
        The base class's load hooks are not run."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError(f"optimizer state has groups of {[len(s['params']) for s in saved_groups]} "
                             f"parameters, this optimizer {[len(g['params']) for g in self.param_groups]}")
        by_id = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            _check_supported(saved, f"the loaded state's parameter group {i}")
            by_id.update(zip(saved["params"], group["params"]))
        for i, values in state_dict["state"].items():
            if i not in by_id:
                raise ValueError(f"optimizer state {i}: no parameter of that index in the saved groups")
            missing = {"step", "exp_avg", "exp_avg_sq"} - set(values)
            if missing:
                raise ValueError(f"optimizer state {i}: no {sorted(missing)} (not an AdamW state)")
            for key in ("exp_avg", "exp_avg_sq"):
                if tuple(values[key].shape) != tuple(by_id[i].shape):
                    raise ValueError(f"optimizer state {i}.{key}: shape {tuple(values[key].shape)}, "
                                     f"its parameter {tuple(by_id[i].shape)}")
        if self.device.type == "cuda":
            self._downloaded.synchronize()
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
            group["betas"] = tuple(group["betas"])
        for p in by_id.values():
            st = self.state[p]
            st["step"] = torch.tensor(0.0)
            st["exp_avg"].zero_(), st["exp_avg_sq"].zero_()
        for i, values in state_dict["state"].items():
            st = self.state[by_id[i]]
            st["exp_avg"].copy_(values["exp_avg"])
            st["exp_avg_sq"].copy_(values["exp_avg_sq"])
            st["step"] = torch.tensor(float(values["step"]))
