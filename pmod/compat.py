"""What differs between the transformers versions pmod supports (pyproject.toml declares the range).

Everything version-dependent is decided here, once, from the installed transformers' own signatures and
modules, never from version strings: a rename that pmod does not know about fails at import with a clear error
instead of silently bypassing the p-MoD cache.

- The KV cache keyword: ``past_key_values`` up to transformers 5.23, ``cache`` from 5.24 on (with
  ``past_key_values`` a deprecated alias). Decoder layers, attention modules and model forwards all use one
  name; model outputs carry the cache under the same name.
- The video-processor base class: ``VideoProcessorMixin`` from 5.2x on; before it, video processors derive
  from the image-processor base directly.
- How ``ProcessorMixin.from_pretrained`` loads a processor's parts (tokenizer, image and video processors): up to
  5.24 through the class hook ``_get_arguments_from_pretrained`` (it returns the list of parts); from 5.25 on
  through ``_resolve_subprocessors`` (it loads each part that ``processor_dict`` holds as a settings dict or not at
  all, and keeps one that is already an object).
- Idefics3's and SmolVLM's PIL image processors: 5.17 exports them as placeholders that demand torchvision
  (`export_pil_image_processors`).
"""

from __future__ import annotations

import inspect
from collections.abc import MutableMapping
from typing import Any

from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from .errors import PModInputError, UnsupportedModelError

CACHE_NAMES = ("cache", "past_key_values")


def _cache_keyword() -> str:
    parameters = inspect.signature(LlamaDecoderLayer.forward).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    import transformers

    raise UnsupportedModelError(
        f"transformers {transformers.__version__} passes the KV cache to decoder layers under a name pmod does not "
        f"know (none of {CACHE_NAMES} in LlamaDecoderLayer.forward{inspect.signature(LlamaDecoderLayer.forward)}); "
        "install a transformers version in the range pmod declares."
    )


CACHE_KWARG: str = _cache_keyword()
"""The keyword under which the installed transformers passes the KV cache (``cache`` or ``past_key_values``)."""


def pop_cache(arguments: MutableMapping[str, Any]) -> Any:
    """Remove the cache from ``arguments`` under either name and return it (None if absent).

    Both names set to different objects is an error: one of them would otherwise be silently ignored.
    """
    found = [(name, arguments.pop(name)) for name in CACHE_NAMES if name in arguments]
    given = [(name, value) for name, value in found if value is not None]
    if len(given) > 1 and given[0][1] is not given[1][1]:
        raise PModInputError(
            f"Both `cache` and `past_key_values` were given; pass the KV cache once (`{CACHE_KWARG}` with this "
            "transformers)."
        )
    return given[0][1] if given else None


def output_cache(output: Any) -> Any:
    """The KV cache a model output carries (``output.cache`` or ``output.past_key_values``), without the
    deprecation notice that the old attribute name logs on newer transformers."""
    return getattr(output, CACHE_KWARG, None)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the installed keyword, for calling transformers modules directly."""
    return {CACHE_KWARG: cache}


try:  # transformers >= 5.2x
    from transformers.video_processing_utils import VideoProcessorMixin as VideoProcessorBase
except ImportError:  # older 5.x: video processors are image processors with a video preprocess
    from transformers.image_processing_utils import BaseImageProcessor as VideoProcessorBase


# the newer hook first: a transformers that still carries the old one unused must take the new path
SUBPROCESSOR_HOOKS = ("_resolve_subprocessors", "_get_arguments_from_pretrained")


def subprocessor_hook() -> str:
    """The `ProcessorMixin` class method through which the installed transformers loads a processor's parts (one of
    `SUBPROCESSOR_HOOKS`), which pmod's frame processors override to supply their video processor.
    `UnsupportedModelError` if it has neither. Decided when a processor is loaded, not at import: only loading a
    video-model processor without torchvision needs it."""
    from transformers.processing_utils import ProcessorMixin

    for hook in SUBPROCESSOR_HOOKS:
        if hook in vars(ProcessorMixin):
            return hook
    import transformers

    raise UnsupportedModelError(
        f"transformers {transformers.__version__} loads a processor's parts through neither of {SUBPROCESSOR_HOOKS}, "
        "so pmod cannot supply its frame video processor. Install torchvision (transformers' own video processors) "
        "or a transformers version in the range pmod declares."
    )


# (family module, class) of PIL image processors that transformers 5.17 takes for torchvision code
MISEXPORTED_PIL_IMAGE_PROCESSORS = (("idefics3", "Idefics3ImageProcessorPil"), ("smolvlm", "SmolVLMImageProcessorPil"))


def export_pil_image_processors() -> None:
    """Export the real classes of `MISEXPORTED_PIL_IMAGE_PROCESSORS` where transformers exports placeholders.

    transformers 5.17 decides that a processor module needs torchvision when its text holds the word
    TorchvisionBackend, which these modules' docstrings do ("mirrors TorchvisionBackend.pad"): without torchvision,
    ``transformers.Idefics3ImageProcessorPil`` and what ``AutoImageProcessor`` finds are placeholders that refuse to
    start, so neither family's processor can be built or loaded. The modules import without torchvision: their
    classes replace the placeholders in transformers' namespaces (5.25 exports them as they are: nothing changes).
    Decided when a processor is built or loaded, not at import."""
    import importlib

    import transformers

    for family, name in MISEXPORTED_PIL_IMAGE_PROCESSORS:
        if not getattr(getattr(transformers, name, None), "is_dummy", False):
            continue
        try:
            real = getattr(importlib.import_module(f"transformers.models.{family}.image_processing_pil_{family}"), name)
        except (ImportError, AttributeError):  # a transformers laid out otherwise: its own error stands
            continue
        setattr(transformers, name, real)
        setattr(importlib.import_module(f"transformers.models.{family}"), name, real)  # where AutoImageProcessor looks


__all__ = [
    "CACHE_KWARG",
    "CACHE_NAMES",
    "SUBPROCESSOR_HOOKS",
    "VideoProcessorBase",
    "cache_kwargs",
    "export_pil_image_processors",
    "output_cache",
    "pop_cache",
    "subprocessor_hook",
]
