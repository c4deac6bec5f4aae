"""Training p-MoD models: a typed recipe, the transformers `Trainer` with p-MoD extras, and `pmod train`.

The engine is the transformers `Trainer` (accelerate underneath; DeepSpeed ZeRO through ``trainer.deepspeed`` and
FSDP through ``trainer.fsdp`` / an accelerate config). What this module adds:

* `TrainConfig`: one dataclass for a recipe (``configs/*.yaml``), with ``key=value`` overrides; its ``trainer``
  mapping goes to `transformers.TrainingArguments` as it is.
* stages: ``pretrain`` trains the projector only; ``finetune`` trains the language model, the projector and
  the routers (vision tower frozen unless ``freeze_vision_tower: false``), in full or, with a ``lora:`` section,
  with LoRA adapters on the language model (`pmod.pipelines.lora`).
* a separate router learning rate, length-grouped batches from cheap length estimates (no image decoding),
  routing statistics (realised kept fraction and mean TanhNorm router weight per routed layer) in the logs,
  the number of skipped (unreadable) records, and resume from the last checkpoint after a kill.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import json
import logging
import math
import os
import time
import types
import typing
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
import yaml
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..config import PModConfig
from ..data.conversation import PLACEHOLDERS
from ..data.records import SKIP_KEY, LlavaCollator, LlavaDataset, check_records, load_records, padding_image_processor
from ..data.synthetic import SyntheticConfig
from ..errors import PModConfigError, PModInputError, PModTrainingError
from ..files import check_output_apart, output_lock, write_text_atomic
from ..tiny import TinyModelSettings, build_tiny
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
    naming it. Booleans are ``true`` / ``false``; the words true, false, yes, no, on, off, 1 and 0 (any case, quoted
    or not) and the numbers 1 and 0 are read as booleans too, so ``freeze_vision_tower: "false"`` means false.
    Numbers must be finite; a number written as a string (YAML reads ``1e-4`` as one) is read as the number;
    whole-number settings take whole numbers only. Sections (``pmod``, ``lora``, ...) take a mapping of their
    settings. Batch size, accumulation and ``model_max_length`` are at least 1, logging and save steps and epochs
    above 0, learning rates, ``weight_decay`` and ``warmup_steps`` at least 0; ``max_steps`` is -1 (train
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
            setattr(self, name, _coerce(name, getattr(self, name), hint))
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
        moved = [k for k in unknown if _trainer_name(k) in _training_argument_names() or k == "warmup_ratio"]
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


def _did_you_mean(unknown: list[str], known: typing.Iterable[str]) -> str:
    """``'a' (did you mean 'b'?), 'c'`` for unknown setting names."""
    hints = {k: difflib.get_close_matches(k, list(known), n=1) for k in unknown}
    return ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())


@functools.cache
def _setting_types() -> dict[str, Any]:
    """TrainConfig's fields and their types (resolved once)."""
    return typing.get_type_hints(TrainConfig)


_BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "1": True,
                  "false": False, "no": False, "off": False, "0": False}
_NOT_GIVEN = object()


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` of setting ``name`` as its type ``hint`` (see `TrainConfig` for what converts), or a
    `PModConfigError` saying what the setting takes. A type with no check here passes ``value`` on unchanged."""
    options = _options(hint)
    if not all(_checked(option) for option in options):
        return value  # e.g. TrainingArguments' enums: TrainingArguments checks those itself
    if value is None:
        if type(None) in options:
            return None
        raise PModConfigError(f"{name} must be {_describe(hint)}, got null")
    for option in options:
        if option is not type(None) and (converted := _convert(name, value, option)) is not _NOT_GIVEN:
            return converted
    raise PModConfigError(f"{name} must be {_describe(hint)}, got {value!r} ({type(value).__name__})")


def _options(hint: Any) -> tuple[Any, ...]:
    """The members of a union type (``int | None``: int, NoneType); a plain type alone."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _checked(kind: Any) -> bool:
    """Whether `_convert` checks values of ``kind``."""
    origin = typing.get_origin(kind)
    if origin is list:
        return _checked(typing.get_args(kind)[0])
    return (kind in (bool, int, float, str, dict, type(None)) or origin in (dict, Literal)
            or dataclasses.is_dataclass(kind))


def _convert(name: str, value: Any, kind: Any) -> Any:
    """``value`` as ``kind`` (one member of a setting's type), or `_NOT_GIVEN` when it is not one."""
    origin = typing.get_origin(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOLEAN_WORDS:
            return _BOOLEAN_WORDS[value.strip().lower()]
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        return _NOT_GIVEN
    if kind in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return _NOT_GIVEN
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            return _NOT_GIVEN
        if not math.isfinite(number):
            raise PModConfigError(f"{name} must be a finite number, got {value!r}")
        if kind is float:
            return float(number)
        return int(number) if float(number).is_integer() else _NOT_GIVEN
    if kind is str:
        return os.fspath(value) if isinstance(value, (str, os.PathLike)) else _NOT_GIVEN
    if origin is Literal:
        return value if value in typing.get_args(kind) else _NOT_GIVEN
    if origin is dict or kind is dict:
        return value if isinstance(value, dict) else _NOT_GIVEN
    if dataclasses.is_dataclass(kind):
        return (value if isinstance(value, kind)
                else _section(kind, value, name) if isinstance(value, dict) else _NOT_GIVEN)
    (item,) = typing.get_args(kind)  # a list
    if not isinstance(value, (list, tuple)):
        return _NOT_GIVEN
    items = [_convert(name, v, item) for v in value]
    return _NOT_GIVEN if any(v is _NOT_GIVEN for v in items) else items


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
            else "a mapping"  # dict, or a section's dataclass
        )
    return " or ".join(words)


def _section(cls: type, settings: dict[str, Any], section: str) -> Any:
    """A recipe section (``pmod``, ``lora``, ...) as its settings dataclass ``cls``, its values converted like the
    recipe's; an unknown key is refused with the known ones, and a bad value names the section."""
    hints = {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}
    unknown = [k for k in settings if k not in hints]
    if unknown:
        raise PModConfigError(f"unknown {section} setting {_did_you_mean(unknown, hints)}; known {section} settings: "
                              f"{', '.join(sorted(hints))}")
    settings = {k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in settings.items()}
    try:
        return cls(**settings)
    except (TypeError, ValueError) as exc:  # PModConfigError too: named by section unless it says it already
        raise PModConfigError(str(exc) if str(exc).startswith(section) else f"{section}: {exc}") from exc


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


def _trainer_name(key: str) -> str:
    """``key`` under this transformers version's name: activation checkpointing is ``gradient_checkpointing*``
    before 5.2x and ``activation_checkpointing*`` after (the old name deprecated), so recipes run on both."""
    old, new = "gradient_checkpointing", "activation_checkpointing"
    if new not in _training_argument_names():
        old, new = new, old
    return new + key.removeprefix(old) if key.startswith(old) else key


def _check_trainer(settings: dict[str, Any]) -> dict[str, Any]:
    """The ``trainer`` mapping checked against this transformers version's TrainingArguments: names, types, and the
    ranges TrainingArguments itself does not check (a batch size of 0 would fail only once training starts)."""
    settings = {_trainer_name(k): v for k, v in settings.items()}
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
    settings = {k: _coerce(f"trainer.{k}", v, hints[k]) if k in hints else v for k, v in settings.items()}

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


# ---------------------------------------------------------------------------------------------- model and data
def _words(records: list[dict[str, Any]]) -> list[str]:
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    words: dict[str, None] = {}
    for record in records:
        turns = record.get("conversations")
        for turn in turns if isinstance(turns, list) else []:  # malformed records are refused by check_records
            text = str(turn.get("value", "")) if isinstance(turn, dict) else ""
            for placeholder in PLACEHOLDERS:
                text = text.replace(placeholder, " ")
            for word, _ in split.pre_tokenize_str(text):
                words[word] = None
    return list(words)


def build_model(config: TrainConfig, records: list[dict[str, Any]], extra_words: list[str] | None = None):
    """The model to train (p-MoD unless ``pmod`` is null) and its processor (with the recipe's chat template)."""
    model, processor = _model_and_processor(config, records, extra_words)
    if config.chat_template is not None:
        from ..data.conversation import resolve_chat_template

        processor.chat_template = resolve_chat_template(config.chat_template)
    if config.pad_images:
        processor.image_processor = padding_image_processor(processor.image_processor)
    return model, processor


def _model_and_processor(config: TrainConfig, records: list[dict[str, Any]], extra_words: list[str] | None):
    from transformers import AutoConfig

    from ..config import ResolvedPMod
    from ..loading import load_model, load_pretrained, load_processor
    from ..models import apply_pmod

    kwargs = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    if config.tiny_model is not None:
        model, processor = build_tiny(config.tiny_model, _words(records) + list(extra_words or []),
                                      config.attn_implementation)
        return (model if config.pmod is None else apply_pmod(model, config.pmod)), processor
    path = config.model_name_or_path
    if not Path(path).is_dir():
        raise PModConfigError(f"model_name_or_path {path!r} is not a directory (no model hub access is assumed)")
    saved = AutoConfig.from_pretrained(path)
    if saved.model_type.startswith("pmod_"):
        own = ResolvedPMod.from_dict(saved.pmod).settings.to_dict()
        if config.pmod is not None and config.pmod.to_dict() != own:
            changed = ", ".join(
                f"{k} {v!r} (saved: {own[k]!r})" for k, v in config.pmod.to_dict().items() if v != own[k]
            )
            raise PModConfigError(f"{path} is already a p-MoD model, with other settings than the recipe's pmod "
                                  f"section ({changed}); set pmod: null to train it with its own")
        model = load_pretrained(path, **kwargs)
    elif config.pmod is not None:
        model = load_model(path, config.pmod, **kwargs)
    else:
        model = load_pretrained(path, **kwargs)  # the dense baseline, as it is
    return model, load_processor(path, need_images=False)  # text-only models train too


def set_trainable(model: torch.nn.Module, stage: Stage, freeze_vision_tower: bool = True) -> dict[str, int]:
    """Freeze parameters for a stage; returns trainable parameter counts by part."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        part = model_part(name)
        if stage == "pretrain":
            train = part in ("projector", "image_newline")
        else:
            train = part != "vision_tower" or not freeze_vision_tower
        param.requires_grad_(train)
        if train:
            counts[part] = counts.get(part, 0) + param.numel()
    if not counts:
        raise PModConfigError(f"stage {stage!r} leaves nothing to train in {type(model).__name__}")
    return counts


# where each family keeps its vision tower and its projector (the modules that map vision features to the decoder)
_PROJECTORS = ("multi_modal_projector",  # LLaVA family, InternVL, Gemma 3, Mistral 3
               ".visual.merger.", ".visual.deepstack_merger_list.",  # Qwen2-VL / Qwen2.5-VL; Qwen3-VL's DeepStack
               ".connector.")  # SmolVLM / Idefics3
_VISION_TOWERS = ("vision_tower", ".visual.", ".vision_model.")  # ...; Qwen-VL; SmolVLM / Idefics3


def model_part(name: str) -> str:
    """The part a parameter belongs to: "projector", "vision_tower", "router", "image_newline" or "language_model"
    (names as ``named_parameters`` gives them, also under PEFT's wrappers)."""
    dotted = "." + name  # Qwen-VL's parts sit at model.visual (ForConditionalGeneration) or visual (Model)
    if any(key in dotted for key in _PROJECTORS):
        return "projector"
    if any(key in dotted for key in _VISION_TOWERS):
        return "vision_tower"
    if ".router." in name:
        return "router"
    return "image_newline" if "image_newline" in name else "language_model"


def _is_projector(name: str) -> bool:
    return model_part(name) == "projector"


def tokens_per_image(model: torch.nn.Module) -> int:
    """Image tokens of one image for length estimates (LLaVA-NeXT: the base grid, a lower bound; Qwen2-VL: a
    448 x 448 image; InternVL: one tile; Mistral 3: its largest image)."""
    config = model.config
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return 0
    for name in ("image_seq_length", "mm_tokens_per_image"):  # stated by the config (LLaVA, InternVL, Gemma 3)
        stated = getattr(config, name, None)
        if isinstance(stated, int) and stated > 0:
            return stated
    if not hasattr(vision, "image_size"):  # dynamic resolution (Qwen2-VL): a typical 448 x 448 image
        return (448 // (vision.patch_size * getattr(vision, "spatial_merge_size", 1))) ** 2
    size, patch = vision.image_size, vision.patch_size
    size, patch = (v[0] if isinstance(v, (list, tuple)) else v for v in (size, patch))  # (height, width) forms
    return (size // patch) ** 2 // getattr(config, "spatial_merge_size", 1) ** 2  # Mistral 3 merges 2 x 2 patches


# ------------------------------------------------------------------------------------------------ the trainer
class PModTrainer(Trainer):
    """`Trainer` with a router learning rate, cheap length grouping, routing statistics and skip counts."""

    def __init__(self, *args, router_learning_rate: float | None = None, projector_learning_rate: float | None = None,
                 group_lengths: list[int] | None = None, log_routing_per_layer: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.router_learning_rate = router_learning_rate
        self.projector_learning_rate = projector_learning_rate
        self.group_lengths = group_lengths
        self.log_routing_per_layer = log_routing_per_layer
        self.skipped_records = 0
        self._routing_sums: dict[int, torch.Tensor] = {}  # layer -> [kept, targets, weight sum]

    def _get_train_sampler(self, train_dataset=None):
        if self.group_lengths is None:
            return (super()._get_train_sampler(train_dataset) if train_dataset is not None
                    else super()._get_train_sampler())
        return _EpochLengthGroupedSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps, self.group_lengths, self.args.seed
        )

    def create_optimizer(self, model=None):
        special = (self.router_learning_rate, self.projector_learning_rate)
        if all(lr is None for lr in special) or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))

        def group(weight_decay: float, lr: float | None) -> dict[str, Any]:
            return {"params": [], "weight_decay": weight_decay, **({} if lr is None else {"lr": lr})}

        # a fixed order (the optimizer state of a checkpoint is matched to the groups by position)
        groups = [group(self.args.weight_decay, None), group(0.0, None), group(0.0, self.router_learning_rate),
                  group(self.args.weight_decay, self.projector_learning_rate), group(0.0, self.projector_learning_rate)]
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                if self.router_learning_rate is not None and ".router." in name:
                    index = 2
                else:
                    index = 0 if name in decay else 1
                    if self.projector_learning_rate is not None and _is_projector(name):
                        index += 3
                groups[index]["params"].append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not isinstance(target, PreTrainedModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # save_pretrained writes multimodal models in the original key layout, and Trainer reloads checkpoints
        # with a plain load_state_dict that does not rename them back (huggingface/transformers#43701), which
        # would resume from random weights; from_pretrained renames correctly.
        logger.info("loading model weights from %s", resume_from_checkpoint)
        dtype = next(target.parameters()).dtype
        advice = "delete that folder to resume from an earlier checkpoint, or set resume: false to start over"
        try:
            saved, info = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype, output_loading_info=True)
        except Exception as exc:  # OSError, RuntimeError (size mismatch), safetensors' own error, ...
            raise PModInputError(f"cannot load the weights of checkpoint {resume_from_checkpoint} "
                                 f"({type(exc).__name__}: {exc}); {advice}") from exc
        missing = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
        if missing:  # from_pretrained would fill them with random weights
            raise PModInputError(f"checkpoint {resume_from_checkpoint} lacks weights of the model being trained "
                                 f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); {advice}")
        try:
            target.load_state_dict(saved.state_dict(), strict=True)
        except RuntimeError as exc:
            raise PModInputError(
                f"checkpoint {resume_from_checkpoint} does not match the model being trained: {exc}"
            ) from exc

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # One device sync per micro-batch (Trainer makes the same for its NaN filter): a non-finite loss stops the
        # run before its gradients reach the weights, instead of being logged as the previous average.
        if not torch.isfinite(loss).all():
            raise PModTrainingError(
                f"training stopped at step {self.state.global_step + 1}: the loss is {loss.float().mean().item()}. "
                f"{_DIVERGED_ADVICE}"
            )
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (and processor), refusing weights that are not finite (checkpoints and the final model)."""
        where = output_dir or self.args.output_dir
        bad = _non_finite_parameters(self.model)
        if bad:
            raise PModTrainingError(
                f"refusing to save a model with non-finite weights ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}) to {where} at step {self.state.global_step}. {_DIVERGED_ADVICE}"
            )
        super().save_model(output_dir, _internal_call=_internal_call)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop(SKIP_KEY, None)
        if skipped is not None:
            self.skipped_records += int(skipped)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if model.training:
            self._accumulate_routing(model)
        return result

    @torch.no_grad()
    def _accumulate_routing(self, model) -> None:
        inner = self.accelerator.unwrap_model(model)
        routed = inner.routed_layers() if hasattr(inner, "routed_layers") else {}
        rows, indices = [], []
        for idx, layer in routed.items():
            r = getattr(layer, "last_routing", None)
            if r is None:
                continue
            weight = layer.router_weight(r.router_logits[r.target])
            rows.append(torch.stack([r.selected.sum().float(), r.target.sum().float(), weight.sum().float()]))
            indices.append(idx)
        if rows:
            stats = torch.stack(rows).cpu()  # (layers, 3), one device sync per step
            for idx, row in zip(indices, stats):
                self._routing_sums[idx] = self._routing_sums.get(idx, torch.zeros(3)) + row

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._routing_sums and "loss" in logs:
            kept, weights = [], []
            for idx, (n_kept, n_target, w_sum) in sorted(self._routing_sums.items()):
                if n_target > 0:
                    kept.append(float(n_kept / n_target))
                    weights.append(float(w_sum / n_target))
                    if self.log_routing_per_layer:
                        logs[f"routing/kept_fraction/layer_{idx}"] = round(kept[-1], 4)
                        logs[f"routing/router_weight/layer_{idx}"] = round(weights[-1], 4)
            if kept:
                logs["routing/kept_fraction"] = round(sum(kept) / len(kept), 4)
                logs["routing/router_weight"] = round(sum(weights) / len(weights), 4)
            self._routing_sums = {}
        if self.skipped_records and "loss" in logs:
            logs["skipped_records"] = self.skipped_records
        super().log(logs, *args, **kwargs)


class _EpochLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order that is a function of (seed, epoch), so a resumed run sees the same batches
    (accelerate calls ``set_epoch`` on the sampler at the start of every epoch)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


_DIVERGED_ADVICE = (
    "Try a lower learning rate (trainer.learning_rate, router_learning_rate) or a longer warmup "
    "(trainer.warmup_steps), and check the data and the settings (pmod, model_name_or_path); nothing from this step "
    "was saved. Start again with resume=false or another output_dir"
)


def _non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding NaN or infinity (one device sync for the whole model)."""
    named = [(n, p) for n, p in model.named_parameters() if p.numel()]  # ZeRO-3 partitions are empty here
    if not named:
        return []
    device = named[0][1].device
    finite = torch.stack([torch.isfinite(p.detach()).all().to(device) for _, p in named]).tolist()
    return [n for (n, _), ok in zip(named, finite) if not ok]


class _FiniteGradients(TrainerCallback):
    """Stops training before an optimizer step whose gradients hold NaN or infinity (the loss can be finite
    while its gradient is not); checked on the gradients themselves, so it holds whatever max_grad_norm is.
    Not used with DeepSpeed and FSDP, whose gradients are kept in their own (sharded) buffers."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16:  # fp16 loss scaling overflows now and then by design, and skips those steps itself
            return control
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if not grads:
            return control
        device = grads[0].device
        norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32).to(device) for g in grads])
        norm = float(torch.linalg.vector_norm(norms))  # one device sync
        if not math.isfinite(norm):
            raise PModTrainingError(
                f"training stopped at step {state.global_step + 1}: the gradient norm is {norm} (a gradient holds "
                f"NaN or infinity). {_DIVERGED_ADVICE}"
            )
        return control


class _StopAfter(TrainerCallback):
    """Stops training after a number of optimizer steps (tests of resuming after a kill)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True
        return control


@dataclass
class TrainResult:
    """What a training run produced."""

    output_dir: Path
    global_step: int
    losses: list[float]
    skipped_records: int
    seconds: float
    resumed_from: str | None
    trainable_parameters: dict[str, int]
    log_history: list[dict[str, Any]] = field(repr=False, default_factory=list)
    adapter_dir: Path | None = None  # a LoRA run's adapter (the merged model is in output_dir)


def _report_to(wanted: list[str]) -> list[str]:
    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
    active = [name for name in wanted if importlib.util.find_spec(modules.get(name, name)) is not None]
    missing = sorted(set(wanted) - set(active))
    if missing:
        logger.info("not reporting to %s (not installed)", ", ".join(missing))
    return active or ["none"]


def prepare_data(config: TrainConfig) -> tuple[Path, Path | None, list[str]]:
    """The training data file, its image folder, and extra vocabulary words (for tiny models), generating the
    synthetic dataset when the recipe asks for it."""
    if config.data_path is not None:
        folder = Path(config.image_folder) if config.image_folder else None
        if folder is not None and not folder.is_dir():
            raise PModConfigError(f"image_folder {folder} is not a folder; set it to the folder that the records' "
                                  "image paths are relative to")
        return Path(config.data_path), folder, []
    from ..data.synthetic import write_dataset

    dataset = write_dataset(Path(config.output_dir) / "data", config.synthetic_data)
    return dataset.train_json, dataset.image_dir, dataset.vocabulary()


def train(config: TrainConfig, stop_after: int | None = None) -> TrainResult:
    """Run a training recipe; saves checkpoints under ``output_dir`` and the final model (with its processor) there.
    The main process holds ``output_dir`` (`pmod.files.output_lock`): a second run into it is refused.

    ``stop_after`` ends the run after that many optimizer steps with a checkpoint, as a kill would between two
    saves (used by tests of resuming).
    """
    out = Path(config.output_dir)
    # the final model is saved into output_dir: it must not be (or lie in) the model it starts from
    base = config.model_name_or_path if config.model_name_or_path and Path(config.model_name_or_path).exists() else None
    check_output_apart(out, {"base model": base}, PModConfigError)
    main_process = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0  # other ranks share the folder
    with output_lock(out, "pmod train", PModInputError) if main_process else contextlib.nullcontext():
        return _train(config, out, stop_after)


def _train(config: TrainConfig, out: Path, stop_after: int | None) -> TrainResult:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    resume = _checkpoint_to_resume(config, out)
    # TrainingArguments first: it sets up the distributed state (and DeepSpeed ZeRO-3 partitioned loading)
    # that building the model and preparing the data rely on.
    args = _training_arguments(config)
    _check_router_optimizer(config)
    with args.main_process_first(desc="preparing data"):  # one process writes generated data, the others read
        data_path, image_folder, words = prepare_data(config)
    records = load_records(data_path)
    check_records(records, data_path)  # before the model is loaded
    model, processor = build_model(config, records, words)
    lora_base = None
    if config.lora is not None:
        model, lora_base = _wrap_lora(config, model, processor, out, resume, args)
        from .lora import trainable_parameters

        trainable = trainable_parameters(model)
    else:
        trainable = set_trainable(model, config.stage, config.freeze_vision_tower)
    logger.info("trainable parameters: %s", ", ".join(f"{k} {v:,}" for k, v in trainable.items()))
    dataset = LlavaDataset(records, processor, image_folder, config.model_max_length, tokens_per_image(model),
                           check=False)
    tokenizer = getattr(processor, "tokenizer", processor)
    collator = LlavaCollator(pad_token_id=tokenizer.pad_token_id or 0, count_in_batch=True)
    if getattr(args, _trainer_name("gradient_checkpointing")):
        model.config.use_cache = False
    trainer = PModTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        router_learning_rate=config.router_learning_rate,
        projector_learning_rate=config.projector_learning_rate,
        group_lengths=dataset.lengths if config.group_by_length else None,
        log_routing_per_layer=config.log_routing_per_layer,
        callbacks=[_StopAfter(stop_after)] if stop_after else None,
    )
    if not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        trainer.add_callback(_FiniteGradients())
    if resume:
        logger.info("resuming from %s", resume)
    if trainer.is_world_process_zero():
        _save_recipe(config, out)
    trainer.train(resume_from_checkpoint=resume)
    if stop_after is None and lora_base is not None:
        _save_lora(trainer, out, lora_base)
    elif stop_after is None:
        trainer.save_model(str(out))  # writes the processor too (processing_class), on the main process only
    if trainer.skipped_records:
        logger.warning("%d records were skipped (unreadable images or unusable samples); see warnings above",
                       trainer.skipped_records)
    history = trainer.state.log_history
    return TrainResult(
        output_dir=out,
        global_step=trainer.state.global_step,
        losses=[h["loss"] for h in history if "loss" in h],
        skipped_records=trainer.skipped_records,
        seconds=time.perf_counter() - start,
        resumed_from=resume,
        trainable_parameters=trainable,
        log_history=history,
        adapter_dir=out / ADAPTER_DIR if lora_base is not None and stop_after is None else None,
    )


ADAPTER_DIR = "adapter"  # a LoRA run's adapter, under output_dir (the merged model is output_dir itself)


def _wrap_lora(config: TrainConfig, model: PreTrainedModel, processor: Any, out: Path, resume: str | None,
               args: TrainingArguments) -> tuple[torch.nn.Module, Path]:
    """The model wrapped for LoRA training, and the folder of the base model its adapter applies to."""
    from .lora import apply_lora

    if config.tiny_model is None:
        base = Path(config.model_name_or_path)
    else:
        # a tiny model is random: its adapter is only usable with these very weights, which are saved beside it
        base = out / "base"
        if resume:
            if not (base / "config.json").is_file():
                raise PModInputError(f"{base} (the base model of the adapters in {resume}) is missing; set resume: "
                                     "false to start over")
            from ..loading import load_pretrained

            kwargs = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
            model = load_pretrained(base, **kwargs)
        elif args.should_save:
            model.save_pretrained(base)
            processor.save_pretrained(base)
    from transformers import set_seed

    set_seed(args.seed)  # LoRA's A matrices start random: from the recipe's seed, so that a run can be repeated
    return apply_lora(model, config.lora, base_model_name_or_path=base), base


def _save_lora(trainer: PModTrainer, out: Path, base: Path) -> None:
    """A LoRA run's results: the adapter (with pmod_adapter.json) in ``out/adapter``, the merged model in ``out``."""
    from .lora import load_adapter, write_adapter_info

    adapter_dir = out / ADAPTER_DIR
    trainer.save_model(str(adapter_dir))  # on every process (ZeRO-3 gathers); writes the processor there too
    if not trainer.is_world_process_zero():
        return
    wrapped = trainer.accelerator.unwrap_model(trainer.model)
    write_adapter_info(wrapped, adapter_dir)
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        # the weights may be sharded across processes: merge into a fresh copy of the base instead
        merged = load_adapter(base, adapter_dir, merge=True)
    else:
        merged = wrapped.merge_and_unload()
    bad = _non_finite_parameters(merged)
    if bad:  # finite weights can merge into infinite ones in half precision
        raise PModTrainingError(f"refusing to save a merged model with non-finite weights ({', '.join(bad[:3])}) to "
                                f"{out}; the adapter is in {adapter_dir}")
    merged.save_pretrained(out)
    trainer.processing_class.save_pretrained(out)
    logger.info("saved the adapter to %s and the merged model to %s", adapter_dir, out)


# Settings that may change between a run and its resumption without changing what is trained.
_RESUMABLE_CHANGES = {"resume", "log_routing_per_layer", "trainer.logging_steps", "trainer.save_steps",
                      "trainer.save_total_limit", "trainer.dataloader_num_workers", "trainer.report_to"}


def _checkpoint_to_resume(config: TrainConfig, out: Path) -> str | None:
    """The newest complete checkpoint of this recipe in ``out`` (None to start afresh).

    A checkpoint is complete when its trainer state and weights were written (Trainer writes the state last,
    so a save cut by a kill is skipped). Checkpoints of a different recipe are refused, not silently resumed.
    """
    if not config.resume:
        return None
    complete = []
    for path in out.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        weights = any((path / name).is_file() for name in _WEIGHT_FILES)
        deepspeed = any(p.is_dir() for p in path.glob("global_step*"))
        if step.isdigit() and (path / "trainer_state.json").is_file() and (weights or deepspeed):
            complete.append((int(step), path))
        else:
            logger.warning("ignoring incomplete checkpoint %s (interrupted while saving?)", path)
    if not complete:
        return None
    newest = max(complete)[1]
    previous = out / "pmod_train.yaml"
    if previous.is_file():
        try:
            old = read_recipe_yaml(previous.read_text(encoding="utf-8")) or {}
            if not isinstance(old, dict):
                raise yaml.YAMLError("not a mapping of settings")
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise PModInputError(f"{previous} (the recipe of the checkpoints in {out}) is unreadable ({exc}); use "
                                 "another output_dir, or resume=false to start over in this one") from exc
        old, new = _flat(old), _flat(config.to_dict())
        changed = sorted(k for k in set(old) | set(new) if k not in _RESUMABLE_CHANGES and old.get(k) != new.get(k))
        if changed:
            raise PModConfigError(
                f"{out} holds checkpoints of a different recipe (changed: {', '.join(changed)}); use another "
                "output_dir, or resume=false to start over in this one"
            )
    _check_checkpoint(newest)
    return str(newest)


def _flat(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe with its trainer settings as ``trainer.NAME`` keys, so that they are compared one by one."""
    trainer = recipe.get("trainer")
    flat = {k: v for k, v in recipe.items() if k != "trainer" or not isinstance(trainer, dict)}
    return flat | ({f"trainer.{k}": v for k, v in trainer.items()} if isinstance(trainer, dict) else {})


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json",
                 "adapter_model.safetensors", "adapter_model.bin")  # the last two: LoRA runs


def _check_checkpoint(path: Path) -> None:
    """A `PModInputError` naming checkpoint ``path`` when a file the resumption reads is unreadable (truncated by a
    full disk, a copy cut short): cheap checks of the trainer state, the weights' headers and the torch files."""
    def broken(name: str, why: str) -> PModInputError:
        return PModInputError(
            f"checkpoint {path} is damaged ({name}: {why}); delete that folder to resume from an earlier "
            "checkpoint, or set resume: false (override resume=false) to start over"
        )

    shards: set[str] = set()
    for name in ("trainer_state.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if not (path / name).is_file():
            continue
        try:
            content = json.loads((path / name).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise broken(name, f"not valid JSON ({exc})") from exc
        key = "global_step" if name == "trainer_state.json" else "weight_map"
        if not isinstance(content, dict) or key not in content:
            raise broken(name, f"no {key}")
        if key == "weight_map":
            if not isinstance(content[key], dict) or not all(isinstance(v, str) for v in content[key].values()):
                raise broken(name, "the weight_map does not map weights to files")
            shards |= set(content[key].values())
    for name in sorted(shards | {n for n in _WEIGHT_FILES if not n.endswith(".json")}):
        file = path / name
        if not file.is_file():
            if name in shards:
                raise broken(name, "missing, but listed in the index")
            continue
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="pt"):  # reads the header, checks it covers the file
                    pass
            except Exception as exc:  # safetensors raises its own SafetensorError
                raise broken(name, str(exc)) from exc
        elif not zipfile.is_zipfile(file):
            raise broken(name, "not a complete torch file")
    for file in sorted(path.glob("*.pt")) + sorted(path.glob("*.pth")):  # optimizer, scheduler, RNG states
        if not zipfile.is_zipfile(file):
            raise broken(file.name, "not a complete torch file")


def _check_router_optimizer(config: TrainConfig) -> None:
    """A DeepSpeed config with its own optimizer bypasses the Trainer's parameter groups (and the router and
    projector rates)."""
    rates = [n for n in ("router_learning_rate", "projector_learning_rate") if getattr(config, n) is not None]
    deepspeed = config.trainer.get("deepspeed")
    if rates and deepspeed and "optimizer" in _deepspeed_config(deepspeed):
        raise PModConfigError(
            f"{' and '.join(rates)} need{'s' if len(rates) == 1 else ''} the Trainer's optimizer, but "
            f"{deepspeed} defines one; remove its 'optimizer' section or the {' and '.join(rates)} setting"
        )


def _deepspeed_config(value: str | dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``deepspeed`` setting as a mapping (a JSON file is read)."""
    if isinstance(value, dict):
        return value
    try:
        ds = json.loads(Path(value).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PModConfigError(f"deepspeed config {value} does not exist (see configs/deepspeed/)") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PModConfigError(f"deepspeed config {value} is not valid JSON: {exc}") from exc
    if not isinstance(ds, dict):
        raise PModConfigError(f"deepspeed config {value} must hold a JSON object")
    return ds


def _training_arguments(config: TrainConfig) -> TrainingArguments:
    """`TrainingArguments` from the recipe's trainer mapping, with pmod's own settings and what this machine needs."""
    kwargs = {"dataloader_pin_memory": torch.cuda.is_available(), **config.trainer}
    checkpointing = _trainer_name("gradient_checkpointing")
    if kwargs.get(checkpointing):  # reentrant checkpointing loses the gradients of inputs that do not need them
        kwargs.setdefault(f"{checkpointing}_kwargs", {"use_reentrant": False})
    report_to = [kwargs["report_to"]] if isinstance(kwargs.get("report_to"), str) else kwargs.get("report_to")
    if isinstance(report_to, list) and not {"all", "none"} & set(report_to):
        kwargs["report_to"] = _report_to(report_to)  # those installed: TrainingArguments fails on the others
    if kwargs.get("bf16") and "use_cpu" not in kwargs:
        from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

        # bf16 on a machine with no bf16 accelerator is autocast on the CPU, which TrainingArguments wants said
        kwargs["use_cpu"] = not (is_torch_bf16_gpu_available() or is_torch_xla_available())
    if isinstance(kwargs.get("deepspeed"), str):
        _deepspeed_config(kwargs["deepspeed"])  # a missing or broken file named as such
    try:
        args = TrainingArguments(output_dir=config.output_dir, remove_unused_columns=False, **kwargs)
    except (TypeError, ValueError) as exc:  # e.g. an unknown lr_scheduler_type, bf16 without support
        raise PModConfigError(f"invalid trainer settings: {exc}") from exc
    if args.data_seed is None:  # accelerate's sampler would take torch's initial seed: the data order from the recipe's
        args.data_seed = args.seed
    return args


def _save_recipe(config: TrainConfig, out: Path) -> None:
    """The resolved recipe beside the checkpoints (written atomically), so a run can be reproduced."""
    write_text_atomic(out / "pmod_train.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
