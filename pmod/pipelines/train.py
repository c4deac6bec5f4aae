"""Training p-MoD models: `train` runs a recipe (`pmod.pipelines.recipe.TrainConfig`) with `PModTrainer`.

The engine is the transformers `Trainer` (accelerate underneath; DeepSpeed ZeRO through ``trainer.deepspeed`` and
FSDP through ``trainer.fsdp`` / an accelerate config). What this module adds:

* the model to train (a saved model, converted to p-MoD unless the recipe's ``pmod`` is null, or a tiny one) and
  its data; the recipe's ``trainer`` mapping goes to `transformers.TrainingArguments` as it is.
* stages: ``pretrain`` trains the projector only; ``finetune`` trains the language model, the projector and
  the routers (vision tower frozen unless ``freeze_vision_tower: false``), in full or, with a ``lora:`` section,
  with LoRA adapters on the language model (`pmod.pipelines.lora`).
* a separate router learning rate, length-grouped batches from cheap length estimates (no image decoding),
  routing statistics (realised kept fraction and mean TanhNorm router weight per routed layer) in the logs,
  the number of skipped (unreadable) records, and resume from the last checkpoint after a kill.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments

from ..checkpoints import check_weight_file, inspect_weight_files
from ..data.conversation import PLACEHOLDERS
from ..data.records import LlavaCollator, LlavaDataset, check_records, load_records, padding_image_processor
from ..errors import CheckpointError, PModConfigError, PModInputError, PModTrainingError
from ..files import check_output_apart, output_lock, write_text_atomic
from ..tiny import build_tiny
from .recipe import Stage, TrainConfig, read_recipe_yaml, trainer_name
from .trainer import FiniteGradients, PModTrainer, model_part, non_finite_parameters

logger = logging.getLogger(__name__)


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
    completed: bool = True  # false when a callback stopped the run early: no final model, resumable
    max_steps: int = 0  # the steps the run was planned for


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


def train(config: TrainConfig, callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """Run a training recipe; saves checkpoints under ``output_dir`` and the final model (with its processor) there.
    The main process holds ``output_dir`` (`pmod.files.output_lock`): a second run into it is refused.

    ``callbacks`` are added to the Trainer's. One that stops the run before its last step (``should_training_stop``)
    leaves it as an interruption does: its checkpoints are written, the final model is not, and the same recipe
    resumes it (`TrainResult.completed` is false).
    """
    out = Path(config.output_dir)
    # the final model is saved into output_dir: it must not be (or lie in) the model it starts from
    base = config.model_name_or_path if config.model_name_or_path and Path(config.model_name_or_path).exists() else None
    check_output_apart(out, {"base model": base}, PModConfigError)
    main_process = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0  # other ranks share the folder
    with output_lock(out, "pmod train", PModInputError) if main_process else contextlib.nullcontext():
        return _train(config, out, list(callbacks))


def _train(config: TrainConfig, out: Path, callbacks: list[TrainerCallback]) -> TrainResult:
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
    if getattr(args, trainer_name("gradient_checkpointing")):
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
        callbacks=callbacks or None,
    )
    if not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        trainer.add_callback(FiniteGradients())
    if resume:
        logger.info("resuming from %s", resume)
    if trainer.is_world_process_zero():
        _save_recipe(config, out)
    trainer.train(resume_from_checkpoint=resume)
    completed = trainer.state.global_step >= trainer.state.max_steps
    if not completed:
        logger.warning("training stopped at step %d of %d; the final model is not saved: run the same recipe to "
                       "resume from the last checkpoint in %s", trainer.state.global_step, trainer.state.max_steps, out)
    elif lora_base is not None:
        _save_lora(trainer, out, lora_base)
    else:
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
        adapter_dir=out / ADAPTER_DIR if lora_base is not None and completed else None,
        completed=completed,
        max_steps=trainer.state.max_steps,
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
    bad = non_finite_parameters(merged)
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
        weights = any((path / name).is_file() for name in (*_MODEL_WEIGHTS, *_ADAPTER_WEIGHTS))
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


_MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # LoRA runs


def _check_checkpoint(path: Path) -> None:
    """A `PModInputError` naming checkpoint ``path`` when a file the resumption reads is unreadable (truncated by a
    full disk, a copy cut short): cheap checks of the trainer state, the weights (`pmod.checkpoints`: the shard index,
    the safetensors headers) and the torch files (optimizer, scheduler, RNG states: complete zip archives, as the
    Trainer writes them)."""
    advice = f"delete {path} to resume from an earlier checkpoint, or set resume: false (override resume=false) to " \
             "start over"
    state = path / "trainer_state.json"
    try:
        content = json.loads(state.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PModInputError(f"checkpoint {path} is damaged: {state.name} is not valid JSON ({exc}); {advice}") from exc
    if not isinstance(content, dict) or "global_step" not in content:
        raise PModInputError(f"checkpoint {path} is damaged: {state.name} has no global_step; {advice}")
    try:
        if any((path / n).is_file() for n in _MODEL_WEIGHTS):
            inspect_weight_files(path, CheckpointError, advice)
        for name in _ADAPTER_WEIGHTS:
            if (path / name).is_file():
                check_weight_file(path / name, CheckpointError, advice)
    except CheckpointError as exc:  # its message names the file and ends with the advice
        raise PModInputError(f"checkpoint {path} is damaged: {exc}") from exc
    for file in sorted(path.glob("*.pt")) + sorted(path.glob("*.pth")):
        if not zipfile.is_zipfile(file):
            raise PModInputError(f"checkpoint {path} is damaged: {file.name} is not a complete torch file; {advice}")


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
    checkpointing = trainer_name("gradient_checkpointing")
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
