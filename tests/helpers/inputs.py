"""LLaVA-1.5 and LLaVA-NeXT test batches (random images, rows with different vision-token counts) and an all-routed
p-MoD config."""

import torch

import pmod
from tests.helpers.batches import build_batch, llava_tokens_per_image

ROWS = [(3, 1, 4), (2, 2, 1), (5, 0, 3), (1, 1, 0)]  # different vision-token counts, one row without image


def llava_inputs(model, rows=ROWS, padding_side="left", seed=0):
    ids, mask, pos = build_batch(rows, model.config.image_token_id, llava_tokens_per_image(model), 128, padding_side,
                                 seed)
    n_images = [r[1] for r in rows]
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(sum(n_images), 3, 28, 28, generator=gen)
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=pixel_values), n_images


def all_routed(num_layers, ratio=1.0):
    return pmod.PModConfig(schedule=[ratio] * num_layers, routed_layers=list(range(num_layers)))


def next_inputs(model, sizes, texts, seed=0):
    """A LLaVA-NeXT batch, left padded: per row one image of the given (h, w), a list of such sizes (several images),
    or None (no image)."""
    gen = torch.Generator().manual_seed(seed)
    per_row = [[] if s is None else list(s) if isinstance(s, list) else [s] for s in sizes]
    image_sizes = torch.tensor([s for row in per_row for s in row])
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    base = model.config.vision_config.image_size
    patches = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, base) for s in image_sizes.tolist()]
    pixel_values = torch.zeros(len(patches), max(patches), 3, base, base)
    for i, p in enumerate(patches):
        pixel_values[i, :p] = torch.randn(p, 3, base, base, generator=gen)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values, image_sizes).pooler_output
    counts = iter([f.shape[0] for f in feats])
    rows = [(t[0], [next(counts) for _ in row], t[1]) for row, t in zip(per_row, texts)]
    ids, mask, pos = build_batch(rows, model.config.image_token_id, 0, 128, "left", seed)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=pixel_values,
                  image_sizes=image_sizes)
    return inputs, [len(row) for row in per_row]
