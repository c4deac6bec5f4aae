"""Checkpoint conversion: a dense transformers LLaVA / LLaVA-NeXT (or Llama/Qwen2/Mistral) checkpoint into an
untrained p-MoD checkpoint (routers at zero), the starting point for training.

Everything read is checked first (config, weight files and shards, key names and shapes) and the output is
written to a temporary folder next to OUT and moved into place only when complete, so a failed conversion
never leaves a half-written OUT and an existing OUT is replaced only with ``force=True``.
"""

from __future__ import annotations

import json
import logging
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

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        for item in src.iterdir():
            if item.is_file() and item.name not in _MODEL_FILES and not item.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(item, staging / item.name)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Converted %s -> %s (routed layers %s)", src, out, model.pmod.routed_layers)
    return out


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise ConversionError(f"{out} already exists and is not empty; pass --force to replace it.")
        if not out.is_dir():
            raise ConversionError(f"{out} exists and is not a directory.")
