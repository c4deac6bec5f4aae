"""Qwen3-VL and Qwen3-VL-MoE (interleaved M-RoPE, DeepStack, frame-separated videos, sparse MoE MLPs): the core
guarantees hold, against a per-example reference that adds the DeepStack features as the model does."""

import pytest
import torch

import pmod
from pmod.compat import output_cache
from pmod.efficiency import kv_cache_report
from pmod.tiny import randomize_routers, tiny_qwen3_vl
from tests.helpers.batches import assert_keep_ratio_one_equals_dense, valid_rows
from tests.helpers.qwen_inputs import left_padded, media_patches
from tests.helpers.reference import reference_logits

# per row: ("image", t, h, w) | ("video", t, h, w) | None, and (text before, text after); grids in patches
ROWS = [(("image", 1, 4, 6), (2, 3)), (("video", 2, 4, 4), (3, 1)), (None, (5, 2)), (("image", 1, 6, 4), (1, 1))]
SCHEDULE = [0.5, 1.0, 0.3, 0.6]  # layer 0 routed: DeepStack features are added after it


def qwen3_inputs(model, rows=ROWS, seed=0):
    """A left-padded batch, and each row's own inputs. A video's frames (one per temporal patch) are written as
    Qwen3-VL's processor writes them: a timestamp (two text tokens here), then the frame's tokens between vision start
    and end."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    vision = cfg.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    merge = vision.spatial_merge_size**2
    vocab = cfg.text_config.vocab_size

    def text(n):
        return torch.randint(5, vocab - 4, (n,), generator=gen)

    seqs, types, singles = [], [], []
    pixels, grids = {"image": [], "video": []}, {"image": [], "video": []}
    for vis, (before, after) in rows:
        parts, kinds, single = [text(before)], [torch.zeros(before, dtype=torch.long)], {}
        if vis is not None:
            kind, t, h, w = vis
            token, kind_id = (cfg.image_token_id, 1) if kind == "image" else (cfg.video_token_id, 2)
            per_frame = h * w // merge
            for _ in range(t):  # images have t == 1 and no timestamp
                if kind == "video":
                    parts.append(text(2))
                    kinds.append(torch.zeros(2, dtype=torch.long))
                parts += [torch.tensor([cfg.vision_start_token_id]), torch.full((per_frame,), token),
                          torch.tensor([cfg.vision_end_token_id])]
                kinds += [torch.zeros(1, dtype=torch.long), torch.full((per_frame,), kind_id),
                          torch.zeros(1, dtype=torch.long)]
            single = media_patches(kind, t, h, w, patch_dim, gen, pixels, grids)
        parts.append(text(after))
        kinds.append(torch.zeros(after, dtype=torch.long))
        seqs.append(torch.cat(parts))
        types.append(torch.cat(kinds))
        singles.append(single)
    return left_padded(seqs, types, singles, pixels, grids)


def _suppress(cfg):
    # placeholders, and the end of sequence: every row generates all its tokens (a batch pads after a row's end)
    return [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
            cfg.text_config.eos_token_id]


@pytest.mark.parametrize("moe", [False, True])
def test_keep_ratio_one_equals_dense(moe):
    dense = tiny_qwen3_vl(moe=moe)
    assert_keep_ratio_one_equals_dense(dense, qwen3_inputs(dense)[0])


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_random_routers_match_reference(moe, attn):
    model = pmod.apply_pmod(tiny_qwen3_vl(moe=moe, attn_implementation=attn), pmod.PModConfig(schedule=SCHEDULE))
    randomize_routers(model)
    inputs, singles = qwen3_inputs(model)
    with torch.no_grad():
        got = valid_rows(model(**inputs).logits, inputs["attention_mask"])
        ref = reference_logits(
            model, inputs["input_ids"], inputs["attention_mask"],
            row_inputs=lambda b: {k: v for k, v in singles[b].items() if k != "input_ids"},
        )
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    r = model.routing()[2]
    ids = inputs["input_ids"]
    n_video = int((ids[1] == model.config.video_token_id).sum())
    assert n_video == 8 and int(r.target[1].sum()) == n_video  # two frames of 4, the timestamps between them text
    assert int(r.selected[1].sum()) == int(n_video * 0.3) and not r.target[2].any()
    assert r.processed[0][ids[0] == model.config.vision_start_token_id].all()


def test_deepstack_reaches_skipped_tokens():
    """The reference without DeepStack differs: the features the model adds after layer 0 (routed, most vision tokens
    skipped) are part of what both compute."""
    from tests.helpers.reference import _inner, reference_language_model

    model = pmod.apply_pmod(tiny_qwen3_vl(), pmod.PModConfig(schedule=[0.2, 1.0, 1.0, 1.0]))
    randomize_routers(model)
    inputs, singles = qwen3_inputs(model, rows=ROWS[:1])
    with torch.no_grad():
        got = model(**inputs).logits[0]
        ref = reference_logits(model, inputs["input_ids"], inputs["attention_mask"],
                               row_inputs=lambda b: {k: v for k, v in singles[b].items() if k != "input_ids"})[0]
        from tests.helpers.reference import merged_embeddings

        x, positions, deepstack = merged_embeddings(model, **singles[0])
        without = reference_language_model(model, x[0], positions[-3:, 0],
                                           inputs["input_ids"][0] == model.config.image_token_id)
    assert deepstack is not None and len(deepstack[1]) == 2 and _inner(model) is model.model.language_model
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (without - ref).abs().max() > 1e-3


@pytest.mark.parametrize("moe", [False, True])
def test_batched_generation_equals_rows_alone_kv_shrinks_and_round_trips(tmp_path, moe):
    model = pmod.apply_pmod(tiny_qwen3_vl(moe=moe), pmod.PModConfig(schedule=SCHEDULE))
    randomize_routers(model)
    inputs, singles = qwen3_inputs(model)
    kw = dict(max_new_tokens=5, do_sample=False, suppress_tokens=_suppress(model.config), return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(**inputs, **kw)
        batched = out.sequences[:, inputs["input_ids"].shape[1]:]
        for b, single in enumerate(singles):
            alone = model.generate(**single, **kw).sequences[0, single["input_ids"].shape[1]:]
            assert torch.equal(batched[b], alone), b
        video_alone = model.generate(**singles[1], **kw)
    report = kv_cache_report(output_cache(out))
    assert sum(layer.entries for layer in report.layers) < sum(layer.dense_entries for layer in report.layers)
    assert kv_cache_report(output_cache(video_alone)).ratio < 1.0
    model.save_pretrained(tmp_path)
    loaded = pmod.load_model(tmp_path)
    assert loaded.config.model_type == ("pmod_qwen3_vl_moe" if moe else "pmod_qwen3_vl")
    assert type(loaded).__name__ == type(model).__name__
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("moe", [False, True])
def test_cached_decoding_equals_recomputation(moe):
    model = pmod.apply_pmod(tiny_qwen3_vl(moe=moe), pmod.PModConfig(schedule=SCHEDULE))
    randomize_routers(model)
    inputs, _ = qwen3_inputs(model)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=_suppress(model.config),
                             return_dict_in_generate=True, output_logits=True)
        n = inputs["input_ids"].shape[1]
        for step, logits in enumerate(out.logits):
            ids = out.sequences[:, : n + step]
            extra = torch.ones(ids.shape[0], ids.shape[1] - n, dtype=torch.long)
            full = dict(inputs, input_ids=ids, attention_mask=torch.cat([inputs["attention_mask"], extra], 1),
                        mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], 0 * extra], 1))
            torch.testing.assert_close(logits, model(**full).logits[:, -1], rtol=1e-4, atol=1e-4)


def test_dense_checkpoint_converts_and_the_moe_load_balancing_loss_is_refused(tmp_path):
    dense = tiny_qwen3_vl(moe=True)
    dense.save_pretrained(tmp_path / "dense")
    every_layer = pmod.PModConfig(schedule=[1.0] * 4, routed_layers=[0, 1, 2, 3])
    model = pmod.load_model(tmp_path / "dense", every_layer)
    assert model.config.model_type == "pmod_qwen3_vl_moe" and sorted(model.routed_layers()) == [0, 1, 2, 3]
    inputs, _ = qwen3_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, dense(**inputs).logits)  # keep ratio 1: the dense model
        with pytest.raises(pmod.PModInputError, match="output_router_logits"):
            model(**inputs, output_router_logits=True)
    model.config.text_config.output_router_logits = True
    with torch.no_grad(), pytest.raises(pmod.PModInputError, match="output_router_logits"):
        model(**inputs)
