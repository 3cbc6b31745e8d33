"""The engine's slot-indexed KV pool and the two cache views the model attends through.

Layout (one pair of tensors per layer; see ossrl.kernels.decode_attention):

    full-attention layer   k, v  [slots, capacity, Hkv, D]   token p at row p
    sliding layer          k, v  [slots, window,   Hkv, D]   token p at row p % window (a ring)
    lengths                [slots] int32, tokens written per slot (on the device)

`PrefillWriter` is the cache for prefilling prompts packed into one row, each its own document:
the model attends normally (FlexAttention on CUDA) and every layer's keys/values are also written
to each prompt's n sample slots (a prefix is computed once and copied n times). With shared
prefixes (`KVPool(share_prefixes=True)`), layers whose cache is not a ring keep the prompt in its
first sample slot only, and the decode kernel reads it from there for all n (`prefix_slot`,
`prefix_len`; ossrl.kernels.decode_attention): n - 1 fewer copies of each prompt's KV read from
memory at every step, the same outputs. `DecodeView` is
the cache for one decode step of B active rows: it appends each row's new key/value to its slot
and runs the decode kernel, which reads only that slot's valid entries. Neither reads anything back to the host.
"""

from __future__ import annotations

import torch

from ossrl.kernels.attention import sink_attention
from ossrl.kernels.decode_attention import append_kv, decode_attention
from ossrl.kernels.transfer import host_to_device


class KVPool:
    def __init__(self, config, *, slots: int, capacity: int, device, dtype, share_prefixes: bool = False):
        self.config = config
        self.slots, self.capacity = slots, capacity
        self.share_prefixes = share_prefixes
        Hkv, D = config.num_key_value_heads, config.head_dim
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for layer in range(config.num_hidden_layers):
            rows = config.window(layer) or capacity
            rows = min(rows, capacity)
            self.k[layer] = torch.empty(slots, rows, Hkv, D, device=device, dtype=dtype)
            self.v[layer] = torch.empty(slots, rows, Hkv, D, device=device, dtype=dtype)
        self.lengths = torch.zeros(slots, dtype=torch.int32, device=device)
        # slot s reads its rows below prefix_len[s] from slot prefix_slot[s] (layers that are not rings)
        self.prefix_slot = torch.arange(slots, dtype=torch.int32, device=device)
        self.prefix_len = torch.zeros(slots, dtype=torch.int32, device=device)

    def reset(self) -> None:
        """Empty every slot (a new generate): no tokens, no shared prefixes. In place (graphs read these)."""
        self.lengths.zero_()
        self.prefix_slot.copy_(torch.arange(self.slots, dtype=torch.int32, device=self.prefix_slot.device))
        self.prefix_len.zero_()

    def shares(self, cache: torch.Tensor) -> bool:
        """Whether a layer's cache holds shared prefixes: sharing is on and it is not a ring (its rows
        are the positions, so the prompt's rows are never overwritten)."""
        return self.share_prefixes and cache.shape[1] == self.capacity

    @staticmethod
    def bytes_per_slot(config, capacity: int, dtype) -> int:
        per_token = 2 * config.num_key_value_heads * config.head_dim * torch.finfo(dtype).bits // 8
        rows = sum(min(config.window(i) or capacity, capacity) for i in range(config.num_hidden_layers))
        return rows * per_token

    def fits(self, slots: int, capacity: int, dtype) -> bool:
        return slots <= self.slots and capacity <= self.capacity and self.k[0].dtype == dtype


class PrefillWriter:
    """Cache view for prefilling several prompts packed into one row [1, T]: prompt i occupies
    tokens starts[i]..starts[i]+lengths[i]-1 as its own document (positions restart at 0, it
    attends only to itself), and its keys/values go to each of its sample slots `slot_groups[i]`
    (on the layers the pool shares, to the first of them only; `advance` records who reads what).

    The copies are one indexed write per layer: the (slot, row, token) targets are built once
    per cache depth (full layers keep every token, sliding layers the last `window` in a ring), on
    the host and copied over once, as is the bookkeeping of `advance` (64 prompts would otherwise
    cost about a thousand tiny launches). `slot_groups` may be host tensors (the engine's) or not.
    """

    packed_documents = True  # the model accepts doc_ids together with this cache

    def __init__(self, pool: KVPool, lengths: list[int], slot_groups: list[torch.Tensor]):
        self.pool, self.lengths = pool, lengths
        self.slot_groups = [s.long().cpu() for s in slot_groups]
        self.starts = [sum(lengths[:i]) for i in range(len(lengths))]
        self._targets: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def key_positions(self, positions):
        return positions

    def targets(self, rows: int, device, first_only: bool = False):
        """(slot, row, token) index tensors for a cache of `rows` rows per slot (first_only: each
        prompt's first sample slot only, the one its samples share when the pool shares prefixes)."""
        key = (rows, first_only)
        if key not in self._targets:
            slot, row, token = [], [], []
            for start, length, slots in zip(self.starts, self.lengths, self.slot_groups):
                slots = slots[:1] if first_only else slots
                keep = min(length, rows)
                pos = torch.arange(length - keep, length)
                n = slots.numel()
                slot.append(slots.repeat_interleave(keep))
                row.append((pos % rows).repeat(n))
                token.append((pos + start).repeat(n))
            self._targets[key] = tuple(host_to_device(torch.cat(t), device) for t in (slot, row, token))
        return self._targets[key]

    def attend(self, layer_idx, q, k, v, sinks, mask, *, scale):
        kc, vc = self.pool.k[layer_idx], self.pool.v[layer_idx]
        slot, row, token = self.targets(kc.shape[1], k.device, first_only=self.pool.shares(kc))
        kc[slot, row] = k[0, token]
        vc[slot, row] = v[0, token]
        return sink_attention(q, k, v, sinks, mask, scale=scale)

    def advance(self, key_positions):
        pool, device = self.pool, self.pool.lengths.device
        counts = torch.tensor([s.numel() for s in self.slot_groups])
        slots = host_to_device(torch.cat(self.slot_groups), device)
        lengths = host_to_device(torch.tensor(self.lengths, dtype=torch.int32).repeat_interleave(counts), device)
        pool.lengths[slots] = lengths
        if pool.share_prefixes:
            first = torch.cat([s[:1] for s in self.slot_groups]).to(torch.int32).repeat_interleave(counts)
            pool.prefix_slot[slots] = host_to_device(first, device)
            pool.prefix_len[slots] = lengths


class DecodeView:
    """Cache view for one decode step: row b appends at positions[b] of slot slot_ids[b].

    The caller has already advanced `pool.lengths` to include the new token (so the kernel sees it).
    """

    def __init__(self, pool: KVPool, slot_ids: torch.Tensor, positions: torch.Tensor):
        self.pool, self.slot_ids, self.positions = pool, slot_ids, positions

    def key_positions(self, positions):
        return positions  # masks are unused on this path

    def attend(self, layer_idx, q, k, v, sinks, mask, *, scale):
        kc, vc = self.pool.k[layer_idx], self.pool.v[layer_idx]
        append_kv(kc, vc, k[:, 0], v[:, 0], self.slot_ids, self.positions)
        return self._decode(q, kc, vc, sinks, scale)

    def attend_rotary(self, layer_idx, q, k, v, cos, sin, sinks, *, scale, fused):
        """`attend` for q and k not yet rotated: `fused.rotary_append` rotates q, and rotates k into
        the cache while v is written beside it, in one launch (the model's `ROTARY_APPEND`)."""
        kc, vc = self.pool.k[layer_idx], self.pool.v[layer_idx]
        q = fused.rotary_append(q, k, v, cos, sin, kc, vc, self.slot_ids, self.positions)
        return self._decode(q, kc, vc, sinks, scale)

    def _decode(self, q, kc, vc, sinks, scale):
        pool = self.pool
        prefixes = dict(prefix_slot=pool.prefix_slot, prefix_len=pool.prefix_len) if pool.shares(kc) else {}
        out = decode_attention(q[:, 0], kc, vc, sinks, self.slot_ids, pool.lengths, scale=scale, **prefixes)
        return out[:, None]

    def advance(self, key_positions):
        pass
