"""Loading p-MoD and dense checkpoints, which are untrusted input: `load_model`, `load_pretrained`, `load_processor`.

Every load reads a local folder's config first (a missing or unreadable one is a `CheckpointError` naming it), checks
its weight files (`pmod.checkpoints.inspect_weight_files`) and then what ``from_pretrained`` loaded: missing,
unexpected or wrongly shaped tensors, non-finite values and integer tensors are refused (`check_loaded_weights`),
never started from random values.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel

from .checkpoints import DEFAULT_ADVICE
from .config import PModConfig, ResolvedPMod
from .errors import CheckpointError, PModConfigError, PModInputError, UnsupportedModelError, describe_names, one_line
from .families import FAMILIES, family_of_model_type
from .models import apply_pmod


def load_model(path: str | os.PathLike, pmod_config: PModConfig | None = None,
               **from_pretrained_kwargs) -> PreTrainedModel:
    """Load a p-MoD model saved with ``save_pretrained``.

    A dense transformers checkpoint of a supported family (`pmod.families.FAMILIES`) is loaded and converted with
    ``pmod_config`` (default `PModConfig()`), routers starting at zero. ``from_pretrained_kwargs`` go to
    ``from_pretrained`` (``torch_dtype``, ``attn_implementation``, ``device_map``...). A checkpoint whose tensors
    do not match its config (missing, unexpected, wrongly shaped) raises `CheckpointError`, as does a local path
    that is not a checkpoint directory; other strings are hub model ids.
    """
    source = local_path(path)
    config = _read_config(path, source)
    where = source / "config.json" if source is not None else path
    if config.model_type.startswith("pmod_"):
        if pmod_config is not None:
            raise PModConfigError(f"{path} is already a p-MoD checkpoint; do not pass pmod_config.")
        family = family_of_model_type(config.model_type)
        if family is None:
            raise UnsupportedModelError(f"Unknown p-MoD model type {config.model_type!r} in {path}.")
        _check_pmod_entry(config, where)
        return family.auto_class.from_pretrained(path if source is None else source, **from_pretrained_kwargs)
    loaded = load_checked(
        dense_model_class(config.model_type, path).from_pretrained, path if source is None else source, source,
        from_pretrained_kwargs,
    )
    if isinstance(loaded, tuple):  # output_loading_info=True
        return apply_pmod(loaded[0], pmod_config), loaded[1]
    return apply_pmod(loaded, pmod_config)


def dense_model_class(model_type: str, source: Any) -> type[PreTrainedModel]:
    """The transformers class of a dense checkpoint's ``model_type`` that p-MoD converts; `UnsupportedModelError`
    naming ``source`` (the checkpoint) for any other."""
    family = family_of_model_type(model_type)
    if family is None or family.model_type == model_type:
        raise UnsupportedModelError(
            f"{source} holds a {model_type!r} model; p-MoD converts {', '.join(f.dense_model_type for f in FAMILIES)}."
        )
    return family.dense


def load_pretrained(path: str | os.PathLike, **from_pretrained_kwargs) -> PreTrainedModel:
    """Load a saved model as it is: a p-MoD checkpoint as p-MoD, a dense one as the dense transformers model
    (for evaluating baselines; `load_model` would convert it)."""
    source = local_path(path)
    config = _read_config(path, source)
    if config.model_type.startswith("pmod_"):
        return load_model(path, **from_pretrained_kwargs)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    # a dense baseline is checked like any checkpoint: a missing tensor would silently start from random values
    return load_checked(auto.from_pretrained, path if source is None else source, source, from_pretrained_kwargs)


def read_checkpoint_config(path: str | os.PathLike):
    """The transformers config of a checkpoint (a local directory or a hub id), p-MoD model types registered; a local
    path that is missing or has no readable config.json raises `CheckpointError` naming it."""
    return _read_config(path, local_path(path))





# from_pretrained arguments that load other files than the directory's own weights: the file checks are skipped
_OTHER_WEIGHTS = ("subfolder", "variant", "gguf_file", "state_dict")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "owner/name": anything else is a local path


def local_path(path: Any) -> Path | None:
    """``path`` as a local checkpoint directory, or None for a hub model id ("name" or "owner/name" that is not an
    existing path). A missing local path (anything else: more slashes, a trailing slash, ``./`` or ``~``), a link that
    leads nowhere, or a file raises `CheckpointError`."""
    if not isinstance(path, (str, os.PathLike)):
        return None  # from_pretrained(None, config=..., state_dict=...)
    text = os.fspath(path)
    local = Path(os.path.expanduser(text))
    if local.is_dir():
        return local
    if local.is_symlink() and not local.exists():
        raise CheckpointError(f"{text} is a symbolic link that leads nowhere (its target is missing, or the links "
                              "form a loop); point it at the checkpoint directory.")
    if local.exists():
        raise CheckpointError(
            f"{text} is a file; pass the checkpoint directory that holds config.json and the weights."
        )
    if isinstance(path, os.PathLike) or not _HUB_ID.fullmatch(text) or text in (".", ".."):
        raise CheckpointError(f"No such directory: {text}. Pass a local checkpoint directory (pmod reads local "
                              "folders; a hub model id has the form 'owner/name').")
    return None


def _read_config(path: str | os.PathLike, source: Path | None):
    """The transformers config of a checkpoint; for a local directory, a missing or unreadable config.json raises
    `CheckpointError` naming the file."""
    if source is None:
        return AutoConfig.from_pretrained(path)
    config_file = source / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{source} has no config.json; is it a checkpoint saved with save_pretrained?")
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as exc:  # not JSON, no or unknown model_type, fields of the wrong type: many exception types

        raise CheckpointError(f"Cannot read {config_file}: {one_line(exc)}") from exc


def _check_pmod_entry(config: Any, where: Any) -> None:
    """The ``pmod`` entry of a p-MoD config.json: settings, per-layer ratios and routed layers that fit the model."""
    if not isinstance(config.pmod, dict):
        raise CheckpointError(
            f"{where}: model_type {config.model_type!r} needs a 'pmod' object (settings, layer_ratios, routed_layers), "
            f"got {type(config.pmod).__name__}; save the model again with save_pretrained after pmod.apply_pmod."
        )
    try:
        resolved = ResolvedPMod.from_dict(config.pmod)
    except PModConfigError as exc:
        raise PModConfigError(f"{where}: {exc}") from exc
    layers = config.get_text_config(decoder=True).num_hidden_layers
    if len(resolved.layer_ratios) != layers:
        raise PModConfigError(
            f"{where}: pmod.layer_ratios has {len(resolved.layer_ratios)} entries for a model with {layers} decoder "
            "layers."
        )


def load_checked(load, path: Any, source: Path | None, kwargs: dict[str, Any]):
    """``load(path, **kwargs)`` (a ``from_pretrained``) whose weight files and loaded tensors are checked."""
    kwargs = dict(kwargs)
    want_info = kwargs.pop("output_loading_info", False)
    allow_mismatched = bool(kwargs.get("ignore_mismatched_sizes", False))
    kwargs["ignore_mismatched_sizes"] = True  # wrong shapes are listed below, not a generic RuntimeError
    files = None
    if (source is not None and not any(kwargs.get(k) for k in _OTHER_WEIGHTS)
            and kwargs.get("use_safetensors") is not False):
        from .checkpoints import inspect_weight_files

        files = inspect_weight_files(source, error=CheckpointError)
    model, info = load(path, output_loading_info=True, **kwargs)
    check_loaded_weights(model, info, path, files, allow_mismatched=allow_mismatched)
    return (model, info) if want_info else model


def check_loaded_weights(
    model: nn.Module,
    info: dict[str, Any],
    source: Any,
    files: dict[str, dict[str, str]] | None = None,
    error: type[CheckpointError] = CheckpointError,
    allow_mismatched: bool = False,
    advice: str = DEFAULT_ADVICE,
) -> None:
    """Raise ``error`` if ``from_pretrained``'s loading info reports missing, unexpected or wrongly shaped tensors,
    if a loaded tensor holds NaN or inf (a model that answers nothing, silently), or if the weight files
    (`pmod.checkpoints.inspect_weight_files`) hold integer tensors for a model of floats.
    Tied weights (an LM head tied to the embeddings) and non-persistent buffers are not missing. ``advice`` ends
    the message: what to do about it."""
    from .checkpoints import non_floating_tensors

    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {describe_names(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected {describe_names(info['unexpected_keys'])}")
    mismatched = list(info.get("mismatched_keys") or ())
    if mismatched and not allow_mismatched:
        shapes = [
            f"{m[0]} {tuple(m[1])} instead of {tuple(m[2])}" if isinstance(m, tuple) and len(m) == 3 else str(m)
            for m in sorted(mismatched, key=str)
        ]
        problems.append(
            f"wrong shapes {', '.join(shapes[:5])}{f' and {len(shapes) - 5} more' if len(shapes) > 5 else ''}"
        )
    if info.get("error_msgs"):
        problems.append(f"errors {'; '.join(map(str, info['error_msgs']))[:500]}")
    non_finite = [name for name, t in model.state_dict().items()
                  if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all())]
    if non_finite:
        problems.append(f"values that are not finite (NaN or inf) in {describe_names(non_finite)}")
    if files and all(t.is_floating_point() for t in model.state_dict().values()):
        integers = non_floating_tensors(files)
        if integers:
            problems.append(f"tensors that are not floating point {describe_names(integers)}")
    if problems:
        # the hint fits loading a model, not resuming a run (whose advice is its own)
        routers = advice == DEFAULT_ADVICE and any(".router." in k for k in info.get("missing_keys") or ())
        raise error(
            f"The weights in {source} do not match its config ({type(model).__name__}): {'; '.join(problems)}. The "
            f"checkpoint is incomplete, damaged or from another model: {advice}"
            + (" (routers start at zero only when a dense checkpoint is converted: pmod.load_model(DENSE_DIR, "
               "PModConfig(...)) or pmod convert dense)." if routers else ".")
        )


def load_processor(model_dir: str | os.PathLike, need_images: bool = True):
    """The processor saved next to a model, or a `PModInputError` that says how to save one."""
    from transformers import AutoProcessor

    from .compat import export_pil_image_processors
    from .processors import load_video_model_processor

    export_pil_image_processors()  # Idefics3 / SmolVLM without torchvision on transformers 5.17
    try:
        # video-model processors need torchvision in transformers; without it, pmod's frame video processors stand in
        processor = load_video_model_processor(model_dir) or AutoProcessor.from_pretrained(model_dir)
    except ImportError as exc:  # a processor of a newer family needs a package pmod does not install
        if "torchvision" in str(exc).lower():  # transformers' video processors are torchvision code
            raise PModInputError(
                f"The processor saved in {model_dir} needs torchvision ({one_line(exc).split(' requires')[0]} is "
                "torchvision code): pip install torchvision. pmod stands in its own video processors only for "
                "Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL, LLaVA-NeXT-Video and SmolVLM."
            ) from exc
        raise PModInputError(f"The processor saved in {model_dir} needs a package that is not installed: "
                             f"{one_line(exc)}") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise PModInputError(
            f"{model_dir} has no usable processor (tokenizer + image processor): {exc}. "
            "Save one next to the model with processor.save_pretrained(MODEL_DIR)."
        ) from exc
    if need_images and not hasattr(processor, "image_processor"):  # e.g. only a tokenizer was saved
        raise PModInputError(
            f"{model_dir} has a {type(processor).__name__} but no image processor; save the model's processor there."
        )
    return processor

