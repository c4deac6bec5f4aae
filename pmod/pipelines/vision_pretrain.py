"""Pretrain the vision tower of a LLaVA model on per-cell image labels: the miniature of CLIP's pretraining.

LLaVA (and p-MoD after it) starts from a vision encoder that was pretrained elsewhere and stays frozen. A tiny model
built from a config has a random one; trained only through the language model's answers it learns colours but not
shapes within a CPU budget (issue 19). This stage gives it what CLIP gives LLaVA: patch features that say what is
where. The labels are the synthetic scenes' grid cells (`pmod.data.synthetic.SyntheticDataset.cell_labels`): the
tokens of each cell are mean-pooled and classified into (shape or empty, colour or empty), and every token is
classified into its cell (so its features carry its position, as CLIP's do). The heads are thrown away afterwards.

    metrics = pretrain_vision_tower(model, processor, images, labels, grid=2, steps=1500)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import PModConfigError

logger = logging.getLogger(__name__)


def vision_tokens(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The patch features LLaVA hands to its projector: layer ``vision_feature_layer`` of the vision tower, without the
    CLS token for the ``default`` selection strategy. (B, N, D) for N patches in raster order."""
    config = model.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise PModConfigError(f"vision pretraining needs one vision_feature_layer (an int), got {layer!r}")
    tower = model.model.vision_tower
    hidden = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]  # (B, 1 + N, D)
    return hidden[:, 1:] if config.vision_feature_select_strategy == "default" else hidden


def _cell_index(side: int, grid: int) -> torch.Tensor:
    """The grid cell (raster order) of each of side x side patches, in raster order: (side * side,)."""
    rows = torch.arange(side).repeat_interleave(side) * grid // side
    cols = torch.arange(side).repeat(side) * grid // side
    return rows * grid + cols


def pretrain_vision_tower(model: nn.Module, processor: Any, images: Sequence[Any],
                          labels: Sequence[Sequence[tuple[int, int]]], grid: int, steps: int, batch_size: int = 8,
                          lr: float = 1e-3, seed: int = 0, held_out: int = 200) -> dict[str, float]:
    """Train ``model``'s vision tower (only it) for ``steps`` steps on ``images`` (PIL) and their per-cell ``labels``
    ((shape, colour) per cell, 1-based, (0, 0) = empty). The last ``held_out`` images are kept for the returned
    held-out accuracies ``shape_accuracy`` and ``colour_accuracy`` (over non-empty cells) and ``position_accuracy``
    (tokens put in their cell)."""
    if len(images) != len(labels) or len(images) <= held_out:
        raise PModConfigError(f"vision pretraining needs more images than the {held_out} held out and one label list "
                              f"per image; got {len(images)} images and {len(labels)} label lists")
    cells = grid * grid
    if any(len(cell_labels) != cells for cell_labels in labels):
        raise PModConfigError(f"every image needs {cells} cell labels for a {grid} x {grid} grid")
    generator = torch.Generator().manual_seed(seed)

    def pixels_of(index: Sequence[int]) -> torch.Tensor:  # processed per batch: all images at once take ~1 GB
        return processor.image_processor([images[i] for i in index],
                                         return_tensors="pt")["pixel_values"]  # (b, 3, H, W)

    targets = torch.tensor([list(map(list, cell_labels)) for cell_labels in labels])  # (n, cells, 2)
    n_shapes, n_colours = int(targets[..., 0].max()) + 1, int(targets[..., 1].max()) + 1
    tower = model.model.vision_tower
    with torch.no_grad():
        _, n_tokens, width = vision_tokens(model, pixels_of([0])).shape
    side = round(n_tokens**0.5)
    if side % grid:
        raise PModConfigError(f"{side} x {side} patches do not split into a {grid} x {grid} grid of cells")
    cell_of_token = _cell_index(side, grid)  # (N,)
    heads = nn.ModuleDict({"shape": nn.Linear(width, n_shapes), "colour": nn.Linear(width, n_colours),
                           "cell": nn.Linear(width, cells)})
    trainable = [p for p in tower.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to zero
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    one_hot = F.one_hot(cell_of_token, cells).float().T / (side * side // cells)  # (cells, N): mean over a cell

    def losses(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        tokens = vision_tokens(model, x)  # (B, N, D)
        pooled = one_hot @ tokens  # (B, cells, D)
        shape, colour = heads["shape"](pooled), heads["colour"](pooled)
        cell = heads["cell"](tokens)  # (B, N, cells)
        loss = (F.cross_entropy(shape.flatten(0, 1), y[..., 0].flatten())
                + F.cross_entropy(colour.flatten(0, 1), y[..., 1].flatten())
                + F.cross_entropy(cell.flatten(0, 1), cell_of_token.repeat(len(x))))
        filled = y[..., 0] > 0
        return loss, {"shape_accuracy": (shape.argmax(-1) == y[..., 0])[filled].float().mean().item(),
                      "colour_accuracy": (colour.argmax(-1) == y[..., 1])[filled].float().mean().item(),
                      "position_accuracy": (cell.argmax(-1) == cell_of_token).float().mean().item()}

    n_train = len(images) - held_out
    was_training = tower.training
    tower.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(n_train, (batch_size,), generator=generator)
        loss, _ = losses(pixels_of(index.tolist()), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            logger.info("vision pretraining: step %d/%d, loss %.3f (%.0f s)", step, steps, loss.item(),
                        time.perf_counter() - start)
    tower.train(was_training)
    with torch.no_grad():
        _, metrics = losses(pixels_of(range(n_train, len(images))), targets[n_train:])
    metrics |= {"steps": steps, "seconds": time.perf_counter() - start}
    logger.info("vision pretraining: held-out shape %.1f%%, colour %.1f%%, position %.1f%%",
                100 * metrics["shape_accuracy"], 100 * metrics["colour_accuracy"], 100 * metrics["position_accuracy"])
    return metrics
