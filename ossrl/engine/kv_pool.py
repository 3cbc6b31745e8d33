"""The engine's slot-indexed KV pool and the two cache views the model attends through.

Layout (one pair of tensors per layer; see ossrl.kernels.decode_attention):

    full-attention layer   k, v  [slots, capacity, Hkv, D]   token p at row p
    sliding layer          k, v  [slots, window,   Hkv, D]   token p at row p % window (a ring)
    lengths                [slots] int32, tokens written per slot (on the device)

`PrefillWriter` is the cache for prefilling one prompt: the model attends normally (FlexAttention
on CUDA) and every layer's keys/values are also written to each of the prompt's n sample slots
(the prefix is computed once and copied n times). `DecodeView` is the cache for one decode step of
B active rows: it appends each row's new key/value to its slot and runs the decode kernel, which
reads only that slot's valid entries. Neither reads anything back to the host.
"""

from __future__ import annotations

import torch

from ossrl.kernels.attention import sink_attention
from ossrl.kernels.decode_attention import append_kv, decode_attention


class KVPool:
    def __init__(self, config, *, slots: int, capacity: int, device, dtype):
        self.config = config
        self.slots, self.capacity = slots, capacity
        Hkv, D = config.num_key_value_heads, config.head_dim
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for layer in range(config.num_hidden_layers):
            rows = config.window(layer) or capacity
            rows = min(rows, capacity)
            self.k[layer] = torch.empty(slots, rows, Hkv, D, device=device, dtype=dtype)
            self.v[layer] = torch.empty(slots, rows, Hkv, D, device=device, dtype=dtype)
        self.lengths = torch.zeros(slots, dtype=torch.int32, device=device)

    @staticmethod
    def bytes_per_slot(config, capacity: int, dtype) -> int:
        per_token = 2 * config.num_key_value_heads * config.head_dim * torch.finfo(dtype).bits // 8
        rows = sum(min(config.window(i) or capacity, capacity) for i in range(config.num_hidden_layers))
        return rows * per_token

    def fits(self, slots: int, capacity: int, dtype) -> bool:
        return slots <= self.slots and capacity <= self.capacity and self.k[0].dtype == dtype


class PrefillWriter:
    """Cache view for prefilling one prompt [1, T] into `slot_ids` (the prompt's n sample slots)."""

    def __init__(self, pool: KVPool, slot_ids: torch.Tensor):
        self.pool, self.slot_ids = pool, slot_ids.long()

    def next_positions(self, batch, length, device):
        return torch.arange(length, device=device).expand(batch, length)

    def key_positions(self, positions):
        return positions

    def attend(self, layer_idx, q, k, v, sinks, mask, *, scale):
        T = k.shape[1]
        kc, vc = self.pool.k[layer_idx], self.pool.v[layer_idx]
        rows = kc.shape[1]
        keep = min(T, rows)  # a ring keeps the last `window` tokens; a full layer keeps all
        pos = torch.arange(T - keep, T, device=k.device)
        idx = pos % rows
        for_slots = self.slot_ids[:, None]
        kc[for_slots, idx[None, :]] = k[0, T - keep:].unsqueeze(0)
        vc[for_slots, idx[None, :]] = v[0, T - keep:].unsqueeze(0)
        return sink_attention(q, k, v, sinks, mask, scale=scale)

    def advance(self, key_positions):
        self.pool.lengths[self.slot_ids] = key_positions.shape[1]


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
        out = decode_attention(q[:, 0], kc, vc, sinks, self.slot_ids, self.pool.lengths, scale=scale)
        return out[:, None]

    def advance(self, key_positions):
        pass
