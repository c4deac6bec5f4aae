"""Which vision tokens each routed layer kept, laid out over the image.

After a forward pass, `kept_token_maps` turns every routed layer's `LayerRouting.selected` into grids over
the image: for LLaVA-1.5 one (g, g) grid in raster order (g = vision image_size // patch_size); for
LLaVA-NeXT (anyres) the (g, g) grid of the base image plus the unpadded high-resolution grid, whose rows in
the sequence each end with an image-newline token (dropped from the grid, kept apart; LLaVA-OneVision
interpolates a large high-resolution grid down first, "anyres_max_N"); for Qwen2-VL /
Qwen2.5-VL (dynamic resolution) the merged (h / merge, w / merge) grid of the image's ``image_grid_thw``, in
raster order (the processor orders patches by merged cell, and the vision tower keeps that order). `plot_routing`
draws them: kept tokens clear, skipped tokens darkened. `visualize` does both from a model and processor,
which is what the `pmod viz` command runs:

    pmod viz MODEL_DIR --image photo.png --prompt "what colour is the circle ?" --out routing.png
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PModInputError
from ..layout import VisionLayout, vision_layout  # noqa: F401  (part of this module's API)
from ..loading import load_processor
from ..models import get_routing
from ..routing import LayerRouting

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeptTokenMap:
    """The vision tokens one routed layer kept for one image.

    Attributes:
        layer: decoder layer index.
        keep_ratio: the layer's keep ratio.
        tokens: (N,) bool, kept flag of every vision token of the image, in sequence order.
        base: (rows, cols) bool, the base-image grid.
        highres: (rows, cols) bool, the unpadded high-resolution grid (LLaVA-NeXT), else None.
        newline: (rows,) bool, kept flags of the image-newline tokens ending the high-res rows, else None.
    """

    layer: int
    keep_ratio: float
    tokens: np.ndarray
    base: np.ndarray
    highres: np.ndarray | None = None
    newline: np.ndarray | None = None

    @property
    def kept(self) -> int:
        return int(self.tokens.sum())

    @property
    def total(self) -> int:
        return int(self.tokens.size)


def _example_rows(values: Any, example: int, batch: int, width: int, name: str) -> tuple[int, ...] | None:
    """One example's row of a per-image input (``image_sizes``, ``image_grid_thw``) of a one-image-per-row batch."""
    if values is None:
        return None
    rows = torch.as_tensor(values).reshape(-1, width)  # a single row or an (n_images, width) batch
    if rows.shape[0] == 1:
        return tuple(rows[0].tolist())
    if rows.shape[0] == batch:  # one image per example
        return tuple(rows[example].tolist())
    raise PModInputError(f"{name} has {rows.shape[0]} rows for a batch of {batch}; pass the row of example "
                         f"{example}'s image.")


def kept_token_maps(
    model: Any,
    routing: Mapping[int, LayerRouting] | None = None,
    input_ids: torch.Tensor | None = None,
    example: int = 0,
    image_sizes: Any = None,
    vision_mask: torch.Tensor | None = None,
    image_grid_thw: Any = None,
) -> dict[int, KeptTokenMap]:
    """Per routed layer, the vision tokens of one example's image that the layer kept, as grids.

    Args:
        model: the p-MoD model of the forward pass (its config gives the layout).
        routing: ``model.routing()`` after the forward (the default).
        input_ids: (B, T) ids of that forward; vision tokens are ``input_ids == config.image_token_id``.
        example: row of the batch.
        image_sizes: LLaVA-NeXT only: the processor's ``image_sizes`` or the example's image (height, width).
        image_grid_thw: Qwen2-VL only: the processor's ``image_grid_thw`` (one image per example) or the
            example's image (t, h, w).
        vision_mask: (B, T) bool vision-token mask, instead of ``input_ids``. Without either, the routing's
            target mask is used (the vision tokens, unless the model routes every token).

    The example must hold exactly one image; its number of vision tokens is checked against the layout.
    """
    routing = dict(get_routing(model) if routing is None else routing)
    if not routing:
        raise PModInputError("No routing recorded: run a forward pass of a p-MoD model with an image first.")
    first = next(iter(routing.values()))
    batch, length = first.selected.shape
    if not 0 <= example < batch:
        raise PModInputError(f"example {example} is out of range for a batch of {batch}.")
    if vision_mask is None and input_ids is not None:
        vision_mask = input_ids == model.config.image_token_id
    if vision_mask is None:
        targets = getattr(getattr(model, "pmod", None), "settings", None)
        if getattr(targets, "targets", None) == "all":
            raise PModInputError("This model routes every token: pass input_ids to tell vision tokens apart.")
        vision_mask = first.target
    if tuple(vision_mask.shape) != (batch, length):
        raise PModInputError(
            f"input_ids / vision_mask have shape {tuple(vision_mask.shape)} but the last forward was {(batch, length)}."
        )
    positions = vision_mask[example].nonzero().flatten().cpu()  # (N,) sequence positions of the vision tokens
    if positions.numel() == 0:
        raise PModInputError(
            f"Example {example} has no vision tokens in the last forward (a decoding step, or a text-only row)."
        )
    size = _example_rows(image_sizes, example, batch, 2, "image_sizes")
    layout = vision_layout(model.config, size, _example_rows(image_grid_thw, example, batch, 3, "image_grid_thw"))
    if positions.numel() != layout.num_tokens:
        where = f" for an image of (height, width) {size}" if layout.highres is not None else ""
        raise PModInputError(
            f"Example {example} has {positions.numel()} vision tokens, but one image needs {layout.num_tokens}{where}. "
            "Token maps need exactly one image per example (and, for LLaVA-NeXT, that image's size; for Qwen2-VL, "
            "its image_grid_thw)."
        )
    maps = {}
    for index, r in sorted(routing.items()):
        tokens = r.selected[example].cpu()[positions].numpy().astype(bool)  # (N,)
        rows, cols = layout.base
        base = tokens[layout.prefix : layout.prefix + rows * cols].reshape(rows, cols)
        highres = newline = None
        if layout.highres is not None:
            h, w = layout.highres
            # (h * (w + 1),) -> (h, w + 1): each high-res row is w features then one newline token.
            rest = tokens[layout.prefix + rows * cols :].reshape(h, w + 1)
            highres, newline = rest[:, :w], rest[:, w]
        maps[index] = KeptTokenMap(index, float(r.keep_ratio), tokens, base, highres, newline)
    return maps


# ---------------------------------------------------------------------- drawing
def _overlay(kept: np.ndarray) -> np.ndarray:
    """(rows, cols) bool -> (rows, cols, 4) RGBA: skipped tokens dark and mostly opaque, kept ones clear."""
    rgba = np.zeros(kept.shape + (4,), dtype=np.float32)
    rgba[..., 3] = np.where(kept, 0.0, 0.72)
    return rgba


def _as_array(image: Any) -> np.ndarray:
    """A PIL image or an (H, W, 3) array -> (H, W, 3) array."""
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)


def plot_routing(
    image: Any,
    maps: Mapping[int, KeptTokenMap],
    out_path: str | os.PathLike,
    title: str | None = None,
    base_image: Any = None,
    columns: int = 6,
) -> Path:
    """Write one PNG: the image, then per routed layer the image with skipped vision tokens darkened.

    ``image`` (PIL image or (H, W, 3) array) is what the maps cover: the high-resolution grid of LLaVA-NeXT
    covers the original image. ``base_image`` is the model's square view under the base grid (the resized
    and cropped or squashed input); it defaults to ``image``. LLaVA-NeXT figures get a second group of panels
    with the base-image maps. Panels wrap after ``columns`` per row. Returns the path written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plot_routing needs matplotlib: pip install 'matplotlib>=3.7' (or pmod[dev]).") from exc
    if not maps:
        raise PModInputError("No token maps to plot.")
    picture = _as_array(image)
    base_picture = picture if base_image is None else _as_array(base_image)
    anyres = any(m.highres is not None for m in maps.values())

    # (title, picture, kept grid or None) per panel; LLaVA-NeXT: high-res maps first, then the base maps.
    panels: list[tuple[str, np.ndarray, np.ndarray | None]] = [("input", picture, None)]
    for index, m in sorted(maps.items()):
        grid = m.highres if anyres and m.highres is not None else m.base
        label = f"layer {index} high-res" if anyres else f"layer {index}"
        panels.append((f"{label}\nkept {int(grid.sum())}/{grid.size} (R={m.keep_ratio:.2f})", picture, grid))
    if anyres:
        panels.append(("base view", base_picture, None))
        for index, m in sorted(maps.items()):
            panels.append((f"layer {index} base\nkept {int(m.base.sum())}/{m.base.size}", base_picture, m.base))
    elif base_image is not None:
        panels = [("input", picture, None), ("model view", base_picture, None)] + [
            (t, base_picture, grid) for t, _, grid in panels[1:]
        ]

    ncols = min(columns, len(panels))
    if anyres and 1 + len(maps) <= columns:
        ncols = 1 + len(maps)  # the base-map group starts its own row, under the high-res maps
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(2.3 * ncols, 2.8 * nrows + (0.4 if title else 0)), dpi=100)  # room for two-line titles
    FigureCanvasAgg(fig)
    for k, (label, pic, grid) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        height, width = pic.shape[:2]
        ax.imshow(pic, extent=(0, width, height, 0))
        if grid is not None:
            # The token grid is stretched over the whole picture: token (i, j) covers one cell.
            ax.imshow(_overlay(grid), extent=(0, width, height, 0), interpolation="nearest")
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    from matplotlib.patches import Patch

    # what the shading means, in every figure: a reader of one PNG has nothing else to go by
    legend = [Patch(facecolor="white", edgecolor="grey", label="kept: the layer processed this vision token"),
              Patch(facecolor=(0, 0, 0, 0.72), edgecolor="grey",
                    label="skipped (darkened): the layer left it as it was")]
    fig.legend(handles=legend, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    logger.info("wrote routing maps of %d layers to %s", len(maps), out)
    return out


def _model_view(pixel_values: torch.Tensor, processor: Any) -> np.ndarray | None:
    """(3, S, S) normalised pixels -> (S, S, 3) uint8 picture, undoing the image processor's normalisation."""
    image_processor = getattr(processor, "image_processor", None)
    mean = getattr(image_processor, "image_mean", None)
    std = getattr(image_processor, "image_std", None)
    x = pixel_values.detach().float().cpu()
    if mean is not None and std is not None and getattr(image_processor, "do_normalize", True):
        x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    else:  # unknown normalisation: stretch to the full range
        x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-6)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def visualize(
    model_dir_or_model: Any,
    processor: Any,
    image: Any,
    prompt: str,
    out_path: str | os.PathLike,
    title: str | None = None,
) -> dict[int, KeptTokenMap]:
    """Run one forward pass on ``image`` and ``prompt``, plot the kept vision tokens per layer to ``out_path``.

    ``model_dir_or_model`` is a p-MoD model or a directory `pmod.load_model` reads; ``processor`` is the
    model's processor, or None to load it from that directory. ``image`` is a PIL image or a path.
    Returns the token maps.
    """
    from ..data.conversation import render, use_chat_template
    from ..data.images import load_image
    from ..loading import load_model, read_checkpoint_config
    from .generation import encode

    if isinstance(model_dir_or_model, (str, os.PathLike)):
        config = read_checkpoint_config(model_dir_or_model)
        if not config.model_type.startswith("pmod_"):  # the same rule as every verb: a folder is used as it is
            raise PModInputError(f"{model_dir_or_model} is a dense checkpoint: none of its layers routes tokens, so "
                                 "there is nothing to draw. Draw a p-MoD model (pmod convert dense, then train it).")
        model = load_model(model_dir_or_model).eval()
        if processor is None:
            processor = load_processor(model_dir_or_model)
    else:
        model = model_dir_or_model
    if processor is None:
        raise PModInputError("visualize needs the model's processor (tokenizer and image processor).")
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    image = image.convert("RGB")
    # the prompt `pmod chat` and `pmod eval` give the same question: the processor's chat template, or the LLaVA-1.5
    # one with a warning (`use_chat_template`, on a copy: the caller's processor is left as it is)
    processor = copy.copy(processor)
    use_chat_template(processor, None, "the processor")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    inputs = encode(model, processor, [render(processor, messages, add_generation_prompt=True)], [[image]])
    with torch.no_grad():
        model(**inputs, use_cache=False)
    maps = kept_token_maps(model, get_routing(model), inputs["input_ids"], 0, inputs.get("image_sizes"),
                           image_grid_thw=inputs.get("image_grid_thw"))
    pixels = inputs["pixel_values"]
    if pixels.dim() == 2:  # Qwen2-VL flat patches: the model saw the image resized to (h, w) patches
        _, h, w = (int(v) for v in inputs["image_grid_thw"][0])
        patch = model.config.vision_config.patch_size
        base_view = np.asarray(image.resize((w * patch, h * patch)))
    else:
        pixels = pixels[0]
        base_view = _model_view(pixels[0] if pixels.dim() == 4 else pixels, processor)  # NeXT: crop 0 is the base view
    plot_routing(image, maps, out_path, title=title if title is not None else prompt, base_image=base_view)
    return maps

