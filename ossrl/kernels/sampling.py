"""Fused sampling on the GPU: one pass over each row's logits (Triton), no host synchronisation.

Implements the sampling rule of `ossrl.engine.sampling` (its PyTorch twin lives here too, with
the hash) for the temperature-only case (no top-k/top-p/min-p):
Gumbel-max with a counter-based hash of (row key, step, token id), plus both log-probs GRPO
needs, in a single streaming pass with online log-sum-exps:

    token   = argmax_v (z_v / T + G_v)
    plain   = z_tok - logsumexp(z)            (temperature 1)
    sampled = z_tok / T - logsumexp(z / T)    (the distribution sampled)

The hash and the uniform mapping are the same as the PyTorch rule (there in fp64, here in fp32),
so the kernels draw the same token unless two candidates are within rounding of each other.
`sample_temperature` runs the kernel on CUDA and the twin elsewhere.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), without int64 overflow (16-bit halves of c)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser: a bijection on 32-bit integers with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def fold_seed(seed: torch.Tensor) -> torch.Tensor:
    """int64 seeds -> 32-bit row keys."""
    seed = seed.long()
    return _fmix32((seed & MASK32) ^ _fmix32((seed >> 32) & MASK32))


def uniform_noise(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """u in (0, 1) of shape [B, V] from 32-bit row keys [B] and steps [B]; bijective in the token id."""
    row = _fmix32((steps.long() & MASK32) ^ keys.long())[:, None]
    cols = torch.arange(vocab, device=keys.device, dtype=torch.long)[None, :]
    h = _fmix32(_mul32(cols, 0x9E3779B1) ^ row)
    return ((h >> 8).double() + 0.5) * (1.0 / (1 << 24))


def gumbel_argmax(logprobs: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """argmax_v (logprobs_v + Gumbel noise from hash(key, step, v)), the twin of the kernel's draw."""
    gumbel = -torch.log(-torch.log(uniform_noise(keys, steps, logprobs.shape[-1])))
    return (logprobs.double() + gumbel).argmax(-1)


def _sample_temperature_twin(logits, temperature, keys, steps):
    z = logits.float()
    plain_all = torch.log_softmax(z, -1)
    rows = torch.arange(z.shape[0], device=z.device)
    if temperature == 0:
        tokens = z.argmax(-1)
        return tokens, plain_all[rows, tokens], torch.zeros(z.shape[0], device=z.device)
    lp = torch.log_softmax(z / temperature, -1)
    tokens = gumbel_argmax(lp, keys, steps)
    return tokens, plain_all[rows, tokens], lp[rows, tokens]


if triton is not None:

    @triton.jit
    def _fmix32_tl(x):
        x ^= x >> 16
        x *= 0x85EBCA6B
        x ^= x >> 13
        x *= 0xC2B2AE35
        x ^= x >> 16
        return x

    @triton.jit
    def _sample_partial_kernel(Logits, Keys, Steps, Part, PartIdx, V, stride_row, inv_temp, chunk,
                               GREEDY: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
        """One split of a row's vocabulary: its argmax candidate and both online logsumexps."""
        row = tl.program_id(0)
        split = tl.program_id(1)
        base = Logits + row.to(tl.int64) * stride_row
        key = tl.load(Keys + row).to(tl.uint32)
        step = tl.load(Steps + row).to(tl.uint32)
        row_hash = _fmix32_tl(step ^ key)
        offs = tl.arange(0, BLOCK)
        m1 = tl.full([BLOCK], float("-inf"), tl.float32)
        s1 = tl.zeros([BLOCK], tl.float32)
        mt = tl.full([BLOCK], float("-inf"), tl.float32)
        st = tl.zeros([BLOCK], tl.float32)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK], tl.int32)
        lo = split * chunk
        for start in range(0, chunk, BLOCK):
            cols = lo + start + offs
            valid = (cols < V) & (start + offs < chunk)
            z = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
            # online logsumexp per lane (temperature 1 and temperature T)
            m1_new = tl.maximum(m1, z)
            s1 = s1 * tl.exp(m1 - m1_new) + tl.where(valid, tl.exp(z - m1_new), 0.0)
            s1 = tl.where(m1_new == float("-inf"), 0.0, s1)
            m1 = m1_new
            zt = z * inv_temp
            mt_new = tl.maximum(mt, zt)
            st = st * tl.exp(mt - mt_new) + tl.where(valid, tl.exp(zt - mt_new), 0.0)
            st = tl.where(mt_new == float("-inf"), 0.0, st)
            mt = mt_new
            if GREEDY:
                score = z
            else:
                h = _fmix32_tl((cols.to(tl.uint32) * 0x9E3779B1) ^ row_hash)
                u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                score = zt - tl.log(-tl.log(u))
            score = tl.where(valid, score, float("-inf"))
            better = score > best
            best = tl.where(better, score, best)
            best_idx = tl.where(better, cols, best_idx)
        # reduce the lanes: argmax (first index on ties), then the two logsumexps
        top = tl.max(best, 0)
        token = tl.min(tl.where(best == top, best_idx, V), 0)
        M1 = tl.max(m1, 0)
        S1 = tl.where(M1 == float("-inf"), 0.0, tl.sum(s1 * tl.exp(m1 - M1), 0))
        MT = tl.max(mt, 0)
        ST = tl.where(MT == float("-inf"), 0.0, tl.sum(st * tl.exp(mt - MT), 0))
        out = Part + (row * SPLITS + split) * 5
        tl.store(out, top)
        tl.store(out + 1, M1)
        tl.store(out + 2, S1)
        tl.store(out + 3, MT)
        tl.store(out + 4, ST)
        tl.store(PartIdx + row * SPLITS + split, token)

    @triton.jit
    def _sample_combine_kernel(Logits, Part, PartIdx, Tokens, Plain, Sampled, V, stride_row, inv_temp,
                               GREEDY: tl.constexpr, SPLITS: tl.constexpr):
        row = tl.program_id(0)
        sp = tl.arange(0, SPLITS)
        p = Part + (row * SPLITS + sp) * 5
        best = tl.load(p)
        idx = tl.load(PartIdx + row * SPLITS + sp)
        top = tl.max(best, 0)
        token = tl.min(tl.where(best == top, idx, V), 0)  # splits are in vocabulary order: first index wins
        token = tl.minimum(token, V - 1)  # NaN logits match nothing: stay inside the row
        m1 = tl.load(p + 1)
        s1 = tl.load(p + 2)
        M1 = tl.max(m1, 0)
        lse1 = M1 + tl.log(tl.sum(tl.where(s1 > 0, s1 * tl.exp(m1 - M1), 0.0), 0))
        mt = tl.load(p + 3)
        st = tl.load(p + 4)
        MT = tl.max(mt, 0)
        lset = MT + tl.log(tl.sum(tl.where(st > 0, st * tl.exp(mt - MT), 0.0), 0))
        z_tok = tl.load(Logits + row.to(tl.int64) * stride_row + token).to(tl.float32)
        tl.store(Tokens + row, token.to(tl.int64))
        tl.store(Plain + row, z_tok - lse1)
        if GREEDY:
            tl.store(Sampled + row, 0.0)
        else:
            tl.store(Sampled + row, z_tok * inv_temp - lset)


def sample_temperature(logits: torch.Tensor, temperature: float, keys: torch.Tensor, steps: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V]; keys (fold_seed of the row seeds) and steps [B]. -> (tokens, plain log-probs,
    sampling log-probs), temperature 0 greedy. Triton on CUDA, the twin elsewhere."""
    if triton is None or not logits.is_cuda:
        return _sample_temperature_twin(logits, temperature, keys, steps)
    return _sample_triton(logits, temperature, keys, steps)


def _sample_triton(logits, temperature, keys, steps, *, splits: int = 32, block: int = 1024):
    """The CUDA path of `sample_temperature`. Each row's vocabulary is split over `splits` programs
    (one program per row left a batch-1 step's 201,088 logits to a single SM), then combined."""
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(B, dtype=torch.long, device=logits.device)
    plain = torch.empty(B, dtype=torch.float32, device=logits.device)
    sampled = torch.empty(B, dtype=torch.float32, device=logits.device)
    greedy = temperature == 0
    inv_temp = 1.0 if greedy else 1.0 / temperature
    chunk = triton.cdiv(triton.cdiv(V, splits), block) * block
    part = torch.empty(B, splits, 5, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(B, splits, dtype=torch.int32, device=logits.device)
    _sample_partial_kernel[(B, splits)](logits, keys, steps, part, part_idx, V, logits.stride(0), inv_temp, chunk,
                                        GREEDY=greedy, SPLITS=splits, BLOCK=block, num_warps=4)
    _sample_combine_kernel[(B,)](logits, part, part_idx, tokens, plain, sampled, V, logits.stride(0), inv_temp,
                                 GREEDY=greedy, SPLITS=splits, num_warps=1)
    return tokens, plain, sampled
