"""A KV cache whose routed layers hold entries only for the tokens they processed (method.md section 4).

Every layer reports the *logical* sequence length (all tokens seen so far), because transformers derives
position ids, the causal mask and `generate`'s input slicing from it.

The protocol, for each forward call of a p-MoD model over T new tokens:

1. The model (`pmod.modeling.PModModelMixin`) takes the caller's `PModCache` or creates one (one `PModCacheLayer` per
   decoder layer) and plans routing with ``past_length = cache.get_seq_length()``.
2. A dense layer: its attention calls ``cache.update(keys, values, layer_idx)`` as in transformers; the layer appends
   the T entries and its logical length grows by T.
3. A routed layer (`pmod.layer.PModLayerMixin`) that gathered the tokens it processes into S slots per example:

   a. if any example processes a token: before its attention runs it calls `PModCacheLayer.stage` with the logical
      column of each slot (``past_length + position``, -1 for an empty slot) and builds its attention mask from the
      returned columns of every entry it will hold; its attention then calls ``update`` exactly once, which appends
      the S entries, checks their count against the staged columns and commits the stage (columns, empty-slot flag,
      logical length + T). A step that routes nothing (a decoding step) is this case with every slot full.
   b. if no example processes any token: it calls `PModCacheLayer.skip` instead (no entries, logical length + T).

What a layer stores: keys and values (B, heads, S_phys, head_dim) as in `DynamicLayer`, ``logical_length``, and for a
routed layer ``columns`` (B, S_phys), the logical column of each held entry or -1 for an empty slot of a row that
processed fewer tokens than the widest row, with ``has_empty_slots`` set once any entry is -1 (plain causal attention
is exact only without them). A layer is dense or routed from its first step on: ``update`` without ``stage`` on a
routed layer, or ``stage`` on a dense layer that holds entries, is an error.

`PModStaticCache` follows the same protocol with preallocated storage, for compiled decoding (static shapes, no host
synchronisation): each layer's entries, columns and lengths live in tensors written in place. A dense layer holds
``max_cache_len`` entries (its logical columns); a routed layer ``max_cache_len - T + S``, sized at its first step
(T prompt tokens gathered into S slots), so it saves the same KV memory as the dynamic cache. Unwritten capacity is
empty slots (column -1), so routed layers always build an explicit mask. `stage` returns the held columns and the slot
index of the first new one (an int for `PModCache`, a 0-d tensor for `PModStaticCache`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from .errors import PModInputError


class PModCacheLayer(DynamicLayer):
    """One layer of a `PModCache`: a `DynamicLayer` for dense layers, plus the stage / update handshake of routed
    layers (module docstring)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.logical_length = 0
        self.columns: torch.Tensor | None = None  # (B, S_phys) long for routed layers
        self.has_empty_slots = False  # some held entry is an empty slot (column -1)
        self._staged: tuple[torch.Tensor, int, bool] | None = None  # (columns after the update, T, no empty slot)

    def stage(self, columns: torch.Tensor, step_length: int, full: bool) -> tuple[torch.Tensor, int]:
        """Step 3a: announce the logical columns of the next `update` (B, S_new; -1 = empty slot; ``full``: none is
        -1). Returns the columns of every entry the layer will hold after the update, (B, S_phys + S_new), and the
        slot of the first new entry (S_phys)."""
        if self.logical_length and self.columns is None:
            raise PModInputError("A dense cache layer cannot become a routed one mid-sequence.")
        held = columns if self.columns is None else torch.cat([self.columns, columns], dim=1)
        self._staged = (held, step_length, full)
        return held, held.shape[1] - columns.shape[1]

    def skip(self, step_length: int, batch: int, device: torch.device) -> None:
        """Step 3b: record a step in which this routed layer processed no token of any example."""
        self.stage(torch.empty(batch, 0, dtype=torch.long, device=device), step_length, full=True)
        self._commit()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self._staged is not None:
            if self._staged[0].shape[1] != keys.shape[-2]:
                raise PModInputError(
                    f"Staged {self._staged[0].shape[1]} columns but the layer holds {keys.shape[-2]} entries."
                )
            self._commit()
        elif self.columns is not None:
            raise PModInputError("A routed cache layer was updated without its columns being staged.")
        else:
            self.logical_length += key_states.shape[-2]
        return keys, values

    def _commit(self) -> None:
        self.columns, step_length, full = self._staged
        self.has_empty_slots |= not full
        self.logical_length += step_length
        self._staged = None

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.logical_length + query_length, 0

    def physical_length(self) -> int:
        """Number of key/value entries stored per example (including empty slots)."""
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def reset(self) -> None:
        # Drop the entries (as transformers 5.2x does) rather than zero them (5.17): `update` grows by concatenation.
        self.keys = self.values = None
        self.is_initialized = False
        super().reset()
        self.logical_length = 0
        self.columns = None
        self.has_empty_slots = False
        self._staged = None

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` logical tokens (transformers' convention; a positive value is the
        length to keep, as transformers 5.17 still accepts), for assisted and prompt-lookup decoding. A routed layer
        drops the entries of those tokens, which every row holds as the same number of trailing entries unless the crop
        reaches into a step that routed tokens (the prompt): that is refused."""
        remove = _tokens_to_remove(tokens_to_remove, self.logical_length)
        if remove == 0:
            return
        keep_length = self.logical_length - remove
        held = self.physical_length()
        if self.columns is None:
            drop = min(remove, held)
        else:
            dropped = self.columns >= keep_length  # (B, S_phys)
            drop = int(dropped.sum(dim=1).max()) if held else 0
            if drop and not bool(dropped[:, held - drop:].all()):
                raise PModInputError(
                    f"Cannot crop a p-MoD cache back to {keep_length} tokens: that reaches into the prompt, whose "
                    "routed layers hold different tokens per example."
                )
            self.columns = self.columns[:, : held - drop]
        if drop:
            self.keys = self.keys[..., : held - drop, :]
            self.values = self.values[..., : held - drop, :]
        self.logical_length = keep_length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.physical_length():  # a routed layer may hold no entry (it kept no token of the prompt)
            super().reorder_cache(beam_idx)
        if self.columns is not None:
            self.columns = self.columns.index_select(0, beam_idx.to(self.columns.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.physical_length():
            super().batch_repeat_interleave(repeats)
        if self.columns is not None:
            self.columns = self.columns.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.physical_length():
            super().batch_select_indices(indices)
        if self.columns is not None:
            self.columns = self.columns[indices]


class PModCache(DynamicCache):
    """`DynamicCache` with one `PModCacheLayer` per decoder layer.

    All layers keep every entry they are given (no sliding-window eviction); sliding-window attention is
    still applied exactly, through the attention mask the model builds from logical positions.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.layers = [PModCacheLayer() for _ in range(num_layers)]
        self.layer_class_to_replicate = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def has_past(self) -> bool:
        """Whether any step has been cached (a Python bool, read without synchronising with the device)."""
        return self.get_seq_length() > 0

    @property
    def is_compileable(self) -> bool:
        return False


class PModStaticCacheLayer(CacheLayerMixin):
    """One layer of a `PModStaticCache`: preallocated keys, values and (routed layers) columns, written in place at
    ``length``; ``length`` (entries written) and ``logical_length`` are 0-d tensors, so that a compiled decoding step
    reads and advances them on the device."""

    is_compileable = True
    # assisted decoding overruns a static cache's length (transformers' own StaticCache too, as of 5.25): it takes
    # the default cache, which crops
    is_croppable = False
    is_sliding = False

    def __init__(self, max_cache_len: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.max_cache_len, self.num_heads, self.head_dim, self.dtype = max_cache_len, num_heads, head_dim, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.columns: torch.Tensor | None = None  # (B, capacity) long, routed layers only
        self.has_empty_slots = True  # unwritten capacity: routed layers always build an explicit mask
        self.prefilled = False  # a Python flag, set once by the first step (never changed inside a compiled step)
        self.length = torch.zeros((), dtype=torch.long, device=self.device)
        self.logical_length = torch.zeros((), dtype=torch.long, device=self.device)
        self._staged: tuple[torch.Tensor, int] | None = None  # (slots the new entries go to, T)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate(key_states.shape[0], self.max_cache_len)

    def _allocate(self, batch: int, capacity: int) -> None:
        shape = (batch, self.num_heads, capacity, self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.is_initialized = True
        if not torch.compiler.is_compiling():
            # fixed addresses: a compiled step mutates them in place (CUDA graphs need it)
            for tensor in (self.keys, self.values, self.columns, self.length, self.logical_length):
                if tensor is not None:
                    torch._dynamo.mark_static_address(tensor)

    def _first_step(self, step_length: int, batch: int, slots: int | None) -> None:
        """Size the layer at its first step: ``slots`` new entries of a routed layer (None: a dense layer)."""
        if step_length > self.max_cache_len:
            raise PModInputError(f"The prompt has {step_length} tokens but the static cache holds "
                                 f"{self.max_cache_len}; create it with a larger max_cache_len (prompt + new tokens).")
        self.prefilled = True
        if slots is not None:
            capacity = self.max_cache_len - step_length + slots
            self.columns = torch.full((batch, capacity), -1, dtype=torch.long, device=self.device)
            self._allocate(batch, capacity)

    def stage(self, columns: torch.Tensor, step_length: int, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 3a (module docstring): write the new columns at ``length``; returns every column slot (B, capacity)
        and ``length``, the slot of the first new one."""
        if not self.prefilled:
            self._first_step(step_length, columns.shape[0], columns.shape[1])
        elif self.columns is None:
            raise PModInputError("A dense cache layer cannot become a routed one mid-sequence.")
        self._check_batch(columns.shape[0])
        index = self.length + torch.arange(columns.shape[1], device=self.device)  # (S_new,) slots to write
        self.columns.index_copy_(1, index, columns)
        self._staged = (index, step_length)
        return self.columns, self.length

    def skip(self, step_length: int, batch: int, device: torch.device) -> None:
        """Step 3b: a step in which this routed layer processed no token of any example."""
        if not self.prefilled:
            self._first_step(step_length, batch, 0)
        self.logical_length.add_(step_length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.prefilled:
            self._first_step(key_states.shape[-2], key_states.shape[0], None)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_batch(key_states.shape[0])
        new = key_states.shape[-2]
        if self._staged is not None:
            index, step_length = self._staged
            if index.shape[0] != new:
                raise PModInputError(f"Staged {index.shape[0]} columns but the layer was given {new} entries.")
            self._staged = None
        elif self.columns is not None:
            raise PModInputError("A routed cache layer was updated without its columns being staged.")
        else:
            index, step_length = self.length + torch.arange(new, device=self.device), new
        self.keys.index_copy_(2, index, key_states.to(self.dtype))
        self.values.index_copy_(2, index, value_states.to(self.dtype))
        self.length.add_(new)
        if self.columns is not None:  # a dense layer's logical length is its length: one op fewer per step
            self.logical_length.add_(step_length)
        return self.keys, self.values

    def _check_batch(self, batch: int) -> None:
        if self.keys is not None and batch != self.keys.shape[0]:
            raise PModInputError(f"This static cache holds {self.keys.shape[0]} sequences, the step has {batch}: "
                                 "reset it (cache.reset()) or create one for this batch.")

    def get_seq_length(self) -> torch.Tensor:
        return self.logical_length if self.columns is not None else self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0  # the model's mask covers every logical column

    def get_max_length(self) -> int:
        return self.max_cache_len

    def physical_length(self) -> int:
        """Number of key/value entries stored per example (including empty slots); reads the device."""
        return int(self.length)

    def reset(self) -> None:
        # drop the storage: a routed layer's capacity depends on the next prompt
        self.keys = self.values = self.columns = None
        self.is_initialized = self.prefilled = False
        self.length.zero_()
        self.logical_length.zero_()
        self._staged = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise PModInputError("A p-MoD static cache cannot be cropped; assisted and prompt-lookup decoding take the "
                                 "default cache (leave cache_implementation unset).")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name in ("keys", "values", "columns"):
            held = getattr(self, name)
            if held is not None:  # in place: the storage keeps its address
                held.copy_(held.index_select(0, beam_idx.to(held.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in ("keys", "values", "columns"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in ("keys", "values", "columns"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[indices])


class PModStaticCache(Cache):
    """A p-MoD KV cache with preallocated storage (module docstring), for compiled decoding: every decoding step has
    the same shapes and advances the lengths on the device. ``max_cache_len`` is the prompt plus the new tokens.
    `generate(..., cache_implementation="static")` creates one; `for_model` builds one for a plain decoding loop."""

    def __init__(self, num_layers: int, max_cache_len: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__(layers=[PModStaticCacheLayer(max_cache_len, num_heads, head_dim, dtype, device)
                                 for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model, max_cache_len: int) -> PModStaticCache:
        """A static cache shaped for ``model``'s language model (its layers, key/value heads, dtype and device)."""
        text = model.config.get_text_config(decoder=True)
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(text.num_hidden_layers, max_cache_len, heads, head_dim, model.dtype, model.device)

    def has_past(self) -> bool:
        """Whether any step has been cached (a Python flag: no device read, nothing for a compiled step to guard on
        but a constant)."""
        return self.layers[0].prefilled

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor | int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0


def _tokens_to_remove(tokens_to_remove: int, length: int) -> int:
    """transformers' ``crop`` argument as a number of tokens to remove: negative, that many; positive (transformers
    5.17's legacy form), the length to keep."""
    if tokens_to_remove > 0:
        return max(length - tokens_to_remove, 0)
    return -tokens_to_remove
