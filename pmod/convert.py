"""Checkpoint conversion: a dense transformers LLaVA / LLaVA-NeXT (or Llama/Qwen2/Mistral) checkpoint into an
untrained p-MoD checkpoint (routers at zero), the starting point for training.

Everything read is checked first (config, weight files and shards, key names and shapes) and the output is
written to a temporary folder next to OUT and moved into place only when complete, so a failed conversion
never leaves a half-written OUT and an existing OUT is replaced only with ``force=True``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

from .config import PModConfig
from .errors import PModError, UnsupportedModelError

logger = logging.getLogger(__name__)

# Files save_pretrained writes itself; everything else in SRC (tokenizer, processor, chat template) is carried over.
_MODEL_FILES = ("config.json", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


class ConversionError(PModError):
    """A checkpoint could not be converted (missing files, mismatched weights, existing output)."""


def check_weight_files(src: Path) -> list[str]:
    """Names of the weight files of a checkpoint directory; raises if none, or if an index names a missing shard."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as exc:
                raise ConversionError(f"{index} is not a valid shard index ({exc!r}).") from exc
            missing = [s for s in shards if not (src / s).exists()]
            if missing:
                raise ConversionError(f"{src} is missing weight shards listed in {index_name}: {missing}.")
            return shards
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).exists():
            return [name]
    raise ConversionError(f"No weights in {src}: expected model.safetensors (or a sharded index).")


def convert_dense(src: str | os.PathLike, out: str | os.PathLike, config: PModConfig | None = None, force: bool = False) -> Path:
    """Convert the dense checkpoint in ``src`` into an untrained p-MoD checkpoint in ``out``; returns ``out``."""
    from transformers import AutoConfig

    from .models import SUPPORTED_TEXT_FAMILIES, _FAMILIES, apply_pmod

    src, out = Path(src), Path(out)
    if not (src / "config.json").exists():
        raise ConversionError(f"{src} has no config.json; is it a transformers checkpoint directory?")
    _check_output(out, force)
    try:
        hf_config = AutoConfig.from_pretrained(src)
    except (ValueError, KeyError, OSError) as exc:
        raise ConversionError(f"Cannot read {src / 'config.json'}: {exc}") from exc
    if hf_config.model_type.startswith("pmod_"):
        raise ConversionError(f"{src} is already a p-MoD checkpoint ({hf_config.model_type}).")
    family = next((f for f in _FAMILIES if f.base_config.model_type == hf_config.model_type), None)
    if family is None:
        raise UnsupportedModelError(
            f"{src} holds a {hf_config.model_type!r} model; supported: "
            f"{', '.join(f.base_config.model_type for f in _FAMILIES)} (language models: {SUPPORTED_TEXT_FAMILIES})."
        )
    check_weight_files(src)
    try:
        # mismatched sizes are collected (and reported below) instead of aborting with a generic message
        model, info = family.base_model.from_pretrained(src, output_loading_info=True, ignore_mismatched_sizes=True)
    except (RuntimeError, ValueError, OSError) as exc:  # shape mismatches, unreadable files
        raise ConversionError(f"Cannot load the weights of {src}: {exc}") from exc
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ConversionError(f"The weights in {src} do not match its config: {problems}.")
    model = apply_pmod(model, config)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        for item in src.iterdir():
            if item.is_file() and item.name not in _MODEL_FILES and not item.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(item, staging / item.name)

    _write_atomically(out, write)
    logger.info("Converted %s -> %s (routed layers %s)", src, out, model.pmod.routed_layers)
    return out


def _write_atomically(out: Path, write) -> None:
    """Run ``write(staging_dir)`` and move the result to ``out`` only if it completes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_output(out: Path, force: bool) -> None:
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
        try:
            maximum, minimum = float(parts[2]), float(parts[3])
        except ValueError as exc:
            raise ConversionError(f"mod_target_layers {schedule!r}: bad numbers ({exc}).") from exc
        shift = _number(cfg, "mod_router_factor", 0.5)  # the average keep ratio, a in method.md section 3
        raws = [
            0.5 * math.cos(math.pi * i / _ORIGINAL_SPAN) + shift if parts[0] == "shiftedcos" else 0.5 - i / _ORIGINAL_SPAN + shift
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
        raise ConversionError(f"Unknown mod_weight_norm {cfg.get('mod_weight_norm')!r}: supported is 'tanh_ALPHA_BETA'.")
    alpha, beta = float(norm[1]), float(norm[2])
    original_targets = str(cfg.get("mod_target_token_type", "vision_all"))
    if original_targets not in _ORIGINAL_TARGETS:
        raise ConversionError(
            f"Unknown mod_target_token_type {original_targets!r}: the original's values are {sorted(_ORIGINAL_TARGETS)}."
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
        router_bias=bool(cfg.get("mod_bias_enabled", True)),
        targets=targets,
    )


def _number(cfg: dict, key: str, default: float) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
        raise ConversionError(f"{key} must be a number in (0, 1], got {value!r}.")
    return float(value)


def read_state_dict(src: Path) -> dict:
    """All tensors of a checkpoint directory (safetensors or .bin, sharded or not), read safely."""
    import torch
    from safetensors.torch import load_file

    state = {}
    for name in check_weight_files(src):
        path = src / name
        try:
            if name.endswith(".safetensors"):
                state.update(load_file(path))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # corrupt or truncated files surface as many exception types
            raise ConversionError(f"Cannot read weights from {path}: {exc}") from exc
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
    layers = 1 + max(int(k[len(prefix) :].split(".")[2]) for k in state if k.startswith(prefix + "encoder.layers."))
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    image_size = int(round((positions.shape[0] - 1) ** 0.5)) * patch_size
    extra = {"num_attention_heads": hidden // 64, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    source = vision_tower or (Path(cfg["mm_vision_tower"]) if Path(str(cfg.get("mm_vision_tower", ""))).is_dir() else None)
    if source is not None:
        try:
            vc = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise ConversionError(f"Cannot read the vision tower config in {source}: {exc}") from exc
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


_TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act",
    "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias",
)


def _rename_original(key: str) -> str | None:
    """Original LLaVA-layout key -> parameter name of the transformers p-MoD model (None: not a parameter)."""
    if key.startswith("model.vision_tower.vision_tower.vision_model."):  # CLIPVisionModel of transformers 4.x
        return "model.vision_tower." + key[len("model.vision_tower.vision_tower.vision_model.") :]
    if key.startswith("model.mm_projector."):
        index, rest = key[len("model.mm_projector.") :].split(".", 1)
        return {"0": "model.multi_modal_projector.linear_1.", "2": "model.multi_modal_projector.linear_2."}.get(index, "?") + rest
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
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

    from .models import apply_pmod

    src, out = Path(src), Path(out)
    _check_output(out, force)
    try:
        cfg = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"Cannot read {src / 'config.json'}: {exc}") from exc
    if cfg.get("model_type") != "pmod_llava_llama":
        raise ConversionError(f"{src} is a {cfg.get('model_type')!r} checkpoint; expected the original 'pmod_llava_llama'.")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConversionError(f"mm_projector_type {cfg['mm_projector_type']!r} is not supported (only 'mlp2x_gelu').")
    anyres = cfg.get("image_aspect_ratio") == "anyres"
    merge = cfg.get("mm_patch_merge_type", "flat")
    if anyres and not merge.startswith("spatial_unpad") or (not anyres and merge != "flat"):
        raise ConversionError(
            f"image_aspect_ratio {cfg.get('image_aspect_ratio')!r} with mm_patch_merge_type {merge!r} is not supported: "
            "use 'pad'/'square' with 'flat' (LLaVA-1.5) or 'anyres' with 'spatial_unpad' (LLaVA-NeXT)."
        )
    state = read_state_dict(src)
    vision = _vision_config(state, cfg, Path(vision_tower) if vision_tower else None)

    # One image token per vision feature, appended after the original vocabulary (the original used -200).
    vocab = int(cfg["vocab_size"])
    image_token_id = vocab
    text = LlamaConfig(**{k: cfg[k] for k in _TEXT_FIELDS if k in cfg})
    text.vocab_size = vocab + 1
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="default" if cfg.get("mm_vision_select_feature", "patch") == "patch" else "full",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    if anyres:
        pinpoints = cfg.get("image_grid_pinpoints")
        if not isinstance(pinpoints, list):
            raise ConversionError(f"image_grid_pinpoints must be a list of [height, width], got {pinpoints!r}.")
        config, cls = LlavaNextConfig(image_grid_pinpoints=pinpoints, **common), LlavaNextForConditionalGeneration
    else:
        config, cls = LlavaConfig(image_seq_length=(vision.image_size // vision.patch_size) ** 2, **common), LlavaForConditionalGeneration
    settings = parse_original_settings(cfg, text.num_hidden_layers)
    with torch.device("meta"):
        skeleton = cls(config)
    model = apply_pmod(skeleton, settings)

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
        if name in renamed:
            w = renamed[name]
            renamed[name] = torch.cat([w, torch.zeros(1, w.shape[1], dtype=w.dtype)])
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(unknown + [k for k in renamed if k not in expected])
    wrong = sorted(k for k in renamed if k in expected and tuple(renamed[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise ConversionError(
            f"The weights in {src} do not match the original p-MoD layout: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}, wrong shapes "
            f"{[(k, tuple(renamed[k].shape), tuple(expected[k].shape)) for k in wrong[:8]]}."
        )
    model.load_state_dict(renamed, assign=True)
    _rebuild_buffers(model)
    model.generation_config.suppress_tokens = [image_token_id]
    model.eval()

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        _carry_processor(src, staging, model, cfg)

    _write_atomically(out, write)
    logger.info("Converted original p-MoD checkpoint %s -> %s", src, out)
    return out


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


def _carry_processor(src: Path, out: Path, model, cfg: dict) -> None:
    """Save SRC's tokenizer with the image token added, and a matching processor, next to the model."""
    from transformers import AutoTokenizer, LlavaNextProcessor, LlavaProcessor

    from .tiny import VICUNA_CHAT_TEMPLATE

    if not any((src / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        logger.warning("%s has no tokenizer; the converted model is saved without tokenizer and processor.", src)
        return
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id != model.config.image_token_id:
        raise ConversionError(
            f"The tokenizer in {src} gives <image> the id {image_id}, expected {model.config.image_token_id} "
            "(vocab_size): its vocabulary does not match the model's."
        )
    vision = model.config.vision_config
    size = vision.image_size
    pre = {}
    if (src / "preprocessor_config.json").exists():
        pre = json.loads((src / "preprocessor_config.json").read_text())
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
        chat_template=VICUNA_CHAT_TEMPLATE,  # the original models' conversation format (Vicuna v1)
    )
    if getattr(model.config, "image_grid_pinpoints", None):
        from transformers import LlavaNextImageProcessorPil

        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessorPil(image_grid_pinpoints=model.config.image_grid_pinpoints, **common),
            **kwargs,
        )
    else:
        from transformers import LlavaImageProcessorPil

        # "pad": pad to a square with the mean colour before resizing, as the original preprocessing does
        pad = cfg.get("image_aspect_ratio") == "pad"
        processor = LlavaProcessor(image_processor=LlavaImageProcessorPil(do_pad=pad, **common), **kwargs)
    processor.save_pretrained(out)
