"""Training recipes: `TrainConfig` (one dataclass per recipe, ``configs/*.yaml``), its validation and ``key=value``
overrides.

Values are validated by pydantic (`pydantic.TypeAdapter` over each setting's type, sections as their dataclasses,
unknown keys forbidden, numbers finite) under pydantic's lax conversion rules; this module adds what pydantic does not
know: errors that name the setting as a recipe writes it (``pmod.alpha``, ``trainer.learning_rate``) with the closest
valid name for a typo, the ``trainer`` mapping checked against this transformers version's `TrainingArguments`, and a
YAML loader that refuses duplicate keys and aliases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import functools
import json
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic
import transformers
import yaml
from transformers import TrainingArguments

from ..config import PModConfig
from ..data.synthetic import SyntheticConfig
from ..errors import PModConfigError
from ..tiny import TinyModelSettings
from .lora import LoraSettings

logger = logging.getLogger(__name__)

Stage = Literal["pretrain", "finetune"]

# pmod's defaults for the trainer mapping where they differ from TrainingArguments' own (the paper's schedule, and a
# short log interval, one kept checkpoint and TensorBoard logs); a recipe's trainer mapping is laid over them.
TRAINER_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-5, "warmup_steps": 0.03, "lr_scheduler_type": "cosine", "num_train_epochs": 1.0,
    "per_device_train_batch_size": 16, "logging_steps": 10, "save_total_limit": 1, "report_to": ["tensorboard"],
}
# TrainingArguments that pmod sets itself, and why.
_SET_BY_PMOD = {"output_dir": "set output_dir at the top level of the recipe",
                "remove_unused_columns": "pmod's collator needs every column of its dataset"}


@dataclass
class TrainConfig:
    """A training recipe. Paths are relative to the working directory.

    Attributes:
        output_dir: where the run writes its checkpoints, the final model and, for ``synthetic_data``, the data.
        model_name_or_path: a saved model directory: dense (converted with ``pmod``) or already p-MoD.
        tiny_model: instead of a checkpoint, build a tiny model (`pmod.tiny.TinyModelSettings`), with a
            word-level tokenizer over the training data's words (CPU recipes and the demo).
        pmod: the `PModConfig` applied to a dense model; null trains the dense model (a baseline). A p-MoD
            ``model_name_or_path`` trains with its own settings: give null or the same ones.
        data_path: LLaVA-format JSON (or JSONL) training data.
        image_folder: folder that the records' image paths are relative to.
        chat_template: ``vicuna_v1`` (the original LLaVA conversation format, system prompt included), a Jinja
            chat template, or null to keep the processor's own.
        synthetic_data: a `pmod.data.synthetic.SyntheticConfig`; the dataset is generated into ``{output_dir}/data``
            when ``data_path`` is not given (CPU recipes and the demo).
        stage: ``pretrain`` (projector only) or ``finetune`` (language model + projector + routers).
        freeze_vision_tower: keep the vision encoder frozen in ``finetune``; null (the default): frozen for a saved
            model or with ``lora``, trained for a ``tiny_model`` (whose vision tower starts random).
        router_learning_rate: learning rate of the routers (default: ``trainer.learning_rate``).
        projector_learning_rate: learning rate of the multimodal projector (default: ``trainer.learning_rate``).
        lora: `pmod.pipelines.lora.LoraSettings` (``{}``: the defaults) to fine-tune with LoRA adapters on the language
            model, the routers and projector trained in full; null (the default) fine-tunes in full. Needs ``stage:
            finetune`` and a frozen vision tower. The run writes the adapter (PEFT's files, routers and projector
            included) to ``{output_dir}/adapter`` and the merged p-MoD model to ``output_dir`` (`pmod.load_model`);
            a ``tiny_model`` base is saved to ``{output_dir}/base``, which the adapter applies to
            (`pmod.pipelines.lora.load_adapter`); otherwise the base is ``model_name_or_path``.
        model_max_length: records are cut (or skipped) beyond this many tokens.
        pad_images: LLaVA-1.5 "pad" image preprocessing (square, mean colour, then resize): the processor is
            switched to transformers' LLaVA image processor with ``do_pad`` and saved so, for evaluation too.
        group_by_length: batches of similar length (fewer padded tokens), from cheap length estimates.
        resume: continue from the last ``checkpoint-*`` in ``output_dir`` if there is one.
        log_routing_per_layer: log each routed layer's statistics, not only their mean.
        trainer: `transformers.TrainingArguments` fields (learning rate, schedule, batch size, steps, precision,
            ``activation_checkpointing``, ``deepspeed``, ``fsdp``, ...), passed on as they are, over
            `TRAINER_DEFAULTS`. ``output_dir`` and ``remove_unused_columns`` are pmod's. ``warmup_steps`` below 1 is
            a fraction of the steps; ``activation_checkpointing`` and ``gradient_checkpointing`` (its name before
            transformers 5.2x) are one setting, under the name this transformers version uses.

    Every setting is checked against its type when the recipe is made, in YAML recipes, ``key=value`` overrides
    and Python alike (the trainer's against TrainingArguments' own types), and a wrong one is a `PModConfigError`
    naming it. Conversions are pydantic's lax ones: booleans are ``true`` / ``false``, and the words true, false,
    yes, no, on, off, t, f, y, n, 1 and 0 (any case, quoted or not) and the numbers 1 and 0 are read as booleans
    too, so ``freeze_vision_tower: "false"`` means false. Numbers must be finite; a number written as a string
    (YAML reads ``1e-4`` as one) is read as the number; whole-number settings take whole numbers only (``8.0`` is
    8; ``2.5`` and ``true`` are refused). Sections (``pmod``, ``lora``, ...) take a mapping of their settings.
    Batch size, accumulation and ``model_max_length`` are at least 1, logging and save steps and epochs above 0,
    learning rates, ``weight_decay`` and ``warmup_steps`` at least 0; ``max_steps`` is -1 (train
    ``num_train_epochs``) or at least 1.
    """

    output_dir: str = "runs/pmod"
    model_name_or_path: str | None = None
    tiny_model: TinyModelSettings | None = None
    pmod: PModConfig | None = field(default_factory=PModConfig)
    attn_implementation: str | None = None
    data_path: str | None = None
    image_folder: str | None = None
    chat_template: str | None = None
    synthetic_data: SyntheticConfig | None = None
    stage: Stage = "finetune"
    freeze_vision_tower: bool | None = None
    router_learning_rate: float | None = None
    projector_learning_rate: float | None = None
    lora: LoraSettings | None = None
    model_max_length: int = 2048
    pad_images: bool = False
    group_by_length: bool = True
    resume: bool = True
    log_routing_per_layer: bool = False
    trainer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, hint in _setting_types().items():  # sections given as mappings become their dataclasses here
            setattr(self, name, _validated(name, getattr(self, name), hint))
        self.trainer = _check_trainer({**TRAINER_DEFAULTS, **self.trainer})
        if self.model_max_length < 1:
            raise PModConfigError(f"model_max_length must be at least 1, got {self.model_max_length}")
        for name in ("router_learning_rate", "projector_learning_rate"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise PModConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if (self.model_name_or_path is None) == (self.tiny_model is None):
            raise PModConfigError("give exactly one of model_name_or_path (a saved model) and tiny_model (build one)")
        if self.freeze_vision_tower is None:
            # a saved model's vision tower is trained already: frozen, as LLaVA's recipes do; a tiny model's starts
            # random and would never learn to see (LoRA adapts the language model only: frozen there too)
            self.freeze_vision_tower = self.tiny_model is None or self.lora is not None
            logger.info("freeze_vision_tower: %s (%s)", self.freeze_vision_tower,
                        "a tiny model's vision tower starts random" if not self.freeze_vision_tower
                        else "the default for a saved model" if self.lora is None else "LoRA")
        if self.data_path is None and self.synthetic_data is None:
            raise PModConfigError("give data_path (LLaVA-format JSON) or synthetic_data (generate a dataset)")
        if self.lora is not None and self.stage != "finetune":
            raise PModConfigError("lora adapts the language model in the finetune stage; stage: pretrain trains "
                                  "the projector in full (set lora: null)")
        if self.lora is not None and not self.freeze_vision_tower:
            raise PModConfigError("lora keeps the vision tower frozen (its weights are not in the adapter); set "
                                  "freeze_vision_tower: true or lora: null")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A recipe from its YAML mapping; an unknown key is refused naming it (and where it belongs)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in names]
        moved = [k for k in unknown if trainer_name(k) in _training_argument_names() or k == "warmup_ratio"]
        if moved:
            raise PModConfigError(f"{', '.join(moved)}: Trainer settings go in the trainer mapping (trainer: "
                                  f"{{{moved[0]}: ...}}; on the command line trainer.{moved[0]}=...)")
        if unknown:
            raise PModConfigError(f"unknown training setting {_did_you_mean(unknown, names)}; known settings: "
                                  f"{', '.join(sorted(names))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain YAML / JSON values (sections as mappings, tuples as lists), as `from_dict` takes it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@functools.cache
def _setting_types() -> dict[str, Any]:
    """TrainConfig's fields and their types (resolved once)."""
    return typing.get_type_hints(TrainConfig)


# unknown keys of a section are errors, numbers must be finite (pydantic's defaults allow both)
_RULES = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)


@functools.cache
def _adapter(hint: Any) -> pydantic.TypeAdapter | None:
    """pydantic's validator for a setting's type; None for TrainingArguments' enums (``lr_scheduler_type``,
    ``optim``, ...), which TrainingArguments checks itself (pydantic before 2.8 lets their lookup errors escape)."""
    return None if _has_enum(hint) else pydantic.TypeAdapter(hint, config=_RULES)


def _validated(name: str, value: Any, hint: Any) -> Any:
    """``value`` of setting ``name`` validated as its type ``hint``, or a `PModConfigError` naming the setting."""
    value = _prepared(name, value, hint)
    adapter = _adapter(hint)
    if adapter is None:
        return value
    try:
        return adapter.validate_python(value)
    except pydantic.ValidationError as exc:
        raise _config_error(name, value, hint, exc.errors()[0]) from None


def _prepared(name: str, value: Any, hint: Any) -> Any:
    """Where a recipe's rules differ from pydantic's lax ones, ``value`` (a section's values, a list's items) made to
    follow them: paths are strings, ``1e3`` is a whole number, true is not a number (pydantic would read it as 1),
    and spaces around a boolean word do not count."""
    options = _options(hint)
    section = next((o for o in options if dataclasses.is_dataclass(o)), None)
    if section is not None and isinstance(value, dict):
        fields = _field_types(section)
        return {k: _prepared(f"{name}.{k}", v, fields[k]) if k in fields else v for k, v in value.items()}
    sequence = next((o for o in options if typing.get_origin(o) in (list, tuple)), None)
    if sequence is not None and isinstance(value, (list, tuple)):
        items = _item_types(sequence, len(value))
        try:
            return [_prepared(name, v, item) for v, item in zip(value, items)] + list(value[len(items):])
        except PModConfigError:  # an item's error names the whole setting and value
            raise PModConfigError(f"{name} must be {_describe(hint)}, got {list(value)!r}") from None
    if isinstance(value, os.PathLike) and str in options:
        value = os.fspath(value)
    if isinstance(value, bool) and bool not in options and {int, float} & set(options):
        raise PModConfigError(f"{name} must be {_describe(hint)}, got {value!r}")
    if isinstance(value, str) and bool in options and str not in options:
        value = value.strip()
    if isinstance(value, str) and int in options and str not in options:
        with contextlib.suppress(ValueError):  # YAML reads 1e3 as a string; pydantic takes integer strings only
            value = float(value) if float(value).is_integer() else value
    return value


def _item_types(sequence: Any, length: int) -> tuple[Any, ...]:
    """The item types of ``length`` values of a ``list[X]``, ``tuple[X, ...]`` or fixed ``tuple[X, Y]`` type."""
    args = typing.get_args(sequence) or (Any,)
    if typing.get_origin(sequence) is tuple and Ellipsis not in args:
        return args
    return (args[0],) * length


def _has_enum(hint: Any) -> bool:
    return (isinstance(hint, type) and issubclass(hint, enum.Enum)) or any(map(_has_enum, typing.get_args(hint)))


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _config_error(name: str, value: Any, hint: Any, error: Any) -> PModConfigError:
    """pydantic's first error for setting ``name`` as a `PModConfigError` in a recipe's words: the dotted key
    (``pmod.alpha``), what it takes, and for an unknown key the closest known one."""
    keys, kind = [], hint  # follow the error's location through the sections' dataclasses
    for key in error["loc"]:
        section = next((o for o in _options(kind) if dataclasses.is_dataclass(o)), None)
        if section is None or not isinstance(key, str):
            break
        known = _field_types(section)
        if key not in known:
            if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
                where = ".".join([name, *keys])
                return PModConfigError(f"unknown {where} setting {_did_you_mean([key], known)}; known {where} "
                                       f"settings: {', '.join(sorted(known))}")
            break
        keys.append(key)
        kind = known[key]
        value = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
    where = ".".join([name, *keys])
    if error["type"] == "value_error":  # raised by a section's own checks (its __post_init__)
        cause = str(error.get("ctx", {}).get("error", error["msg"]))
        return PModConfigError(cause if cause.startswith(where) else f"{where}: {cause}")
    got = "null" if value is None else f"{value!r} ({type(value).__name__})"
    return PModConfigError(f"{where} must be {_describe(kind)}, got {got}")


def _options(hint: Any) -> tuple[Any, ...]:
    """The members of a union type (``int | None``: int, NoneType); a plain type alone."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _did_you_mean(unknown: list[str], known: typing.Iterable[str]) -> str:
    """``'a' (did you mean 'b'?), 'c'`` for unknown setting names."""
    hints = {k: difflib.get_close_matches(k, list(known), n=1) for k in unknown}
    return ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())


def _describe(hint: Any) -> str:
    """Words for a setting's type: ``a whole number or null``."""
    words = []
    for kind in _options(hint):
        origin = typing.get_origin(kind)
        words.append(
            "null" if kind is type(None)
            else "true or false" if kind is bool
            else "a whole number" if kind is int
            else "a finite number" if kind is float
            else "a string" if kind is str
            else "one of " + ", ".join(repr(v) for v in typing.get_args(kind)) if origin is Literal
            else f"a list of {_describe(typing.get_args(kind)[0]).removeprefix('a ')}s" if origin is list
            or (origin is tuple and Ellipsis in typing.get_args(kind))
            else f"a list of {len(typing.get_args(kind))} {_describe(typing.get_args(kind)[0]).removeprefix('a ')}s"
            if origin is tuple and len(set(typing.get_args(kind))) == 1
            else "a list of: " + ", ".join(map(_describe, typing.get_args(kind))) if origin is tuple
            else "a mapping" if kind is dict or origin is dict or dataclasses.is_dataclass(kind)
            else f"a {getattr(kind, '__name__', kind)}"
        )
    return " or ".join(words)


@functools.cache
def _training_argument_names() -> frozenset[str]:
    """The settings this transformers version's TrainingArguments has."""
    return frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)


@functools.cache
def _training_argument_types() -> dict[str, Any]:
    """The types of this transformers version's TrainingArguments (empty if they cannot be resolved)."""
    try:
        return typing.get_type_hints(TrainingArguments)
    except (NameError, TypeError, AttributeError):  # an unresolvable annotation: the trainer's types go unchecked
        return {}


def trainer_name(key: str) -> str:
    """``key`` under this transformers version's name: activation checkpointing is ``gradient_checkpointing*``
    before 5.2x and ``activation_checkpointing*`` after (the old name deprecated), so recipes run on both."""
    old, new = "gradient_checkpointing", "activation_checkpointing"
    if new not in _training_argument_names():
        old, new = new, old
    return new + key.removeprefix(old) if key.startswith(old) else key


def _check_trainer(settings: dict[str, Any]) -> dict[str, Any]:
    """The ``trainer`` mapping checked against this transformers version's TrainingArguments: names, types, and the
    ranges TrainingArguments itself does not check (a batch size of 0 would fail only once training starts)."""
    settings = {trainer_name(k): v for k, v in settings.items()}
    known = _training_argument_names()
    unknown = [k for k in settings if k not in known]
    if unknown:
        raise PModConfigError(
            f"unknown trainer setting {_did_you_mean(unknown, known)}: transformers {transformers.__version__} "
            "TrainingArguments has no such field"
            + ("; warmup_ratio is warmup_steps below 1 since transformers 5" if "warmup_ratio" in unknown else "")
        )
    if owned := sorted(settings.keys() & _SET_BY_PMOD.keys()):
        raise PModConfigError(f"trainer.{owned[0]} is set by pmod: {_SET_BY_PMOD[owned[0]]}")
    hints = _training_argument_types()
    settings = {k: _validated(f"trainer.{k}", v, hints[k]) if k in hints else v for k, v in settings.items()}

    def check(names: tuple[str, ...], ok: typing.Callable[[float], bool], words: str) -> None:
        for name in names:
            if isinstance(settings.get(name), (int, float)) and not ok(settings[name]):
                raise PModConfigError(f"trainer.{name} must {words}, got {settings[name]}")

    check(("per_device_train_batch_size", "gradient_accumulation_steps"), lambda v: v >= 1, "be at least 1")
    check(("logging_steps", "save_steps", "num_train_epochs"), lambda v: v > 0, "be above 0")
    check(("learning_rate", "weight_decay", "warmup_steps", "dataloader_num_workers", "save_total_limit", "seed"),
          lambda v: v >= 0, "not be negative")
    check(("max_steps",), lambda v: v == -1 or v >= 1, "be at least 1, or -1 to train num_train_epochs")
    check(("seed",), lambda v: v < 2**32, "be below 2**32")
    for name in ("eval_strategy", "do_eval", "load_best_model_at_end"):  # pmod train has no evaluation set
        if settings.get(name) not in (None, False, "no"):
            raise PModConfigError(f"trainer.{name}={settings[name]!r} needs an evaluation set, which pmod train does "
                                  "not take: evaluate the saved model with pmod eval (or leave the setting out).")
    return settings


class RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter for recipes: a key given twice (``pmod:`` then ``pmod: null`` silently trained the
    dense baseline) and aliases (``*name``: a 512-byte recipe of nested aliases expanded to gigabytes when saved) are
    errors that point at the line."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a training recipe: write "
                                              "the value out where it is used", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_recipe_yaml(text: str) -> Any:
    """``text`` parsed with `RecipeLoader` (`yaml.YAMLError` on a duplicate key or an alias)."""
    return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader subclass: no arbitrary objects


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe and apply ``key=value`` overrides (dotted keys reach into mappings: ``trainer.max_steps=10``,
    ``pmod.average_ratio=0.3``; values are YAML)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PModConfigError(f"training recipe {path} does not exist")
        try:
            values = read_recipe_yaml(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise PModConfigError(f"training recipe {path} is not valid YAML: {exc}") from exc
        if not isinstance(values, dict):
            raise PModConfigError(f"{path} must hold a mapping of training settings")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PModConfigError(f"override {item!r} is not of the form key=value (e.g. trainer.learning_rate=1e-5)")
        try:
            value = read_recipe_yaml(raw) if raw else None
        except yaml.YAMLError as exc:
            raise PModConfigError(f"override {item!r}: the value is not valid YAML ({exc}); quote it, or write "
                                  "lists as [a, b]") from exc
        *parents, leaf = key.split(".")
        node = values
        for name in parents:
            if node.get(name) is None:
                node[name] = {}
            if not isinstance(node[name], dict):
                raise PModConfigError(f"override {item!r}: {name!r} is not a mapping")
            node = node[name]
        node[leaf] = value
    return TrainConfig.from_dict(values)
