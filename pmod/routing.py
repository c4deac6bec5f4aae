"""The routing plan of one forward pass and the token selection of a routed layer.

Everything that depends only on the inputs (which positions are targets, how many each example keeps in
each routed layer, how wide the gathered batch is) is computed once per forward in `RoutingPlan.build`,
with a single host synchronisation for all layers. Each routed layer then only ranks its own router
scores (`select_tokens`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .config import RoutedLayerSpec


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), in plain Python: a compiled forward folds it to a
    constant."""
    if x == 0.0:
        return 0.0
    mantissa, exponent = math.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return math.ldexp(round(mantissa * 2.0**24), exponent - 24)  # 24 significant bits; round() ties to even


def keep_count(num_targets: int, ratio: float) -> int:
    """k = trunc(float32(N) * float32(R)), the keep count the original computes in float32, on the host (the product
    of two float32 values is exact in a double, so rounding it once to float32 reproduces the float32 product)."""
    return math.floor(_float32(_float32(float(num_targets)) * _float32(ratio)))


def _on_device(values: list, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device`` without waiting for it: a copy from pageable host memory would make the
    host wait for the work queued on a CUDA device, so it goes through pinned memory, asynchronously. (A compiled
    forward folds the values into its graph.)"""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return torch.tensor(values, device=device)
    return torch.tensor(values).pin_memory().to(device, non_blocking=True)


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
        not_target, text: (B, T) bool, ``~target`` and ``valid & ~target``; ranks: (B, T) long, ``0..T-1`` per row
            (None for a plan with ``shared_targets``); row_start: (B, 1) long, ``b * T`` (None at batch 1): what every
            routed layer's selection needs, computed once per forward (at batch 1 a GPU pays for each operation).
        keep_counts: layer index -> (B,) long, keep count k: the number of target tokens each example keeps.
        width: layer index -> int, number of gathered slots (max over the batch of processed tokens).
        uniform: layer index -> bool, every example processes the same number of tokens and there is
            no padding, so the gathered batch has no empty slots.
        shared_targets: the number of targets N of every row when all rows have the same and there is no padding
            (a batch of one, most often), known on the host; None otherwise.
        shared_keep: layer index -> int, the keep count of every row when ``shared_targets`` is known: a layer's
            selection is then a slice of its ranking (`select_tokens`).
        text_positions: (B, T - N) long, the non-target positions of every row, ascending: computed once per forward
            for a regular plan (None otherwise).
        rotary: the rotary tables the routed layers were given, each as ``(cos, torch.cat([cos, sin], -1))``: layers
            that share them gather both with one index (cached here for the forward).
        token_weight_terms: (alpha, beta) -> `weight_terms`' tensors, made once per forward.
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
    shared_targets: int | None = None
    shared_keep: dict[int, int] | None = None
    text_positions: torch.Tensor | None = None
    rotary: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    token_weight_terms: dict[tuple[float, float], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def weight_terms(self, alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset, scale), each (B, T, 1) fp32: beta and alpha at targets, 1 and 0 elsewhere, so that a token's weight
        is ``offset + scale * t`` (t = tanh(s), TanhNorm's g at targets, 1 at plain dense tokens); made once per forward
        for the layers that share the settings."""
        terms = self.token_weight_terms.get((alpha, beta))
        if terms is None:
            target = self.target[..., None]  # (B, T, 1)
            # fp32 whatever torch's default dtype: alpha and beta must not be rounded to a bf16 default first
            ones = torch.ones(target.shape, dtype=torch.float32, device=target.device)
            terms = (ones.masked_fill(target, beta), torch.zeros_like(ones).masked_fill_(target, alpha))
            self.token_weight_terms[(alpha, beta)] = terms
        return terms

    def __post_init__(self) -> None:
        batch, length = self.target.shape
        if self.dense_step:
            self.columns = (self.past_length + torch.arange(length, device=self.target.device)).expand(batch, length)
            return
        self.not_target = ~self.target
        self.text = self.valid & self.not_target
        # at batch 1 flat indices are the positions themselves
        self.row_start = torch.arange(batch, device=self.target.device)[:, None] * length if batch > 1 else None
        if self.shared_targets is not None:
            # non-targets first, each group in ascending position order (stable sort on a 0/1 key)
            order = torch.sort(self.target.to(torch.uint8), dim=1, stable=True).indices  # (B, T)
            self.text_positions = order[:, : length - self.shared_targets]  # (B, T - N)
        else:
            self.ranks = torch.arange(length, device=self.target.device).expand(batch, length)

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
        tokens: Sequence[int] | None = None,
    ) -> RoutingPlan:
        """Plan a forward pass over a (B, T) batch for the routed layers ``layers`` (the model's `ResolvedPMod.layers`).

        ``counts``: each row's number of targets, when the caller knows them (``target_counts``), and ``tokens`` its
        number of non-padding tokens (``token_counts``): the plan is then made on the host without reading the device
        (a compiled prefill has no graph break), the counts checked on the device. ``padded``: whether ``valid`` may
        hold padding (False: no attention mask was given)."""
        if counts is not None:
            return cls._from_counts(target & valid, valid, layers, past_length, counts, tokens, padded)
        target = target & valid
        num_targets = target.sum(dim=1)  # (B,)
        num_text = valid.sum(dim=1) - num_targets  # (B,)
        ratios = torch.tensor([spec.keep_ratio for spec in layers], dtype=torch.float32, device=target.device)
        # k = trunc(float32(N_V) * float32(R)), as the original computes it.
        keep = torch.floor(num_targets.to(torch.float32)[None, :] * ratios[:, None]).to(torch.long)  # (layers, B)
        processed = keep + num_text[None, :]  # (layers, B)
        n = len(layers)
        flags = torch.stack([valid.all().long(), num_targets.sum(), num_targets.min(), num_targets.max()])
        stats = torch.cat([processed.max(dim=1).values, processed.min(dim=1).values, flags])
        stats = stats.tolist()  # the one host sync of the forward: widths of all layers at once
        widest, narrowest = stats[:n], stats[n : 2 * n]
        all_valid, total_targets, fewest, most = bool(stats[-4]), stats[-3], stats[-2], stats[-1]
        shared = fewest if all_valid and fewest == most else None
        return cls(
            target=target,
            valid=valid,
            past_length=past_length,
            dense_step=all_valid and total_targets == 0,
            keep_counts={spec.index: keep[j] for j, spec in enumerate(layers)},
            width={spec.index: widest[j] for j, spec in enumerate(layers)},
            uniform={spec.index: all_valid and widest[j] == narrowest[j] for j, spec in enumerate(layers)},
            shared_targets=shared,
            shared_keep=(
                None if shared is None else {spec.index: keep_count(shared, spec.keep_ratio) for spec in layers}
            ),
        )


    @classmethod
    def _from_counts(cls, target: torch.Tensor, valid: torch.Tensor, layers: Sequence[RoutedLayerSpec],
                     past_length: int | torch.Tensor, counts: Sequence[int], tokens: Sequence[int] | None,
                     padded: bool) -> RoutingPlan:
        """`build` with the per-row target counts known on the host, and the non-padding token counts when given.
        Without token counts a padded batch counts each padding token as a possible processed slot (an empty one):
        its widths are upper bounds (a row of text beside rows with images makes every routed layer as wide as the
        prompt); with them, or without padding, they are exact."""
        batch, length = target.shape
        # a wrong count would keep another number of tokens than the widths allow: checked on the device, no sync
        if tokens is None:
            given = _on_device(list(counts), target.device)
            found = target.sum(dim=1)
            tokens, may_pad = [length] * batch, padded
        else:
            given = _on_device([list(counts), list(tokens)], target.device)  # (2, B)
            found = torch.stack([target.sum(dim=1), valid.sum(dim=1)])
            may_pad = any(t != length for t in tokens)
        torch._assert_async((found == given).all(), "target_counts / token_counts differ from the inputs' tokens")
        keep = [[keep_count(n, spec.keep_ratio) for n in counts] for spec in layers]  # (layers, B) on the host
        processed = [[k + t - n for k, n, t in zip(row, counts, tokens)] for row in keep]  # (layers, B)
        shared = counts[0] if not may_pad and len(set(counts)) == 1 else None
        keep_all = _on_device(keep, target.device)  # (layers, B): one copy to the device for every layer
        return cls(
            target=target,
            valid=valid,
            past_length=past_length,
            dense_step=False,
            keep_counts=dict(zip((spec.index for spec in layers), keep_all)),
            width={spec.index: max(processed[j]) for j, spec in enumerate(layers)},
            uniform={spec.index: not may_pad and len(set(processed[j])) == 1 for j, spec in enumerate(layers)},
            shared_targets=shared,
            shared_keep=None if shared is None else {spec.index: keep[j][0] for j, spec in enumerate(layers)},
        )


class Selection:
    """The tokens one routed layer processes, gathered into a dense (B, S) layout.

    Attributes:
        positions: (B, S) long, sequence positions of the gathered slots, ascending within each row;
            slots past a row's count point at distinct unprocessed positions.
        slot_valid: (B, S) bool, the slot holds a processed token; None when every slot does (the layer's plan is
            uniform).
        processed: (B, T) bool, tokens processed by the layer (text + selected targets).
        selected: (B, T) bool, selected target tokens.
        chosen: (B, k) long, the selected target positions, when every row keeps k (a plan with ``shared_keep``;
            None otherwise): the two masks are then built from it and ``text`` only when read (by the routing
            record, after the forward), not by the layer.
    """

    def __init__(self, positions: torch.Tensor, slot_valid: torch.Tensor | None, processed: torch.Tensor | None = None,
                 selected: torch.Tensor | None = None, chosen: torch.Tensor | None = None,
                 text: torch.Tensor | None = None) -> None:
        if (processed is None or selected is None) and (chosen is None or text is None):
            raise ValueError("a Selection needs processed and selected, or chosen and text")
        self.positions, self.slot_valid, self.chosen, self.text = positions, slot_valid, chosen, text
        self._processed, self._selected = processed, selected

    @property
    def selected(self) -> torch.Tensor:
        if self._selected is None:
            self._selected = torch.zeros_like(self.text).scatter_(1, self.chosen, True)  # (B, T)
        return self._selected

    @property
    def processed(self) -> torch.Tensor:
        if self._processed is None:
            self._processed = self.text | self.selected  # (B, T)
        return self._processed


def select_tokens(logits: torch.Tensor, plan: RoutingPlan, layer_idx: int) -> Selection:
    """Select, per example, the ``k`` target tokens with the highest router logit.

    ``logits`` is (B, T) fp32. Ties are broken by position (earlier first) with a stable sort, so the
    result never depends on kernel tie-breaking.
    """
    neg_inf = torch.finfo(logits.dtype).min
    scores = logits.masked_fill(plan.not_target, neg_inf)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, T) positions by rank
    if plan.shared_keep is not None:
        # every row keeps k of N targets and has the same text: the first k of the ranking, merged with the text
        # positions (five operations where the general case below takes eleven; a GPU at batch 1 pays per operation)
        chosen = order[:, : plan.shared_keep[layer_idx]]  # (B, k)
        positions = torch.sort(torch.cat([plan.text_positions, chosen], dim=1), dim=1).values  # (B, S) ascending
        return Selection(positions=positions, slot_valid=None, chosen=chosen, text=plan.text)
    rank = torch.empty_like(order).scatter_(1, order, plan.ranks)  # (B, T) rank of each position
    selected = plan.target & (rank < plan.keep_counts[layer_idx][:, None])
    processed = plan.text | selected
    width = plan.width[layer_idx]
    # Processed positions first, each group in ascending position order (stable sort on a 0/1 key).
    positions = torch.sort(processed.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]  # (B, S)
    slot_valid = None if plan.uniform[layer_idx] else processed.gather(1, positions)
    return Selection(positions=positions, slot_valid=slot_valid, processed=processed, selected=selected)


class LayerRouting:
    """Routing decisions of one routed layer in the most recent forward pass (detached, on the model's device).

    Attributes:
        target: (B, T) bool, positions that were candidates for routing.
        processed: (B, T) bool, positions the layer processed (text tokens and selected targets).
        selected: (B, T) bool, selected target positions.
        router_logits: (B, T) float32 router scores ``s``.
        keep_ratio: the layer's keep ratio (its `RoutedLayerSpec.keep_ratio`, which the selection used).

    ``processed`` and ``selected`` may be given as a `Selection` instead (``selection``), whose masks are built when
    first read: a forward does not pay for them.
    """

    def __init__(self, target: torch.Tensor, processed: torch.Tensor | None = None,
                 selected: torch.Tensor | None = None, router_logits: torch.Tensor | None = None,
                 keep_ratio: float | None = None, *, selection: Selection | None = None) -> None:
        if router_logits is None or keep_ratio is None:
            raise ValueError("LayerRouting needs router_logits and keep_ratio")
        if selection is None:
            if processed is None or selected is None:
                raise ValueError("LayerRouting needs processed and selected, or a selection")
            selection = Selection(positions=processed.new_zeros(0), slot_valid=None, processed=processed,
                                  selected=selected)
        self.target = target
        self.router_logits = router_logits
        self.keep_ratio = keep_ratio
        self._selection = selection

    def __repr__(self) -> str:
        return (f"LayerRouting(target={tuple(self.target.shape)}, kept={self.selected.sum(dim=1).tolist()} of "
                f"{self.target.sum(dim=1).tolist()}, keep_ratio={self.keep_ratio})")

    @property
    def selected(self) -> torch.Tensor:
        return self._selection.selected

    @property
    def processed(self) -> torch.Tensor:
        return self._selection.processed

    def kept_positions(self, example: int) -> list[int]:
        """Sequence positions of the target tokens that ``example`` kept in this layer."""
        return self.selected[example].nonzero().flatten().tolist()

    def kept_fraction(self) -> torch.Tensor:
        """(B,) realised fraction of target tokens kept per example (1.0 for rows without targets)."""
        n_target = self.target.sum(dim=1)
        n_kept = self.selected.sum(dim=1)
        return torch.where(n_target > 0, n_kept / n_target.clamp(min=1), torch.ones_like(n_kept, dtype=torch.float32))
