"""Checkpoint conversion: a dense transformers LLaVA / LLaVA-NeXT (or Llama/Qwen2/Mistral) checkpoint into an
untrained p-MoD checkpoint (routers at zero), the starting point for training.

Checkpoints are untrusted input. Everything read is checked before anything is written (config, weight files and
shards, tensor names, shapes and dtypes, the resulting settings); the output is built in a hidden folder next to
OUT and moved into place only when complete (`pmod.files.write_dir_atomic`), so a failed or killed conversion
never leaves a half-written OUT, and an existing OUT is replaced (rename, then delete) only with ``force=True``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from ..checkpoints import check_weight_files, inspect_weight_files, preview
from ..config import PModConfig, ResolvedPMod
from ..errors import ConversionError, PModError, describe_names, one_line
from ..files import check_output_apart, check_output_name, output_lock, recover_dir, write_dir_atomic

logger = logging.getLogger(__name__)

# Files save_pretrained writes itself; everything else in SRC (tokenizer, processor, chat template) is carried over.
# what a converted folder takes from its source besides the model: the tokenizer's and the processor's files (not a
# run's metrics, predictions or stamps that happen to sit next to the checkpoint)
_PROCESSOR_FILES = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "image_processor_config.json", "chat_template.json", "chat_template.jinja",
}


def convert_dense(src: str | os.PathLike, out: str | os.PathLike, config: PModConfig | None = None,
                  force: bool = False) -> Path:
    """Convert the dense checkpoint in ``src`` into an untrained p-MoD checkpoint in ``out``; returns ``out``."""
    from transformers import AutoConfig

    from ..loading import check_loaded_weights, dense_model_class
    from ..models import apply_pmod

    src, out = Path(src), Path(out)
    check_output_apart(out, {"source checkpoint": src}, ConversionError, replaces=True)
    _check_source(src)
    _check_output(out, force)
    try:
        hf_config = AutoConfig.from_pretrained(src)
    except Exception as exc:  # not JSON, no model_type, fields of the wrong type: many exception types
        raise ConversionError(f"Cannot read {src / 'config.json'}: {one_line(exc)}") from exc
    if hf_config.model_type.startswith("pmod_"):
        raise ConversionError(f"{src} is already a p-MoD checkpoint ({hf_config.model_type}).")
    base_model = dense_model_class(hf_config.model_type, src)
    try:  # the settings against the model's depth, before the (large) weights are read
        layers = hf_config.get_text_config(decoder=True).num_hidden_layers
    except AttributeError as exc:
        raise ConversionError(f"{src / 'config.json'} gives no num_hidden_layers for the language model.") from exc
    ResolvedPMod.resolve(config if config is not None else PModConfig(), layers)
    files = inspect_weight_files(src)
    try:
        # mismatched sizes are collected (and reported below) instead of aborting with a generic message
        model, info = base_model.from_pretrained(src, output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as exc:  # unreadable tensors, configs the model cannot be built from
        raise ConversionError(f"Cannot load the weights of {src}: {one_line(exc)}") from exc
    check_loaded_weights(model, info, src, files, error=ConversionError)
    model = apply_pmod(model, config)
    _check_settings_round_trip(model)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        left = []
        for item in sorted(src.iterdir()):
            if item.is_file() and item.name in _PROCESSOR_FILES:
                shutil.copy2(item, staging / item.name)
            elif item.is_file() and item.name not in ("config.json", "generation_config.json", "README.md") and not (
                    item.name.endswith((".safetensors", ".bin", ".index.json"))):  # the model: saved anew above
                left.append(item.name)
        if left:
            logger.info("Not copied from %s (not the tokenizer's or processor's): %s", src, ", ".join(left))

    _write_output(out, write, force)
    logger.info("Converted %s -> %s (routed layers %s)", src, out, model.pmod.routed_layers)
    return out


def _check_settings_round_trip(model) -> None:
    """The settings written to config.json must load back (standard JSON, valid for `ResolvedPMod.from_dict`)."""
    try:
        json.dumps(model.config.pmod, allow_nan=False)
    except ValueError as exc:
        raise ConversionError(
            f"The p-MoD settings contain a NaN or infinite number: {model.config.pmod['settings']}."
        ) from exc
    ResolvedPMod.from_dict(model.config.pmod)  # raises PModConfigError, as loading the output would


def _check_source(src: Path) -> None:
    if not src.is_dir():
        raise ConversionError(f"{src} {'is not a directory' if src.exists() else 'does not exist'}: "
                              "pass the checkpoint directory to convert.")
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src} has no config.json; is it a transformers checkpoint directory?")


def _write_output(out: Path, write, force: bool) -> None:
    with output_lock(out, "pmod convert", ConversionError):
        _write_locked(out, write, force)


def _write_locked(out: Path, write, force: bool) -> None:
    """`write_dir_atomic`, replacing an existing OUT only with --force (checked again at the end: a folder that
    appeared while converting is never deleted)."""
    try:
        write_dir_atomic(out, write, replace=force)
    except FileExistsError as exc:
        raise ConversionError(f"{exc}; pass --force to replace it, or choose another output folder.") from exc


def _check_output(out: Path, force: bool) -> None:
    check_output_name(out, ConversionError)  # before the conversion's work, not at its end
    recover_dir(out)  # a conversion killed while replacing OUT: put the old OUT back (or finish the replacement)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise ConversionError(f"{out} already exists and is not empty; pass --force to replace it.")
        if not out.is_dir():
            raise ConversionError(f"{out} exists and is not a directory.")


# ====================================================================== original p-MoD (LLaVA layout)
# The original research code stores settings as strings; this is the one place they are parsed.
_ORIGINAL_SPAN = 31  # the original hard-codes L - 1 = 31 in its schedules, whatever the depth
# mod_target_token_type -> PModConfig.targets. vision_all (both released checkpoints): every vision token, for anyres
# the base image, the high-resolution part and the newlines; vision_hr: only the high-resolution part
_ORIGINAL_TARGETS = {"vision_all": "vision", "vision_hr": "vision_hr", "all": "all"}


def parse_original_settings(cfg: dict, num_layers: int) -> PModConfig:
    """`PModConfig` reproducing the original's ``mod_*`` settings exactly (explicit per-layer ratios)."""
    schedule = str(cfg.get("mod_target_layers", ""))
    parts = schedule.split("_")
    if len(parts) == 4 and parts[1] == "decay" and parts[0] in ("shiftedcos", "shiftedlinear"):
        maximum, minimum = (_ratio_text(parts[2], "mod_target_layers", schedule),
                            _ratio_text(parts[3], "mod_target_layers", schedule))
        if minimum > maximum:
            raise ConversionError(
                f"mod_target_layers {schedule!r}: the minimum {minimum} is above the maximum {maximum}."
            )
        shift = _number(cfg, "mod_router_factor", 0.5)  # the average keep ratio, a in method.md section 3
        raws = [
            0.5 * math.cos(math.pi * i / _ORIGINAL_SPAN) + shift if parts[0] == "shiftedcos"
            else 0.5 - i / _ORIGINAL_SPAN + shift
            for i in range(num_layers)
        ]
        routed = [i for i, raw in enumerate(raws) if raw <= maximum]
        ratios = [max(raw, minimum) if i in routed else 1.0 for i, raw in enumerate(raws)]
    else:
        raise ConversionError(
            f"Unknown mod_target_layers {schedule!r}: supported are 'shiftedcos_decay_MAX_MIN' and "
            "'shiftedlinear_decay_MAX_MIN'."
        )
    norm = str(cfg.get("mod_weight_norm", "tanh_0.2_1")).split("_")
    if len(norm) != 3 or norm[0] != "tanh":
        raise ConversionError(
            f"Unknown mod_weight_norm {cfg.get('mod_weight_norm')!r}: supported is 'tanh_ALPHA_BETA'."
        )
    alpha, beta = (_finite_text(text, "mod_weight_norm", cfg.get("mod_weight_norm")) for text in norm[1:])
    original_targets = str(cfg.get("mod_target_token_type", "vision_all"))
    if original_targets not in _ORIGINAL_TARGETS:
        raise ConversionError(
            f"Unknown mod_target_token_type {original_targets!r}: the original's values are "
            f"{sorted(_ORIGINAL_TARGETS)}."
        )
    targets = _ORIGINAL_TARGETS[original_targets]
    if targets == "vision_hr" and cfg.get("image_aspect_ratio") != "anyres":
        raise ConversionError(
            "mod_target_token_type 'vision_hr' routes the high-resolution part of anyres images, but this checkpoint "
            f"has image_aspect_ratio {cfg.get('image_aspect_ratio')!r} (no high-resolution part)."
        )
    return PModConfig(
        schedule=ratios,
        routed_layers=routed,
        alpha=alpha,
        beta=beta,
        router_bias=_flag(cfg, "mod_bias_enabled", True),
        targets=targets,
    )


def _number(cfg: dict, key: str, default: float) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
        raise ConversionError(f"{key} must be a number in (0, 1], got {value!r}.")
    return float(value)


def _finite_text(text: str, key: str, whole: Any) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConversionError(f"{key} {whole!r}: {text!r} is not a finite number.")
    return value


def _ratio_text(text: str, key: str, whole: Any) -> float:
    value = _finite_text(text, key, whole)
    if not 0 < value <= 1:
        raise ConversionError(f"{key} {whole!r}: {text!r} is not a keep ratio in (0, 1].")
    return value


def _flag(cfg: dict, key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConversionError(f"{key} must be true or false, got {value!r}.")
    return value


def read_state_dict(src: Path) -> dict:
    """All tensors of a checkpoint directory (safetensors or .bin, sharded or not), read safely."""
    import torch
    from safetensors.torch import load_file

    state = {}
    for name in check_weight_files(src):
        path = src / name
        try:
            part = (load_file(path) if name.endswith(".safetensors")
                    else torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # corrupt or truncated files surface as many exception types
            raise ConversionError(f"Cannot read weights from {path}: {one_line(exc)}") from exc
        if not isinstance(part, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in part.items()
        ):
            raise ConversionError(f"Cannot read weights from {path}: expected a mapping of tensor names to tensors, "
                                  f"got {type(part).__name__}{' with other values' if isinstance(part, dict) else ''}.")
        twice = sorted(set(part) & set(state))
        if twice:
            raise ConversionError(f"{path}: tensors stored in another weight file too: {describe_names(twice)}.")
        state.update(part)
    return state


def _vision_config(state: dict, cfg: dict, vision_tower: Path | None):
    """CLIPVisionConfig from the checkpoint's own tensors; heads, activation and eps from --vision-tower if given."""
    from transformers import AutoConfig, CLIPVisionConfig

    prefix = "model.vision_tower.vision_tower.vision_model."
    try:
        patch = state[prefix + "embeddings.patch_embedding.weight"]  # (hidden, 3, p, p)
        positions = state[prefix + "embeddings.position_embedding.weight"]  # (patches + 1, hidden)
        fc1 = state[prefix + "encoder.layers.0.mlp.fc1.weight"]  # (intermediate, hidden)
    except KeyError as exc:
        raise ConversionError(f"The checkpoint has no vision tower weights ({exc.args[0]} missing).") from exc
    for name, tensor, rank in (("patch_embedding", patch, 4), ("position_embedding", positions, 2), ("fc1", fc1, 2)):
        if tensor.dim() != rank:
            raise ConversionError(
                f"The vision tower's {name} weight has shape {tuple(tensor.shape)}; expected {rank} dimensions."
            )
    indices = {
        k[len(prefix + "encoder.layers.") :].split(".", 1)[0] for k in state if k.startswith(prefix + "encoder.layers.")
    }
    if not all(i.isdigit() for i in indices):
        raise ConversionError(
            "Vision tower layer names with a non-numeric index: "
            f"{describe_names(i for i in indices if not i.isdigit())}."
        )
    layers = 1 + max(int(i) for i in indices)
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    image_size = int(round((positions.shape[0] - 1) ** 0.5)) * patch_size
    extra = {"num_attention_heads": hidden // 64, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    source = vision_tower or (
        Path(cfg["mm_vision_tower"]) if Path(str(cfg.get("mm_vision_tower", ""))).is_dir() else None
    )
    if source is not None:
        try:
            vc = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise ConversionError(f"Cannot read the vision tower config in {source}: {one_line(exc)}") from exc
        vc = getattr(vc, "vision_config", vc)
        extra = {k: getattr(vc, k) for k in extra}
    elif hidden % 64:
        raise ConversionError(
            f"Cannot infer the vision tower's attention heads (hidden size {hidden}); pass --vision-tower DIR "
            f"with its config (mm_vision_tower is {cfg.get('mm_vision_tower')!r})."
        )
    elif cfg.get("mm_vision_tower"):
        logger.warning(
            "Vision tower %r is not a local directory: its shape is read from the checkpoint, with %d heads, "
            "quick_gelu and eps 1e-5 (CLIP defaults); pass --vision-tower DIR to read them from its config.",
            cfg["mm_vision_tower"],
            extra["num_attention_heads"],
        )
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=fc1.shape[0],
        num_hidden_layers=layers,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
        **extra,
    )


# config.json fields of the language model -> what they must be (the first five are required)
_TEXT_FIELDS: dict[str, str] = {
    "vocab_size": "count", "hidden_size": "count", "intermediate_size": "count", "num_hidden_layers": "count",
    "num_attention_heads": "count", "num_key_value_heads": "count", "max_position_embeddings": "count",
    "rms_norm_eps": "positive", "rope_theta": "positive", "hidden_act": "name", "bos_token_id": "token",
    "eos_token_id": "tokens", "pad_token_id": "token", "attention_bias": "flag",
}
_REQUIRED_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_FIELD_KINDS = {
    "count": "a positive integer",
    "positive": "a positive finite number",
    "name": "a string",
    "token": "a token id (an integer) or null",
    "tokens": "a token id, a list of token ids or null",
    "flag": "true or false",
}


def _valid_field(value: Any, kind: str) -> bool:
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if kind == "count":
        return integer(value) and value > 0
    if kind == "positive":
        return (integer(value) or isinstance(value, float)) and math.isfinite(value) and value > 0
    if kind == "name":
        return isinstance(value, str)
    if kind == "token":  # some Llama configs say -1 for "no padding token"
        return value is None or integer(value)
    if kind == "tokens":
        return value is None or integer(value) or isinstance(value, list) and all(integer(v) for v in value)
    return isinstance(value, bool)


def _read_original_config(src: Path) -> tuple[dict, Path]:
    """The original config.json, with every field the conversion reads checked; errors name the file."""
    path = src / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise ConversionError(f"Cannot read {path}: it is not a JSON file ({one_line(exc)}).") from exc
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path} must hold a JSON object (the model's settings), got a {type(cfg).__name__}.")
    if cfg.get("model_type") != "pmod_llava_llama":
        raise ConversionError(
            f"{src} is a {cfg.get('model_type')!r} checkpoint; expected the original 'pmod_llava_llama'."
        )
    absent = [k for k in _REQUIRED_TEXT_FIELDS if k not in cfg]
    if absent:
        raise ConversionError(f"{path} has no {', '.join(absent)}: the language model's shape cannot be known.")
    for key, kind in _TEXT_FIELDS.items():
        if key in cfg and not _valid_field(cfg[key], kind):
            raise ConversionError(f"{path}: {key} must be {_FIELD_KINDS[kind]}, got {preview(cfg[key])}.")
    for key in ("image_aspect_ratio", "mm_patch_merge_type", "mm_projector_type", "mm_vision_select_feature",
                "mod_target_layers", "mod_weight_norm", "mod_target_token_type"):
        if key in cfg and not isinstance(cfg[key], str):
            raise ConversionError(f"{path}: {key} must be a string, got {preview(cfg[key])}.")
    layer = cfg.get("mm_vision_select_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ConversionError(f"{path}: mm_vision_select_layer must be an integer, got {preview(layer)}.")
    return cfg, path


def _rename_original(key: str) -> str | None:
    """Original LLaVA-layout key -> parameter name of the transformers p-MoD model (None: not a parameter)."""
    if key.startswith("model.vision_tower.vision_tower.vision_model."):  # CLIPVisionModel of transformers 4.x
        return "model.vision_tower." + key[len("model.vision_tower.vision_tower.vision_model.") :]
    if key.startswith(("model.mm_projector.", "model.layers.")) and key.count(".") < 3:
        return "?" + key  # no parameter name after the index
    if key.startswith("model.mm_projector."):
        index, rest = key[len("model.mm_projector.") :].split(".", 1)
        return {
            "0": "model.multi_modal_projector.linear_1.", "2": "model.multi_modal_projector.linear_2."
        }.get(index, "?") + rest
    if key == "model.image_newline":
        return "model.image_newline"
    if key.startswith("model.layers."):
        rest = key[len("model.layers.") :]
        layer, rest = rest.split(".", 1)
        rest = rest.replace("decoder_layer.", "", 1) if rest.startswith("decoder_layer.") else rest
        rest = "router." + rest[len("router.router.") :] if rest.startswith("router.router.") else rest
        return f"model.language_model.layers.{layer}.{rest}"
    if key.startswith("model.embed_tokens.") or key.startswith("model.norm."):
        return "model.language_model." + key[len("model.") :]
    if key == "lm_head.weight":
        return key
    if key.endswith("rotary_emb.inv_freq"):
        return None  # a buffer recomputed from the config
    return "?" + key


def convert_original(
    src: str | os.PathLike, out: str | os.PathLike, vision_tower: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Convert a checkpoint saved by the original p-MoD code (LLaVA layout) into a pmod checkpoint in ``out``."""
    import torch
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    from ..models import apply_pmod

    src, out = Path(src), Path(out)
    check_output_apart(out, {"source checkpoint": src, "vision tower": vision_tower}, ConversionError,
                       replaces=True)
    _check_source(src)
    _check_output(out, force)
    cfg, config_file = _read_original_config(src)
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConversionError(
            f"{config_file}: mm_projector_type {cfg['mm_projector_type']!r} is not supported (only 'mlp2x_gelu')."
        )
    anyres = cfg.get("image_aspect_ratio") == "anyres"
    merge = cfg.get("mm_patch_merge_type", "flat")
    if anyres and not merge.startswith("spatial_unpad") or (not anyres and merge != "flat"):
        raise ConversionError(
            f"{config_file}: image_aspect_ratio {cfg.get('image_aspect_ratio')!r} with mm_patch_merge_type {merge!r} "
            "is not supported: use 'pad'/'square' with 'flat' (LLaVA-1.5) or 'anyres' with 'spatial_unpad' "
            "(LLaVA-NeXT)."
        )
    pinpoints = cfg.get("image_grid_pinpoints")
    if anyres and not (
        isinstance(pinpoints, list) and pinpoints
        and all(isinstance(p, list) and len(p) == 2 and all(_valid_field(n, "count") for n in p) for p in pinpoints)
    ):
        raise ConversionError(f"{config_file}: image_grid_pinpoints must be a list of [height, width] pairs of "
                              f"positive integers, got {preview(pinpoints)}.")
    try:
        settings = parse_original_settings(cfg, cfg["num_hidden_layers"])
    except PModError as exc:
        raise ConversionError(f"{config_file}: {exc}") from exc
    state = read_state_dict(src)
    vision = _vision_config(state, cfg, Path(vision_tower) if vision_tower else None)

    # One image token per vision feature, appended after the original vocabulary (the original used -200).
    vocab = cfg["vocab_size"]
    image_token_id = vocab
    try:
        text = LlamaConfig(**{k: cfg[k] for k in _TEXT_FIELDS if k in cfg})
        text.vocab_size = vocab + 1
        common = dict(
            vision_config=vision,
            text_config=text,
            image_token_id=image_token_id,
            vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
            vision_feature_select_strategy=(
                "default" if cfg.get("mm_vision_select_feature", "patch") == "patch" else "full"
            ),
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )
        if anyres:
            config, cls = LlavaNextConfig(image_grid_pinpoints=pinpoints, **common), LlavaNextForConditionalGeneration
        else:
            config = LlavaConfig(image_seq_length=(vision.image_size // vision.patch_size) ** 2, **common)
            cls = LlavaForConditionalGeneration
        with torch.device("meta"):
            skeleton = cls(config)
    except Exception as exc:  # inconsistent sizes (heads that do not divide the hidden size, ...): many types
        raise ConversionError(f"{config_file} describes a model that cannot be built: {one_line(exc)}") from exc
    try:
        model = apply_pmod(skeleton, settings)
    except PModError as exc:
        raise ConversionError(f"{config_file}: {exc}") from exc

    renamed = {}
    unknown = []
    for key, tensor in state.items():
        name = _rename_original(key)
        if name is None:
            continue
        if name.startswith("?"):
            unknown.append(key)
        else:
            renamed[name] = tensor
    # The image token gets a zero embedding and a zero LM-head row (its input embedding is always replaced).
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if name in renamed and renamed[name].dim() == 2:  # other shapes are reported below
            w = renamed[name]
            renamed[name] = torch.cat([w, torch.zeros(1, w.shape[1], dtype=w.dtype)])
    expected = dict(model.state_dict())
    _check_original_tensors(src, renamed, unknown, expected)
    model.load_state_dict(renamed, assign=True)
    _rebuild_buffers(model)
    model.generation_config.suppress_tokens = [image_token_id]
    model.eval()
    _check_settings_round_trip(model)
    processor = _build_processor(src, model, cfg)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)

    _write_output(out, write, force)
    logger.info("Converted original p-MoD checkpoint %s -> %s", src, out)
    return out


def _check_original_tensors(src: Path, renamed: dict, unknown: list[str], expected: dict) -> None:
    """Every parameter of the model once, with its shape and a floating-point dtype; nothing else."""
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(unknown + [k for k in renamed if k not in expected])
    wrong = sorted(k for k in renamed if k in expected and tuple(renamed[k].shape) != tuple(expected[k].shape))
    dtype = sorted(
        k for k in renamed if k in expected and renamed[k].is_floating_point() != expected[k].is_floating_point()
    )
    problems = []
    if missing:
        problems.append(f"missing {describe_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {describe_names(unexpected)}")
    if wrong:
        shapes = [f"{k} {tuple(renamed[k].shape)} instead of {tuple(expected[k].shape)}" for k in wrong[:5]]
        problems.append(f"wrong shapes {', '.join(shapes)}{f' and {len(wrong) - 5} more' if len(wrong) > 5 else ''}")
    if dtype:
        problems.append(f"not floating point {describe_names(f'{k} ({renamed[k].dtype})' for k in dtype)}")
    if problems:
        raise ConversionError(f"The weights in {src} do not match the original p-MoD layout: {'; '.join(problems)}.")


def _rebuild_buffers(model) -> None:
    """Recreate the non-persistent buffers (rotary frequencies, position ids) left on the meta device."""
    import torch

    lm = model.model.language_model
    lm.rotary_emb = type(lm.rotary_emb)(config=lm.config)
    tower = model.model.vision_tower
    embeddings = getattr(tower, "vision_model", tower).embeddings
    embeddings.register_buffer(
        "position_ids", torch.arange(embeddings.num_positions).expand((1, -1)), persistent=False
    )
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ConversionError(f"Tensors not set by the checkpoint: {left[:8]}")


def _build_processor(src: Path, model, cfg: dict):
    """SRC's tokenizer with the image token added, in a processor matching the model (None without a tokenizer).

    Built before anything is written, so that a broken tokenizer or preprocessor config stops the conversion."""
    from transformers import AutoTokenizer, LlavaNextProcessor, LlavaProcessor

    from ..data.conversation import VICUNA_V1_TEMPLATE

    if not any((src / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        logger.warning("%s has no tokenizer; the converted model is saved without tokenizer and processor.", src)
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    except Exception as exc:  # tokenizer files come in many formats, each with its own errors
        raise ConversionError(f"Cannot read the tokenizer in {src}: {one_line(exc)}") from exc
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id != model.config.image_token_id:
        raise ConversionError(
            f"The tokenizer in {src} gives <image> the id {image_id}, expected {model.config.image_token_id} "
            "(vocab_size): its vocabulary does not match the model's."
        )
    vision = model.config.vision_config
    size = vision.image_size
    pre = _read_preprocessor_config(src / "preprocessor_config.json")
    common = dict(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),  # CLIP's
        image_std=pre.get("image_std", [0.26862954, 0.26130258, 0.27577711]),
    )
    kwargs = dict(
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=VICUNA_V1_TEMPLATE,  # the original models' conversation format
    )
    if getattr(model.config, "image_grid_pinpoints", None):
        from transformers import LlavaNextImageProcessorPil

        return LlavaNextProcessor(
            image_processor=LlavaNextImageProcessorPil(
                image_grid_pinpoints=model.config.image_grid_pinpoints, **common
            ),
            **kwargs,
        )
    from transformers import LlavaImageProcessorPil

    # "pad": pad to a square with the mean colour before resizing, as the original preprocessing does
    pad = cfg.get("image_aspect_ratio") == "pad"
    return LlavaProcessor(image_processor=LlavaImageProcessorPil(do_pad=pad, **common), **kwargs)


def _read_preprocessor_config(path: Path) -> dict:
    """image_mean / image_std of the original preprocessor_config.json ({} without one), checked."""
    if not path.exists():
        return {}
    try:
        pre = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"Cannot read {path}: it is not a JSON file ({one_line(exc)}).") from exc
    if not isinstance(pre, dict):
        raise ConversionError(f"{path} must hold a JSON object, got a {type(pre).__name__}.")
    for key, least in (("image_mean", "non-negative"), ("image_std", "positive")):
        value = pre.get(key, [0.5, 0.5, 0.5])
        if not (isinstance(value, list) and len(value) == 3
                and all(_valid_field(v, "positive") or least == "non-negative" and type(v) in (int, float) and v == 0
                        for v in value)):
            raise ConversionError(
                f"{path}: {key} must be a list of 3 {least} numbers (one per colour), got {preview(value)}."
            )
    return pre
