"""LLaVA-OneVision (SigLIP + Qwen2, anyres with feature interpolation, video): the core guarantees hold."""

import math

import pytest
import torch

import pmod
from pmod.compat import output_cache
from pmod.tiny import randomize_routers, tiny_llava_onevision
from tests.helpers.batches import assert_keep_ratio_one_equals_dense, build_batch, valid_rows
from tests.helpers.reference import reference_logits

# per row: image (h, w) | "video" | None, and (text before, text after)
ROWS = [((28, 56), (2, 3)), ("video", (3, 1)), (None, (5, 2)), ((56, 56), (1, 1))]


def onevision_inputs(model, rows=ROWS, padding_side="left", seed=0):
    """A batch of rows with an anyres image, a 4-frame video, or text only."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    base = cfg.vision_config.image_size
    sizes = [r for r, _ in rows if isinstance(r, tuple)]
    patches = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, base) for s in sizes]
    pixel_values = torch.zeros(len(sizes), max(patches), 3, base, base)
    for i, p in enumerate(patches):
        pixel_values[i, :p] = torch.randn(p, 3, base, base, generator=gen)
    n_videos = sum(r == "video" for r, _ in rows)
    videos = torch.randn(n_videos, 4, 3, base, base, generator=gen)
    with torch.no_grad():
        image_counts = iter(
            f.shape[0] for f in model.model.get_image_features(pixel_values, torch.tensor(sizes)).pooler_output
        )
    # a video's tokens: each frame's features pooled to ceil(side / 2) squared, then one newline (as the processor
    # counts; get_video_features includes the newline on some transformers versions and not on others)
    pooled = math.ceil(base // cfg.vision_config.patch_size / 2)
    video_counts = iter([videos.shape[1] * pooled**2 + 1] * n_videos)
    spec = []
    for kind, (before, after) in rows:
        count = next(image_counts) if isinstance(kind, tuple) else next(video_counts) if kind == "video" else None
        spec.append((before, [count] if count else [], after))
    ids, mask, pos = build_batch(spec, cfg.image_token_id, 0, cfg.text_config.vocab_size - 2, padding_side, seed)
    for b, (kind, _) in enumerate(rows):
        if kind == "video":
            ids[b][ids[b] == cfg.image_token_id] = cfg.video_token_id
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=pixel_values,
                  image_sizes=torch.tensor(sizes), pixel_values_videos=videos)
    per_row = dict(images_per_row=[int(isinstance(k, tuple)) for k, _ in rows],
                   videos_per_row=[int(k == "video") for k, _ in rows])
    return inputs, per_row


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keep_ratio_one_equals_dense(attn):
    dense = tiny_llava_onevision(attn_implementation=attn)
    assert_keep_ratio_one_equals_dense(dense, onevision_inputs(dense)[0])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_random_routers_match_reference_with_images_and_video(padding_side):
    model = pmod.apply_pmod(tiny_llava_onevision(), pmod.PModConfig(schedule=[0.5, 1.0, 0.3, 0.6]))
    randomize_routers(model)
    inputs, per_row = onevision_inputs(model, padding_side=padding_side)
    with torch.no_grad():
        got = valid_rows(model(**inputs).logits, inputs["attention_mask"])
        ref = reference_logits(
            model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_sizes"],
            inputs["position_ids"], pixel_values_videos=inputs["pixel_values_videos"], **per_row,
        )
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # video tokens are targets: the video row keeps floor(0.3 * n) of them in layer 2
    r = model.routing()[2]
    n_video = int((inputs["input_ids"][1] == model.config.video_token_id).sum())
    assert int(r.target[1].sum()) == n_video and int(r.selected[1].sum()) == int(n_video * 0.3)
    assert not r.target[2].any()  # the text-only row


def test_cached_generation_equals_rows_alone_and_save_load(tmp_path):
    model = pmod.apply_pmod(tiny_llava_onevision(), pmod.PModConfig(schedule=[0.5, 1.0, 0.3, 0.6]))
    randomize_routers(model)
    inputs, per_row = onevision_inputs(model)
    inputs.pop("position_ids")
    suppress = [model.config.image_token_id, model.config.video_token_id, model.config.text_config.eos_token_id]
    kw = dict(max_new_tokens=5, do_sample=False, suppress_tokens=[t for t in suppress if t is not None])
    with torch.no_grad():
        batched = model.generate(**inputs, **kw)[:, inputs["input_ids"].shape[1]:]
        image = video = 0
        for b in range(len(ROWS)):
            valid = inputs["attention_mask"][b].bool()
            single = dict(input_ids=inputs["input_ids"][b][valid][None])
            if per_row["images_per_row"][b]:
                single.update(pixel_values=inputs["pixel_values"][image : image + 1],
                              image_sizes=inputs["image_sizes"][image : image + 1])
                image += 1
            if per_row["videos_per_row"][b]:
                single.update(pixel_values_videos=inputs["pixel_values_videos"][video : video + 1])
                video += 1
            out = model.generate(**single, **kw, return_dict_in_generate=True)
            assert torch.equal(batched[b], out.sequences[0, single["input_ids"].shape[1]:]), b
            if per_row["videos_per_row"][b]:  # generate() passes encoded video: its tokens are still routed
                from pmod.efficiency import kv_cache_report

                assert kv_cache_report(output_cache(out)).ratio < 1.0
        model.save_pretrained(tmp_path)
        loaded = pmod.load_model(tmp_path)
        assert loaded.config.model_type == "pmod_llava_onevision"
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
