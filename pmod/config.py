"""`PModConfig`: the p-MoD settings of a model, as a typed dataclass; `ResolvedPMod`: those settings resolved for
one model depth, and the `RoutedLayerSpec` of each routed layer.

The resolved per-layer values (`layer_ratios`, `routed_layers`) are what a model actually uses; they
are written into the model's `config.json` next to the settings that produced them, so a saved model
never depends on re-running a schedule. The dict in ``config.pmod`` is written by `apply_pmod` and parsed when a
model is built (`apply_pmod`, ``from_pretrained``); forwards read the model's `ResolvedPMod` (``model.pmod``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from . import schedules
from .errors import PModConfigError

TargetKind = Literal["vision", "vision_hr", "all"]
_TARGETS: tuple[TargetKind, ...] = get_args(TargetKind)


@dataclass
class PModConfig:
    """Settings of a p-MoD model.

    Attributes:
        schedule: ``"shifted_cos"`` (progressive ratio decay, the paper's default), ``"shifted_linear"``,
            ``"constant"`` (``average_ratio`` on layers ``constant_start .. constant_end-1``),
            ``"interleave"`` (``average_ratio`` on odd layers), or an explicit list with one keep ratio per
            decoder layer (``1.0`` meaning dense).
        average_ratio, max_ratio, min_ratio: parameters of the decay schedules (method.md section 3).
        constant_start, constant_end: routed layer range of the ``"constant"`` schedule (slice semantics).
        alpha, beta: TanhNorm, router weight ``g = alpha * tanh(s) + beta``.
        tanh_norm: ablation switch; ``False`` gives the unbounded weight ``g = alpha * s + beta``.
        string: ablation switch for STRing; ``False`` lets skipped targets pass unchanged (``x' = x``, as in
            the original Mixture-of-Depths), so routers learn from selected tokens only.
        router_bias: whether routers have a bias.
        router_zero_init: routers start at zero, so a converted model starts as the dense model with some
            tokens skipping layers (and equals it exactly at keep ratio 1).
        targets: ``"vision"`` routes every vision token (images and videos: for anyres images the base image, the
            high-resolution part and its newline tokens; the original's ``vision_all``); ``"vision_hr"`` routes only
            the high-resolution part of anyres images (LLaVA-NeXT, LLaVA-OneVision), the base-image tokens being
            processed in every layer; ``"all"`` routes every non-padding token.
        routed_layers: layers to route in addition to the schedule's: a layer is routed iff its ratio is below 1 or
            it is listed here (list a layer to route it even at ratio 1, e.g. to test the routed path).
    """

    # each field's "help" is its one-line description on the command line (`pmod convert dense --help`, ...), where
    # every field is a flag with this default
    schedule: schedules.Name | list[float] = field(default="shifted_cos", metadata={
        "help": "how the keep ratio falls with depth: a name, or one ratio per layer, comma-separated"})
    average_ratio: float = field(default=0.5, metadata={"help": "mean keep ratio the decay schedules aim at"})
    max_ratio: float = field(default=0.85, metadata={"help": "a layer whose ratio would exceed this stays dense"})
    min_ratio: float = field(default=0.15, metadata={"help": "the lowest keep ratio of the decay schedules"})
    constant_start: int = field(default=2, metadata={"help": "first routed layer of the constant schedule"})
    constant_end: int | None = field(default=-1, metadata={
        "help": "end of the constant schedule's routed layers, slice semantics ('none': to the last layer)"})
    alpha: float = field(default=0.2, metadata={"help": "TanhNorm: router weight g = alpha * tanh(s) + beta"})
    beta: float = field(default=1.0, metadata={"help": "TanhNorm's offset beta"})
    tanh_norm: bool = field(default=True, metadata={
        "help": "TanhNorm (--no-tanh-norm: the unbounded alpha * s + beta)"})
    string: bool = field(default=True, metadata={"help": "STRing (--no-string: skipped tokens pass unchanged)"})
    router_bias: bool = field(default=True, metadata={"help": "routers have a bias"})
    router_zero_init: bool = field(default=True, metadata={
        "help": "routers start at zero (a converted model starts as the dense one, some tokens skipping layers)"})
    targets: TargetKind = field(default="vision", metadata={"help": "which tokens are routed"})
    routed_layers: list[int] | None = field(default=None, metadata={
        "help": "layers to route besides the schedule's, comma-separated indices"})

    def __post_init__(self) -> None:
        # Validated where the settings are made (code, recipes, CLI flags, config.json): a NaN, a ratio above 1 or
        # the string "false" in a boolean field would otherwise give a silently wrong model.
        if hasattr(self.schedule, "tolist") and not isinstance(self.schedule, str):  # a numpy array or a tensor
            self.schedule = self.schedule.tolist()
            if not isinstance(self.schedule, list):
                raise PModConfigError(f"schedule must be a name or a list of per-layer ratios, got one number "
                                      f"({self.schedule!r}).")
        if isinstance(self.schedule, Sequence) and not isinstance(self.schedule, str):
            self.schedule = [_number(r, f"schedule[{i}]") for i, r in enumerate(self.schedule)]
            for i, r in enumerate(self.schedule):
                _check_ratio(r, f"schedule[{i}]")
        elif not isinstance(self.schedule, str) or self.schedule not in schedules.NAMES:
            raise PModConfigError(
                f"Unknown schedule {self.schedule!r}: use one of {', '.join(schedules.NAMES)} or a list of "
                "per-layer ratios."
            )
        # every schedule parameter is a keep ratio (the shifted schedules clip to [min_ratio, max_ratio])
        for name in ("average_ratio", "max_ratio", "min_ratio"):
            _check_ratio(_number(getattr(self, name), name), name)
        if self.min_ratio > self.max_ratio:
            raise PModConfigError(f"min_ratio ({self.min_ratio}) is larger than max_ratio ({self.max_ratio}).")
        _number(self.alpha, "alpha")
        _number(self.beta, "beta")
        for name in ("tanh_norm", "string", "router_bias", "router_zero_init"):
            if not isinstance(getattr(self, name), bool):
                raise PModConfigError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        _integer(self.constant_start, "constant_start")
        if self.constant_end is not None:
            _integer(self.constant_end, "constant_end")
        if self.targets not in _TARGETS:
            raise PModConfigError(f"targets must be one of {_TARGETS}, got {self.targets!r}.")
        if self.routed_layers is not None:
            if isinstance(self.routed_layers, (str, bytes)) or not isinstance(self.routed_layers, Sequence):
                raise PModConfigError(f"routed_layers must be a list of layer indices, got {self.routed_layers!r}.")
            self.routed_layers = sorted({_integer(i, "routed_layers") for i in self.routed_layers})

    # ------------------------------------------------------------------ per-layer values
    def layer_ratios(self, num_layers: int) -> list[float]:
        """One keep ratio per decoder layer; ``1.0`` means the layer keeps every token (dense)."""
        return [1.0 if r is None else r for r in self._raw_schedule(num_layers)]

    def resolve_routed_layers(self, num_layers: int) -> list[int]:
        """Indices of the layers that get a router. Raises if the schedule routes no layer."""
        # every layer the schedule gives a ratio below 1, plus the listed ones: a ratio below 1 on a layer that is not
        # routed would be a nominal saving that never happens
        routed = {i for i, r in enumerate(self._raw_schedule(num_layers)) if r is not None and r < 1.0}
        if self.routed_layers is not None:
            bad = [i for i in self.routed_layers if not 0 <= i < num_layers]
            if bad:
                raise PModConfigError(f"routed_layers {bad} out of range for a model with {num_layers} layers.")
            routed |= set(self.routed_layers)
        routed = sorted(routed)
        if not routed:
            raise PModConfigError(
                f"The schedule {self.schedule!r} routes no layer of a {num_layers}-layer model (every keep ratio is "
                "1). Lower the ratios, or list layers in routed_layers to route them anyway."
            )
        return routed

    def _raw_schedule(self, num_layers: int) -> list[float | None]:
        if num_layers < 1:
            raise PModConfigError(f"num_layers must be positive, got {num_layers}.")
        if isinstance(self.schedule, list):
            if len(self.schedule) != num_layers:
                raise PModConfigError(
                    f"The explicit schedule has {len(self.schedule)} ratios but the model has {num_layers} decoder "
                    "layers."
                )
            return [None if r == 1.0 else r for r in self.schedule]
        if self.schedule == "shifted_cos":
            return schedules.shifted_cos(num_layers, self.average_ratio, self.max_ratio, self.min_ratio)
        if self.schedule == "shifted_linear":
            return schedules.shifted_linear(num_layers, self.average_ratio, self.max_ratio, self.min_ratio)
        if self.schedule == "constant":
            return schedules.constant(num_layers, self.average_ratio, self.constant_start, self.constant_end)
        return schedules.interleave(num_layers, self.average_ratio)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PModConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PModConfigError(f"Unknown p-MoD settings {sorted(unknown)}; known settings: {sorted(known)}.")
        return cls(**data)


def _check_ratio(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        raise PModConfigError(f"{name} must be a keep ratio in (0, 1], got {value!r}.")


def _number(value: Any, name: str) -> float:
    """``value`` as a float if it is a finite real number (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PModConfigError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PModConfigError(f"{name} must be an integer, got {value!r}.")
    return value


@dataclass(frozen=True)
class RoutedLayerSpec:
    """Everything one routed layer needs, fixed when the model is built; the layer holds it as ``layer.pmod_spec``.

    The routing plan of every forward takes the keep ratios from these same objects (`ResolvedPMod.layers`), so the
    ratio a layer reports (`LayerRouting.keep_ratio`) is the one it selected with.
    """

    index: int  # decoder layer index, also the layer's slot in the `PModCache`
    keep_ratio: float
    alpha: float  # TanhNorm: router weight g = alpha * tanh(s) + beta
    beta: float
    tanh_norm: bool
    string: bool  # STRing: skipped target tokens become g * x (False: they pass unchanged)
    router_bias: bool  # how a missing router is built
    router_zero_init: bool


@dataclass(frozen=True)
class ResolvedPMod:
    """What a converted model stores in ``config.pmod``: the settings plus the resolved per-layer values.

    ``layers`` (derived, not saved) holds the `RoutedLayerSpec` of each routed layer, in layer order.
    """

    settings: PModConfig
    layer_ratios: list[float]
    routed_layers: list[int]
    layers: tuple[RoutedLayerSpec, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s = self.settings
        specs = tuple(
            RoutedLayerSpec(i, float(self.layer_ratios[i]), float(s.alpha), float(s.beta), s.tanh_norm, s.string,
                            s.router_bias, s.router_zero_init)
            for i in sorted(set(self.routed_layers))  # a hand-edited config.json may list them in any order
        )
        object.__setattr__(self, "layers", specs)  # a frozen dataclass sets its derived fields this way

    @classmethod
    def resolve(cls, settings: PModConfig, num_layers: int) -> ResolvedPMod:
        # a validated copy: settings changed after construction are caught, and later changes do not reach the model
        settings = dataclasses.replace(settings)
        ratios = settings.layer_ratios(num_layers)
        for i, r in enumerate(ratios):  # after the derivation too, not only the inputs
            _check_ratio(r, f"the derived keep ratio of layer {i}")
        return cls(settings, ratios, settings.resolve_routed_layers(num_layers))

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.to_dict(), "layer_ratios": self.layer_ratios,
                "routed_layers": self.routed_layers}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResolvedPMod:
        """Parse a saved ``config.pmod`` (a test in tests/test_save_load.py pins the format that checkpoints hold)."""
        try:
            settings = PModConfig.from_dict(dict(data["settings"]))
            ratios = [_number(r, f"layer_ratios[{i}]") for i, r in enumerate(data["layer_ratios"])]
            routed = [_integer(i, "routed_layers") for i in data["routed_layers"]]
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, PModConfigError):
                raise PModConfigError(f"config.pmod: {exc}") from exc
            raise PModConfigError(
                f"config.pmod is malformed ({exc!r}); expected settings, layer_ratios, routed_layers."
            ) from exc
        for i, r in enumerate(ratios):
            _check_ratio(r, f"layer_ratios[{i}]")
        if not routed or any(not 0 <= i < len(ratios) for i in routed):
            raise PModConfigError(
                f"config.pmod.routed_layers {routed} is empty or out of range for {len(ratios)} layers."
            )
        routed_set = set(routed)
        unrouted = [i for i, r in enumerate(ratios) if r < 1.0 and i not in routed_set]
        if unrouted:
            raise PModConfigError(
                f"config.pmod: layers {unrouted} have keep ratios below 1 ({[ratios[i] for i in unrouted]}) but are "
                "not in routed_layers, so they would keep every token while the settings claim otherwise; add them to "
                "routed_layers or set their ratios to 1.0."
            )
        return cls(settings, ratios, routed)
