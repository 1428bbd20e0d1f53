"""The keys and values of the tokens a model has already run, for incremental decoding.

Shape legend: b batch rows, n heads on this TP rank, t cached tokens, s new tokens, d head dim.

``GLMModel.forward(..., kv_cache=cache)`` appends the new tokens' keys and values of every layer
(``cache.layer(i).update``) and then ``cache.advance(s)``. The 2D positions are not cached: each
token's position is in the key computed from its embedding, so a continuation only gives the new
tokens' positions. The cache also keeps ``key_mask``, which of the cached tokens are real (a
batched generation leaves padding between Part A and Part B and between blanks); the generator
passes it to the model with each forward. Buffers grow by doubling, so a step costs no copy of the
whole cache.
"""

from __future__ import annotations

import torch

__all__ = ["KVCache", "LayerKVCache"]


class LayerKVCache:
    """One layer's buffers ``[b, n, capacity, d]``; the first ``owner.length`` positions hold
    tokens."""

    def __init__(self, owner: KVCache) -> None:
        self._owner = owner
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new ``k, v [b, n, s, d]`` after the cached tokens; return all of them
        ``[b, n, t + s, d]``."""
        start = self._owner.length
        end = start + k.shape[2]
        if self.keys is None or self.values is None:
            self.keys = k.new_empty(
                *k.shape[:2], max(end, self._owner.initial_capacity), k.shape[3]
            )
            self.values = torch.empty_like(self.keys)
        elif end > self.keys.shape[2]:
            grown = max(end, 2 * self.keys.shape[2])
            self.keys = _grow(self.keys, grown, start)
            self.values = _grow(self.values, grown, start)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]

    def select_rows(self, index: torch.Tensor) -> None:
        if self.keys is not None and self.values is not None:
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)


def _grow(buffer: torch.Tensor, capacity: int, used: int) -> torch.Tensor:
    out = buffer.new_empty(*buffer.shape[:2], capacity, buffer.shape[3])
    out[:, :, :used] = buffer[:, :, :used]
    return out


class KVCache:
    """Every layer's cached keys and values plus ``key_mask [b, t]`` (True: a real token).

    ``initial_capacity``: positions allocated at the first write (more are added by doubling);
    pass the expected total length to avoid any growth.
    """

    def __init__(self, num_layers: int, initial_capacity: int = 0) -> None:
        self.length = 0
        self.initial_capacity = initial_capacity
        self._layers = [LayerKVCache(self) for _ in range(num_layers)]
        self.key_mask: torch.Tensor | None = None  # [b, t] bool

    def layer(self, index: int) -> LayerKVCache:
        return self._layers[index]

    def advance(self, num_tokens: int) -> None:
        """Called by the model after every layer wrote its ``num_tokens`` new keys and values."""
        self.length += num_tokens

    def mask_with(self, new_valid: torch.Tensor) -> torch.Tensor:
        """``key_mask`` extended by the validity ``[b, s]`` of the tokens about to be run: the
        ``key_mask`` argument of that forward. Kept as the cache's mask for the next one."""
        mask = new_valid if self.key_mask is None else torch.cat([self.key_mask, new_valid], 1)
        self.key_mask = mask
        return mask

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (repeats allowed) in this order: beam search's reordering."""
        for layer in self._layers:
            layer.select_rows(index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)

    def truncate(self, length: int) -> None:
        """Forget every token from position ``length`` on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length
        if self.key_mask is not None:
            self.key_mask = self.key_mask[:, :length]
