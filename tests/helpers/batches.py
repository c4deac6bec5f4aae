"""Builders of padded multimodal batches for tests."""

from __future__ import annotations

import torch


def llava_tokens_per_image(model) -> int:
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2


def build_batch(rows, image_token_id, tokens_per_image, vocab_size, padding_side="left", seed=0):
    """rows: list of (n_text_before, n_images_or_token_counts, n_text_after).

    The middle entry is either an int number of images of ``tokens_per_image`` tokens each, or a list of
    per-image token counts. Returns input_ids, attention_mask, position_ids (counting only real tokens).
    """
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for before, images, after in rows:
        counts = [tokens_per_image] * images if isinstance(images, int) else list(images)
        parts = [torch.randint(1, vocab_size - 1, (before,), generator=gen)]
        for c in counts:
            parts.append(torch.full((c,), image_token_id))
            parts.append(torch.randint(1, vocab_size - 1, (2,), generator=gen))
        parts.append(torch.randint(1, vocab_size - 1, (after,), generator=gen))
        seqs.append(torch.cat(parts))
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        if padding_side == "left":
            ids[b, length - len(s):] = s
            mask[b, length - len(s):] = 1
        else:
            ids[b, : len(s)] = s
            mask[b, : len(s)] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


def valid_rows(logits, mask):
    """Split (B, T, V) logits into per-row (n_b, V) tensors over non-padding positions."""
    return [logits[b][mask[b].bool()] for b in range(logits.shape[0])]


def rows_alone(inputs, n_images):
    """Yield each row of a padded LLaVA batch as its own unpadded single-example inputs."""
    cursor = 0
    for b, n in enumerate(n_images):
        valid = inputs["attention_mask"][b].bool()
        single = {"input_ids": inputs["input_ids"][b][valid][None]}
        if n:
            single["pixel_values"] = inputs["pixel_values"][cursor : cursor + n]
        cursor += n
        yield b, single


def assert_keep_ratio_one_equals_dense(dense, inputs, num_layers: int = 4) -> None:
    """Route every layer of ``dense`` at keep ratio 1 (in place) and check its logits equal the dense ones."""
    import pmod

    with torch.no_grad():
        want = valid_rows(dense(**inputs).logits, inputs["attention_mask"])
        routed = pmod.apply_pmod(dense, pmod.PModConfig(schedule=[1.0] * num_layers,
                                                        routed_layers=list(range(num_layers))))
        got = valid_rows(routed(**inputs).logits, inputs["attention_mask"])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
