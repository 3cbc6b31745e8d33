"""A training step's forward and backward replayed from CUDA graphs: `CapturedLogprobs`.

A LoRA step of gpt-oss-20b queues about 5,000 kernels from Python. Below 8K tokens the host takes
longer to queue them than the GPU takes to run them (docs/benchmarks.md, "Training step": at 1K
tokens a replayed step took 0.098 s against 0.226 s eager on an H200). `CapturedLogprobs(model)` is
called like `sequence_logprobs(model, batch, ...)` and returns the same log-probs (and entropies),
differentiable; the loss between them and the backward stay the caller's, run eagerly (they are
small). The one thing to know: **gradients land in `.grad` buffers this object owns**, so the
training loop clears them with `captured.zero_grad()` instead of `optimizer.zero_grad()` (which
would set them to None, and the graphs would go on writing the old buffers).

Per batch shape (rows, length rounded up to a multiple of 1,024 with a padding document, targets
rounded up to a capacity: a bucket) it keeps fixed device buffers for the inputs (token ids,
positions, documents, branches, and the targets' index padded to the capacity with position 0,
whose incoming gradient is always zero), a forward graph (the model from those buffers, its
attention masks' block tables built on the device inside the graph, then the targets' log-probs)
and a backward graph (from fixed buffers of incoming gradients, the LoRA gradients added into the
`.grad` buffers in one launch). With `attention.VARLEN_ATTENTION`, a layout that FlashAttention's
varlen kernels serve also keeps its segments in fixed buffers (`SegmentBuffers`: their counts and
longest runs rounded up, a part of the bucket's key). A shape is captured the second time
it comes (a one-off shape runs eagerly and costs nothing extra), after a warm-up on the fixed
buffers that compiles and autotunes what the capture will need. Every graph draws on one memory
pool, so a bucket's forward and backward must be replayed as a pair with no other captured
forward in between, which is what a training loop does (an out-of-order backward is refused).

The graphs read every weight by address: while buckets exist, the kept bf16 expert copies are
frozen (`GptOssModel.dense_copies_frozen`: "auto" checkpointing neither frees nor makes them), and
weights that moved (new storage) drop every bucket at the next `zero_grad`.

What is not captured (the eager `sequence_logprobs` runs instead; `unsupported` says why): a model
off CUDA, full fine-tuning, disabled adapters, LoRA dropout (its random masks), an embedding table
offloaded to the host, a sharded (FSDP) model, a step with layers checkpointed, batches over
`max_tokens`, and no-grad calls (reference log-probs). Without `graphs` (the CPU tests), the same
buffers, buckets and gradient path run eagerly: the bookkeeping is tested everywhere, the capture
on a GPU (tests/test_train_gpu.py).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ossrl.kernels import attention
from ossrl.kernels.varlen_attention import SegmentBuffers, document_segments, varlen_serves
from ossrl.model.expert_copies import dense_copy_addresses, mxfp4_experts
from ossrl.model.gptoss import weight_storage
from ossrl.train.logprobs import DEFAULT_CHUNK, PackedBatch, check_token_range, packed_logprobs, sequence_logprobs

MIN_CAPACITY = 256
CAPTURE_HINT = (" (if torch warned that an AccumulateGrad node's stream does not match: an earlier step's "
                "autograd graph, e.g. its loss, was still alive at the capture; drop it before the next forward)")


class NotCapturable(RuntimeError):
    """A shape this model cannot replay (found at its warm-up)."""


# Rows are padded to a multiple of this many tokens before keying a bucket, so that GRPO's and SFT's
# micro-batches (whose packed lengths vary step to step) come back to a few shapes. The padding is a
# document of its own (no target, seen by no other token): at most 1,023 tokens of extra work a row,
# which a step short enough to be host-bound does not notice.
ROW_MULTIPLE = 1024


def target_capacity(n: int, limit: int) -> int:
    """The targets' buffer size for n targets: the next of 256, 384, 512, 768, 1,024, ... (at most a
    third more rows through the lm_head than needed, and few distinct shapes), capped at `limit`
    (every position of the batch)."""
    size = MIN_CAPACITY
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size // 3 * 4
    return max(min(size, limit), n)


def pad_columns(batch: PackedBatch, length: int) -> PackedBatch:
    """The batch with each row extended to `length` tokens by a padding document of its own (token
    0, positions from 0, no targets); the targets and their order are unchanged."""
    R, T = batch.input_ids.shape
    extra = length - T
    if extra <= 0:
        return batch

    def widened(t: torch.Tensor, value: int) -> torch.Tensor:  # (made where t is: no copy to wait for)
        return torch.cat((t, torch.full((R, extra), value, device=t.device, dtype=t.dtype)), 1)

    index = batch.target_index()
    doc_ids = batch.doc_ids if batch.doc_ids is not None else torch.zeros_like(batch.positions)
    positions = torch.cat((batch.positions, torch.arange(extra, device=batch.positions.device).expand(R, extra)), 1)
    return PackedBatch(
        widened(batch.input_ids, 0), positions,
        torch.cat((doc_ids, (doc_ids.amax(1, keepdim=True) + 1).expand(R, extra)), 1),
        widened(batch.target_mask, False), widened(batch.sequence_index, -1), batch.num_sequences,
        None if batch.branch_ids is None else widened(batch.branch_ids, 0), index // T * length + index % T,
        batch.token_range)


@dataclass(eq=False)
class _Bucket:
    """One batch shape's fixed buffers and graphs."""

    key: tuple
    ids: torch.Tensor  # [R, T] int64
    positions: torch.Tensor  # [R, T]
    doc_ids: torch.Tensor  # [R, T]
    branch_ids: torch.Tensor | None  # [R, T]
    index: torch.Tensor  # [C] flat target positions, padded with 0
    segments: SegmentBuffers | None  # the layout's varlen segments (attention.VARLEN_ATTENTION), or None
    forward_fn: Callable | None = None  # the model on these buffers: (log-probs [C], entropies [C] or [0])
    outputs: tuple = ()  # the forward's outputs, detached (the graph's own buffers when captured)
    grad_outputs: tuple = ()  # fixed incoming gradients, one per differentiable output (the first ones)
    forward_graph: torch.cuda.CUDAGraph | None = None
    backward_graph: torch.cuda.CUDAGraph | None = None
    copies: tuple = ()  # where the kept expert copies were at the capture (`dense_copy_addresses`)
    pending: list = field(default_factory=list)  # without graphs: the forward's outputs, for its backward


class CapturedLogprobs:
    """`sequence_logprobs` for training batches, replayed from CUDA graphs (the module docstring).

    `graphs=None`: graphs on a CUDA model; False: the same buffers and gradient path, run eagerly.
    `max_buckets`: shapes kept at most (each holds its inputs' buffers; the activations share
    the pool); a new shape past it runs eagerly. `max_tokens`: larger batches (rows x padded
    length) run eagerly: there the GPU, not the host, sets the pace, and the pool's memory would
    only make "auto" checkpoint the other shapes (H100, 20b: a step replayed saves 33% at 1K tokens,
    7% at 4K, 2% at 8K; GRPO's 8.5K-token micro-batches lost 26%, docs/benchmarks.md). `warmup`:
    eager runs on a new bucket's buffers before its capture."""

    def __init__(self, model, *, graphs: bool | None = None, max_buckets: int = 8, max_tokens: int = 4096,
                 warmup: int = 2):
        self.model = model
        self.graphs = model.lm_head.weight.is_cuda if graphs is None else graphs
        if self.graphs and not torch.cuda.is_available():
            raise ValueError("CapturedLogprobs(graphs=True) needs CUDA")
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be at least 1, got {max_buckets}")
        if warmup < 1:  # (the capture would compile and autotune, and take another shape's plan)
            raise ValueError(f"warmup must be at least 1, got {warmup}")
        self.max_buckets, self.max_tokens, self.warmup = max_buckets, max_tokens, warmup
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._experts = mxfp4_experts(model)  # (those that may keep bf16 copies, which the graphs read)
        self._grads: list[torch.Tensor] | None = None
        self._buckets: dict[tuple, _Bucket] = {}
        self._seen: dict[tuple, int] = {}
        self._refused: dict[tuple, str] = {}  # shapes whose capture failed, and why
        self._pool = None
        self._weights = None  # where the weights were when the buckets were captured (`weight_storage`)
        self._anchor = torch.zeros((), requires_grad=True)  # gives the replayed outputs a backward
        self._generation = 0  # captured forwards so far; a backward must belong to the last one
        self.eager_calls = self.replayed_calls = self.captures = 0

    # -- gradients ---------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Zeroes the parameters' gradients in the buffers the graphs write (made on first use). A
        training pass starts with it: graphs the model can no longer replay (e.g. every layer
        checkpointed after running out of memory, or weights that moved since the capture: the
        graphs read them by address) are dropped here, and their memory with them."""
        if self._buckets and (self.unsupported() or weight_storage(self.model) != self._weights):
            self.release()  # (weights that moved: the rollout engine lays q, k and v out again after a move)
        if self._grads is None:
            self._grads = [torch.zeros_like(p) for p in self.params]
        else:
            torch._foreach_zero_(self._grads)
        for p, g in zip(self.params, self._grads):
            p.grad = g

    def _check_grads(self) -> None:
        if self._grads is None or any(p.grad is not g for p, g in zip(self.params, self._grads)):
            raise RuntimeError("CapturedLogprobs: the parameters' gradients were replaced; clear them with "
                               "captured.zero_grad(), not optimizer.zero_grad() or model.zero_grad()")

    # -- support -----------------------------------------------------------------------------
    def unsupported(self) -> str | None:
        """Why this model's training step cannot be replayed now (None: it can)."""
        model, inner = self.model, self.model.model
        if self.graphs and not model.lm_head.weight.is_cuda:
            return "the model is not on CUDA"
        if getattr(model, "sharded", False):
            return "a sharded (FSDP) model gathers its weights inside the step"
        if getattr(model, "lora_config", None) is None:
            return "no LoRA adapters (full fine-tuning would hold a second copy of every gradient)"
        if not model.adapter_switch.enabled:
            return "the adapters are disabled (nothing to train)"
        if model.lora_config.dropout > 0:
            return "LoRA dropout draws random masks each step"
        if inner.embed_tokens.weight.device != model.lm_head.weight.device:
            return "the embedding table is offloaded to the host"
        if inner.gradient_checkpointing is True:
            return "every layer is checkpointed"
        return None

    # -- the call ----------------------------------------------------------------------------
    def __call__(self, batch: PackedBatch, *, temperature: float = 1.0, chunk: int = DEFAULT_CHUNK,
                 with_entropy: bool = False, entropy_grad: bool = True):
        """As `sequence_logprobs(self.model, batch, ...)`; `batch` as `PackedBatch.to` moves it."""
        R, T = batch.input_ids.shape
        length = -(-T // ROW_MULTIPLE) * ROW_MULTIPLE
        if not torch.is_grad_enabled() or batch.token_range is None or R * length > self.max_tokens or \
                self.unsupported() is not None:
            self.eager_calls += 1
            return sequence_logprobs(self.model, batch, temperature=temperature, chunk=chunk,
                                     with_entropy=with_entropy, entropy_grad=entropy_grad)
        check_token_range(self.model, batch.token_range)
        self._check_grads()
        original = batch
        batch = pad_columns(batch, length)
        index = batch.target_index()
        R, T = batch.input_ids.shape
        n = index.numel()
        segments = self._segments(batch)
        key = (R, T, target_capacity(n, R * T), batch.branch_ids is not None, float(temperature), int(chunk),
               with_entropy, with_entropy and entropy_grad, self.model.training,
               None if segments is None else segments.capacity(T))  # (what the forward reads)
        bucket = self._buckets.get(key)
        if bucket is not None and bucket.copies != dense_copy_addresses(self._experts):
            # The graphs read the kept expert copies by address, and they were remade since (frozen
            # while buckets exist, so by someone else: `dense_experts`): this bucket is captured again
            del self._buckets[key]
            bucket = None
        if bucket is None:
            self._seen[key] = seen = self._seen.get(key, 0) + 1
            if seen >= 2 and key not in self._refused and len(self._buckets) < self.max_buckets:
                bucket = self._new_bucket(key, batch, index, segments)
            if bucket is None:  # (eagerly, unpadded)
                self.eager_calls += 1
                return sequence_logprobs(self.model, original, temperature=temperature, chunk=chunk,
                                         with_entropy=with_entropy, entropy_grad=entropy_grad)
        else:
            self._fill(bucket, batch, index, segments)
        self.replayed_calls += 1
        logprobs, entropy = _Replay.apply(self, bucket, n, self._anchor)
        return logprobs, (entropy if with_entropy else None)

    @property
    def bucket_count(self) -> int:
        """Shapes kept (captured, or with graphs off, bucketed)."""
        return len(self._buckets)

    @property
    def refused(self) -> dict[tuple, str]:
        """Shapes whose capture failed (they run eagerly), with the reason."""
        return dict(self._refused)

    def release(self) -> None:
        """Drops every graph and buffer and frees their memory; the kept expert copies may be refitted
        again."""
        self._buckets.clear()
        self._seen.clear()
        self._pool = None
        self.model.model.dense_copies_frozen = False
        if self.graphs:
            gc.collect()
            torch.cuda.empty_cache()  # (else "auto" checkpointing does not see the pool's memory as free)

    # -- buckets -----------------------------------------------------------------------------
    def _segments(self, batch: PackedBatch):
        """The padded batch's FlashAttention varlen segments (host), where attention runs on them
        (`attention.VARLEN_ATTENTION`, `varlen_serves` this model) and the layout has them; else None
        (FlexAttention in the graph)."""
        if not attention.VARLEN_ATTENTION or batch.positions.device.type != "cpu" or not varlen_serves(
                self.model.lm_head.weight.device, self.model.lm_head.weight.dtype, self.model.config.head_dim):
            return None
        return document_segments(batch.positions, batch.doc_ids, batch.branch_ids)

    def _fill(self, bucket: _Bucket, batch: PackedBatch, index: torch.Tensor, segments) -> None:
        """Copies the batch (and its varlen segments) into the bucket's buffers without waiting for
        the device (host tensors through pinned memory)."""
        if bucket.segments is not None:
            bucket.segments.fill(segments)
        bucket.ids.copy_(batch.input_ids, non_blocking=True)
        for buffer, t in ((bucket.positions, batch.positions), (bucket.doc_ids, batch.doc_ids),
                          (bucket.branch_ids, batch.branch_ids)):
            if buffer is not None:
                buffer.copy_(t.pin_memory() if t.device.type == "cpu" and buffer.is_cuda else t, non_blocking=True)
        n = index.numel()
        bucket.index[:n].copy_(index, non_blocking=True)
        bucket.index[n:].zero_()

    def _new_bucket(self, key: tuple, batch: PackedBatch, index: torch.Tensor, segments) -> _Bucket | None:
        R, T, capacity, branches, temperature, chunk, with_entropy, entropy_grad, _, segment_capacity = key
        device = self.model.lm_head.weight.device

        def buffer(dtype=torch.long):
            return torch.zeros(R, T, dtype=dtype, device=device)

        bucket = _Bucket(key, buffer(), buffer(), buffer(), buffer() if branches else None,
                         torch.zeros(capacity, dtype=torch.long, device=device),
                         None if segment_capacity is None else SegmentBuffers(segment_capacity, device))
        self._fill(bucket, batch, index, segments)

        def forward():
            # (the buffers hold ids checked against the vocabulary on the host as they were filled)
            logprobs, entropy = packed_logprobs(
                self.model, bucket.ids, bucket.positions, bucket.doc_ids, bucket.branch_ids, bucket.index,
                temperature=temperature, chunk=chunk, with_entropy=with_entropy, entropy_grad=entropy_grad,
                target_range=(0, self.model.config.vocab_size - 1),
                segments=None if bucket.segments is None else bucket.segments.segments)
            return logprobs, (entropy if entropy is not None else logprobs.new_zeros(0))

        bucket.forward_fn = forward
        bucket.grad_outputs = (torch.zeros(capacity, device=device),) + \
            ((torch.zeros(capacity, device=device),) if entropy_grad else ())
        if not self.graphs:
            bucket.copies = dense_copy_addresses(self._experts)
        else:
            try:
                self._capture(bucket)
            except NotCapturable as e:
                self._refused[key] = str(e)
            except Exception as e:  # noqa: BLE001 - any failure: this shape runs eagerly from now on
                self._refused[key] = f"{type(e).__name__}: {e}".strip() + CAPTURE_HINT
            if key in self._refused:
                # (out of the handler, whose traceback would keep the capture's tensors alive)
                bucket.forward_graph = bucket.backward_graph = None
                del bucket
                torch.cuda.synchronize()
                if not self._buckets:
                    self._pool = None
                gc.collect()
                torch.cuda.empty_cache()  # (what the failed capture's pool held)
                return None
        if not self._buckets:
            self._weights = weight_storage(self.model)
        self.model.model.dense_copies_frozen = True  # (the graphs read the copies by address)
        self._buckets[key] = bucket
        self.captures += 1
        return bucket

    def _grads_of(self, outputs: tuple, grad_outputs: tuple) -> list:
        """The parameters' gradients (None where unused) from the differentiable outputs."""
        return list(torch.autograd.grad(outputs[:len(grad_outputs)], self.params, grad_outputs, allow_unused=True))

    def _add_grads(self, grads: list) -> None:
        used = [(g, new) for g, new in zip(self._grads, grads) if new is not None]
        if used:
            torch._foreach_add_([g for g, _ in used], [new for _, new in used])

    def _capture(self, bucket: _Bucket) -> None:
        """Warm-up on a side stream (compiles, autotunes, decides checkpointing), then the forward
        and the backward captured into the shared pool."""
        inner = self.model.model
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                outputs = bucket.forward_fn()
                self._grads_of(outputs, bucket.grad_outputs)  # (returned, not added: .grad stays)
                del outputs
        torch.cuda.current_stream().wait_stream(side)
        if inner.gradient_checkpointing and inner.checkpointed_layers:
            raise NotCapturable(f"{inner.checkpointed_layers} layers are checkpointed at this size (not captured)")
        bucket.copies = dense_copy_addresses(self._experts)  # (after the warm-up, which may have refitted them)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        bucket.forward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(bucket.forward_graph, pool=self._pool):
            outputs = bucket.forward_fn()
        bucket.backward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(bucket.backward_graph, pool=self._pool):
            self._add_grads(self._grads_of(outputs, bucket.grad_outputs))
        bucket.outputs = tuple(o.detach() for o in outputs)

    def _forward(self, bucket: _Bucket) -> int:
        self._generation += 1
        if bucket.forward_graph is not None:
            bucket.forward_graph.replay()
        else:
            with torch.enable_grad():  # (a Function's forward runs with autograd off)
                outputs = bucket.forward_fn()
            bucket.pending = [outputs]
            bucket.outputs = tuple(o.detach() for o in outputs)
        return self._generation

    def _backward(self, bucket: _Bucket, generation: int) -> None:
        if generation != self._generation:
            raise RuntimeError("CapturedLogprobs: a replayed forward's backward must run before the next "
                               "replayed forward (they share the graphs' memory)")
        self._check_grads()
        if bucket.backward_graph is not None:
            bucket.backward_graph.replay()
        else:
            outputs = bucket.pending.pop()
            self._add_grads(self._grads_of(outputs, bucket.grad_outputs))


class _Replay(torch.autograd.Function):
    """The bucket's forward replayed (its outputs cut to the batch's targets and copied out of the
    graph's buffers); the backward copies the incoming gradients into the fixed buffers (zero past
    the targets) and replays the backward graph, which adds into the `.grad` buffers itself."""

    @staticmethod
    def forward(ctx, captured, bucket, n, anchor):
        ctx.captured, ctx.bucket, ctx.n = captured, bucket, n
        ctx.generation = captured._forward(bucket)
        logprobs = bucket.outputs[0][:n].clone()
        entropy = bucket.outputs[1][:n].clone()
        if len(bucket.grad_outputs) < 2:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        bucket, n = ctx.bucket, ctx.n
        for buffer, g in zip(bucket.grad_outputs, (grad_logprobs, grad_entropy)):
            buffer.zero_()
            if g is not None:
                buffer[:n].copy_(g)
        ctx.captured._backward(bucket, ctx.generation)
        return None, None, None, None
