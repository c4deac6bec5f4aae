"""The routing plan of one forward pass and the token selection of a routed layer.

Everything that depends only on the inputs (which positions are targets, how many each example keeps in
each routed layer, how wide the gathered batch is) is computed once per forward in `RoutingPlan.build`,
with a single host synchronisation for all layers. Each routed layer then only ranks its own router
scores (`select_tokens`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import RoutedLayerSpec


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), in plain Python: a compiled forward folds it to a constant."""
    if x == 0.0:
        return 0.0
    mantissa, exponent = math.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return math.ldexp(round(mantissa * 2.0**24), exponent - 24)  # 24 significant bits; round() ties to even


def keep_count(num_targets: int, ratio: float) -> int:
    """k = trunc(float32(N) * float32(R)), the keep count the original computes in float32, on the host (the product
    of two float32 values is exact in a double, so rounding it once to float32 reproduces the float32 product)."""
    return math.floor(_float32(_float32(float(num_targets)) * _float32(ratio)))


@dataclass
class RoutingPlan:
    """Inputs of every routed layer in one forward pass.

    Attributes:
        target: (B, T) bool, routed positions (vision tokens, or every token for ``targets="all"``).
        valid: (B, T) bool, non-padding positions.
        past_length: logical number of tokens already in the KV cache before this forward (a 0-d tensor with a
            `PModStaticCache`).
        dense_step: no target anywhere and, unless it is known without reading the device that there can be none
            (`dense`), no padding: every layer processes every token, so routed layers run as plain dense layers.
        decoding: a dense step that continues a cached sequence (generated tokens): routed layers skip their router
            and keep the routing record of the prompt.
        columns: (B, T) long, the logical column of each new token (``past_length + position``), computed once per
            forward for every layer of a dense step (None otherwise).
        not_target, text: (B, T) bool, ``~target`` and ``valid & ~target``; ranks: (B, T) long, ``0..T-1`` per row;
            row_start: (B, 1) long, ``b * T``: what every routed layer's selection needs, computed once per forward
            (at batch 1 a GPU pays for each operation).
        keep_counts: layer index -> (B,) long, keep count k: the number of target tokens each example keeps.
        width: layer index -> int, number of gathered slots (max over the batch of processed tokens).
        uniform: layer index -> bool, every example processes the same number of tokens and there is
            no padding, so the gathered batch has no empty slots.
    """

    target: torch.Tensor
    valid: torch.Tensor
    past_length: int | torch.Tensor
    dense_step: bool
    keep_counts: dict[int, torch.Tensor]
    width: dict[int, int]
    uniform: dict[int, bool]
    decoding: bool = False
    columns: torch.Tensor | None = None
    not_target: torch.Tensor | None = None
    text: torch.Tensor | None = None
    ranks: torch.Tensor | None = None
    row_start: torch.Tensor | None = None

    def __post_init__(self) -> None:
        batch, length = self.target.shape
        if self.dense_step:
            self.columns = (self.past_length + torch.arange(length, device=self.target.device)).expand(batch, length)
            return
        self.not_target = ~self.target
        self.text = self.valid & self.not_target
        self.ranks = torch.arange(length, device=self.target.device).expand(batch, length)
        self.row_start = torch.arange(batch, device=self.target.device)[:, None] * length

    @classmethod
    def dense(cls, valid: torch.Tensor, past_length: int | torch.Tensor = 0, decoding: bool = False) -> RoutingPlan:
        """The plan of a forward in which nothing can be routed (a decoding step, a batch without images): every
        layer processes every token, padding included, as the dense model does. Reads nothing from the device, so a
        compiled decoding step has no graph break here."""
        return cls(target=torch.zeros_like(valid), valid=valid, past_length=past_length, dense_step=True,
                   keep_counts={}, width={}, uniform={}, decoding=decoding)

    @classmethod
    def build(
        cls,
        target: torch.Tensor,
        valid: torch.Tensor,
        layers: Sequence[RoutedLayerSpec],
        past_length: int | torch.Tensor = 0,
        counts: Sequence[int] | None = None,
        padded: bool = True,
    ) -> RoutingPlan:
        """Plan a forward pass over a (B, T) batch for the routed layers ``layers`` (the model's `ResolvedPMod.layers`).

        ``counts``: each row's number of targets, when the caller knows them (``target_counts``): the plan is then
        made on the host without reading the device (a compiled prefill has no graph break), the count checked on
        the device. ``padded``: whether ``valid`` may hold padding (False: no attention mask was given)."""
        if counts is not None:
            return cls._from_counts(target & valid, valid, layers, past_length, counts, padded)
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


    @classmethod
    def _from_counts(cls, target: torch.Tensor, valid: torch.Tensor, layers: Sequence[RoutedLayerSpec],
                     past_length: int | torch.Tensor, counts: Sequence[int], padded: bool) -> RoutingPlan:
        """`build` with the per-row target counts known on the host. A padding token counts as a possible processed
        slot (an empty one): widths are upper bounds, exact without padding."""
        batch, length = target.shape
        # a wrong count would keep another number of tokens than the widths allow: checked on the device, no sync
        given = torch.tensor(list(counts), device=target.device)
        torch._assert_async((target.sum(dim=1) == given).all(), "target_counts differ from the inputs' target tokens")
        keep = [[keep_count(n, spec.keep_ratio) for n in counts] for spec in layers]  # (layers, B) on the host
        width = [max(k + length - n for k, n in zip(row, counts)) for row in keep]
        return cls(
            target=target,
            valid=valid,
            past_length=past_length,
            dense_step=False,
            keep_counts={spec.index: torch.tensor(keep[j], device=target.device) for j, spec in enumerate(layers)},
            width={spec.index: width[j] for j, spec in enumerate(layers)},
            uniform={spec.index: not padded and len(set(counts)) == 1 for spec in layers},
        )


@dataclass
class Selection:
    """The tokens one routed layer processes, gathered into a dense (B, S) layout.

    Attributes:
        positions: (B, S) long, sequence positions of the gathered slots, ascending within each row;
            slots past a row's count point at distinct unprocessed positions.
        slot_valid: (B, S) bool, the slot holds a processed token; None when every slot does (the layer's plan is
            uniform).
        processed: (B, T) bool, tokens processed by the layer (text + selected targets).
        selected: (B, T) bool, selected target tokens.
    """

    positions: torch.Tensor
    slot_valid: torch.Tensor | None
    processed: torch.Tensor
    selected: torch.Tensor


def select_tokens(logits: torch.Tensor, plan: RoutingPlan, layer_idx: int) -> Selection:
    """Select, per example, the ``k`` target tokens with the highest router logit.

    ``logits`` is (B, T) fp32. Ties are broken by position (earlier first) with a stable sort, so the
    result never depends on kernel tie-breaking.
    """
    neg_inf = torch.finfo(logits.dtype).min
    scores = logits.masked_fill(plan.not_target, neg_inf)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, T) positions by rank
    rank = torch.empty_like(order).scatter_(1, order, plan.ranks)  # (B, T) rank of each position
    selected = plan.target & (rank < plan.keep_counts[layer_idx][:, None])
    processed = plan.text | selected
    width = plan.width[layer_idx]
    # Processed positions first, each group in ascending position order (stable sort on a 0/1 key).
    positions = torch.sort(processed.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]  # (B, S)
    slot_valid = None if plan.uniform[layer_idx] else processed.gather(1, positions)
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
