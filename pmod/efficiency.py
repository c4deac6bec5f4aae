"""Measured efficiency of p-MoD models: KV-cache bytes of a live cache, per layer and in total.

A dense model's cache holds one key and one value vector per token and layer; a routed p-MoD layer holds
them only for the tokens it processed. `kv_cache_report` compares what a `PModCache` holds with what the
dense model's cache would hold for the same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache import PModCache


@dataclass
class LayerKV:
    """KV-cache use of one layer.

    Attributes:
        entries: key/value entries holding a token, summed over the batch.
        slots: entries allocated, summed over the batch (``entries`` plus empty slots of rows that processed
            fewer tokens than the widest row).
        dense_entries: entries a dense model would hold (logical length x batch).
        bytes: bytes allocated for keys and values (``slots`` worth).
        dense_bytes: bytes a dense model's cache would take.
    """

    routed: bool
    entries: int
    slots: int
    dense_entries: int
    bytes: int
    dense_bytes: int


@dataclass
class KVCacheReport:
    layers: list[LayerKV]

    @property
    def bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def ratio(self) -> float:
        """Allocated bytes, p-MoD over dense."""
        return self.bytes / self.dense_bytes if self.dense_bytes else 1.0

    @property
    def entry_ratio(self) -> float:
        """Entries that hold a token, p-MoD over dense (ignores empty slots of shorter rows)."""
        dense = sum(layer.dense_entries for layer in self.layers)
        return sum(layer.entries for layer in self.layers) / dense if dense else 1.0

    def to_dict(self) -> dict:
        return {
            "bytes": self.bytes,
            "dense_bytes": self.dense_bytes,
            "ratio": self.ratio,
            "entry_ratio": self.entry_ratio,
            "layers": [vars(layer) for layer in self.layers],
        }


def kv_cache_report(cache: PModCache) -> KVCacheReport:
    """Per-layer and total KV-cache bytes of ``cache`` against a dense model's cache for the same tokens."""
    if not isinstance(cache, PModCache):
        raise TypeError(f"kv_cache_report needs a pmod.PModCache, got {type(cache).__name__}.")
    layers = []
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
            # Nothing stored (a routed layer that processed no token, or an empty cache); the dense
            # size of such a layer is unknown without its shapes, so it is left out of both totals.
            layers.append(LayerKV(layer.columns is not None, 0, 0, 0, 0, 0))
            continue
        batch, _, slots, _ = layer.keys.shape
        per_entry = (layer.keys[:, :, :1].numel() + layer.values[:, :, :1].numel()) // batch * layer.keys.element_size()
        entries = int((layer.columns >= 0).sum()) if layer.columns is not None else batch * slots
        dense_entries = batch * layer.get_seq_length()
        layers.append(
            LayerKV(
                routed=layer.columns is not None,
                entries=entries,
                slots=batch * slots,
                dense_entries=dense_entries,
                bytes=batch * slots * per_entry,
                dense_bytes=dense_entries * per_entry,
            )
        )
    return KVCacheReport(layers)
