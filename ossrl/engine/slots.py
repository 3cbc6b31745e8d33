"""The engine's fast path: a slot-indexed KV pool, decode steps over all active slots, CUDA graphs.

For P prompts x n samples: the prompts are prefilled once each, packed into one forward as separate
documents (FlexAttention on CUDA), and each prompt's keys and values are written into its n slots
(with `share_prefixes`, into the first of them on the layers that are not rings);
then every active slot decodes together, one token per step, through the decode-attention kernel
and the routed-MoE kernels. A step reads and writes only device tensors (slot ids, lengths, step
counters, seeds, output buffers), so on CUDA it is captured once per bucketed batch size and
replayed; the host looks at the generated tokens only every `sync_every` steps, to retire slots
that hit a stop token or their length limit. Retired slots leave the batch at that point (their
extra steps' tokens are discarded); the remaining rows are compacted into the next smaller bucket.
Padding rows in a bucket point at a scratch slot. With `share_prefixes` the n slots of a prompt
read its KV from one slot on the layers that are not rings (ossrl.engine.kv_pool).

Same sampling rule and seeds as the CPU path (ossrl.engine.sampling), so outputs agree up to the
numerics of the kernels.

Lockstep (a model sharded over ranks, ossrl.train.sharding): every forward gathers each layer's
parameters with a collective, so all ranks must run the same number of forwards. The ranks agree
on the number of prefill forwards and, each round, on the number of decode steps (the largest any
rank needs; one small all-reduce per round); a rank with nothing left steps its scratch slot, and
a rank with no prompts at all still takes part. No CUDA graphs then (the gathers happen in the
layers' hooks, outside what a graph replays).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from ossrl.engine.kv_pool import DecodeView, KVPool, PrefillWriter
from ossrl.engine.sampling import SamplingParams, sample_tokens
from ossrl.engine.types import Completion
from ossrl.kernels.transfer import host_to_device
from ossrl.model import gptoss


# Prefills give the model their positions and documents as host tensors, so that its attention masks'
# block tables are built on the host and copied once (`ossrl.kernels.attention.AttentionMask.host`);
# False: as device tensors, the tables built by kernels on the GPU (benchmarks' --host-masks switch).
HOST_MASKS = True


def bucket_size(n: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return b


class SlotDecoder:
    def __init__(self, model, *, cuda_graphs: bool = True, sync_every: int = 8, prefill_tokens: int = 16384,
                 lockstep: bool = False, share_prefixes: bool = False, tile_experts: bool = False):
        self.model = model
        self.tile_experts = tile_experts  # rollouts read tile-contiguous copies of MXFP4 blocks (`_prepare`)
        self.share_prefixes = share_prefixes
        self.lockstep = lockstep  # step together with the other ranks (module docstring)
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda" and not lockstep
        self.sync_every = sync_every
        self.prefill_tokens = prefill_tokens  # prompts are prefilled packed, up to this many tokens per forward
        self.pool: KVPool | None = None
        self.state: dict[str, torch.Tensor] | None = None
        self.graphs: dict[int, tuple] = {}  # bucket -> (CUDAGraph, static slot ids)
        self.graph_params: tuple | None = None  # the sampling rule the graphs were captured with
        self.graph_failures: list[str] = []

    def release(self) -> None:
        """Standby: drop the KV pool, the step buffers, the captured graphs and the experts' tiled
        copies (made again, after the next pool, by `_prepare`)."""
        self.pool, self.state = None, None
        self.graphs.clear()
        self.graph_params = None
        gptoss.tile_experts(self.model, enabled=False)

    # ------------------------------------------------------------------ buffers
    def _prepare(self, slots: int, capacity: int, width: int, params: SamplingParams) -> None:
        model, device = self.model, self.model.device
        need_new = (self.pool is None or not self.pool.fits(slots + 1, capacity, model.dtype)
                    or self.state is None or self.state["tokens"].shape[1] < width)
        if need_new:
            # A new pool or buffer invalidates every captured graph, so grow in coarse steps and never
            # shrink while the pool is held: calls with slightly different prompt lengths or limits
            # (dynamic-sampling retries, evaluation) reuse it. `release()` drops it altogether.
            if self.pool is not None and self.state is not None:
                slots = max(slots, self.pool.slots - 1)
                capacity = max(capacity, self.pool.capacity)
                width = max(width, self.state["tokens"].shape[1])
            capacity, width = _round_up(capacity, 512), _round_up(width, 256)
            self.release()
            self.pool = KVPool(model.config, slots=slots + 1, capacity=capacity, device=device, dtype=model.dtype,
                               share_prefixes=self.share_prefixes)
            S = self.pool.slots
            self.state = {
                "tokens": torch.zeros(S, width, dtype=torch.long, device=device),
                "plain": torch.zeros(S, width, dtype=torch.float32, device=device),
                "sampled": torch.zeros(S, width, dtype=torch.float32, device=device),
                "current": torch.zeros(S, dtype=torch.long, device=device),
                "steps": torch.zeros(S, dtype=torch.long, device=device),
                "seeds": torch.zeros(S, dtype=torch.long, device=device),
            }
        # MXFP4 experts' tile-contiguous copies for the word decode, with the memory the pool left
        # (made, refreshed or kept; `ossrl.model.gptoss.tile_experts`); graphs key on `tiled_epoch`
        gptoss.tile_experts(model, self.tile_experts, prefill_tokens=self.prefill_tokens)
        self.pool.reset()
        for name in ("steps", "current"):
            self.state[name].zero_()
        key = self._graph_key(params)
        if self.graph_params != key:
            self.graphs.clear()  # the sampling rule and the adapters' on/off state are baked into graphs
            self.graph_params = key

    def _graph_key(self, params: SamplingParams) -> tuple:
        switch = getattr(self.model, "adapter_switch", None)
        return (_params_key(params), id(getattr(self.model, "lora_config", None)),
                switch is not None and switch.enabled,
                # graphs read the adapters' rollout copies by address: new copies, new graphs
                switch is not None and switch.rollout_dtype, switch is not None and switch.rollout_epoch,
                # and the experts' tiled copies (made or freed by any engine on this model since)
                gptoss.tiled_epoch(), _kernel_switches())

    # ------------------------------------------------------------------ one step
    def _step(self, slot_ids: torch.Tensor, params: SamplingParams) -> None:
        """One decode step for rows slot_ids (device tensor); all effects land in device buffers."""
        st, pool = self.state, self.pool
        scratch = pool.slots - 1
        positions = pool.lengths[slot_ids].long()
        pool.lengths[slot_ids] = (positions + 1).to(torch.int32)
        view = DecodeView(pool, slot_ids, positions)
        logits = self.model(st["current"][slot_ids][:, None], positions=positions[:, None], cache=view)[:, -1]
        steps = st["steps"][slot_ids]
        tokens, plain, sampled = sample_tokens(logits, params, st["seeds"][slot_ids], steps)
        col = steps.clamp(max=st["tokens"].shape[1] - 1)
        st["tokens"][slot_ids, col] = tokens
        st["plain"][slot_ids, col] = plain
        st["sampled"][slot_ids, col] = sampled
        st["current"][slot_ids] = tokens
        st["steps"][slot_ids] = steps + 1
        pool.lengths[scratch:].zero_()  # padding rows never accumulate (a slice: no host scalar copy)
        st["steps"][scratch:].zero_()

    def _runner(self, bucket: int, params: SamplingParams):
        """A callable running one step for a bucket: a replayed CUDA graph, or eager."""
        if not self.cuda_graphs:
            return None
        if bucket in self.graphs:
            return self.graphs[bucket]
        static_ids = torch.full((bucket,), self.pool.slots - 1, dtype=torch.long, device=self.model.device)
        saved = {k: v.clone() for k, v in self.state.items() if k in ("steps", "current")}
        lengths = self.pool.lengths.clone()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: compile kernels, settle allocations
                    self._step(static_ids, params)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(static_ids, params)
        except Exception as e:  # a kernel that cannot be captured: run eagerly, say where once
            frames = traceback.extract_tb(e.__traceback__)[-3:]
            where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in frames)
            self.graph_failures.append(f"bucket {bucket}: {type(e).__name__}: {e} (at {where})")
            self.cuda_graphs = False
            torch.cuda.synchronize()
            return None
        finally:  # the warm-up steps ran on the scratch slot only; undo their bookkeeping
            for k, v in saved.items():
                self.state[k].copy_(v)
            self.pool.lengths.copy_(lengths)
        self.graphs[bucket] = (graph, static_ids)
        return self.graphs[bucket]

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        model, device = self.model, self.model.device
        P = len(prompts)
        slots = P * n
        limits = [params.max_new_tokens_for(i) for i in range(P) for _ in range(n)]
        width = max(limits, default=0) + self.sync_every
        capacity = max((len(p) for p in prompts), default=1) + width
        self._prepare(slots, capacity, width, params)
        st = self.state
        base = 0 if params.seed is None else params.seed
        st["seeds"][:slots] = torch.arange(slots, device=device) + base

        packs = _pack([len(p) for p in prompts], self.prefill_tokens)
        for _ in range(self._agree(len(packs)) - len(packs)):  # lockstep: as many forwards as the busiest rank
            model.model(torch.zeros(1, 1, dtype=torch.long, device=device))
        for group in packs:  # each prompt once, KV to its n slots
            # built on the host, each copied once without waiting for the GPU (host_to_device); the
            # positions and documents go as host tensors: the model builds its masks' tables from them
            lengths = [len(prompts[i]) for i in group]
            ids = host_to_device(torch.tensor([[t for i in group for t in prompts[i]]]), device)
            positions = torch.cat([torch.arange(length) for length in lengths])[None]
            docs = torch.repeat_interleave(torch.arange(len(group)), torch.tensor(lengths))[None]
            if not HOST_MASKS:
                positions, docs = host_to_device(positions, device), host_to_device(docs, device)
            slot_groups = [torch.arange(i * n, (i + 1) * n) for i in group]
            hidden = model.model(ids, positions=positions, doc_ids=docs,
                                 cache=PrefillWriter(self.pool, lengths, slot_groups))
            last = torch.tensor(lengths).cumsum(0) - 1  # each prompt's last token: only these rows' logits
            logits = model.lm_head(hidden[0, host_to_device(last, device)].to(model.lm_head.weight.dtype))
            slot_ids = host_to_device(torch.cat(slot_groups), device)
            tokens, plain, sampled = sample_tokens(logits.repeat_interleave(n, 0), params, st["seeds"][slot_ids],
                                                   st["steps"][slot_ids])
            st["tokens"][slot_ids, 0], st["plain"][slot_ids, 0], st["sampled"][slot_ids, 0] = tokens, plain, sampled
            st["current"][slot_ids] = tokens
            st["steps"][slot_ids] = 1

        stops = set(params.stop_token_ids)
        done_at = [None] * slots  # number of tokens kept, once finished
        reasons = ["length"] * slots
        active = list(range(slots))
        checked = 0  # tokens per slot already inspected on the host
        generated = 1
        while True:
            host_tokens = st["tokens"][:slots, checked:generated].tolist()  # the one sync per round
            still = []
            for s in active:
                row = host_tokens[s]
                for offset, token in enumerate(row):
                    count = checked + offset + 1
                    if token in stops:
                        done_at[s], reasons[s] = count, "stop"
                        break
                    if count >= limits[s]:
                        done_at[s] = count
                        break
                else:
                    still.append(s)
            active, checked = still, generated
            rounds = min(self.sync_every, max((limits[s] - checked for s in active), default=0))
            rounds = self._agree(rounds)  # lockstep: the most any rank needs (its extra tokens are dropped)
            if rounds == 0:
                break
            bucket = bucket_size(max(len(active), 1))  # a finished rank in lockstep steps its scratch slot
            ids = torch.full((bucket,), self.pool.slots - 1, dtype=torch.long)
            ids[: len(active)] = torch.tensor(active, dtype=torch.long)
            ids = host_to_device(ids, device)
            runner = self._runner(bucket, params)
            if runner is not None:
                graph, static_ids = runner
                static_ids.copy_(ids)
            for _ in range(rounds):
                if runner is not None:
                    graph.replay()
                else:
                    self._step(ids, params)
            generated += rounds

        tokens = st["tokens"][:slots].tolist()
        plain = st["plain"][:slots].tolist()
        sampled = st["sampled"][:slots].tolist()
        out = []
        for i in range(P):
            group = []
            for j in range(n):
                s = i * n + j
                k = done_at[s]
                group.append(Completion(tokens[s][:k], plain[s][:k], sampled[s][:k], reasons[s]))
            out.append(group)
        return out

    def _agree(self, value: int) -> int:
        """The largest `value` over the ranks in lockstep (one all-reduce), else `value`."""
        if not self.lockstep:
            return value
        on_gpu = dist.get_backend() == "nccl"
        t = torch.tensor([value], dtype=torch.long, device=self.model.device if on_gpu else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def _pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive prompt indices grouped so that each group's total length stays within `budget`
    (a longer prompt gets a group of its own)."""
    groups: list[list[int]] = []
    total = 0
    for i, length in enumerate(lengths):
        if groups and total + length <= budget:
            groups[-1].append(i)
            total += length
        else:
            groups.append([i])
            total = length
    return groups


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _kernel_switches() -> tuple:
    """The module switches a captured decode step bakes in (benchmarks flip them between calls),
    read from their modules where loaded (a switch is only set on an imported module)."""
    values = [gptoss.DEFER_RESIDUAL_ADD, gptoss.ROTARY_APPEND]
    for name, attribute in (("ossrl.kernels.moe_gemv", "GEMV"), ("ossrl.kernels.moe_triton", "SPLIT_K_FIXUP"),
                            ("ossrl.kernels.moe_triton", "COMBINE_PARTS"), ("ossrl.kernels.fused", "ROUTER_GROUPS"),
                            ("ossrl.kernels.decode_attention", "ONE_SPLIT_MAX_CAPACITY")):
        module = sys.modules.get(name)
        values.append(getattr(module, attribute, None) if module is not None else None)
    return tuple(values)


def _params_key(params: SamplingParams) -> tuple:
    return (params.temperature, params.top_p, params.top_k, params.min_p)
