"""Where one image's vision tokens sit in the token sequence, per model family (LLaVA, LLaVA-NeXT anyres,
LLaVA-OneVision, Qwen2-VL and Qwen3-VL, Gemma 3): the base-image grid, the high-resolution grid and its newline tokens.

Used to route only the high-resolution part (``PModConfig(targets="vision_hr")``) and to draw kept-token maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import PModInputError


@dataclass(frozen=True)
class VisionLayout:
    """How one image's vision tokens are ordered in the sequence.

    Attributes:
        base: (rows, cols) of the base-image grid, in raster order.
        highres: (rows, cols) of the unpadded high-resolution grid (LLaVA-NeXT), or None.
        prefix: tokens before the base grid (the CLS feature with ``vision_feature_select_strategy="full"``).
    """

    base: tuple[int, int]
    highres: tuple[int, int] | None = None
    prefix: int = 0

    @property
    def num_base_tokens(self) -> int:
        """Tokens of the base image (the prefix included), which come first."""
        return self.prefix + self.base[0] * self.base[1]

    @property
    def num_tokens(self) -> int:
        n = self.num_base_tokens
        if self.highres is not None:
            n += self.highres[0] * (self.highres[1] + 1)  # one image-newline token ends each high-res row
        return n


def vision_layout(config: Any, image_size: Sequence[int] | None = None,
                  grid_thw: Sequence[int] | None = None) -> VisionLayout:
    """The token layout of one image for a LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL (Qwen3-VL) or Gemma 3
    config.

    ``image_size`` is the original image's (height, width), as the processor returns it in ``image_sizes``;
    LLaVA-NeXT and LLaVA-OneVision need it, because the high-resolution grid is cropped back to the image's aspect
    ratio. ``grid_thw`` is the image's (t, h, w) patch grid from the processor's ``image_grid_thw``; Qwen2-VL needs it.
    """
    vision = config.vision_config
    merge = getattr(vision, "spatial_merge_size", None)
    if merge is not None:  # Qwen2-VL / Qwen2.5-VL: one token per merge x merge patches
        if grid_thw is None:
            raise PModInputError(
                "Qwen2-VL token maps need the image's patch grid: pass image_grid_thw from the processor."
            )
        t, h, w = (int(v) for v in grid_thw)
        if t != 1:
            raise PModInputError(f"token maps are drawn for images; this grid has {t} time steps (a video).")
        return VisionLayout(base=(h // merge, w // merge))
    pooled = getattr(config, "mm_tokens_per_image", None)
    if pooled is not None:  # Gemma 3: the patch grid average-pooled to a (side, side) grid, kept in raster order
        side = math.isqrt(pooled)
        return VisionLayout(base=(side, side))
    g = vision.image_size // vision.patch_size
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    aspect = getattr(config, "vision_aspect_ratio", None)  # LLaVA-OneVision: "anyres_max_N"
    if pinpoints is None:
        # LLaVA-1.5: one crop; "full" keeps the CLS feature in front of the patch features.
        return VisionLayout(base=(g, g), prefix=int(strategy == "full"))
    if aspect is None and strategy != "default":
        raise PModInputError(
            f"LLaVA-NeXT token layout is only defined for vision_feature_select_strategy='default', not {strategy!r}."
        )
    if image_size is None:
        raise PModInputError(
            "LLaVA-NeXT token maps need the image's (height, width): pass image_sizes from the processor."
        )
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    height, width = (int(v) for v in image_size)
    # The same calls as LlavaNextModel.pack_image_features: crops per side, then the crop-grid feature map
    # (g * crops_h, g * crops_w) cut back to the image's aspect ratio. A 1-channel dummy gives the exact shape.
    crops_h, crops_w = get_anyres_image_grid_shape((height, width), pinpoints, vision.image_size)
    unpadded = unpad_image(torch.empty(1, g * crops_h, g * crops_w), (height, width))
    rows, cols = unpadded.shape[1], unpadded.shape[2]
    if aspect is not None:
        # LLaVA-OneVision (SigLIP, no CLS feature): a high-res grid larger than N base grids is interpolated down
        # by the same ratio as in LlavaOnevisionModel.pack_image_features
        ratio = math.sqrt(rows * cols / (int(aspect.removeprefix("anyres_max_")) * g * g))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return VisionLayout(base=(g, g), highres=(rows, cols))


def high_resolution_targets(config: Any, image_tokens: torch.Tensor, image_sizes: Any) -> torch.Tensor:
    """(B, T) bool: the image tokens of the high-resolution parts of anyres images (their newline tokens included),
    i.e. ``image_tokens`` without each image's leading base-image tokens.

    ``image_tokens``: (B, T) bool image-token positions; images fill them in order, row by row, as the model splices
    their features in. ``image_sizes``: (n_images, 2) original (height, width) of each image, from the processor.
    """
    if getattr(config, "image_grid_pinpoints", None) is None:
        raise PModInputError(
            "targets='vision_hr' routes the high-resolution part of anyres images; this model has none (no "
            "image_grid_pinpoints). Use targets='vision'."
        )
    if image_sizes is None:
        raise PModInputError(
            "targets='vision_hr' needs image_sizes (from the processor) to find each image's base tokens."
        )
    sizes = torch.as_tensor(image_sizes).reshape(-1, 2).tolist()
    layouts = [vision_layout(config, size) for size in sizes]
    flat = image_tokens.flatten().nonzero().squeeze(1)  # (N,) flat positions of every image token, in order
    if sum(layout.num_tokens for layout in layouts) != flat.numel():
        raise PModInputError(
            f"input_ids hold {flat.numel()} image tokens, but {len(sizes)} image(s) of sizes {sizes} have "
            f"{[layout.num_tokens for layout in layouts]} tokens; build inputs with the model's processor."
        )
    base = torch.zeros(flat.numel(), dtype=torch.bool)
    start = 0
    for layout in layouts:
        base[start : start + layout.num_base_tokens] = True  # base-image tokens lead each image's span
        start += layout.num_tokens
    target = image_tokens.flatten().clone()
    target[flat[base.to(flat.device)]] = False
    return target.view_as(image_tokens)
