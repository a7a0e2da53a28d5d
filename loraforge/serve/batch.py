"""The rows a server decodes together, and their KV cache.

Every row is left-padded to one length: the cache holds (rows, heads, length, head_dim) per layer, the
attention mask marks padding with 0, and each row keeps its own position (its count of real tokens), so a
row computes what it would compute alone. Rows join after their own prefill (both sides are left-padded to
the longer length and stacked) and leave between decode steps; columns that became padding in every row
are cut off.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from loraforge.errors import LoraforgeError


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (len(rows), longest), each row right-aligned."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, length - len(row) :] = torch.tensor(row)
    return ids.to(device), left_padding_mask([len(row) for row in rows], device)


def left_padding_mask(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    """The attention mask (len(lengths), longest) of right-aligned rows of these lengths: 1 on each row's last
    `length` positions."""
    longest = max(lengths)
    return (torch.arange(longest) >= longest - torch.tensor(lengths)[:, None]).long().to(device)


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token (padding gets 0 too)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which the model's forward takes a KV cache: `cache` since transformers renamed it
    (`past_key_values` warns, and goes in 5.40), `past_key_values` in the 5.x releases before the rename."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# Token positions of spare room a RoomyLayer buffer is made with: one copy of the cache per ROOM decode steps
# (transformers' layer copies it at every step), for at most ROOM positions a row unused.
ROOM = 32


class RoomyLayer(DynamicLayer):
    """A full-attention layer's keys and values as views into buffers with room to grow. transformers' DynamicLayer
    concatenates the whole cache with each decode step's token (every step copies every layer's cache), and under
    autocast on a CPU keeps it in fp32 (RoPE's fp32 cos/sin widen k), which attention casts to the autocast dtype
    again at every step. Here a step writes its token into the spare room, and the cache is stored in the dtype
    attention computes in — the same rounding autocast would apply, so the same numbers. A buffer is remade (with
    ROOM positions to spare) when full, or when the batch replaced the views (rows joined or left)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.buffers: dict[str, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        device = key_states.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else key_states.dtype
        self.keys = self._append("keys", self.keys, key_states.to(dtype))
        self.values = self._append("values", self.values, value_states.to(dtype))
        return self.keys, self.values

    def _append(self, part: str, cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        length = cached.shape[-2] if cached.numel() else 0
        total = length + new.shape[-2]
        buffer = self.buffers.get(part)
        in_place = (buffer is not None and cached.numel() and cached.data_ptr() == buffer.data_ptr()
                    and cached.shape[:2] == buffer.shape[:2] and cached.stride() == buffer.stride()
                    and buffer.dtype == new.dtype and buffer.shape[-2] >= total)
        if not in_place:
            batch, heads, _, dim = new.shape
            buffer = new.new_empty(batch, heads, total + ROOM, dim)
            if length:
                buffer[:, :, :length].copy_(cached)
            self.buffers[part] = buffer
        buffer[:, :, length:total].copy_(new)
        return buffer[:, :, :total]


def decode_cache(config) -> DynamicCache:
    """A KV cache for the engine's batches: transformers' DynamicCache with RoomyLayer layers."""
    cache = DynamicCache(config=config)
    cache.layers = [RoomyLayer() for _ in cache.layers]
    return cache


def check_full_attention(config) -> None:
    """Refuse models whose KV cache is more than keys and values per layer: joining and trimming rows edit those
    tensors directly, which sliding-window and linear-attention layers (they keep more state) would not survive."""
    kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers if type(layer) is not DynamicLayer}
    if kinds:
        raise LoraforgeError(f"loraforge's generation engine (serve, GRPO rollouts) needs a model whose every layer "
                             f"uses plain full attention; this one has {', '.join(sorted(kinds))} layers")


class RunningBatch:
    """Rows in decode, in the order of `rows`; `cache` and `mask` cover exactly those rows."""

    def __init__(self, cache_keyword: str = "cache") -> None:
        self.cache_keyword = cache_keyword
        self._clear()

    def _clear(self) -> None:
        self.rows: list = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, cached length), 1 = real token
        self.positions: torch.Tensor | None = None  # (rows,), the position of each row's next token

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: list, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add freshly prefilled rows (their cache and mask cover exactly their prompts)."""
        if not cache.is_initialized:
            raise LoraforgeError("the model left some layers without a KV cache (shared KV layers?); serve cannot "
                                 "batch it")
        positions = mask.sum(-1)
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions = list(rows), cache, mask, positions
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([pad_left(mine.keys, length), pad_left(theirs.keys, length)])
            mine.values = torch.cat([pad_left(mine.values, length), pad_left(theirs.values, length)])
        self.mask = torch.cat([pad_left(self.mask, length, dim=1), pad_left(mask, length, dim=1)])
        self.positions = torch.cat([self.positions, positions])
        self.rows.extend(rows)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order); cut the columns that are now padding in every row."""
        if not indices:
            self._clear()
            return
        if indices == list(range(len(self.rows))):
            return
        self.rows = [self.rows[i] for i in indices]
        index = torch.tensor(indices, device=self.mask.device)
        self.mask, self.positions = self.mask[index], self.positions[index]
        start = int(self.mask.any(0).nonzero()[0])
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def decode_inputs(self, next_tokens: list[int]) -> dict:
        """Model inputs for one decode step: every row's latest token at its own position."""
        device = self.mask.device
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        inputs = dict(input_ids=torch.tensor(next_tokens, device=device)[:, None], attention_mask=self.mask,
                      position_ids=self.positions[:, None], use_cache=True, **{self.cache_keyword: self.cache})
        self.positions = self.positions + 1
        return inputs


def pad_left(tensor: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    """Zeros before `tensor` along `dim` up to `length` (the cache's sequence axis by default)."""
    missing = length - tensor.shape[dim]
    if not missing:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)
