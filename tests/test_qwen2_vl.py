"""Qwen2-VL and Qwen2.5-VL (M-RoPE, flat patches, images and video): the core guarantees hold."""

import pytest
import torch

import pmod
from pmod.compat import output_cache
from pmod.tiny import randomize_routers, tiny_qwen2_vl
from tests.helpers.batches import assert_keep_ratio_one_equals_dense, valid_rows
from tests.helpers.qwen_inputs import ROWS, qwen_inputs
from tests.helpers.reference import reference_logits


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_keep_ratio_one_equals_dense(version):
    dense = tiny_qwen2_vl(version=version)
    assert_keep_ratio_one_equals_dense(dense, qwen_inputs(dense)[0])


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_random_routers_match_reference(version):
    model = pmod.apply_pmod(tiny_qwen2_vl(version=version), pmod.PModConfig(schedule=[0.5, 1.0, 0.3, 0.6]))
    randomize_routers(model)
    inputs, singles = qwen_inputs(model)
    with torch.no_grad():
        got = valid_rows(model(**inputs).logits, inputs["attention_mask"])
        ref = reference_logits(
            model, inputs["input_ids"], inputs["attention_mask"],
            row_inputs=lambda b: {k: v for k, v in singles[b].items() if k != "input_ids"},
        )
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    r = model.routing()[2]
    n_video = int((inputs["input_ids"][1] == model.config.video_token_id).sum())
    assert int(r.target[1].sum()) == n_video and int(r.selected[1].sum()) == int(n_video * 0.3)
    assert int(r.target[0].sum()) == 6 and not r.target[2].any()


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_batched_generation_equals_rows_alone_and_kv_shrinks(tmp_path, version):
    model = pmod.apply_pmod(tiny_qwen2_vl(version=version), pmod.PModConfig(schedule=[0.5, 1.0, 0.3, 0.6]))
    randomize_routers(model)
    inputs, singles = qwen_inputs(model)
    cfg = model.config
    suppress = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    kw = dict(max_new_tokens=5, do_sample=False, suppress_tokens=suppress, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(**inputs, **kw)
        batched = out.sequences[:, inputs["input_ids"].shape[1]:]
        for b, single in enumerate(singles):
            alone = model.generate(**single, **kw).sequences[0, single["input_ids"].shape[1]:]
            assert torch.equal(batched[b], alone), b
    from pmod.efficiency import kv_cache_report

    report = kv_cache_report(output_cache(out))
    # routed layers hold fewer entries (the text-only row keeps every slot of this small batch allocated)
    assert sum(layer.entries for layer in report.layers) < sum(layer.dense_entries for layer in report.layers)
    with torch.no_grad():
        alone = model.generate(**singles[1], **kw)  # the video row: its cache shrinks in bytes too
    assert kv_cache_report(output_cache(alone)).ratio < 1.0
    model.save_pretrained(tmp_path)
    loaded = pmod.load_model(tmp_path)
    assert loaded.config.model_type == ("pmod_qwen2_vl" if version == "2" else "pmod_qwen2_5_vl")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_training_batches_equal_one_by_one_losses():
    """The training collator on Qwen2-VL items (flat patches, grids, modality types): batch loss == per-item."""
    from pmod.data.records import IGNORE_INDEX, LlavaCollator

    model = pmod.apply_pmod(tiny_qwen2_vl(), pmod.PModConfig(schedule=[0.5, 1.0, 0.3, 0.6]))
    randomize_routers(model)
    _, singles = qwen_inputs(model)
    items = []
    for single in singles:
        item = {k: v for k, v in single.items()}
        item["input_ids"] = single["input_ids"][0]
        item["mm_token_type_ids"] = single["mm_token_type_ids"][0]
        item["labels"] = torch.full_like(item["input_ids"], IGNORE_INDEX)
        item["labels"][-3:] = item["input_ids"][-3:]  # train on the last three tokens
        items.append(item)
    collator = LlavaCollator(pad_token_id=0)
    batch = collator(items)
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape and batch["image_grid_thw"].shape == (2, 3)
    with torch.no_grad():
        batch_loss = model(**batch).loss
        per_item = [model(**collator([item])).loss for item in items]
    torch.testing.assert_close(batch_loss, sum(per_item) / len(per_item), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_cached_decoding_equals_recomputation(version):
    """Each generated step's logits (cache, rope_deltas kept by the model) equal a full recomputation."""
    model = pmod.apply_pmod(tiny_qwen2_vl(version=version), pmod.PModConfig(schedule=[0.5, 1.0, 0.3, 0.6]))
    randomize_routers(model)
    inputs, _ = qwen_inputs(model)
    cfg = model.config
    suppress = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=suppress,
                             return_dict_in_generate=True, output_logits=True)
        n = inputs["input_ids"].shape[1]
        for step, logits in enumerate(out.logits):
            ids = out.sequences[:, : n + step]
            extra = ids.shape[1] - n
            full = dict(inputs, input_ids=ids,
                        attention_mask=torch.cat([inputs["attention_mask"],
                                                  torch.ones(ids.shape[0], extra, dtype=torch.long)], 1),
                        mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"],
                                                     torch.zeros(ids.shape[0], extra, dtype=torch.long)], 1))
            torch.testing.assert_close(logits, model(**full).logits[:, -1], rtol=1e-4, atol=1e-4)


def test_tokens_per_image_estimate_for_dynamic_resolution():
    from pmod.pipelines.train import tokens_per_image

    assert tokens_per_image(tiny_qwen2_vl()) == (448 // 4) ** 2


@pytest.mark.parametrize("hidden_size", [64, 128])
def test_tiny_builder_scales_the_rotary_sections(hidden_size):
    """The M-RoPE sections follow the head size (the demo's full size uses hidden 128)."""
    model = tiny_qwen2_vl(hidden_size=hidden_size)
    section = model.config.get_text_config().rope_parameters["mrope_section"]
    assert sum(section) == hidden_size // 4 // 2
    inputs, _ = qwen_inputs(model, rows=ROWS[:2])
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
