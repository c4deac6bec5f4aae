"""Qwen2-VL / Qwen2.5-VL test batches: images and videos as flat patches, with each row's own inputs."""

import torch

# per row: ("image", t, h, w) | ("video", t, h, w) | None, and (text before, text after); grids in patches
ROWS = [(("image", 1, 4, 6), (2, 3)), (("video", 2, 4, 4), (3, 1)), (None, (5, 2)), (("image", 1, 6, 4), (1, 1))]


def media_patches(kind, t, h, w, patch_dim, gen, pixels, grids):
    """An image's or video's random flat patches and grid, added to the batch's ``pixels`` and ``grids``; returns
    them as that row's own inputs."""
    px = torch.randn(t * h * w, patch_dim, generator=gen)
    pixels[kind].append(px)
    grids[kind].append([t, h, w])
    key = "pixel_values" if kind == "image" else "pixel_values_videos"
    return {key: px, f"{kind}_grid_thw": torch.tensor([[t, h, w]])}


def qwen_inputs(model, rows=ROWS, seed=0):
    """A left-padded batch, and each row's own inputs (for the per-example reference and one-by-one runs)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    vision = cfg.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    merge = vision.spatial_merge_size**2
    seqs, types, singles = [], [], []
    pixels = {"image": [], "video": []}
    grids = {"image": [], "video": []}
    for vis, (before, after) in rows:
        text = lambda n: torch.randint(1, cfg.text_config.vocab_size - 4, (n,), generator=gen)  # noqa: E731
        parts, kinds, single = [text(before)], [torch.zeros(before, dtype=torch.long)], {}
        if vis is not None:
            kind, t, h, w = vis
            token = cfg.image_token_id if kind == "image" else cfg.video_token_id
            n = t * h * w // merge
            parts += [torch.tensor([cfg.vision_start_token_id]), torch.full((n,), token),
                      torch.tensor([cfg.vision_end_token_id])]
            kinds += [torch.zeros(1, dtype=torch.long), torch.full((n,), 1 if kind == "image" else 2),
                      torch.zeros(1, dtype=torch.long)]
            single = media_patches(kind, t, h, w, patch_dim, gen, pixels, grids)
        parts.append(text(after))
        kinds.append(torch.zeros(after, dtype=torch.long))
        seqs.append(torch.cat(parts))
        types.append(torch.cat(kinds))
        singles.append(single)
    return left_padded(seqs, types, singles, pixels, grids)


def left_padded(seqs, types, singles, pixels, grids):
    """The rows' token ids and token types (``mm_token_type_ids``) left-padded into one batch with the pixels and
    grids of every image and video, and each row's own inputs completed with its ids and types."""
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    tt = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for b, (s, k) in enumerate(zip(seqs, types)):
        ids[b, length - len(s):], tt[b, length - len(s):], mask[b, length - len(s):] = s, k, 1
        singles[b].update(input_ids=s[None], mm_token_type_ids=k[None])
    inputs = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=tt)
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if pixels[kind]:
            inputs[key] = torch.cat(pixels[kind])
            inputs[f"{kind}_grid_thw"] = torch.tensor(grids[kind])
    return inputs, singles
