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

CHUNK_NUMEL = 2**25  # elements per state per staging buffer: 128 MiB in fp32, 4 buffers in all


class OffloadedAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, chunk_numel: int = CHUNK_NUMEL):
        if chunk_numel <= 0:
            raise ValueError(f"chunk_numel must be positive, got {chunk_numel}")
        # AdamW's own group keys too, so that its state dicts and ours load into each other.
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=False, foreach=None, capturable=False, differentiable=False, fused=None)
        super().__init__(params, defaults)
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
        # One flat host buffer per state and dtype; each parameter's states are views into it, so a
        # chunk of consecutive parameters is one contiguous copy each way.
        sizes: dict[torch.dtype, int] = {}
        for p in params:
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
        self._host = {dtype: [torch.zeros(n, dtype=dtype, pin_memory=streamed) for _ in range(2)]
                      for dtype, n in sizes.items()}
        self._chunks = []  # (group, dtype, host offset, numel, [(param, offset within the chunk)])
        offsets = dict.fromkeys(sizes, 0)
        for group in self.param_groups:
            for p in group["params"]:
                start = offsets[p.dtype]
                offsets[p.dtype] += p.numel()
                exp_avg, exp_avg_sq = (h[start:start + p.numel()].view_as(p) for h in self._host[p.dtype])
                self.state[p] = {"step": torch.tensor(0.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
                last = self._chunks[-1] if self._chunks else None
                if (last is None or last[0] is not group or last[1] != p.dtype
                        or last[3] + p.numel() > chunk_numel):
                    self._chunks.append([group, p.dtype, start, 0, []])
                    last = self._chunks[-1]
                last[4].append((p, last[3]))
                last[3] += p.numel()
        self._staging = None  # two (exp_avg, exp_avg_sq) GPU buffers per dtype, made at the first step
        if streamed:
            self._upload, self._download = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
            self._downloaded = torch.cuda.Event()  # every state is back on the host after this

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
        if self._staging is None:
            biggest = {}
            for _, dtype, _, numel, _ in self._chunks:
                biggest[dtype] = max(biggest.get(dtype, 0), numel)
            self._staging = {dtype: [[torch.empty(n, dtype=dtype, device=self.device) for _ in range(2)]
                                     for _ in range(2)] for dtype, n in biggest.items()}
            self._freed = {dtype: [torch.cuda.Event(), torch.cuda.Event()] for dtype in biggest}
        compute = torch.cuda.current_stream(self.device)
        self._upload.wait_stream(self._download)  # last step's states are on the host again
        for i, (group, dtype, start, numel, members) in enumerate(self._chunks):
            slot = i % 2
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
        for p in params:
            self.state[p]["step"] += 1
            steps.append(self.state[p]["step"].item())
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
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
        if self.device.type == "cuda":
            self._downloaded.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        """AdamW's format (ours or torch.optim.AdamW's): hyperparameters per group, and each saved
        state copied into the host buffers (nothing is staged on the GPU). Parameters without a
        saved state start fresh, as AdamW's would."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError(f"optimizer state has groups of {[len(s['params']) for s in saved_groups]} "
                             f"parameters, this optimizer {[len(g['params']) for g in self.param_groups]}")
        if self.device.type == "cuda":
            self._downloaded.synchronize()
        by_id = {}
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
            group["betas"] = tuple(group["betas"])
            by_id.update(zip(saved["params"], group["params"]))
        for p in by_id.values():
            st = self.state[p]
            st["step"] = torch.tensor(0.0)
            st["exp_avg"].zero_(), st["exp_avg_sq"].zero_()
        for i, values in state_dict["state"].items():
            p = by_id[i]
            st = self.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                if tuple(values[key].shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {i}.{key}: shape {tuple(values[key].shape)}, "
                                     f"its parameter {tuple(p.shape)}")
                st[key].copy_(values[key])
            st["step"] = torch.tensor(float(values["step"]))
