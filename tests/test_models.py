"""Numerical equivalence of p-MoD models: identity at keep ratio 1, a per-example reference, batch vs one-by-one."""

import pytest
import torch

import pmod
from pmod.compat import cache_kwargs, output_cache
from pmod.config import ResolvedPMod
from pmod.tiny import randomize_routers, tiny_causal_lm, tiny_llava, tiny_llava_next
from tests.helpers.batches import build_batch, llava_tokens_per_image, rows_alone, valid_rows
from tests.helpers.inputs import ROWS, all_routed, llava_inputs, next_inputs
from tests.helpers.reference import reference_logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_keep_ratio_one_equals_dense(attn, padding):
    dense = tiny_llava(num_layers=4, attn_implementation=attn)
    rows = [(3, 1, 4), (3, 1, 4)] if padding is None else ROWS
    inputs, _ = llava_inputs(dense, rows, padding or "left")
    if padding is None:
        inputs.pop("attention_mask")
    with torch.no_grad():
        expected = dense(**inputs).logits
        model = pmod.apply_pmod(dense, all_routed(4))
        assert len(model.routed_layers()) == 4
        got = model(**inputs).logits
    if padding is None:
        assert torch.equal(got, expected)
    else:
        mask = inputs["attention_mask"]
        for a, b in zip(valid_rows(got, mask), valid_rows(expected, mask)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_random_routers_match_reference(attn, padding_side):
    model = pmod.apply_pmod(tiny_llava(num_layers=6, attn_implementation=attn), pmod.PModConfig())
    assert model.pmod.routed_layers == [2, 3, 4, 5]
    randomize_routers(model)
    inputs, n_images = llava_inputs(model, padding_side=padding_side)
    with torch.no_grad():
        got = valid_rows(model(**inputs).logits, inputs["attention_mask"])
        ref = reference_logits(model, **inputs, images_per_row=n_images)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The routed layers really skipped tokens, differently per row.
    routing = model.routing()
    kept = routing[5].selected.sum(dim=1).tolist()
    assert kept == [int(16 * 0.15), int(32 * 0.15), 0, int(16 * 0.15)]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_a_padded_batch_of_one_matches_reference(padding_side):
    """A batch of one reads and writes its rows along the sequence (no flat indices). Padded, and planned from
    ``target_counts`` alone (its widths then count the padding as possible slots), its routed layers have empty slots
    that point at unprocessed positions. Against the per-example reference, planned on the device and on the host."""
    model = pmod.apply_pmod(tiny_llava(num_layers=6), pmod.PModConfig())
    randomize_routers(model)
    vision = 2 * llava_tokens_per_image(model)
    batch, _ = llava_inputs(model, [(3, 2, 4), (vision + 16, 0, 0)], padding_side=padding_side)  # row 0 is padded
    inputs = {k: v[:1] if k != "pixel_values" else v for k, v in batch.items()}
    assert not inputs["attention_mask"].all()
    with torch.no_grad():
        ref = reference_logits(model, **inputs, images_per_row=[2])
        for counts in ({}, {"target_counts": [vision]}):
            got = valid_rows(model(**inputs, **counts).logits, inputs["attention_mask"])
            torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
            assert model.routing()[5].selected.sum().item() == int(vision * 0.15)  # the deepest layer's keep count


@pytest.mark.parametrize("ablation", [{"tanh_norm": False}, {"string": False}])
def test_ablations_match_reference(ablation):
    """TanhNorm off (g = alpha * s + beta) and STRing off (skipped targets unchanged) against the reference."""
    model = pmod.apply_pmod(tiny_llava(num_layers=6), pmod.PModConfig(**ablation))
    randomize_routers(model, scale=2.0)
    inputs, n_images = llava_inputs(model, padding_side="right")
    with torch.no_grad():
        got = valid_rows(model(**inputs).logits, inputs["attention_mask"])
        ref = reference_logits(model, **inputs, images_per_row=n_images)
        default = pmod.apply_pmod(tiny_llava(num_layers=6), pmod.PModConfig())
        default.load_state_dict(model.state_dict())
        other = valid_rows(default(**inputs).logits, inputs["attention_mask"])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], other[0], atol=1e-3)  # the switch changes the computation


def test_first_layer_routed_and_targets_all_on_causal_lm():
    for family in ["llama", "qwen2", "mistral"]:
        model = pmod.apply_pmod(
            tiny_causal_lm(family, num_layers=3), pmod.PModConfig(schedule=[0.5, 1.0, 0.25], targets="all")
        )
        randomize_routers(model)
        ids, mask, pos = build_batch([(7, 0, 2), (3, 0, 1)], 127, 0, 128, "left")
        with torch.no_grad():
            got = valid_rows(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits, mask)
            ref = reference_logits(model, ids, mask, position_ids=pos, targets="all")
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_explicit_target_mask_on_causal_lm():
    model = pmod.apply_pmod(tiny_causal_lm("llama", num_layers=2), pmod.PModConfig(schedule=[0.5, 0.5]))
    randomize_routers(model)
    ids = torch.randint(1, 127, (1, 12))
    target = torch.zeros(1, 12, dtype=torch.bool)
    target[0, 2:10] = True
    with torch.no_grad():
        model(input_ids=ids, target_mask=target)
    assert model.routing()[0].selected.sum().item() == 4
    assert not model.routing()[0].selected[~target].any()


def test_layer_that_processes_nothing():
    """k = 0 for every example (one target each, ratio 0.5): the layer only scales, and attention is skipped."""
    model = pmod.apply_pmod(tiny_causal_lm("llama", num_layers=2), pmod.PModConfig(schedule=[0.5, 0.5], targets="all"))
    randomize_routers(model)
    ids = torch.randint(1, 127, (2, 1))
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=True)
        ref = reference_logits(model, ids, targets="all")
    assert not model.routing()[1].processed.any()
    for a, b in zip(got.logits, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert output_cache(got).get_seq_length() == 1
    assert output_cache(got).layers[0].physical_length() == 0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llava_next_anyres_matches_reference(attn):
    model = pmod.apply_pmod(tiny_llava_next(num_layers=4, attn_implementation=attn), pmod.PModConfig())
    randomize_routers(model)
    inputs, n_images = next_inputs(model, [(28, 56), (56, 56), None, (84, 28)], [(2, 3), (1, 1), (6, 2), (3, 0)])
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert len(set(counts)) == 4  # every row has a different number of vision tokens
    with torch.no_grad():
        got = valid_rows(model(**inputs).logits, inputs["attention_mask"])
        ref = reference_logits(model, **inputs, images_per_row=n_images)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llava_next_high_resolution_targets_match_reference(attn):
    """targets='vision_hr': each image's base-image tokens are processed in every layer like text; only the
    high-resolution part (its newline tokens included) is routed. Rows with two images, one, or none."""
    model = pmod.apply_pmod(tiny_llava_next(num_layers=4, attn_implementation=attn),
                            pmod.PModConfig(schedule=[0.4, 1.0, 0.5, 0.2], targets="vision_hr"))
    randomize_routers(model)
    sizes = [[(28, 56), (56, 56)], None, (84, 28), (56, 28)]
    inputs, n_images = next_inputs(model, sizes, [(2, 3), (6, 2), (3, 0), (1, 1)])
    with torch.no_grad():
        got = valid_rows(model(**inputs).logits, inputs["attention_mask"])
        ref = reference_logits(model, **inputs, images_per_row=n_images, targets="vision_hr")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    base = llava_tokens_per_image(model)
    image = inputs["input_ids"] == model.config.image_token_id
    routing = model.routing()[0]
    assert routing.target.sum(1).tolist() == [int(n) - base * k for n, k in zip(image.sum(1), n_images)]
    assert not (routing.target & ~image).any()
    assert (routing.target & ~routing.processed).any()  # some high-resolution tokens are skipped
    assert (routing.processed[image & ~routing.target]).all()  # every base-image token is processed


def test_high_resolution_targets_need_a_high_resolution_part():
    with pytest.raises(pmod.UnsupportedModelError, match="vision_hr.*LlavaForConditionalGeneration has none"):
        pmod.apply_pmod(tiny_llava(num_layers=2), pmod.PModConfig(schedule=[0.5, 1.0], targets="vision_hr"))
    model = pmod.apply_pmod(tiny_llava_next(num_layers=2), pmod.PModConfig(schedule=[0.5, 1.0], targets="vision_hr"))
    inputs, _ = next_inputs(model, [(28, 56)], [(2, 3)])
    with pytest.raises(pmod.PModInputError, match="needs image_sizes"):
        model(**{**inputs, "image_sizes": None})
    wrong = inputs["input_ids"].clone()
    wrong[0, -1] = model.config.image_token_id  # one image token too many
    with pytest.raises(pmod.PModInputError, match="image tokens"):
        model(**{**inputs, "input_ids": wrong})


def test_batch_equals_rows_alone():
    model = pmod.apply_pmod(tiny_llava(num_layers=6), pmod.PModConfig())
    randomize_routers(model)
    inputs, n_images = llava_inputs(model)
    with torch.no_grad():
        batched = valid_rows(model(**inputs).logits, inputs["attention_mask"])
        for b, single in rows_alone(inputs, n_images):
            n = n_images[b]
            alone = model(**single).logits[0]
            torch.testing.assert_close(batched[b], alone, rtol=1e-5, atol=1e-5)
            # Same routing decisions, row alone vs in the batch.
            assert model.routing()[4].selected.sum().item() == int(16 * n * 0.15)


def test_routing_records_are_inspectable():
    model = pmod.apply_pmod(tiny_llava(num_layers=6), pmod.PModConfig())
    randomize_routers(model)
    inputs, _ = llava_inputs(model)
    with torch.no_grad():
        model(**inputs)
    routing = pmod.get_routing(model)
    assert sorted(routing) == [2, 3, 4, 5]
    layer = routing[3]
    ids = inputs["input_ids"]
    is_image = ids == model.config.image_token_id
    assert torch.equal(layer.target, is_image & inputs["attention_mask"].bool())
    assert not layer.selected[~is_image].any()
    assert layer.kept_positions(1) == layer.selected[1].nonzero().flatten().tolist()
    # Text tokens are always processed, padding never.
    assert torch.equal(layer.processed & ~is_image, inputs["attention_mask"].bool() & ~is_image)
    frac = layer.kept_fraction()
    assert frac[2] == 1.0 and abs(frac[1].item() - int(32 * layer.keep_ratio) / 32) < 1e-6


def test_forwards_read_the_settings_kept_on_the_model(monkeypatch):
    """config.pmod is parsed when the model is built, never per forward or decoding step; the settings object given
    to apply_pmod is copied, and the keep ratio a layer reports is the one its selection used."""
    settings = pmod.PModConfig(schedule=[1.0, 0.5, 0.25])
    model = pmod.apply_pmod(tiny_causal_lm(num_layers=3), settings)
    settings.alpha = 5.0  # too late: the model keeps its own validated copy
    monkeypatch.setattr(ResolvedPMod, "from_dict", lambda *_: pytest.fail("config.pmod was parsed in a forward"))
    ids = torch.randint(1, 127, (1, 8))
    with torch.no_grad():
        out = model(input_ids=ids, target_mask=torch.ones_like(ids, dtype=torch.bool), use_cache=True)
        assert model.routing()[2].selected.sum() == 2 and model.routing()[2].keep_ratio == 0.25
        model(input_ids=ids[:, -1:], **cache_kwargs(output_cache(out)))
    assert model.pmod.settings.alpha == model.routed_layers()[1].pmod_spec.alpha == 0.2
    assert [layer.pmod_spec for layer in model.routed_layers().values()] == list(model.pmod.layers)


def test_non_contiguous_hidden_states():
    model = pmod.apply_pmod(tiny_causal_lm(num_layers=3), pmod.PModConfig(schedule=[1.0, 0.5, 0.5], targets="all"))
    randomize_routers(model)
    embeds = model.get_input_embeddings()(torch.randint(1, 100, (2, 7)))
    strided = embeds.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not strided.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=strided).logits, model(inputs_embeds=embeds).logits)


def test_high_resolution_targets_refuse_multi_image_onevision_rows():
    """LLaVA-OneVision processes the images of a multi-image row as base grids only: no high-resolution part."""
    from pmod.tiny import tiny_llava_onevision

    model = pmod.apply_pmod(tiny_llava_onevision(), pmod.PModConfig(schedule=[1.0, 1.0, 0.5, 0.5], targets="vision_hr"))
    ids = torch.randint(1, 50, (1, 12))
    with pytest.raises(pmod.PModInputError, match="one image per row"):
        model(input_ids=ids, pixel_values=torch.zeros(2, 5, 3, 28, 28), image_sizes=torch.tensor([[28, 28], [28, 28]]),
              batch_num_images=torch.tensor([2]))


def test_attention_maps_are_over_sequence_positions():
    """output_attentions returned routed layers' maps in the gathered order (processed tokens first, padding after):
    at keep ratio 1 a left-padded row's map was shifted. They are over positions now: equal to the dense maps at
    keep ratio 1 (prefill and a cached decoding step); with routing, a skipped token's row is zero and every
    processed row sums to 1 over the keys the layer holds."""
    dense = tiny_llava(num_layers=4, attn_implementation="eager")
    inputs, _ = llava_inputs(dense)
    mask = inputs["attention_mask"].bool()
    step = dict(input_ids=torch.randint(1, 100, (4, 1), generator=torch.Generator().manual_seed(5)),
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones(4, 1, dtype=torch.long)], 1),
                position_ids=inputs["position_ids"][:, -1:] + 1, output_attentions=True)
    with torch.no_grad():
        want = dense(**inputs, output_attentions=True, use_cache=True)
        want_step = dense(**step, **cache_kwargs(output_cache(want))).attentions
        routed = pmod.apply_pmod(dense, all_routed(4))
        got = routed(**inputs, output_attentions=True, use_cache=True)
        got_step = routed(**step, **cache_kwargs(output_cache(got))).attentions
    for a, b in zip(got.attentions, want.attentions):
        assert a.shape == b.shape
        for row in range(mask.shape[0]):
            v = mask[row]
            torch.testing.assert_close(a[row][:, v][:, :, v], b[row][:, v][:, :, v], rtol=0, atol=1e-6)
    for a, b in zip(got_step, want_step):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    model = pmod.apply_pmod(tiny_llava(num_layers=4, attn_implementation="eager"),
                            pmod.PModConfig(schedule=[1.0, 0.5, 0.3, 0.6]))
    randomize_routers(model)
    with torch.no_grad():
        maps = model(**inputs, output_attentions=True).attentions
    for index, routing in model.routing().items():
        processed = routing.processed  # (B, T)
        sums = maps[index].sum(-1)  # (B, H, T)
        assert torch.all(sums[~processed[:, None, :].expand_as(sums)] == 0)
        torch.testing.assert_close(sums[processed[:, None, :].expand_as(sums)], torch.ones(int(processed.sum()) * 4))
        held = maps[index].sum(dim=(1, 2)) > 0  # (B, T) keys that received attention
        assert not (held & ~processed).any()  # a key the layer does not hold gets none
