"""Training p-MoD models: a typed recipe, the transformers `Trainer` with p-MoD extras, and `pmod train`.

The engine is the transformers `Trainer` (accelerate underneath; DeepSpeed ZeRO through ``deepspeed:`` and
FSDP through ``fsdp:`` / an accelerate config). What this module adds:

* `TrainConfig`: one dataclass for a recipe (``configs/*.yaml``), with ``key=value`` overrides.
* stages: ``pretrain`` trains the projector only; ``finetune`` trains the language model, the projector and
  the routers (vision tower frozen unless ``freeze_vision_tower: false``).
* a separate router learning rate, length-grouped batches from cheap length estimates (no image decoding),
  routing statistics (realised kept fraction and mean TanhNorm router weight per routed layer) in the logs,
  the number of skipped (unreadable) records, and resume from the last checkpoint after a kill.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import importlib.util
import logging
import math
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from .config import PModConfig
from .conversation import PLACEHOLDERS
from .data import SKIP_KEY, LlavaCollator, LlavaDataset, load_records, padding_image_processor
from .errors import PModConfigError, PModInputError
from .files import write_text_atomic

logger = logging.getLogger(__name__)

Stage = Literal["pretrain", "finetune"]


@dataclass
class TrainConfig:
    """A training recipe. Paths are relative to the working directory.

    Attributes:
        model_name_or_path: a saved model directory: dense (converted with ``pmod``) or already p-MoD.
        tiny_model: instead of a checkpoint, build a tiny model (`build_tiny`: ``arch`` llava, llava-onevision,
            qwen2-vl or qwen2.5-vl, and the `pmod.tiny` builder's arguments), with a word-level tokenizer over the training
            data's words and ``words`` (CPU recipes and the demo).
        pmod: `PModConfig` fields applied to a dense model; ``null`` trains the dense model (a baseline).
        data_path: LLaVA-format JSON (or JSONL) training data.
        image_folder: folder that the records' image paths are relative to.
        chat_template: ``vicuna_v1`` (the original LLaVA conversation format, system prompt included), a Jinja
            chat template, or null to keep the processor's own.
        synthetic_data: `pmod.synthetic.SyntheticConfig` fields; the dataset is generated into
            ``{output_dir}/data`` when ``data_path`` is not given (CPU recipes and the demo).
        stage: ``pretrain`` (projector only) or ``finetune`` (language model + projector + routers).
        freeze_vision_tower: keep the vision encoder frozen in ``finetune``.
        router_learning_rate: learning rate of the routers (default: ``learning_rate``).
        pad_images: LLaVA-1.5 "pad" image preprocessing (square, mean colour, then resize): the processor is
            switched to transformers' LLaVA image processor with ``do_pad`` and saved so, for evaluation too.
        group_by_length: batches of similar length (fewer padded tokens).
        resume: continue from the last ``checkpoint-*`` in ``output_dir`` if there is one.
        log_routing_per_layer: log each routed layer's statistics, not only their mean.
        training_args: any further `transformers.TrainingArguments` fields.
    """

    output_dir: str = "runs/pmod"
    model_name_or_path: str | None = None
    tiny_model: dict[str, Any] | None = None
    pmod: dict[str, Any] | None = field(default_factory=dict)
    attn_implementation: str | None = None
    data_path: str | None = None
    image_folder: str | None = None
    chat_template: str | None = None
    synthetic_data: dict[str, Any] | None = None
    stage: Stage = "finetune"
    freeze_vision_tower: bool = True
    learning_rate: float = 2e-5
    router_learning_rate: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    model_max_length: int = 2048
    pad_images: bool = False
    group_by_length: bool = True
    bf16: bool = False
    gradient_checkpointing: bool = False
    dataloader_num_workers: int = 0
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 1
    seed: int = 42
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    deepspeed: str | None = None
    fsdp: str | None = None
    fsdp_config: dict[str, Any] | None = None
    resume: bool = True
    log_routing_per_layer: bool = False
    training_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stage not in ("pretrain", "finetune"):
            raise PModConfigError(f"stage must be 'pretrain' or 'finetune', got {self.stage!r}")
        if (self.model_name_or_path is None) == (self.tiny_model is None):
            raise PModConfigError("give exactly one of model_name_or_path (a saved model) and tiny_model (build one)")
        if self.data_path is None and self.synthetic_data is None:
            raise PModConfigError("give data_path (LLaVA-format JSON) or synthetic_data (generate a dataset)")
        if self.pmod is not None:
            PModConfig(**self.pmod)  # fail now on a bad schedule, not after loading the model
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            detail = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise PModConfigError(f"unknown training setting {detail}; known settings: {', '.join(sorted(names))}")
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()} if (hints := typing.get_type_hints(cls)) else values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """YAML reads ``1e-4`` (no dot) as a string: numbers in strings become numbers for numeric settings."""
    args = typing.get_args(hint) or (hint,)
    if not isinstance(value, str) or str in args:
        return value
    for kind in (int, float):
        if kind in args:
            try:
                return kind(value) if kind is float else int(float(value)) if float(value).is_integer() else float(value)
            except ValueError:
                pass
    if int in args or float in args:
        raise PModConfigError(f"{name} must be a number, got {value!r}")
    return value


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe and apply ``key=value`` overrides (dotted keys reach into mappings, values are YAML)."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PModConfigError(f"training recipe {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise PModConfigError(f"{path} must hold a mapping of training settings")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PModConfigError(f"override {item!r} is not of the form key=value (e.g. learning_rate=1e-5)")
        value = yaml.safe_load(raw) if raw else None
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
        for turn in record.get("conversations", []):
            text = str(turn.get("value", ""))
            for placeholder in PLACEHOLDERS:
                text = text.replace(placeholder, " ")
            for word, _ in split.pre_tokenize_str(text):
                words[word] = None
    return list(words)


TINY_ARCHES = ("llava", "llava-onevision", "qwen2-vl", "qwen2.5-vl")


def build_tiny(settings: dict[str, Any], records: list[dict[str, Any]], attn_implementation: str | None,
               extra_words: list[str] | None = None):
    """A tiny random model and its processor, with a word-level vocabulary covering ``records`` and
    ``extra_words``. ``settings["arch"]``: ``llava`` (default; `pmod.tiny.tiny_llava` arguments),
    ``llava-onevision`` (`pmod.tiny.tiny_llava_onevision`), ``qwen2-vl`` or ``qwen2.5-vl``
    (`pmod.tiny.tiny_qwen2_vl` arguments, plus ``image_size``: images resized to about ``image_size**2`` pixels,
    keeping their aspect ratio; square images become ``image_size`` squares)."""
    from .tiny import (
        tiny_llava,
        tiny_llava_onevision,
        tiny_llava_onevision_processor,
        tiny_llava_processor,
        tiny_qwen2_vl,
        tiny_qwen2_vl_processor,
    )

    settings = dict(settings)
    arch = settings.pop("arch", "llava")
    if arch not in TINY_ARCHES:
        raise PModConfigError(f"tiny_model.arch must be one of {', '.join(TINY_ARCHES)}, got {arch!r}")
    roles = ["USER", "ASSISTANT", ":"] if arch == "llava" else ["user", "assistant", "system"]
    words = roles + _words(records) + list(extra_words or []) + list(settings.pop("words", []))
    reserved = 6 if arch == "llava" else 10  # special and placeholder tokens, and a spare id
    vocab = settings.pop("vocab_size", None) or 8 * math.ceil((len(set(words)) + reserved) / 8)
    if attn_implementation:
        settings["attn_implementation"] = attn_implementation
    if arch == "llava":
        model = tiny_llava(vocab_size=vocab, **settings)
        return model, tiny_llava_processor(model, words)
    if arch == "llava-onevision":
        model = tiny_llava_onevision(vocab_size=vocab, **settings)
        return model, tiny_llava_onevision_processor(model, words)
    image_size = settings.pop("image_size", None)
    model = tiny_qwen2_vl(vocab_size=vocab, version=arch[4:-3], **settings)
    return model, tiny_qwen2_vl_processor(model, words, image_size=image_size)


def build_model(config: TrainConfig, records: list[dict[str, Any]], extra_words: list[str] | None = None):
    """The model to train (p-MoD unless ``pmod`` is null) and its processor (with the recipe's chat template)."""
    model, processor = _model_and_processor(config, records, extra_words)
    if config.chat_template is not None:
        from .conversation import resolve_chat_template

        processor.chat_template = resolve_chat_template(config.chat_template)
    if config.pad_images:
        processor.image_processor = padding_image_processor(processor.image_processor)
    return model, processor


def _model_and_processor(config: TrainConfig, records: list[dict[str, Any]], extra_words: list[str] | None):
    from transformers import AutoConfig

    from .models import apply_pmod, load_model, load_pretrained, load_processor

    kwargs = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    if config.tiny_model is not None:
        model, processor = build_tiny(config.tiny_model, records, config.attn_implementation, extra_words)
        if config.pmod is not None:
            model = apply_pmod(model, PModConfig(**config.pmod))
        return model, processor
    path = config.model_name_or_path
    if not Path(path).is_dir():
        raise PModConfigError(f"model_name_or_path {path!r} is not a directory (no model hub access is assumed)")
    if AutoConfig.from_pretrained(path).model_type.startswith("pmod_"):
        if config.pmod:
            raise PModConfigError(f"{path} is already a p-MoD model; remove the 'pmod' settings from the recipe")
        model = load_pretrained(path, **kwargs)
    elif config.pmod is not None:
        model = load_model(path, PModConfig(**config.pmod), **kwargs)
    else:
        model = load_pretrained(path, **kwargs)  # the dense baseline, as it is
    return model, load_processor(path, need_images=False)  # text-only models train too


def set_trainable(model: torch.nn.Module, stage: Stage, freeze_vision_tower: bool = True) -> dict[str, int]:
    """Freeze parameters for a stage; returns trainable parameter counts by part."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        dotted = "." + name  # Qwen2-VL's parts sit at model.visual (ForConditionalGeneration) or visual (Model)
        part = (  # LLaVA family: vision_tower, multi_modal_projector; Qwen2-VL: visual, with visual.merger projecting
            "projector" if "multi_modal_projector" in name or ".visual.merger." in dotted
            else "vision_tower" if "vision_tower" in name or ".visual." in dotted
            else "router" if ".router." in name
            else "image_newline" if "image_newline" in name
            else "language_model"
        )
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


def tokens_per_image(model: torch.nn.Module) -> int:
    """Image tokens of one image for length estimates (LLaVA-NeXT: the base grid, a lower bound; Qwen2-VL: a
    448 x 448 image)."""
    vision = getattr(model.config, "vision_config", None)
    if vision is None:
        return 0
    if not hasattr(vision, "image_size"):  # dynamic resolution (Qwen2-VL): a typical 448 x 448 image
        return (448 // (vision.patch_size * getattr(vision, "spatial_merge_size", 1))) ** 2
    return (vision.image_size // vision.patch_size) ** 2


# ------------------------------------------------------------------------------------------------ the trainer
class PModTrainer(Trainer):
    """`Trainer` with a router learning rate, cheap length grouping, routing statistics and skip counts."""

    def __init__(self, *args, router_learning_rate: float | None = None, group_lengths: list[int] | None = None,
                 log_routing_per_layer: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.router_learning_rate = router_learning_rate
        self.group_lengths = group_lengths
        self.log_routing_per_layer = log_routing_per_layer
        self.skipped_records = 0
        self._routing_sums: dict[int, torch.Tensor] = {}  # layer -> [kept, targets, weight sum]

    def _get_train_sampler(self, train_dataset=None):
        if self.group_lengths is None:
            return super()._get_train_sampler(train_dataset) if train_dataset is not None else super()._get_train_sampler()
        return _EpochLengthGroupedSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps, self.group_lengths, self.args.seed
        )

    def create_optimizer(self, model=None):
        if self.router_learning_rate is None or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: list[dict[str, Any]] = [
            {"params": [], "weight_decay": self.args.weight_decay},
            {"params": [], "weight_decay": 0.0},
            {"params": [], "weight_decay": 0.0, "lr": self.router_learning_rate},
        ]
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups[2 if ".router." in name else 0 if name in decay else 1]["params"].append(param)
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
        saved = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype)
        try:
            target.load_state_dict(saved.state_dict(), strict=True)
        except RuntimeError as exc:
            raise PModInputError(f"checkpoint {resume_from_checkpoint} does not match the model being trained: {exc}") from exc

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop(SKIP_KEY, None)
        if skipped is not None:
            self.skipped_records += int(skipped)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
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
        return Path(config.data_path), Path(config.image_folder) if config.image_folder else None, []
    from .synthetic import SyntheticConfig, write_dataset

    try:
        settings = SyntheticConfig(**config.synthetic_data)
    except (TypeError, ValueError) as exc:
        raise PModConfigError(f"synthetic_data: {exc}") from exc
    dataset = write_dataset(Path(config.output_dir) / "data", settings)
    return dataset.train_json, dataset.image_dir, dataset.vocabulary()


def train(config: TrainConfig, stop_after: int | None = None) -> TrainResult:
    """Run a training recipe; saves checkpoints under ``output_dir`` and the final model (with its processor) there.

    ``stop_after`` ends the run after that many optimizer steps with a checkpoint, as a kill would between two
    saves (used by tests of resuming).
    """
    start = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = _checkpoint_to_resume(config, out)
    # TrainingArguments first: it sets up the distributed state (and DeepSpeed ZeRO-3 partitioned loading)
    # that building the model and preparing the data rely on.
    args = _training_arguments(
        dict(
            output_dir=str(out),
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of the total steps
            lr_scheduler_type=config.lr_scheduler_type,
            num_train_epochs=config.num_train_epochs,
            max_steps=config.max_steps,
            per_device_train_batch_size=config.per_device_train_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            bf16=config.bf16,
            **_checkpointing_arguments(config.gradient_checkpointing),
            dataloader_pin_memory=torch.cuda.is_available(),
            dataloader_num_workers=config.dataloader_num_workers,
            logging_steps=config.logging_steps,
            save_steps=config.save_steps,
            save_total_limit=config.save_total_limit,
            seed=config.seed,
            data_seed=config.seed,
            report_to=_report_to(config.report_to),
            deepspeed=config.deepspeed,
            fsdp=config.fsdp,
            fsdp_config=config.fsdp_config,
            remove_unused_columns=False,
            # bf16 autocast on a machine without a GPU needs to be told it is on the CPU
            **({"use_cpu": True} if _bf16_needs_cpu_flag(config) else {}),
        ),
        config.training_args,
    )
    _check_router_optimizer(config)
    with args.main_process_first(desc="preparing data"):  # one process writes generated data, the others read
        data_path, image_folder, words = prepare_data(config)
    records = load_records(data_path)
    model, processor = build_model(config, records, words)
    trainable = set_trainable(model, config.stage, config.freeze_vision_tower)
    logger.info("trainable parameters: %s", ", ".join(f"{k} {v:,}" for k, v in trainable.items()))
    dataset = LlavaDataset(records, processor, image_folder, config.model_max_length, tokens_per_image(model))
    tokenizer = getattr(processor, "tokenizer", processor)
    collator = LlavaCollator(pad_token_id=tokenizer.pad_token_id or 0, count_in_batch=True)
    if config.gradient_checkpointing:
        model.config.use_cache = False
    trainer = PModTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        router_learning_rate=config.router_learning_rate,
        group_lengths=dataset.lengths if config.group_by_length else None,
        log_routing_per_layer=config.log_routing_per_layer,
        callbacks=[_StopAfter(stop_after)] if stop_after else None,
    )
    if resume:
        logger.info("resuming from %s", resume)
    if trainer.is_world_process_zero():
        _save_recipe(config, out)
    trainer.train(resume_from_checkpoint=resume)
    if stop_after is None:
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
    )


# Settings that may change between a run and its resumption without changing what is trained.
_RESUMABLE_CHANGES = {"resume", "logging_steps", "save_steps", "save_total_limit", "dataloader_num_workers",
                      "report_to", "log_routing_per_layer"}


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
        weights = any((path / name).is_file() for name in (
            "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"))
        deepspeed = any(p.is_dir() for p in path.glob("global_step*"))
        if step.isdigit() and (path / "trainer_state.json").is_file() and (weights or deepspeed):
            complete.append((int(step), path))
        else:
            logger.warning("ignoring incomplete checkpoint %s (interrupted while saving?)", path)
    if not complete:
        return None
    previous = out / "pmod_train.yaml"
    if previous.is_file():
        import yaml

        old = yaml.safe_load(previous.read_text()) or {}
        new = config.to_dict()
        changed = sorted(k for k in set(old) | set(new) if k not in _RESUMABLE_CHANGES and old.get(k) != new.get(k))
        if changed:
            raise PModConfigError(
                f"{out} holds checkpoints of a different recipe (changed: {', '.join(changed)}); use another "
                "output_dir, or resume=false to start over in this one"
            )
    return str(max(complete)[1])


def _bf16_needs_cpu_flag(config: TrainConfig) -> bool:
    """bf16 on a machine with no bf16 accelerator is autocast on the CPU, which TrainingArguments wants said."""
    if not config.bf16 or "use_cpu" in config.training_args:
        return False
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return not (is_torch_bf16_gpu_available() or is_torch_xla_available())


def _check_router_optimizer(config: TrainConfig) -> None:
    """A DeepSpeed config with its own optimizer bypasses the Trainer's parameter groups (and the router rate)."""
    if config.router_learning_rate is None or not config.deepspeed:
        return
    ds = json.loads(Path(config.deepspeed).read_text()) if isinstance(config.deepspeed, str) else config.deepspeed
    if "optimizer" in ds:
        raise PModConfigError(
            f"router_learning_rate needs the Trainer's optimizer, but {config.deepspeed} defines one; remove its "
            "'optimizer' section or the router_learning_rate setting"
        )


@functools.cache
def _training_argument_names() -> frozenset[str]:
    """The settings this transformers version's TrainingArguments has."""
    return frozenset(f.name for f in dataclasses.fields(TrainingArguments))


def _checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing under this transformers version's name for it (renamed in 5.2x)."""
    known = _training_argument_names()
    name = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    out: dict[str, Any] = {name: enabled}
    if enabled:
        out[f"{name}_kwargs"] = {"use_reentrant": False}
    return out


def _training_arguments(kwargs: dict[str, Any], extra: dict[str, Any]) -> TrainingArguments:
    """`TrainingArguments` from the recipe plus ``training_args``; settings this transformers version lacks, or
    that ``training_args`` repeats, are refused clearly."""
    clash = sorted(set(kwargs) & set(extra))
    if clash:
        raise PModConfigError(f"training_args repeats recipe settings {clash}; set them at the top level of the recipe")
    kwargs = {**kwargs, **extra}
    known = _training_argument_names()
    unknown = sorted(k for k in kwargs if k not in known)
    if unknown:
        raise PModConfigError(
            f"transformers {__import__('transformers').__version__} TrainingArguments has no {', '.join(unknown)}; "
            "remove them from training_args"
        )
    for key in ("fsdp", "fsdp_config", "deepspeed", "gradient_checkpointing_kwargs"):
        if kwargs.get(key) is None:
            kwargs.pop(key, None)
    return TrainingArguments(**kwargs)


def _save_recipe(config: TrainConfig, out: Path) -> None:
    """The resolved recipe beside the checkpoints (written atomically), so a run can be reproduced."""
    import yaml

    write_text_atomic(out / "pmod_train.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
