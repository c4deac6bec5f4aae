"""LoRA fine-tuning of p-MoD (and dense) models with PEFT.

`apply_lora` wraps a model in a `peft.PeftModel` the way LLaVA's LoRA recipes train: LoRA adapters on the linear
layers of the language model's decoder layers (attention and MLP projections; never the vision tower, the LM head
or the routers), the routers and the multimodal projector trained in full as PEFT ``modules_to_save`` (so they are
saved in, and reloaded from, the adapter), and every other weight frozen. The routed decoder layer calls
``self.self_attn``, ``self.mlp`` and ``self.router`` as modules, so it runs unchanged under PEFT: LoRA sits inside
the projections, and the router's `ModulesToSaveWrapper` calls the trained copy, which is still a `pmod.layer.Router`
(fp32 scores).

`save_adapter` writes PEFT's adapter files plus ``pmod_adapter.json`` (the p-MoD settings the adapter was trained
with); `load_adapter` applies an adapter to its base (a p-MoD checkpoint, or the dense checkpoint it was converted
from), and ``merge=True`` folds it into a plain p-MoD model that `pmod.load_model` can save and load.

A wrapped model is a `PeftModel`: call `pmod.get_routing(model.get_base_model())` for its routing decisions;
``model(...)`` and ``model.generate(...)`` work as on the p-MoD model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ..errors import CheckpointError, PModConfigError, describe_names

logger = logging.getLogger(__name__)

# The linear layers of a Llama / Qwen2 / Mistral decoder layer: "all linear layers of the language model", as
# LLaVA's LoRA recipes target them (the LM head excluded).
LANGUAGE_MODEL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_INFO = "pmod_adapter.json"
# Full-model parts trained in full under LoRA, by module name: LLaVA family, Qwen2-VL / Qwen2.5-VL.
_PROJECTORS = ("multi_modal_projector", "visual.merger")


@dataclass
class LoraSettings:
    """LoRA settings (the ``lora:`` section of a training recipe).

    Attributes:
        r: rank of the adapters (LLaVA's recipes: 128).
        alpha: scaling numerator; the update is ``alpha / r * B @ A`` (LLaVA: 256).
        dropout: dropout on the adapters' inputs while training, in [0, 1).
        target_modules: names of linear layers inside the language model's decoder layers that get adapters
            (default: every attention and MLP projection). The routers are trained in full, not adapted.
        bias: ``none`` (no bias is trained) or ``lora_only`` (the biases of the adapted layers are trained and saved
            with the adapter). PEFT's ``all`` would train every bias of the model, the vision tower's too.
    """

    r: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LANGUAGE_MODEL_LINEAR))
    bias: Literal["none", "lora_only"] = "none"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise PModConfigError(f"lora.r (the adapter rank) must be a whole number of at least 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise PModConfigError(f"lora.alpha must be a finite number above 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise PModConfigError(f"lora.dropout must be a number in [0, 1), got {self.dropout!r}")
        if (not isinstance(self.target_modules, (list, tuple)) or not self.target_modules
                or not all(isinstance(t, str) and t for t in self.target_modules)):
            raise PModConfigError(f"lora.target_modules must be a non-empty list of layer names (e.g. "
                                  f"{list(LANGUAGE_MODEL_LINEAR)}), got {self.target_modules!r}")
        self.target_modules = list(self.target_modules)
        if "router" in self.target_modules:
            raise PModConfigError("lora.target_modules must not name the router: routers are trained in full "
                                  "(saved with the adapter), an adapter would not keep their fp32 scores")
        if self.bias not in ("none", "lora_only"):
            raise PModConfigError(f"lora.bias must be 'none' or 'lora_only', got {self.bias!r} ('all' would train "
                                  "every bias, the vision tower's too)")


def apply_lora(model: nn.Module, settings: LoraSettings | None = None, *, train_projector: bool = True,
               base_model_name_or_path: str | os.PathLike | None = None):
    """Wrap a p-MoD (or dense) model for LoRA fine-tuning; returns the `peft.PeftModel`.

    Adapters go on ``settings.target_modules`` inside the language model's decoder layers; the routers and (with
    ``train_projector``) the multimodal projector are PEFT ``modules_to_save``: trained in full and saved with the
    adapter. Everything else is frozen, LLaVA-NeXT's ``image_newline`` too (a parameter, not a module, which PEFT
    cannot save). ``base_model_name_or_path`` is recorded in ``adapter_config.json``.
    A name in ``target_modules`` that no decoder layer has is a `PModConfigError`.
    """
    from peft import LoraConfig, get_peft_model

    settings = settings if settings is not None else LoraSettings()
    names = dict(model.named_modules())
    prefix, leaves = _decoder_linear_layers(model)
    missing = [t for t in settings.target_modules if t not in leaves]
    if missing:
        raise PModConfigError(f"lora.target_modules {missing} name no linear layer of the decoder layers of "
                              f"{type(model).__name__}; they have {sorted(leaves)}")
    routers = [n for n in names if n.startswith(prefix + ".") and n.endswith(".router")]
    projector = [n for n in names if train_projector and n.endswith(_PROJECTORS)][:1]  # the outermost one
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        bias=settings.bias,
        # a full-match regex, so that only the decoder layers' projections are adapted (CLIP has q_proj too)
        target_modules=rf"{re.escape(prefix)}\.\d+\.(?:.+\.)?(?:{'|'.join(map(re.escape, settings.target_modules))})",
        # full names: PEFT matches modules_to_save by suffix
        modules_to_save=routers + projector or None,
    )
    with _quiet_peft():
        wrapped = get_peft_model(model, config)
    if base_model_name_or_path is not None:  # get_peft_model sets it from the model's own (empty for built models)
        wrapped.peft_config[wrapped.active_adapter].base_model_name_or_path = os.fspath(base_model_name_or_path)
    logger.info("LoRA r=%d alpha=%g on %s; trained in full: %d routers%s", settings.r, settings.alpha,
                ", ".join(settings.target_modules), len(routers), ", the projector" if projector else "")
    return wrapped


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts of a LoRA-wrapped model by part: lora, router, projector."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            projector = any(p + "." in name for p in _PROJECTORS)
            part = "router" if ".router." in name else "projector" if projector else "lora"
            counts[part] = counts.get(part, 0) + param.numel()
    return counts


def save_adapter(model, directory: str | os.PathLike, **save_kwargs: Any) -> None:
    """PEFT's adapter files (LoRA weights, routers and projector) and ``pmod_adapter.json`` into ``directory``."""
    model.save_pretrained(os.fspath(directory), **save_kwargs)
    write_adapter_info(model, directory)


def write_adapter_info(model, directory: str | os.PathLike) -> None:
    """``pmod_adapter.json``: the p-MoD settings of the wrapped model (null: dense), which `load_adapter` needs to
    convert a dense base the way it was converted for training."""
    from ..files import write_text_atomic

    info = {"pmod": getattr(model.get_base_model().config, "pmod", None)}
    write_text_atomic(Path(directory) / ADAPTER_INFO, json.dumps(info, indent=2) + "\n")


def load_adapter(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, *, merge: bool = False,
                 **from_pretrained_kwargs: Any):
    """Apply a saved adapter to its base model, in eval mode.

    ``base_dir`` is the model the adapter was trained on: the p-MoD checkpoint, or the dense checkpoint that
    training converted (converted here the same way, from ``pmod_adapter.json``). Returns the `peft.PeftModel`, or
    with ``merge=True`` the p-MoD model with the adapter merged in (the weights ``pmod train`` saves at the top of
    its ``output_dir``). ``from_pretrained_kwargs`` go to the base model's ``from_pretrained``. An adapter whose
    weights do not match the model, or one trained with other p-MoD settings, is a `pmod.CheckpointError`.
    """
    from peft import PeftModel

    from ..config import ResolvedPMod
    from ..loading import load_model, load_pretrained, read_checkpoint_config
    from ..modeling import PModModelMixin

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter_dir} has no adapter_config.json; pass the folder written by save_adapter "
                              "(pmod train writes OUTPUT_DIR/adapter)")
    info = _read_adapter_info(adapter_dir)
    wanted = None if info.get("pmod") is None else ResolvedPMod.from_dict(info["pmod"])
    if wanted is not None and not read_checkpoint_config(base_dir).model_type.startswith("pmod_"):
        base = load_model(base_dir, wanted.settings, **from_pretrained_kwargs)
    else:
        base = load_pretrained(base_dir, **from_pretrained_kwargs)
    if info:  # written by save_adapter / pmod train
        have = base.pmod if isinstance(base, PModModelMixin) else None
        if have != wanted:
            raise CheckpointError(
                f"the adapter in {adapter_dir} was trained on a {'dense' if wanted is None else 'p-MoD'} model "
                f"(pmod: {info['pmod']}), but {base_dir} gives {'a dense' if have is None else 'a p-MoD'} one "
                f"(pmod: {None if have is None else have.to_dict()})")
    with _quiet_peft():
        model = PeftModel.from_pretrained(base, os.fspath(adapter_dir))
    _check_adapter_weights(model, adapter_dir)
    model.eval()
    return model.merge_and_unload() if merge else model


def _read_adapter_info(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_INFO
    if not path.is_file():
        return {}  # an adapter saved with PeftModel.save_pretrained: the base is used as it is
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict) or not isinstance(info.get("pmod"), (dict, type(None))):
        raise CheckpointError(f"{path} must hold {{'pmod': the p-MoD settings or null}}")
    return info


def _check_adapter_weights(model, adapter_dir: Path) -> None:
    """PEFT only warns about adapter weights that are missing from the file or that the model has no place for;
    either would leave random or zero weights where trained ones belong."""
    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        return  # a .bin adapter: PEFT reads it with torch.load(weights_only=True)
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(os.fspath(file), framework="pt") as f:
        saved = set(f.keys())
    expected = set(get_peft_model_state_dict(model))
    if saved != expected:

        problems = [f"{what} {describe_names(keys)}" for what, keys in
                    (("missing", expected - saved), ("unexpected", saved - expected)) if keys]
        raise CheckpointError(f"the adapter weights in {file} do not match the model: {'; '.join(problems)}")


def _decoder_linear_layers(model: nn.Module) -> tuple[str, set[str]]:
    """The decoder layers' module name (``model.language_model.layers``) and the names of their linear layers
    (routers excepted)."""
    from ..layer import Router
    from ..modeling import find_decoder_layers

    layers = find_decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    leaves = {name.rsplit(".", 1)[-1] for name, module in layers.named_modules()
              if isinstance(module, nn.Linear) and not isinstance(module, Router)}
    return prefix, leaves


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    # PEFT reads the model's `is_gradient_checkpointing`, which transformers 5.24 deprecated (a FutureWarning
    # that is PEFT's, not the caller's)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
