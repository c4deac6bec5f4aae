"""Per-layer keep-ratio schedules (method.md section 3).

Every function returns one value per decoder layer: a float keep ratio for a routed layer and
``None`` for a layer that stays dense. `NAMES` is the one list of schedule names: `PModConfig` validation, the CLI's
``--schedule`` choices and the glossary of docs/method.md (checked by a test) follow it.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

Name = Literal["shifted_cos", "shifted_linear", "constant", "interleave"]
NAMES: tuple[Name, ...] = get_args(Name)


def shifted_cos(num_layers: int, average: float, maximum: float, minimum: float) -> list[float | None]:
    """Progressive ratio decay: ``raw(l) = 0.5 cos(pi l / (L-1)) + average``.

    A layer is routed iff ``raw(l) <= maximum``; its ratio is ``max(raw(l), minimum)``.
    """
    return [
        _clip(0.5 * math.cos(math.pi * i / _span(num_layers)) + average, maximum, minimum) for i in range(num_layers)
    ]


def shifted_linear(num_layers: int, average: float, maximum: float, minimum: float) -> list[float | None]:
    """Linear decay: ``raw(l) = 0.5 - l / (L-1) + average``, routed and clipped like ``shifted_cos``."""
    return [_clip(0.5 - i / _span(num_layers) + average, maximum, minimum) for i in range(num_layers)]


def constant(num_layers: int, ratio: float, start: int, end: int | None) -> list[float | None]:
    """``ratio`` on layers ``start .. end-1`` (Python slice semantics, ``end`` may be negative)."""
    routed = set(range(num_layers)[start:end])
    return [ratio if i in routed else None for i in range(num_layers)]


def interleave(num_layers: int, ratio: float) -> list[float | None]:
    """``ratio`` on every odd layer, as in the original Mixture-of-Depths paper."""
    return [ratio if i % 2 == 1 else None for i in range(num_layers)]


def _span(num_layers: int) -> int:
    # The original hard-codes 31 (= L - 1 for 32 layers); a single-layer model has no span to decay over.
    return max(num_layers - 1, 1)


def _clip(raw: float, maximum: float, minimum: float) -> float | None:
    return None if raw > maximum else max(raw, minimum)
