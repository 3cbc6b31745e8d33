"""Log-probs and entropies of chosen tokens without materialising [tokens x vocab] logits.

`token_logprobs(hidden, lm_head_weight, targets)` runs the unembedding and log-softmax in chunks
of rows, keeping only per-token scalars; its backward recomputes each chunk's logits and returns
the gradient for the hidden states (and for the weight when it requires grad). Peak extra memory
is one chunk of logits, [chunk x vocab] in fp32, instead of [tokens x vocab].

`sequence_logprobs(model, batch)` applies it to a `PackedBatch` (several sequences per row,
document masks, positions restarting per sequence): the log-prob (and entropy) of each target token
given everything before it in its own sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ossrl.kernels.transfer import host_to_device

DEFAULT_CHUNK = 256  # [256 x 201,088] fp32 is 206 MB; at 1024 rows the chunk's buffers took ~3.5 GiB

# On CUDA with Triton, each chunk's softmax statistics and gradient by `ossrl.kernels.log_softmax`
# (one pass over the logits forward, one read and write backward, against about a dozen fp32
# passes here). On since session 11: its GPU test passed (bf16 and fp16 at the 20b vocabulary) and
# the GRPO step's training phase went 5.37 -> 4.95 s on an H100 (benchmarks/results/grpo_step*.json).
FUSED_LOG_SOFTMAX = True


def _fused_log_softmax(hidden: torch.Tensor):
    """`ossrl.kernels.log_softmax` where it serves these logits (FUSED_LOG_SOFTMAX, CUDA, Triton,
    bf16 or fp16: the dtypes its GPU test covers; fp32 models keep PyTorch's ops)."""
    if not FUSED_LOG_SOFTMAX or not hidden.is_cuda or hidden.dtype not in (torch.bfloat16, torch.float16):
        return None
    from ossrl.kernels.moe import triton_available

    if not triton_available():
        return None
    from ossrl.kernels import log_softmax

    return log_softmax


def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(h @ weight.T / temperature) in fp32, in place after the fp32 copy."""
    z = (h @ weight.T).float()
    if temperature != 1.0:
        z.div_(temperature)
    return torch.log_softmax(z, dim=-1)


# Where only the hidden states need a gradient (the lm_head frozen: LoRA training), each chunk's
# gradient of log p(target) with respect to its hidden rows is computed in the forward, from the
# logits it has anyway: a log-prob is a scalar of its own row, so d loss / d h_t = g_t * d logp_t /
# d h_t, and the backward only scales rows by the incoming g_t. That is two [chunk x vocab] matmuls
# a chunk (logits, then (onehot - p) @ W) against three with a recomputing backward (logits, logits
# again, g @ W); the saved [N, H] rows replace the hidden states. On since session 19 (H100, 20b
# shapes, steps timed in turn in one process, benchmarks/results/train_interleaved_s19_h100.json):
# a 4K step 0.2670 -> 0.2602 s, an 8K step 0.5400 -> 0.5225 s; its GPU test at the 20b vocabulary
# passed.
EAGER_GRADIENT = True


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, with_entropy, entropy_grad, eager, checked):
        n = hidden.shape[0]
        logprobs = torch.empty(n, device=hidden.device, dtype=torch.float32)
        entropy = torch.empty(n if with_entropy else 0, device=hidden.device, dtype=torch.float32)
        fused = _fused_log_softmax(hidden)
        # per row: the max of the logits / t and the log of the shifted sum (the fused backward's input)
        stats = torch.empty(2, n if fused else 0, device=hidden.device, dtype=torch.float32)
        # eager: d log p(target) / d hidden per row, filled chunk by chunk below (with the fused
        # kernels, from a gradient of 1 a row)
        dlogp = torch.empty_like(hidden) if eager else None
        ones = torch.ones(min(chunk, n), device=hidden.device, dtype=torch.float32) if eager and fused else None
        # (the kernel reads what it is given: one host sync for the range, unless the caller
        # checked it on the host (`checked`: a packed batch's targets, see PackedBatch.to), or while a
        # CUDA graph is captured, where a sync is an error: a captured step ran uncaptured first)
        if fused and n and not checked and not (hidden.is_cuda and torch.cuda.is_current_stream_capturing()):
            low, high = torch.stack(torch.aminmax(targets)).tolist()
            if low < 0 or high >= weight.shape[0]:
                raise ValueError(f"targets must lie in [0, {weight.shape[0]}), got {low}..{high}")
        for s in range(0, n, chunk):
            t_s = targets[s:s + chunk]
            if fused:  # one pass over the chunk's logits, in the model's dtype
                z = hidden[s:s + chunk] @ weight.T
                logprobs[s:s + chunk], ent, stats[0, s:s + chunk], stats[1, s:s + chunk] = fused.row_stats(
                    z, t_s, temperature, with_entropy)
                if with_entropy:
                    entropy[s:s + chunk] = ent
                if eager:  # the logits overwritten by d logp / d z
                    dlogp[s:s + chunk] = fused.softmax_grad_(z, t_s, stats[0, s:s + chunk], stats[1, s:s + chunk],
                                                             None, ones[:z.shape[0]], None, temperature) @ weight
                continue
            logp = _chunk_logprobs(hidden[s:s + chunk], weight, temperature)  # [c, V] fp32
            logprobs[s:s + chunk] = logp.gather(1, t_s[:, None]).squeeze(1)
            if with_entropy:
                entropy[s:s + chunk] = -(logp.exp() * logp).sum(-1)
            if eager:  # d logp[y] / d z = (onehot(y) - p) / t
                g = logp.exp_().neg_()
                g.scatter_add_(1, t_s[:, None], torch.ones_like(g[:, :1]))
                dlogp[s:s + chunk] = g.div_(temperature).to(hidden.dtype) @ weight
            del logp
        # (the entropy saved as a copy: a caller may change the returned one in place). Eager: the
        # hidden states are kept only for an entropy that may be differentiated (its term is then
        # recomputed in the backward); GRPO's, logged only, is returned without a gradient.
        entropy_grad = with_entropy and entropy_grad
        keep_hidden = not eager or entropy_grad
        ctx.save_for_backward(hidden if keep_hidden else None, weight if keep_hidden else None, targets, stats,
                              entropy.clone() if fused and entropy_grad else None, dlogp)
        if with_entropy and not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        # An output nobody differentiates (GRPO logs the entropy, detached) gets None, not zeros:
        # its term of the backward is skipped instead of computed times zero.
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable  # (the fused path overwrites the logits it differentiates)
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, stats, entropy, dlogp = ctx.saved_tensors
        if not (ctx.with_entropy and grad_entropy is not None and grad_entropy.numel()):
            grad_entropy = None
        if dlogp is not None:  # eager: the log-probs' term is a per-row scale of what the forward kept
            # (computed in fp32, rounded once into the output: no fp32 [N, H] buffer)
            grad_h = torch.mul(dlogp, grad_logprobs[:, None], out=torch.empty_like(dlogp)) \
                if grad_logprobs is not None else torch.zeros_like(dlogp)
            if grad_entropy is not None:  # the entropy's term, recomputed
                grad_h += _ChunkedLogprobs._recomputed(ctx, hidden, weight, targets, stats, entropy, None,
                                                       grad_entropy, True, False)[0]
            return grad_h, None, None, None, None, None, None, None, None
        grad_h, grad_w = _ChunkedLogprobs._recomputed(ctx, hidden, weight, targets, stats, entropy, grad_logprobs,
                                                      grad_entropy, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None, None, None, None, \
            None

    @staticmethod
    def _recomputed(ctx, hidden, weight, targets, stats, entropy, grad_logprobs, grad_entropy, need_h, need_w):
        """(grad hidden, grad weight in fp32) from each chunk's logits computed again."""
        t, chunk = ctx.temperature, ctx.chunk
        if grad_logprobs is None:
            grad_logprobs = torch.zeros(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        fused = _fused_log_softmax(hidden) if stats.numel() else None  # (as the forward ran)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            if fused:
                g = fused.softmax_grad_(h @ weight.T, targets[s:s + chunk], stats[0, s:s + chunk],
                                        stats[1, s:s + chunk], None if grad_entropy is None else entropy[s:s + chunk],
                                        grad_logprobs[s:s + chunk],
                                        None if grad_entropy is None else grad_entropy[s:s + chunk], t)
                if need_h:
                    grad_h[s:s + chunk] = g @ weight
                if need_w:
                    grad_w += (g.T @ h).float()
                continue
            logp = _chunk_logprobs(h, weight, t)
            g = logp.exp()  # p; two [c, V] fp32 buffers at most (in-place below)
            if grad_entropy is not None:
                # H = -sum p log p;  dH/dz_j = -p_j (log p_j + H)
                ent = -(g * logp).sum(-1, keepdim=True)
                logp.add_(ent).mul_(g).mul_(grad_entropy[s:s + chunk, None])  # now grad_entropy * p (logp + H)
                g.mul_(-grad_logprobs[s:s + chunk, None]).sub_(logp)
            else:
                g.mul_(-grad_logprobs[s:s + chunk, None])
            del logp
            # d logp[y] / d z = onehot(y) - p
            g.scatter_add_(1, targets[s:s + chunk, None], grad_logprobs[s:s + chunk, None])
            g = g.div_(t).to(hidden.dtype)  # through z = logits / t
            if need_h:
                grad_h[s:s + chunk] = g @ weight
            if need_w:
                grad_w += (g.T @ h).float()
        return grad_h, grad_w


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, chunk: int = DEFAULT_CHUNK, with_entropy: bool = False,
                   entropy_grad: bool = True,
                   target_range: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [N, H], weight [V, H], targets [N] -> (log p(target) [N] fp32, entropy [N] fp32 or None).
    entropy_grad=False: the entropy is returned without a gradient (for logging; nothing is kept
    for its backward). target_range: the targets' (min, max) where the caller knows them on the
    host: checked here, so the device's values need not be read back."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if target_range is not None and (target_range[0] < 0 or target_range[1] >= weight.shape[0]):
        raise ValueError(f"targets must lie in [0, {weight.shape[0]}), got {target_range[0]}..{target_range[1]}")
    # eager (EAGER_GRADIENT): only the hidden states will want a gradient (decided here: the
    # Function's forward runs with autograd off)
    eager = EAGER_GRADIENT and torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
    logprobs, entropy = _ChunkedLogprobs.apply(hidden, weight, targets, float(temperature), int(chunk), with_entropy,
                                               entropy_grad, eager, target_range is not None)
    return logprobs, (entropy if with_entropy else None)


@dataclass
class PackedBatch:
    """Sequences packed into rows: every tensor is [rows, T].

    `target_mask[r, t]` is True where token t+1 is a trained token (e.g. a completion token): the
    log-prob at t is of input_ids[r, t+1] given the sequence up to t. `sequence_index` maps each
    target position to the sequence it belongs to (-1 elsewhere). `branch_ids` (optional): where
    sequences share an untrained prefix it is stored once (branch 0) and each sequence continues
    as its own branch (see `pack_sequences`).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor
    target_mask: torch.Tensor
    sequence_index: torch.Tensor
    num_sequences: int
    branch_ids: torch.Tensor | None = None
    # [N] int64, where `to` computed it on the host: `target_index()`
    target_rows: torch.Tensor | None = None
    # (min, max) of input_ids, where `to` read them on the host (None: unknown)
    token_range: tuple[int, int] | None = None

    def to(self, device) -> PackedBatch:
        """The batch for a model on `device`. Positions, documents and branches stay where they are
        (the host, as packed): the model copies them over itself and builds its attention masks'
        block tables from the host copies (`GptOssModel.forward`), with no kernel launches. (A
        model sharded with FSDP gets them moved to the device by its root module first, and builds
        its tables there.) The tensors the device needs are copied without waiting (a copy from
        pageable memory would wait for every kernel queued before it: in SFT's loop, the previous
        micro-batch's backward). The target positions' index is computed here, on the host, and
        copied too: gathering the targets on the device then waits for nothing (a boolean
        mask would: its count is read back first). So is the token ids' range, which
        `sequence_logprobs` checks before the forward (an id past the vocabulary would otherwise
        fail inside the embedding, on a GPU as a device-side assert)."""
        rows = self.target_index() if self.target_mask.device.type == "cpu" else self.target_rows
        bounds = self.token_range
        if bounds is None and self.input_ids.device.type == "cpu" and self.input_ids.numel():
            bounds = (int(self.input_ids.min()), int(self.input_ids.max()))
        return PackedBatch(host_to_device(self.input_ids, device), self.positions, self.doc_ids,
                           host_to_device(self.target_mask, device), host_to_device(self.sequence_index, device),
                           self.num_sequences, self.branch_ids, None if rows is None else host_to_device(rows, device),
                           bounds)

    def target_index(self) -> torch.Tensor:
        """Flat indices r * T + t of the target positions, row-major (the order of every per-target
        result). A target in a row's last column (it would predict past the row) is not one."""
        if self.target_rows is not None:
            return self.target_rows
        mask = self.target_mask.clone()
        mask[:, -1] = False
        return mask.flatten().nonzero().squeeze(1)

    def per_target(self, values: torch.Tensor) -> torch.Tensor:
        """values [rows, T, ...] -> [N, ...] at the target positions, in `target_index` order."""
        return values.reshape(-1, *values.shape[2:])[self.target_index()]


def pack_sequences(sequences: list[list[int]], trained: list[list[bool]], *, max_tokens: int,
                   pad_id: int = 0, pad_to: int = 1, share_prefixes: bool = False,
                   min_shared: int = 16) -> PackedBatch:
    """First-fit packing of whole sequences into rows of at most max_tokens.

    `pad_to` rounds the row length up to a multiple (at most to max_tokens), so that successive
    batches share a few shapes (compiled FlexAttention specialises on the length).

    `trained[i][j]` says whether token j of sequence i is trained (its log-prob is wanted); token 0
    can never be (nothing predicts it). Rows are right-padded with a separate padding document.

    `share_prefixes`: consecutive sequences that start with the same untrained tokens (GRPO's
    completions of one prompt) are packed as one document: the common prefix once (branch 0), then
    each sequence's remainder as its own branch, which sees the prefix and itself. The prefix's
    last token is repeated at the start of every branch, so each branch's first target is still
    predicted from the row before it. Log-probs equal those of separate packing; a group of k
    sequences with an L-token shared prefix trains (k - 1) * (L - 1) fewer tokens.
    """
    if len(sequences) != len(trained):
        raise ValueError("sequences and trained have different lengths")
    if share_prefixes and min_shared < 1:
        raise ValueError(f"min_shared must be at least 1, got {min_shared}")
    for i, seq in enumerate(sequences):
        if len(seq) != len(trained[i]):
            raise ValueError(f"sequence {i}: {len(seq)} tokens but {len(trained[i])} trained flags")
        if len(seq) > max_tokens:
            raise ValueError(f"sequence {i} has {len(seq)} tokens, more than max_tokens={max_tokens}")
    units = _prefix_groups(sequences, trained, max_tokens, min_shared) if share_prefixes else \
        [(0, [i]) for i in range(len(sequences))]
    rows: list[list[tuple[int, list[int]]]] = []
    room: list[int] = []
    for unit in units:
        size = _unit_tokens(unit, sequences)
        for r, free in enumerate(room):
            if free >= size:
                rows[r].append(unit)
                room[r] -= size
                break
        else:
            rows.append([unit])
            room.append(max_tokens - size)
    T = max(max_tokens - min(room), 1) if rows else 1
    T = max(T, min(-(-T // pad_to) * pad_to, max_tokens))
    R = max(len(rows), 1)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    positions = torch.zeros((R, T), dtype=torch.long)
    doc_ids = torch.full((R, T), -1, dtype=torch.long)
    branch_ids = torch.zeros((R, T), dtype=torch.long)
    target_mask = torch.zeros((R, T), dtype=torch.bool)
    sequence_index = torch.full((R, T), -1, dtype=torch.long)

    def place(r: int, t: int, i: int, start: int, stop: int, doc: int, branch: int) -> int:
        """Tokens start..stop-1 of sequence i at row r from column t (positions start..); returns the
        end column. The last token's target is the sequence's next token, so it is set only when the
        sequence ends here (a shared prefix stops before untrained tokens: no targets there anyway)."""
        n = stop - start
        if n <= 0:  # (a one-token shared prefix: the branches repeat it, nothing is placed before them)
            return t
        input_ids[r, t:t + n] = torch.tensor(sequences[i][start:stop])
        positions[r, t:t + n] = torch.arange(start, stop)
        doc_ids[r, t:t + n] = doc
        branch_ids[r, t:t + n] = branch
        flags = torch.tensor(trained[i][start + 1:stop], dtype=torch.bool)  # target at t' predicts token t'+1
        target_mask[r, t:t + n - 1] = flags
        sequence_index[r, t:t + n - 1] = torch.where(flags, i, -1)
        return t + n

    for r, members in enumerate(rows):
        t = 0
        for doc, (shared, group) in enumerate(members):
            if shared == 0:
                t = place(r, t, group[0], 0, len(sequences[group[0]]), doc, 0)
                continue
            t = place(r, t, group[0], 0, shared - 1, doc, 0)  # the prefix; the branches repeat token shared - 1
            for b, i in enumerate(group):
                t = place(r, t, i, shared - 1, len(sequences[i]), doc, b + 1)
        doc_ids[r, t:] = len(members)  # padding: its own document, never a target
        positions[r, t:] = torch.arange(T - t)
    shared_any = share_prefixes and bool((branch_ids > 0).any())  # no branches: no branch masking at all
    return PackedBatch(input_ids, positions, doc_ids, target_mask, sequence_index, len(sequences),
                       branch_ids if shared_any else None)


def _prefix_groups(sequences, trained, max_tokens: int, min_shared: int) -> list[tuple[int, list[int]]]:
    """Consecutive sequences sharing at least `min_shared` leading untrained tokens, as
    (shared length, members); shared length 0 for a sequence packed alone."""
    def untrained_lead(i: int) -> int:
        flags = trained[i]
        return next((j for j in range(1, len(flags)) if flags[j]), len(flags))

    units: list[tuple[int, list[int]]] = []
    i = 0
    while i < len(sequences):
        group, shared = [i], untrained_lead(i)
        j = i + 1
        while j < len(sequences):
            common = min(shared, untrained_lead(j), _common_prefix(sequences[i], sequences[j]))
            # every branch keeps at least one token of its own (a target needs the row before it)
            common = min(common, min(len(sequences[m]) for m in group + [j]) - 1)
            candidate = (common, group + [j])
            if common < min_shared or _unit_tokens(candidate, sequences) > max_tokens:
                break
            # Joining saves j's common - 1 prefix tokens but re-forwards shared - common tokens for
            # each other member: completions of another prompt (the same chat header only) stay apart.
            if len(group) > 1 and common - 1 <= (len(group) - 1) * (shared - common):
                break
            group, shared = group + [j], common
            j += 1
        units.append((shared, group) if len(group) > 1 else (0, group))
        i = j
    return units


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _unit_tokens(unit: tuple[int, list[int]], sequences) -> int:
    shared, group = unit
    if shared == 0:
        return len(sequences[group[0]])
    return shared - 1 + sum(len(sequences[i]) - (shared - 1) for i in group)


def sequence_logprobs(model, batch: PackedBatch, *, temperature: float = 1.0, chunk: int = DEFAULT_CHUNK,
                      with_entropy: bool = False,
                      entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of the target tokens of a packed batch, in row-major order of
    `batch.target_mask` ([num_targets] fp32). Use `batch.per_target(batch.sequence_index)` to
    group them by sequence. entropy_grad=False: the entropies come without a gradient (logging).
    (`ossrl.train.graphed.CapturedLogprobs` gives the same from CUDA graphs.)"""
    check_token_range(model, batch.token_range)
    return packed_logprobs(model, batch.input_ids, batch.positions, batch.doc_ids, batch.branch_ids,
                           batch.target_index(),  # (once: a batch not moved by `to` computes it on the device)
                           temperature=temperature, chunk=chunk, with_entropy=with_entropy,
                           entropy_grad=entropy_grad, target_range=batch.token_range)  # (targets are input ids)


def check_token_range(model, token_range: tuple[int, int] | None) -> None:
    """A clear error for token ids outside the model's vocabulary, from their range read on the host
    (`PackedBatch.to`; None: unknown, checked later on the device)."""
    if token_range is not None:
        low, high = token_range
        vocab = model.config.vocab_size
        if low < 0 or high >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}) (the model's vocab_size), got {low}..{high}")


def packed_logprobs(model, input_ids, positions, doc_ids, branch_ids, index: torch.Tensor, *, temperature: float,
                    chunk: int, with_entropy: bool, entropy_grad: bool, target_range: tuple[int, int] | None,
                    segments=None):
    """`sequence_logprobs` on a packed batch's tensors; index [N]: the flat target positions;
    segments: the layout's varlen `Segments` on the device, if the caller has them (`GptOssModel.forward`)."""
    extra = {} if segments is None else {"segments": segments}
    hidden = model.model(input_ids, positions=positions, doc_ids=doc_ids, branch_ids=branch_ids, **extra)  # [R, T, H]
    targets = input_ids.reshape(-1)[index + 1]  # the next token of each target position
    h = hidden.reshape(-1, hidden.shape[-1])[index]  # [N, H]: only rows we need go to the lm_head
    h = h.to(model.lm_head.weight.dtype)  # fp16 mode: the residual stream is fp32
    return token_logprobs(h, model.lm_head.weight, targets, temperature=temperature, chunk=chunk,
                          with_entropy=with_entropy, entropy_grad=entropy_grad, target_range=target_range)
