"""What a p-MoD model does differently from the transformers class it extends: `PModModelMixin`.

Each p-MoD model class (pmod/families.py) is ``class PModX(PModModelMixin, X)``: routed decoder layers built from
``config.pmod`` at construction, a forward that plans routing once per call (`RoutingPlan`) and uses a p-MoD cache,
and ``from_pretrained`` that refuses a checkpoint with missing, unexpected or wrongly shaped tensors (pmod/loading.py).
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, StaticCache

from .cache import PModCache, PModStaticCache
from .compat import CACHE_KWARG, CACHE_NAMES, pop_cache
from .config import ResolvedPMod
from .errors import PModConfigError, PModInputError, UnsupportedModelError
from .layer import PModLayerMixin, convert_decoder_layer
from .layout import high_resolution_targets
from .routing import LayerRouting, RoutingPlan


class PModModelMixin:
    """Behaviour shared by every p-MoD model class, placed before the transformers class it extends
    (``class PModLlavaForConditionalGeneration(PModModelMixin, LlavaForConditionalGeneration)``).

    Each subclass's ``forward`` and ``prepare_inputs_for_generation`` wrap the transformers class's own and keep their
    signatures (generate() inspects them); ``dense_class`` is that transformers class.
    """

    config: Any
    pmod: ResolvedPMod  # the p-MoD settings and resolved per-layer values, set once by `_install` (never per forward)
    dense_class: type[PreTrainedModel]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        if PModModelMixin in cls.__bases__:  # a family's class (a subclass of it inherits, and may override, these)
            dense = next(
                c for c in cls.__mro__[1:] if issubclass(c, PreTrainedModel) and not issubclass(c, PModModelMixin)
            )
            cls.dense_class = dense
            if "forward" not in cls.__dict__:
                cls.forward = _make_forward(dense.forward)
            if "prepare_inputs_for_generation" not in cls.__dict__:
                cls.prepare_inputs_for_generation = _make_prepare_inputs(dense.prepare_inputs_for_generation)
        super().__init_subclass__(**kwargs)

    # transformers decides whether a class may switch its attention / MoE experts implementation by searching the
    # source of the module that defines it: the dense class's module is the one to search
    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return cls.dense_class._can_set_attn_implementation()

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return cls.dense_class._can_set_experts_implementation()

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(config, "pmod", None) is None:
            raise PModConfigError(f"{type(self).__name__} needs config.pmod; build models with pmod.apply_pmod.")
        super().__init__(config, *args, **kwargs)
        _install(self, ResolvedPMod.from_dict(config.pmod))  # the saved dict is parsed here, once

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any = None, *args: Any, **kwargs: Any) -> PreTrainedModel:
        """transformers' ``from_pretrained``, loading a p-MoD checkpoint whole or not at all: missing, unexpected or
        wrongly shaped tensors are refused (transformers would start them from random values). Routers may be absent
        only from a dense checkpoint, which `pmod.load_model` converts with apply_pmod."""
        from .loading import load_checked, local_path  # loading imports the model classes

        source = local_path(pretrained_model_name_or_path)
        return load_checked(
            lambda path, **kw: super(PModModelMixin, cls).from_pretrained(path, *args, **kw),
            pretrained_model_name_or_path if source is None else source,
            source,
            kwargs,
        )

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
            card.write_text(_MODEL_CARD.format(model_type=self.config.model_type, base=self.dense_class.__name__))

    # ------------------------------------------------------------------ forward
    def _pmod_prepare(self, arguments: dict[str, Any], named_use_cache: bool, cache_parameter: str | None) -> None:
        """Create the cache and the routing plan for one forward call (mutates ``arguments``).

        ``cache_parameter``: the forward's own name for the cache (None: it takes the cache through ``**kwargs``).
        """
        extra = arguments.setdefault("kwargs", {})
        target_mask = extra.pop("target_mask", None)
        target_counts = extra.pop("target_counts", None)
        token_counts = extra.pop("token_counts", None)
        input_ids = arguments.get("input_ids")
        reference = input_ids if input_ids is not None else arguments.get("inputs_embeds")
        if reference is None:
            raise PModInputError("Pass input_ids (or inputs_embeds with target_mask) to a p-MoD model.")
        batch, length = reference.shape[:2]
        device = reference.device

        text_config = self.config.get_text_config(decoder=True)
        router_logits = arguments.get("output_router_logits", extra.get("output_router_logits"))
        if router_logits or (router_logits is None and getattr(text_config, "output_router_logits", False)):
            raise PModInputError(
                "output_router_logits (the MoE load-balancing loss) is not supported by p-MoD models: the experts' "
                "routers of a routed layer see only the tokens it processes, and transformers' loss over every "
                "position would fail or miscount them. Set config.text_config.output_router_logits = False (the "
                "default) and leave output_router_logits out."
            )
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
        tokens = _target_counts(token_counts, batch, length, "token_counts", "non-padding tokens per row")
        if tokens is not None and counts is None:
            raise PModInputError("token_counts describe a prompt together with target_counts; pass both "
                                 "(model.routing_counts(**inputs) gives them) or neither.")
        if tokens is not None and any(n > t for n, t in zip(counts, tokens)):
            raise PModInputError(f"target_counts={counts} exceed token_counts={tokens}: a row cannot have more targets "
                                 "than tokens.")
        if target is None:  # nothing can be routed: every layer runs dense, planned without reading the device
            if counts is not None and any(counts):
                raise PModInputError(f"target_counts={counts} but these inputs have no tokens to route (no image, "
                                     "or a decoding step); pass zeros or leave target_counts out.")
            extra["pmod_plan"] = RoutingPlan.dense(valid, past_length, decoding=decoding)
        else:
            extra["pmod_plan"] = RoutingPlan.build(target, valid, self.pmod.layers, past_length=past_length,
                                                   counts=counts, tokens=tokens,
                                                   padded=arguments.get("attention_mask") is not None)

    def routing_counts(self, **inputs: Any) -> dict[str, list[int]]:
        """Each row's number of routing targets (vision tokens) and of non-padding tokens for a prompt's ``inputs`` (a
        processor's output: ``input_ids``, ``attention_mask``, pixels or grids), found by the same rule as the
        forward: ``{"target_counts": [...], "token_counts": [...]}``. Count on the host, before the inputs move to the
        device, and pass them to the forward or generate (``model(**inputs, **counts)``): the prefill then plans its
        routing without waiting for the device (pmod's generation path does this by itself)."""
        input_ids = inputs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise PModInputError("routing_counts needs the prompt's input_ids, (batch, length): vision tokens are "
                                 "found there.")
        batch, length = input_ids.shape
        valid = _valid_positions(inputs.get("attention_mask"), batch, length, 0, input_ids.device, static=False)
        target = self._find_targets(dict(inputs), {}, valid, decoding=False)
        targets = [0] * batch if target is None else (target & valid).sum(dim=1).tolist()
        return {"target_counts": targets, "token_counts": valid.sum(dim=1).tolist()}

    def _find_targets(self, arguments: dict[str, Any], extra: dict[str, Any], valid: torch.Tensor,
                      decoding: bool) -> torch.Tensor | None:
        """(B, T) bool, the positions this forward routes, from its inputs (None: nothing can be routed). Reads the
        inputs where they are: on the host for `routing_counts`, on the model's device in a forward."""
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
                raise PModInputError(f"The {type(cache).__name__} has {len(cache.layers)} layers but the model has "
                                     f"{depth} decoder layers; create it for this model (PModStaticCache.for_model, "
                                     "or PModCache(num_layers)).")
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




def _target_counts(counts: Any, batch: int, length: int, name: str = "target_counts",
                   what: str = "targets per row") -> list[int] | None:
    """``target_counts`` (each row's number of target tokens, given so that routing is planned without reading the
    device) or ``token_counts`` (``name``) as a list of ints, checked against the batch."""
    if counts is None:
        return None
    if isinstance(counts, torch.Tensor):
        if counts.device.type != "cpu":
            raise PModInputError(f"{name} must be on the host (a list of ints or a CPU tensor): reading it from "
                                 f"{counts.device} would wait for the device, which is what {name} avoids.")
        counts = counts.tolist()
    try:
        counts = [int(n) for n in counts]
    except (TypeError, ValueError) as exc:
        raise PModInputError(f"{name} must be a list of {batch} ints ({what}), got {counts!r}.") from exc
    if len(counts) != batch or any(n < 0 or n > length for n in counts):
        raise PModInputError(f"{name} must hold {batch} counts between 0 and {length} ({what} of this batch), got "
                             f"{counts}.")
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
    if (static and attention_mask.dim() == 4 and attention_mask.shape[0] in (1, batch)
            and attention_mask.shape[2] == length):
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
    # the extra keyword arguments (``**kwargs``, or e.g. Gemma 3's ``**lm_kwargs`` under transformers 5.17), which
    # _pmod_prepare reads under the key "kwargs"
    var_keyword = next(
        (name for name, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None
    )
    if var_keyword is None:
        raise UnsupportedModelError(f"{base_forward.__qualname__} takes no extra keyword arguments; pmod passes the "
                                    "routing plan through them and does not know this transformers version.")

    @functools.wraps(base_forward)  # keeps the parent's signature, which generate() inspects
    def forward(self, *args, **kwargs):
        if args:
            bound = signature.bind(self, *args, **kwargs)
            arguments = dict(bound.arguments)
            arguments.pop("self")
            arguments["kwargs"] = arguments.pop(var_keyword, {})
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
    """``prepare_inputs_for_generation`` that also takes ``target_mask`` / ``target_counts`` / ``token_counts``
    (generate() refuses model arguments the method's signature does not name) and passes them to the prompt's forward
    only: they describe the prompt, and a decoding step routes nothing."""
    signature = inspect.signature(base_prepare)
    params = list(signature.parameters.values())
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in PROMPT_ARGUMENTS]
    keyword = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    others = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]

    @functools.wraps(base_prepare)
    def prepare_inputs_for_generation(self, *args, target_mask=None, target_counts=None, token_counts=None, **kwargs):
        inputs = base_prepare(self, *args, **kwargs)
        reference = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        if token_counts is not None and target_counts is None:
            raise PModInputError("token_counts describe a prompt together with target_counts; pass both "
                                 "(model.routing_counts(**inputs) gives them) or neither.")
        if reference is None or (target_mask is None and target_counts is None):
            return inputs
        prompt = kwargs.get("is_first_iteration") or (
            target_mask is not None and reference.shape[1] == target_mask.shape[-1]
        )
        if not prompt:
            return inputs
        if target_mask is not None:
            inputs["target_mask"] = target_mask
        for name, given in (("target_counts", target_counts), ("token_counts", token_counts)):
            if given is None:
                continue
            counts = list(given.tolist() if isinstance(given, torch.Tensor) else given)
            rows = reference.shape[0]
            if counts and rows != len(counts) and rows % len(counts) == 0:  # rows repeated for beams / samples
                counts = [n for n in counts for _ in range(rows // len(counts))]
            inputs[name] = counts
        return inputs

    prepare_inputs_for_generation.__signature__ = signature.replace(parameters=others + extra + keyword)
    return prepare_inputs_for_generation


PROMPT_ARGUMENTS = ("target_mask", "target_counts", "token_counts")


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




# ---------------------------------------------------------------------- helpers
def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported model, p-MoD or dense."""
    inner = getattr(model, "model", None)
    # multimodal models keep their decoder as language_model (SmolVLM / Idefics3: text_model), causal LMs as model
    for owner in (getattr(inner, "language_model", None), getattr(inner, "text_model", None), inner):
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
