"""A KV cache whose routed layers hold entries only for the tokens they processed (method.md section 4).

Every layer reports the *logical* sequence length (all tokens seen so far), because transformers derives
position ids, the causal mask and `generate`'s input slicing from it.

The protocol, for each forward call of a p-MoD model over T new tokens:

1. The model (`pmod.models.PModModelMixin`) takes the caller's `PModCache` or creates one (one `PModCacheLayer` per
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
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

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

    def stage(self, columns: torch.Tensor, step_length: int, full: bool) -> torch.Tensor:
        """Step 3a: announce the logical columns of the next `update` (B, S_new; -1 = empty slot; ``full``: none is
        -1). Returns the columns of every entry the layer will hold after the update, (B, S_phys + S_new)."""
        if self.logical_length and self.columns is None:
            raise PModInputError("A dense cache layer cannot become a routed one mid-sequence.")
        held = columns if self.columns is None else torch.cat([self.columns, columns], dim=1)
        self._staged = (held, step_length, full)
        return held

    def skip(self, step_length: int, batch: int, device: torch.device) -> None:
        """Step 3b: record a step in which this routed layer processed no token of any example."""
        self.stage(torch.empty(batch, 0, dtype=torch.long, device=device), step_length, full=True)
        self._commit()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self._staged is not None:
            if self._staged[0].shape[1] != keys.shape[-2]:
                raise PModInputError(f"Staged {self._staged[0].shape[1]} columns but the layer holds {keys.shape[-2]} entries.")
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
        raise NotImplementedError(
            "Cropping a p-MoD KV cache (assisted/speculative decoding, contrastive search) is not supported: "
            "routed layers hold different tokens per example. Use greedy, sampling or beam search."
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.columns is not None:
            self.columns = self.columns.index_select(0, beam_idx.to(self.columns.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.columns is not None:
            self.columns = self.columns.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
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

    def crop(self, max_length: int) -> None:
        self.layers[0].crop(max_length)

    @property
    def is_compileable(self) -> bool:
        return False
