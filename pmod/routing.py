"""The routing plan of one forward pass and the token selection of a routed layer.

Everything that depends only on the inputs (which positions are targets, how many each example keeps in
each routed layer, how wide the gathered batch is) is computed once per forward in `RoutingPlan.build`,
with a single host synchronisation for all layers. Each routed layer then only ranks its own router
scores (`select_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import RoutedLayerSpec


@dataclass
class RoutingPlan:
    """Inputs of every routed layer in one forward pass.

    Attributes:
        target: (B, T) bool, routed positions (vision tokens, or every token for ``targets="all"``).
        valid: (B, T) bool, non-padding positions.
        past_length: logical number of tokens already in the KV cache before this forward.
        dense_step: no padding and no target anywhere (e.g. a decoding step): every layer processes every
            token, so routed layers can run as plain dense layers.
        keep_counts: layer index -> (B,) long, keep count k: the number of target tokens each example keeps.
        width: layer index -> int, number of gathered slots (max over the batch of processed tokens).
        uniform: layer index -> bool, every example processes the same number of tokens and there is
            no padding, so the gathered batch has no empty slots.
    """

    target: torch.Tensor
    valid: torch.Tensor
    past_length: int
    dense_step: bool
    keep_counts: dict[int, torch.Tensor]
    width: dict[int, int]
    uniform: dict[int, bool]

    @classmethod
    def build(
        cls,
        target: torch.Tensor,
        valid: torch.Tensor,
        layers: Sequence[RoutedLayerSpec],
        past_length: int = 0,
    ) -> RoutingPlan:
        """Plan a forward pass over a (B, T) batch for the routed layers ``layers`` (the model's `ResolvedPMod.layers`)."""
        target = target & valid
        num_targets = target.sum(dim=1)  # (B,)
        num_text = valid.sum(dim=1) - num_targets  # (B,)
        ratios = torch.tensor([spec.keep_ratio for spec in layers], dtype=torch.float32, device=target.device)
        # k = trunc(float32(N_V) * float32(R)), as the original computes it.
        keep = torch.floor(num_targets.to(torch.float32)[None, :] * ratios[:, None]).to(torch.long)  # (layers, B)
        processed = keep + num_text[None, :]  # (layers, B)
        n = len(layers)
        flags = torch.stack([valid.all().long(), num_targets.sum()])
        stats = torch.cat([processed.max(dim=1).values, processed.min(dim=1).values, flags])
        stats = stats.tolist()  # the one host sync of the forward: widths of all layers at once
        widest, narrowest, all_valid, total_targets = stats[:n], stats[n : 2 * n], bool(stats[-2]), stats[-1]
        return cls(
            target=target,
            valid=valid,
            past_length=past_length,
            dense_step=all_valid and total_targets == 0,
            keep_counts={spec.index: keep[j] for j, spec in enumerate(layers)},
            width={spec.index: widest[j] for j, spec in enumerate(layers)},
            uniform={spec.index: all_valid and widest[j] == narrowest[j] for j, spec in enumerate(layers)},
        )


@dataclass
class Selection:
    """The tokens one routed layer processes, gathered into a dense (B, S) layout.

    Attributes:
        positions: (B, S) long, sequence positions of the gathered slots, ascending within each row;
            slots past a row's count point at distinct unprocessed positions.
        slot_valid: (B, S) bool, the slot holds a processed token.
        processed: (B, T) bool, tokens processed by the layer (text + selected targets).
        selected: (B, T) bool, selected target tokens.
    """

    positions: torch.Tensor
    slot_valid: torch.Tensor
    processed: torch.Tensor
    selected: torch.Tensor


def select_tokens(logits: torch.Tensor, plan: RoutingPlan, layer_idx: int) -> Selection:
    """Select, per example, the ``k`` target tokens with the highest router logit.

    ``logits`` is (B, T) fp32. Ties are broken by position (earlier first) with a stable sort, so the
    result never depends on kernel tie-breaking.
    """
    batch, length = logits.shape
    neg_inf = torch.finfo(logits.dtype).min
    scores = logits.masked_fill(~plan.target, neg_inf)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, T) positions by rank
    arange = torch.arange(length, device=logits.device).expand(batch, length)
    rank = torch.empty_like(order).scatter_(1, order, arange)  # (B, T) rank of each position
    selected = plan.target & (rank < plan.keep_counts[layer_idx][:, None])
    processed = (plan.valid & ~plan.target) | selected
    width = plan.width[layer_idx]
    # Processed positions first, each group in ascending position order (stable sort on a 0/1 key).
    positions = torch.sort((~processed).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # (B, S)
    slot_valid = processed.gather(1, positions)
    return Selection(positions=positions, slot_valid=slot_valid, processed=processed, selected=selected)


@dataclass
class LayerRouting:
    """Routing decisions of one routed layer in the most recent forward pass (detached, on the model's device).

    Attributes:
        target: (B, T) bool, positions that were candidates for routing.
        processed: (B, T) bool, positions the layer processed (text tokens and selected targets).
        selected: (B, T) bool, selected target positions.
        router_logits: (B, T) float32 router scores ``s``.
        keep_ratio: the layer's keep ratio (its `RoutedLayerSpec.keep_ratio`, which the selection used).
    """

    target: torch.Tensor
    processed: torch.Tensor
    selected: torch.Tensor
    router_logits: torch.Tensor
    keep_ratio: float

    def kept_positions(self, example: int) -> list[int]:
        """Sequence positions of the target tokens that ``example`` kept in this layer."""
        return self.selected[example].nonzero().flatten().tolist()

    def kept_fraction(self) -> torch.Tensor:
        """(B,) realised fraction of target tokens kept per example (1.0 for rows without targets)."""
        n_target = self.target.sum(dim=1)
        n_kept = self.selected.sum(dim=1)
        return torch.where(n_target > 0, n_kept / n_target.clamp(min=1), torch.ones_like(n_kept, dtype=torch.float32))
