"""Model adapters: p-MoD subclasses of the transformers model classes, `apply_pmod` and `load_model`.

Each supported top-level class (LLaVA, LLaVA-NeXT, and Llama/Qwen2/Mistral causal LMs) gets a p-MoD
subclass whose only differences are: routed decoder layers (built from ``config.pmod``), a forward that
plans routing once per call and uses a `PModCache`, and loading that refuses a checkpoint with missing, unexpected
or wrongly shaped tensors.
The configs get a subclass with a ``pmod`` field and their own ``model_type`` so that `save_pretrained`
and ``AutoModel*.from_pretrained`` round-trip after ``import pmod``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.cache_utils import Cache, DynamicCache, StaticCache

from .cache import PModCache, PModStaticCache
from .compat import CACHE_KWARG, CACHE_NAMES, pop_cache
from .config import PModConfig, ResolvedPMod
from .errors import CheckpointError, PModConfigError, PModInputError, UnsupportedModelError, describe_names, one_line
from .layer import SUPPORTED_ATTENTION, PModLayerMixin, convert_decoder_layer
from .layout import high_resolution_targets
from .routing import LayerRouting, RoutingPlan

logger = logging.getLogger(__name__)

SUPPORTED_TEXT_FAMILIES = ("llama", "qwen2", "mistral", "qwen2_vl_text", "qwen2_5_vl_text")


@dataclass(frozen=True)
class _Family:
    base_model: type[PreTrainedModel]
    base_config: type
    model_type: str
    auto_class: Any
    multimodal: bool


_FAMILIES = [
    _Family(LlavaForConditionalGeneration, LlavaConfig, "pmod_llava", AutoModelForImageTextToText, True),
    _Family(LlavaNextForConditionalGeneration, LlavaNextConfig, "pmod_llava_next", AutoModelForImageTextToText, True),
    _Family(
        LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig, "pmod_llava_onevision", AutoModelForImageTextToText,
        True,
    ),
    # Qwen2-VL / Qwen2.5-VL: M-RoPE. The rotary tables reaching the decoder layers are already per token (B, T, d),
    # so kept tokens keep their 3-D positions by the same row gather as 1-D RoPE.
    _Family(Qwen2VLForConditionalGeneration, Qwen2VLConfig, "pmod_qwen2_vl", AutoModelForImageTextToText, True),
    _Family(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, "pmod_qwen2_5_vl", AutoModelForImageTextToText, True),
    _Family(LlamaForCausalLM, LlamaConfig, "pmod_llama", AutoModelForCausalLM, False),
    _Family(Qwen2ForCausalLM, Qwen2Config, "pmod_qwen2", AutoModelForCausalLM, False),
    _Family(MistralForCausalLM, MistralConfig, "pmod_mistral", AutoModelForCausalLM, False),
]


class PModModelMixin:
    """Behaviour shared by every p-MoD model class (placed before the transformers base class)."""

    config: Any
    pmod: ResolvedPMod  # the p-MoD settings and resolved per-layer values, set once by `_install` (never per forward)

    # ------------------------------------------------------------------ structure
    def decoder_layers(self) -> nn.ModuleList:
        return find_decoder_layers(self)

    def routed_layers(self) -> dict[int, PModLayerMixin]:
        return {i: layer for i, layer in enumerate(self.decoder_layers()) if isinstance(layer, PModLayerMixin)}

    def routing(self) -> dict[int, LayerRouting]:
        """Routing decisions of the most recent forward pass over a prompt (decoding steps route nothing and leave
        them as they were): routed layer index -> `LayerRouting`."""
        return {i: layer.last_routing for i, layer in self.routed_layers().items() if layer.last_routing is not None}

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """transformers' ``save_pretrained``, plus a model card (README.md, unless the folder has one) saying how to
        load the folder: its model type is pmod's, which transformers knows only after ``import pmod``."""
        super().save_pretrained(save_directory, *args, **kwargs)
        card = Path(save_directory) / "README.md"
        if kwargs.get("is_main_process", True) and not card.exists():
            card.write_text(_MODEL_CARD.format(model_type=self.config.model_type, base=next(c for c in type(self).__mro__ if c in _CLASSES).__name__))

    # ------------------------------------------------------------------ forward
    def _pmod_prepare(self, arguments: dict[str, Any], named_use_cache: bool, cache_parameter: str | None) -> None:
        """Create the cache and the routing plan for one forward call (mutates ``arguments``).

        ``cache_parameter``: the forward's own name for the cache (None: it takes the cache through ``**kwargs``).
        """
        extra = arguments.setdefault("kwargs", {})
        target_mask = extra.pop("target_mask", None)
        target_counts = extra.pop("target_counts", None)
        input_ids = arguments.get("input_ids")
        reference = input_ids if input_ids is not None else arguments.get("inputs_embeds")
        if reference is None:
            raise PModInputError("Pass input_ids (or inputs_embeds with target_mask) to a p-MoD model.")
        batch, length = reference.shape[:2]
        device = reference.device

        text_config = self.config.get_text_config(decoder=True)
        use_cache = arguments.get("use_cache", extra.get("use_cache"))
        if use_cache is None:
            # Training needs no cache: building one would only cost time (and breaks checkpointing).
            use_cache = bool(getattr(text_config, "use_cache", False)) and not self.training
        # callers may name the cache `cache` or `past_key_values`; it is passed on under the forward's own name
        passed = {name: source.pop(name) for source in (arguments, extra) for name in CACHE_NAMES if name in source}
        cache = self._pmod_cache(pop_cache(passed))
        if cache is None and use_cache:
            cache = PModCache(text_config.num_hidden_layers)
        # Say it explicitly, or the inner model would create a DynamicCache from config.use_cache.
        (arguments if named_use_cache else extra)["use_cache"] = bool(use_cache or cache is not None)
        if cache is not None:
            (arguments if cache_parameter is not None else extra)[cache_parameter or CACHE_KWARG] = cache
        # an int for PModCache, a 0-d tensor for PModStaticCache (read on the device, never on the host; a copy, as
        # the layers advance the cache's own tensor in place during this forward)
        past_length = cache.get_seq_length() if cache is not None else 0
        past_length = past_length.clone() if isinstance(past_length, torch.Tensor) else past_length
        decoding = cache is not None and cache.has_past()
        valid = _valid_positions(arguments.get("attention_mask"), batch, length, past_length, device,
                                 static=isinstance(cache, PModStaticCache))

        if target_mask is not None:
            if tuple(target_mask.shape) != (batch, length):
                raise PModInputError(f"target_mask must have shape {(batch, length)}, got {tuple(target_mask.shape)}.")
            target = target_mask.to(device=device, dtype=torch.bool)
        else:
            target = self._find_targets(arguments, extra, valid, decoding)
        counts = _target_counts(target_counts, batch, length)
        if target is None:  # nothing can be routed: every layer runs dense, planned without reading the device
            if counts is not None and any(counts):
                raise PModInputError(f"target_counts={counts} but these inputs have no tokens to route (no image, "
                                     "or a decoding step); pass zeros or leave target_counts out.")
            extra["pmod_plan"] = RoutingPlan.dense(valid, past_length, decoding=decoding)
        else:
            extra["pmod_plan"] = RoutingPlan.build(target, valid, self.pmod.layers, past_length=past_length,
                                                   counts=counts, padded=arguments.get("attention_mask") is not None)

    def target_counts(self, **inputs: Any) -> list[int]:
        """Each row's number of routing targets (vision tokens) for a prompt's ``inputs`` (a processor's output:
        ``input_ids``, ``attention_mask``, pixels or grids), found by the same rule as the forward. Call it on the
        host, before the inputs move to the device, and pass the result as ``target_counts=``: the prefill then plans
        its routing without waiting for the device (pmod's generation path does this by itself)."""
        input_ids = inputs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise PModInputError("target_counts needs the prompt's input_ids, (batch, length): vision tokens are found "
                                 "there.")
        batch, length = input_ids.shape
        valid = _valid_positions(inputs.get("attention_mask"), batch, length, 0, input_ids.device, static=False)
        target = self._find_targets(dict(inputs), {}, valid, decoding=False)
        return [0] * batch if target is None else (target & valid).sum(dim=1).tolist()

    def _find_targets(self, arguments: dict[str, Any], extra: dict[str, Any], valid: torch.Tensor,
                      decoding: bool) -> torch.Tensor | None:
        """(B, T) bool, the positions this forward routes, from its inputs (None: nothing can be routed). Reads the
        inputs where they are: on the host for `target_counts`, on the model's device in a forward."""
        input_ids = arguments.get("input_ids")
        targets = self.pmod.settings.targets
        # generate() hands the vision encoder's outputs as {"image": ..., "video": ...} instead of pixels.
        encoded = arguments.get("mm_encoder_outputs", extra.get("mm_encoder_outputs"))
        encoded = encoded if isinstance(encoded, dict) else ({"image": encoded} if encoded is not None else {})
        has_images = arguments.get("pixel_values") is not None or encoded.get("image") is not None
        has_videos = arguments.get("pixel_values_videos") is not None or encoded.get("video") is not None
        image_token_id = getattr(self.config, "image_token_id", None)
        video_token_id = getattr(self.config, "video_token_id", None)
        if decoding and not (has_images or has_videos):
            # A decoding step: generated tokens are never targets (even one that equals the image token id).
            target = None
        elif targets == "all":
            target = valid
        elif image_token_id is None:
            raise PModInputError(
                f"{type(self).__name__} has no vision tokens (no config.image_token_id) to route: pass "
                "target_mask=(batch, length) bool, or convert it with PModConfig(targets='all')."
            )
        elif not (has_images or has_videos):
            target = None  # image (video) tokens are targets only where image (video) features are spliced in
        elif input_ids is None:
            raise PModInputError(
                "Cannot find the vision tokens of inputs_embeds with images: pass input_ids (vision tokens are "
                "input_ids == config.image_token_id) or target_mask=(batch, length) bool."
            )
        else:
            target = input_ids == image_token_id if has_images else torch.zeros_like(valid)
            if has_images and targets == "vision_hr":
                per_row = arguments.get("batch_num_images", extra.get("batch_num_images"))
                if per_row is not None and any(int(n) > 1 for n in per_row):
                    # LLaVA-OneVision gives the images of a multi-image row only a base grid (no high-res part)
                    raise PModInputError("targets='vision_hr' needs one image per row: LLaVA-OneVision processes the "
                                         "images of a multi-image row without a high-resolution part. Use "
                                         "targets='vision' for multi-image inputs.")
                target = high_resolution_targets(self.config, target, arguments.get("image_sizes"))
            if has_videos and targets == "vision_hr":
                raise PModInputError("targets='vision_hr' routes the high-resolution part of images; videos have none. "
                                     "Use a model converted with targets='vision' for videos.")
            if has_videos and video_token_id is not None:
                target = target | (input_ids == video_token_id)
        return target

    def _pmod_cache(self, cache: Any) -> PModCache | PModStaticCache | None:
        """The caller's cache as a p-MoD cache: generate()'s empty DynamicCache (None: the forward creates a
        `PModCache`) or empty StaticCache (``cache_implementation="static"``: a `PModStaticCache` of its length) is
        replaced; any other cache is refused."""
        if isinstance(cache, (PModCache, PModStaticCache)):
            depth = self.config.get_text_config(decoder=True).num_hidden_layers
            if len(cache.layers) != depth:
                raise PModInputError(f"The {type(cache).__name__} has {len(cache.layers)} layers but the model has {depth} "
                                     "decoder layers; create it for this model (PModStaticCache.for_model, or "
                                     "PModCache(num_layers)).")
            return cache
        if cache is None:
            return None
        offloading = getattr(cache, "offloading", False)
        if type(cache) is DynamicCache and cache.get_seq_length() == 0 and not offloading:
            return None
        if type(cache) is StaticCache and not cache.layers[0].is_initialized and not offloading:
            return PModStaticCache.for_model(self, cache.layers[0].max_cache_len)
        raise PModInputError(
            f"p-MoD models need a pmod.PModCache or pmod.PModStaticCache, got a {type(cache).__name__}"
            f"{' with content' if isinstance(cache, Cache) and cache.get_seq_length() else ''}"
            f"{' (offloaded)' if offloading else ''}: routed layers hold only the tokens they processed. Use the "
            "default cache or cache_implementation='static'."
        )


def _target_counts(counts: Any, batch: int, length: int) -> list[int] | None:
    """``target_counts`` (each row's number of target tokens, given so that routing is planned without reading the
    device) as a list of ints, checked against the batch."""
    if counts is None:
        return None
    if isinstance(counts, torch.Tensor):
        if counts.device.type != "cpu":
            raise PModInputError("target_counts must be on the host (a list of ints or a CPU tensor): reading it from "
                                 f"{counts.device} would wait for the device, which is what target_counts avoids.")
        counts = counts.tolist()
    try:
        counts = [int(n) for n in counts]
    except (TypeError, ValueError) as exc:
        raise PModInputError(f"target_counts must be a list of {batch} ints (targets per row), got {counts!r}.") from exc
    if len(counts) != batch or any(n < 0 or n > length for n in counts):
        raise PModInputError(f"target_counts must hold {batch} counts between 0 and {length} (targets per row of "
                             f"this batch), got {counts}.")
    return counts


def _valid_positions(attention_mask: Any, batch: int, length: int, past_length: int | torch.Tensor,
                     device: torch.device, static: bool) -> torch.Tensor:
    """(B, T) bool, the new tokens that are not padding, from the caller's mask: a 2-D padding mask (B, past + T, or
    with a static cache (``static``) up to the cache's length), or, with a static cache, the 4-D mask generate() builds
    for it (B | 1, 1, T, kv) over logical columns, where a token is padding exactly when its own column is masked in
    its own row."""
    if isinstance(attention_mask, dict):  # masks by layer type (Qwen2-VL): the full-attention one
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    # with a static cache the new tokens' columns are taken by position: its masks may cover the whole cache
    own = (past_length + torch.arange(length, device=attention_mask.device)) if static else None  # (T,)
    if static and attention_mask.dim() == 4 and attention_mask.shape[0] in (1, batch) and attention_mask.shape[2] == length:
        rows = own.view(1, length, 1).expand(attention_mask.shape[0], length, 1)
        diagonal = attention_mask[:, 0].gather(2, rows).squeeze(-1)  # (B|1, T)
        valid = diagonal if diagonal.dtype == torch.bool else diagonal == 0
        return valid.to(device).expand(batch, length)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
        raise PModInputError(
            f"p-MoD needs a 2-D padding mask of shape (batch, past + length) = ({batch}, past + {length}); got "
            f"{tuple(attention_mask.shape)}. (A 4-D mask (batch, 1, {length}, keys) is taken only with a "
            "pmod.PModStaticCache, as generate() builds it.)"
        )
    if static:
        return attention_mask.gather(1, own.expand(batch, length)).to(device=device, dtype=torch.bool)
    return attention_mask[:, -length:].to(device=device, dtype=torch.bool)


_MODEL_CARD = """---
library_name: pmod
tags: [p-mod, mixture-of-depths]
---
# A p-MoD model ({model_type})

A {base} whose deep decoder layers process only the vision tokens their routers select (p-MoD, arXiv 2412.04449),
saved with the pmod library. transformers knows the model type `{model_type}` only after
`import pmod` (no remote code is needed or used):

```python
import pmod  # registers the p-MoD model types with transformers
model = pmod.load_model("path/to/this/folder")  # or AutoModelForImageTextToText.from_pretrained after import pmod
```

Without `import pmod`, transformers says it "does not recognize this architecture".
"""


def _make_forward(base_forward):
    signature = inspect.signature(base_forward)
    cache_parameter = next((name for name in CACHE_NAMES if name in signature.parameters), None)
    named = {name for name, p in signature.parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    var_keyword = next((name for name, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if var_keyword != "kwargs":  # _pmod_prepare reads the extra keyword arguments under this name
        raise UnsupportedModelError(f"{base_forward.__qualname__} takes extra keyword arguments as {var_keyword!r}, "
                                    "not **kwargs; pmod does not know this transformers version.")

    @functools.wraps(base_forward)  # keeps the parent's signature, which generate() inspects
    def forward(self, *args, **kwargs):
        if args:
            bound = signature.bind(self, *args, **kwargs)
            arguments = dict(bound.arguments)
            arguments.pop("self")
        else:
            # keywords only (generate, most callers): split them without binding, which would make a compiled step
            # guard on the shape of every tensor argument, used or not (a recompilation per step for an input that
            # grows, such as Qwen2-VL's mm_token_type_ids under transformers 5.17)
            arguments = {name: value for name, value in kwargs.items() if name in named}
            arguments["kwargs"] = {name: value for name, value in kwargs.items() if name not in named}
        self._pmod_prepare(arguments, "use_cache" in signature.parameters, cache_parameter)
        extra = arguments.pop("kwargs", {})
        if torch.compiler.is_compiling():
            # no try block in a traced frame: dynamo cannot resume it after a graph break in transformers' forward
            return base_forward(self, **arguments, **extra)
        try:
            return base_forward(self, **arguments, **extra)
        except ValueError as exc:
            if "Image features and image tokens do not match" in str(exc):
                raise PModInputError(_image_mismatch_message(self, arguments)) from exc
            raise

    return forward


def _make_prepare_inputs(base_prepare):
    """``prepare_inputs_for_generation`` that also takes ``target_mask`` / ``target_counts`` (generate() refuses model
    arguments the method's signature does not name) and passes them to the prompt's forward only: they describe the
    prompt, and a decoding step routes nothing."""
    signature = inspect.signature(base_prepare)
    params = list(signature.parameters.values())
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in PROMPT_ARGUMENTS]
    keyword = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    others = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]

    @functools.wraps(base_prepare)
    def prepare_inputs_for_generation(self, *args, target_mask=None, target_counts=None, **kwargs):
        inputs = base_prepare(self, *args, **kwargs)
        reference = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        if reference is None or (target_mask is None and target_counts is None):
            return inputs
        prompt = kwargs.get("is_first_iteration") or (target_mask is not None and reference.shape[1] == target_mask.shape[-1])
        if not prompt:
            return inputs
        if target_mask is not None:
            inputs["target_mask"] = target_mask
        if target_counts is not None:
            counts = list(target_counts.tolist() if isinstance(target_counts, torch.Tensor) else target_counts)
            rows = reference.shape[0]
            if counts and rows != len(counts) and rows % len(counts) == 0:  # rows repeated for beams / samples
                counts = [n for n in counts for _ in range(rows // len(counts))]
            inputs["target_counts"] = counts
        return inputs

    prepare_inputs_for_generation.__signature__ = signature.replace(parameters=others + extra + keyword)
    return prepare_inputs_for_generation


PROMPT_ARGUMENTS = ("target_mask", "target_counts")


def _image_mismatch_message(model, arguments: dict[str, Any]) -> str:
    image_token_id = model.config.image_token_id
    input_ids = arguments.get("input_ids")
    per_row = (input_ids == image_token_id).sum(dim=1).tolist() if input_ids is not None else "?"
    n_images = _count_images(arguments)
    expected = ""
    vision = model.config.vision_config
    fixed = getattr(model.config, "image_grid_pinpoints", None) is None and hasattr(vision, "image_size")
    if fixed and isinstance(n_images, int):  # LLaVA-1.5: a fixed number of tokens per image
        per_image = (vision.image_size // vision.patch_size) ** 2
        per_image += int(getattr(model.config, "vision_feature_select_strategy", "default") == "full")
        expected = f"; this model needs {per_image} image tokens per image, {per_image * n_images} in all"
    return (
        f"Image tokens and image features do not match: input_ids hold {per_row} image tokens per row "
        f"(config.image_token_id={image_token_id}) for {n_images} image(s){expected}. Build inputs with the model's "
        "processor, which expands each image placeholder to the right number of image tokens."
    )


def _count_images(arguments: dict[str, Any]) -> int | str:
    """How many images a forward was given: pixel values (LLaVA), grids (Qwen2-VL) or, under generate(), the
    encoded images; "?" when none of them says."""
    extra = arguments.get("kwargs") or {}
    grid = arguments.get("image_grid_thw", extra.get("image_grid_thw"))
    if grid is not None:
        return int(grid.shape[0])
    pixel_values = arguments.get("pixel_values", extra.get("pixel_values"))
    if pixel_values is not None:
        return int(pixel_values.shape[0])
    encoded = arguments.get("mm_encoder_outputs", extra.get("mm_encoder_outputs"))
    encoded = encoded.get("image") if isinstance(encoded, dict) else encoded
    encoded = getattr(encoded, "pooler_output", encoded)  # a vision-encoder output: its per-image features
    if isinstance(encoded, (list, tuple)):
        return len(encoded)
    if isinstance(encoded, torch.Tensor) and encoded.dim() == 3:
        return int(encoded.shape[0])
    return "?"


def _make_from_pretrained(base_from_pretrained):
    @functools.wraps(base_from_pretrained)
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        # A p-MoD checkpoint is loaded whole or not at all: missing, unexpected or wrongly shaped tensors are refused
        # (transformers would start them from random values). Routers may be absent only from a dense checkpoint,
        # which load_model converts with apply_pmod.
        source = _local_path(pretrained_model_name_or_path)
        return _load_checked(
            lambda path, **kw: base_from_pretrained.__func__(cls, path, *args, **kw),
            pretrained_model_name_or_path if source is None else source,
            source,
            kwargs,
        )

    return classmethod(from_pretrained)


def _make_init(base_init):
    @functools.wraps(base_init)
    def __init__(self, config, *args, **kwargs):
        if getattr(config, "pmod", None) is None:
            raise PModConfigError(f"{type(self).__name__} needs config.pmod; build models with pmod.apply_pmod.")
        base_init(self, config, *args, **kwargs)
        _install(self, ResolvedPMod.from_dict(config.pmod))  # the saved dict is parsed here, once

    return __init__


def _build_classes(family: _Family) -> tuple[type, type]:
    config_cls = type(
        f"PMod{family.base_config.__name__}",
        (family.base_config,),
        {"__module__": __name__, "model_type": family.model_type, "__annotations__": {"pmod": "dict | None"}, "pmod": None},
    )
    base = family.base_model
    model_cls = type(
        f"PMod{base.__name__}",
        (PModModelMixin, base),
        {
            "__module__": __name__,
            "config_class": config_cls,
            "__init__": _make_init(base.__init__),
            "forward": _make_forward(base.forward),
            "prepare_inputs_for_generation": _make_prepare_inputs(base.prepare_inputs_for_generation),
            "from_pretrained": _make_from_pretrained(base.from_pretrained),
        },
    )
    return config_cls, model_cls


_CLASSES: dict[type, tuple[type, type]] = {}
for _family in _FAMILIES:
    _CLASSES[_family.base_model] = _build_classes(_family)
    globals()[_CLASSES[_family.base_model][0].__name__] = _CLASSES[_family.base_model][0]
    globals()[_CLASSES[_family.base_model][1].__name__] = _CLASSES[_family.base_model][1]


def _register() -> None:
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # older transformers 5.x without user-registered conversions: keys are not renamed either
        get_checkpoint_conversion_mapping = None

    for family in _FAMILIES:
        config_cls, model_cls = _CLASSES[family.base_model]
        AutoConfig.register(family.model_type, config_cls, exist_ok=True)
        family.auto_class.register(config_cls, model_cls, exist_ok=True)
        if get_checkpoint_conversion_mapping is None:
            continue
        # transformers renames legacy checkpoint keys (e.g. LLaVA's language_model.lm_head) only for its own
        # classes; without the same mapping under our model_type, such weights would silently load random.
        mapping = get_checkpoint_conversion_mapping(family.base_config.model_type)
        if mapping is not None:
            register_checkpoint_conversion_mapping(family.model_type, mapping, overwrite=True)


_register()


# ---------------------------------------------------------------------- helpers
def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported model, p-MoD or dense."""
    inner = getattr(model, "model", None)
    for owner in (getattr(inner, "language_model", None), inner):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UnsupportedModelError(f"Cannot find the decoder layers of {type(model).__name__}.")


def _install(model: nn.Module, resolved: ResolvedPMod) -> None:
    """Keep ``resolved`` on the model (``model.pmod``) and make each of its routed layers the routed p-MoD layer of
    its `RoutedLayerSpec`: the routing plan of every forward reads the same spec objects."""
    layers = find_decoder_layers(model)
    if len(layers) != len(resolved.layer_ratios):
        raise PModConfigError(
            f"config.pmod has {len(resolved.layer_ratios)} layer ratios but the model has {len(layers)} decoder layers."
        )
    model.pmod = resolved
    for spec in resolved.layers:
        convert_decoder_layer(layers[spec.index], spec)
    # device_map="auto" (accelerate) keeps the listed classes whole, matching class names exactly: a routed layer's
    # router, attention and MLP must run on one device
    routed_names = {type(layers[spec.index]).__name__ for spec in resolved.layers}
    model._no_split_modules = set(getattr(model, "_no_split_modules", None) or ()) | routed_names


def _family_of(model: nn.Module) -> _Family:
    for family in _FAMILIES:
        if type(model) is family.base_model:
            return family
    if isinstance(model, PModModelMixin):
        raise PModConfigError(f"{type(model).__name__} is already a p-MoD model.")
    supported = ", ".join(f.base_model.__name__ for f in _FAMILIES)
    raise UnsupportedModelError(f"p-MoD does not support {type(model).__name__}; supported models: {supported}.")


# ---------------------------------------------------------------------- public API
def apply_pmod(model: PreTrainedModel, config: PModConfig | Mapping[str, Any] | None = None) -> PreTrainedModel:
    """Convert a transformers LLaVA / LLaVA-NeXT / LLaVA-OneVision / Llama / Qwen2 / Mistral model into a p-MoD
    model in place.

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
    family = _family_of(model)
    text_config = model.config.get_text_config(decoder=True)
    if text_config.model_type not in SUPPORTED_TEXT_FAMILIES:
        raise UnsupportedModelError(
            f"p-MoD does not support a {text_config.model_type!r} language model; supported: {SUPPORTED_TEXT_FAMILIES}."
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
    config_cls, model_cls = _CLASSES[family.base_model]
    model.config.__class__ = config_cls
    model.config.pmod = resolved.to_dict()
    model.__class__ = model_cls
    _install(model, resolved)
    logger.info(
        "p-MoD: routed %d of %d layers, mean keep ratio %.4f",
        len(resolved.routed_layers),
        len(resolved.layer_ratios),
        sum(resolved.layer_ratios) / len(resolved.layer_ratios),
    )
    return model


def load_model(path: str | os.PathLike, pmod_config: PModConfig | None = None, **from_pretrained_kwargs) -> PreTrainedModel:
    """Load a p-MoD model saved with ``save_pretrained``.

    A dense transformers checkpoint (LLaVA, LLaVA-NeXT, Llama, Qwen2, Mistral) is loaded and converted with
    ``pmod_config`` (default `PModConfig()`), routers starting at zero. ``from_pretrained_kwargs`` go to
    ``from_pretrained`` (``torch_dtype``, ``attn_implementation``, ``device_map``...). A checkpoint whose tensors
    do not match its config (missing, unexpected, wrongly shaped) raises `CheckpointError`, as does a local path
    that is not a checkpoint directory; other strings are hub model ids.
    """
    source = _local_path(path)
    config = _read_config(path, source)
    where = source / "config.json" if source is not None else path
    if config.model_type.startswith("pmod_"):
        if pmod_config is not None:
            raise PModConfigError(f"{path} is already a p-MoD checkpoint; do not pass pmod_config.")
        family = next((f for f in _FAMILIES if f.model_type == config.model_type), None)
        if family is None:
            raise UnsupportedModelError(f"Unknown p-MoD model type {config.model_type!r} in {path}.")
        _check_pmod_entry(config, where)
        return family.auto_class.from_pretrained(path if source is None else source, **from_pretrained_kwargs)
    loaded = _load_checked(
        dense_model_class(config.model_type, path).from_pretrained, path if source is None else source, source,
        from_pretrained_kwargs,
    )
    if isinstance(loaded, tuple):  # output_loading_info=True
        return apply_pmod(loaded[0], pmod_config), loaded[1]
    return apply_pmod(loaded, pmod_config)


def dense_model_class(model_type: str, source: Any) -> type[PreTrainedModel]:
    """The transformers class of a dense checkpoint's ``model_type`` that p-MoD converts; `UnsupportedModelError`
    naming ``source`` (the checkpoint) for any other."""
    family = next((f for f in _FAMILIES if f.base_config.model_type == model_type), None)
    if family is None:
        raise UnsupportedModelError(
            f"{source} holds a {model_type!r} model; p-MoD supports "
            f"{', '.join(f.base_config.model_type for f in _FAMILIES)} (language models: {SUPPORTED_TEXT_FAMILIES})."
        )
    return family.base_model


def load_pretrained(path: str | os.PathLike, **from_pretrained_kwargs) -> PreTrainedModel:
    """Load a saved model as it is: a p-MoD checkpoint as p-MoD, a dense one as the dense transformers model
    (for evaluating baselines; `load_model` would convert it)."""
    source = _local_path(path)
    config = _read_config(path, source)
    if config.model_type.startswith("pmod_"):
        return load_model(path, **from_pretrained_kwargs)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    # a dense baseline is checked like any checkpoint: a missing tensor would silently start from random values
    return _load_checked(auto.from_pretrained, path if source is None else source, source, from_pretrained_kwargs)


def read_checkpoint_config(path: str | os.PathLike):
    """The transformers config of a checkpoint (a local directory or a hub id), p-MoD model types registered; a local
    path that is missing or has no readable config.json raises `CheckpointError` naming it."""
    return _read_config(path, _local_path(path))


# ---------------------------------------------------------------------- loading checks (checkpoints are untrusted)
def _register_class_conversions() -> None:
    """Register transformers' key renaming of a base class (Qwen2-VL, Qwen2.5-VL: keyed by class name, not model_type)
    for its p-MoD class too. A model loaded from a dense checkpoint is saved in the legacy key layout; without the
    renaming, loading that p-MoD checkpoint would find every language-model tensor missing."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # older transformers 5.x: no class-keyed conversions either
        return
    for family in _FAMILIES:
        mapping = get_checkpoint_conversion_mapping(family.base_model.__name__)
        if mapping is not None:
            register_checkpoint_conversion_mapping(_CLASSES[family.base_model][1].__name__, mapping, overwrite=True)


_register_class_conversions()


# from_pretrained arguments that load other files than the directory's own weights: the file checks are skipped
_OTHER_WEIGHTS = ("subfolder", "variant", "gguf_file", "state_dict")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "owner/name": anything else is a local path


def _local_path(path: Any) -> Path | None:
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
        raise CheckpointError(f"{text} is a symbolic link that leads nowhere (its target is missing, or the links form a "
                              "loop); point it at the checkpoint directory.")
    if local.exists():
        raise CheckpointError(f"{text} is a file; pass the checkpoint directory that holds config.json and the weights.")
    if isinstance(path, os.PathLike) or not _HUB_ID.fullmatch(text) or text in (".", ".."):
        raise CheckpointError(f"No such directory: {text}. Pass a local checkpoint directory (pmod reads local folders; "
                              "a hub model id has the form 'owner/name').")
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
            f"{where}: pmod.layer_ratios has {len(resolved.layer_ratios)} entries for a model with {layers} decoder layers."
        )


def _load_checked(load, path: Any, source: Path | None, kwargs: dict[str, Any]):
    """``load(path, **kwargs)`` (a ``from_pretrained``) whose weight files and loaded tensors are checked."""
    kwargs = dict(kwargs)
    want_info = kwargs.pop("output_loading_info", False)
    allow_mismatched = bool(kwargs.get("ignore_mismatched_sizes", False))
    kwargs["ignore_mismatched_sizes"] = True  # wrong shapes are listed below, not a generic RuntimeError
    files = None
    if source is not None and not any(kwargs.get(k) for k in _OTHER_WEIGHTS) and kwargs.get("use_safetensors") is not False:
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
) -> None:
    """Raise ``error`` if ``from_pretrained``'s loading info reports missing, unexpected or wrongly shaped tensors,
    if a loaded tensor holds NaN or inf (a model that answers nothing, silently), or if the weight files
    (`pmod.checkpoints.inspect_weight_files`) hold integer tensors for a model of floats.
    Tied weights (an LM head tied to the embeddings) and non-persistent buffers are not missing."""
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
        problems.append(f"wrong shapes {', '.join(shapes[:5])}{f' and {len(shapes) - 5} more' if len(shapes) > 5 else ''}")
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
        routers = any(".router." in k for k in info.get("missing_keys") or ())
        raise error(
            f"The weights in {source} do not match its config ({type(model).__name__}): {'; '.join(problems)}. The "
            "checkpoint is incomplete, damaged or from another model: save or download it again"
            + (" (routers start at zero only when a dense checkpoint is converted: pmod.load_model(DENSE_DIR, "
               "PModConfig(...)) or pmod convert dense)." if routers else ".")
        )


def load_processor(model_dir: str | os.PathLike, need_images: bool = True):
    """The processor saved next to a model, or a `PModInputError` that says how to save one."""
    from transformers import AutoProcessor

    from .processors import load_video_model_processor

    try:
        # video-model processors need torchvision in transformers; without it, pmod's frame video processors stand in
        processor = load_video_model_processor(model_dir) or AutoProcessor.from_pretrained(model_dir)
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


def get_routing(model: nn.Module) -> dict[int, LayerRouting]:
    """Routing decisions of the most recent forward pass of a p-MoD model, by routed layer index."""
    model = getattr(model, "get_base_model", lambda: model)()  # a PEFT-wrapped (LoRA) p-MoD model
    if not isinstance(model, PModModelMixin):
        raise PModInputError(f"{type(model).__name__} is not a p-MoD model; convert it with pmod.apply_pmod.")
    return model.routing()
