"""The public entry points of p-MoD models: `apply_pmod` converts a transformers model, `get_routing` reads what
its last forward routed. Loading is pmod/loading.py, the family table pmod/families.py, the forward
pmod/modeling.py."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from .config import PModConfig, ResolvedPMod
from .errors import PModConfigError, PModInputError, UnsupportedModelError
from .families import family_of
from .layer import SUPPORTED_ATTENTION
from .modeling import PModModelMixin, _install, find_decoder_layers
from .routing import LayerRouting

logger = logging.getLogger(__name__)


def apply_pmod(model: PreTrainedModel, config: PModConfig | Mapping[str, Any] | None = None) -> PreTrainedModel:
    """Convert a transformers model of a supported family (`pmod.families.FAMILIES`: LLaVA, LLaVA-NeXT,
    LLaVA-OneVision, LLaVA-NeXT-Video, InternVL, Mistral 3, SmolVLM, Idefics3, Gemma 3, Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
    Qwen3-VL-MoE, and the Llama, Qwen2 and Mistral causal LMs) into a p-MoD model in place.

    Routed decoder layers keep their parameter names and gain ``router`` (``nn.Linear(hidden, 1)``, zero
    at start by default). The settings and per-layer ratios are written to ``model.config.pmod`` (what
    ``save_pretrained`` saves) and kept as ``model.pmod`` (what forwards read).
    Returns the same model object, whose class is now the p-MoD subclass of its class. ``config`` may also be a
    mapping of `PModConfig`'s settings.
    """
    if isinstance(config, Mapping):
        config = PModConfig.from_dict(dict(config))
    elif config is None:
        config = PModConfig()
    elif not isinstance(config, PModConfig):
        raise PModConfigError(f"apply_pmod takes a pmod.PModConfig (or a mapping of its settings), got a "
                              f"{type(config).__name__}.")
    family = family_of(model)
    text_config = model.config.get_text_config(decoder=True)
    layer_classes = {type(layer) for layer in find_decoder_layers(model)}
    unsupported = sorted(c.__name__ for c in layer_classes if c not in family.layers)
    if unsupported:
        raise UnsupportedModelError(
            f"p-MoD does not support a {family.name} with a {text_config.model_type!r} language model (decoder layers "
            f"{', '.join(unsupported)}); it routes {', '.join(sorted(c.__name__ for c in family.layers))}."
        )
    attn = text_config._attn_implementation
    if attn not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"Attention backend {attn!r} is not supported by p-MoD; load the model with "
            f"attn_implementation='sdpa' or 'eager', or call model.set_attn_implementation('sdpa')."
        )
    if config.targets == "vision_hr" and getattr(model.config, "image_grid_pinpoints", None) is None:
        raise UnsupportedModelError(
            f"targets='vision_hr' routes the high-resolution part of anyres images; {type(model).__name__} has none. "
            "Use targets='vision' (every vision token)."
        )
    resolved = ResolvedPMod.resolve(config, text_config.num_hidden_layers)
    model.config.__class__ = family.pmod.config_class
    if "model_type" in vars(model.config):  # a config read from a file holds its own (dense) model type
        model.config.model_type = family.model_type
    model.config.pmod = resolved.to_dict()
    model.__class__ = family.pmod
    _install(model, resolved)
    logger.info(
        "p-MoD: routed %d of %d layers, mean keep ratio %.4f",
        len(resolved.routed_layers),
        len(resolved.layer_ratios),
        sum(resolved.layer_ratios) / len(resolved.layer_ratios),
    )
    return model




def get_routing(model: nn.Module) -> dict[int, LayerRouting]:
    """Routing decisions of the most recent forward pass of a p-MoD model, by routed layer index."""
    model = getattr(model, "get_base_model", lambda: model)()  # a PEFT-wrapped (LoRA) p-MoD model
    if not isinstance(model, PModModelMixin):
        raise PModInputError(f"{type(model).__name__} is not a p-MoD model; convert it with pmod.apply_pmod.")
    return model.routing()

