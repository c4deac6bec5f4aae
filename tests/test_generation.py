"""Generation with the p-MoD KV cache: cached decoding equals recomputation, batched equals one-by-one."""

import pytest
import torch
from batches import rows_alone
from test_models import all_routed, llava_inputs, next_inputs

import pmod
from pmod.compat import output_cache
from pmod.tiny import randomize_routers, tiny_llava, tiny_llava_next


def _routed_model(attn="sdpa", schedule=(0.5, 1.0, 0.3, 0.6)):
    model = pmod.apply_pmod(tiny_llava(num_layers=len(schedule), attn_implementation=attn), pmod.PModConfig(schedule=list(schedule)))
    randomize_routers(model)
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_decoding_equals_recomputation(attn):
    model = _routed_model(attn)  # layer 0 is routed
    inputs, _ = llava_inputs(model)
    ids, mask, px = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = output_cache(out)
        assert isinstance(cache, pmod.PModCache)
        for step in range(4):
            new = torch.randint(1, 120, (ids.shape[0], 1), generator=gen)
            ids = torch.cat([ids, new], 1)
            mask = torch.cat([mask, torch.ones_like(new)], 1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            step_out = model(input_ids=new, attention_mask=mask, position_ids=pos[:, -1:], past_key_values=cache)
            full = model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=px, use_cache=False)
            torch.testing.assert_close(step_out.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)
        assert cache.get_seq_length() == ids.shape[1]


def _suppress(model):
    # Random weights may emit the image token; EOS would end rows early and make lengths differ.
    return [model.config.image_token_id, model.config.get_text_config().eos_token_id]


def test_batched_greedy_generation_equals_rows_alone():
    model = _routed_model()
    inputs, n_images = llava_inputs(model)
    inputs.pop("position_ids")
    kw = dict(max_new_tokens=6, do_sample=False, suppress_tokens=_suppress(model))
    with torch.no_grad():
        batched = model.generate(**inputs, **kw)[:, inputs["input_ids"].shape[1]:]
        for b, single in rows_alone(inputs, n_images):
            alone = model.generate(**single, **kw)[0, single["input_ids"].shape[1]:]
            assert torch.equal(batched[b], alone), b


def test_batched_llava_next_generation_equals_rows_alone():
    model = pmod.apply_pmod(tiny_llava_next(num_layers=4), pmod.PModConfig(schedule=[0.4, 1.0, 0.5, 0.2]))
    randomize_routers(model)
    sizes = [(28, 56), None, (56, 56), (84, 28)]
    inputs, _ = next_inputs(model, sizes, [(2, 3), (5, 2), (1, 1), (3, 0)])
    inputs.pop("position_ids")
    kw = dict(max_new_tokens=5, do_sample=False, suppress_tokens=_suppress(model))
    with torch.no_grad():
        batched = model.generate(**inputs, **kw)[:, inputs["input_ids"].shape[1]:]
        image = 0
        for b, size in enumerate(sizes):
            valid = inputs["attention_mask"][b].bool()
            single = dict(input_ids=inputs["input_ids"][b][valid][None])
            if size is not None:
                single.update(pixel_values=inputs["pixel_values"][image : image + 1],
                              image_sizes=inputs["image_sizes"][image : image + 1])
                image += 1
            alone = model.generate(**single, **kw)[0, single["input_ids"].shape[1]:]
            assert torch.equal(batched[b], alone), b


def test_sampling_and_beam_search():
    model = _routed_model()
    inputs, _ = llava_inputs(model)
    inputs.pop("position_ids")
    with torch.no_grad():
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=20, suppress_tokens=_suppress(model))
        assert sampled.shape == (4, inputs["input_ids"].shape[1] + 4)
        beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False, suppress_tokens=_suppress(model))
        assert beams.shape == (4, inputs["input_ids"].shape[1] + 4)


def test_beam_search_at_keep_ratio_one_equals_dense():
    dense = tiny_llava(num_layers=3)
    inputs, _ = llava_inputs(dense, [(3, 1, 4), (3, 1, 4)])
    inputs.pop("position_ids")
    inputs.pop("attention_mask")
    kw = dict(max_new_tokens=5, num_beams=3, do_sample=False, suppress_tokens=_suppress(dense))
    with torch.no_grad():
        expected = dense.generate(**inputs, **kw)
        model = pmod.apply_pmod(dense, all_routed(3))
        assert torch.equal(model.generate(**inputs, **kw), expected)


def test_routed_layers_cache_only_processed_tokens():
    model = _routed_model()
    inputs, _ = llava_inputs(model)
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    routing = model.routing()
    length = inputs["input_ids"].shape[1]
    for i, layer in enumerate(cache.layers):
        assert layer.get_seq_length() == length  # logical length, as transformers expects
        if i in routing:
            held = (layer.columns >= 0).sum(dim=1)
            assert torch.equal(held, routing[i].processed.sum(dim=1))
            assert layer.physical_length() == int(held.max())
        else:
            assert layer.physical_length() == length
    assert cache.layers[2].physical_length() < length


def test_generated_image_token_is_text():
    """A decoding step is never routed, even if the sampled token is the image token id."""
    model = _routed_model()
    inputs, _ = llava_inputs(model, [(3, 1, 4)])
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
        step = torch.full((1, 1), model.config.image_token_id)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], 1)
        model(input_ids=step, attention_mask=mask, past_key_values=cache)
    for r in model.routing().values():
        assert not r.target.any() and r.processed.all()


def test_mistral_sliding_window_generation_is_exact():
    """Sliding-window layers keep every entry in the p-MoD cache; the mask still applies the window."""
    from pmod.tiny import tiny_causal_lm

    model = pmod.apply_pmod(
        tiny_causal_lm("mistral", num_layers=3, sliding_window=8), pmod.PModConfig(schedule=[0.5, 1.0, 0.5], targets="all")
    )
    randomize_routers(model)
    ids = torch.randint(1, 120, (1, 14))
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True))
        nxt = torch.randint(1, 120, (1, 1))
        step = model(input_ids=nxt, past_key_values=cache).logits[:, -1]
        # A generated token is never a target: recompute with every prompt token targeted, the new one not.
        target = torch.ones(1, 15, dtype=torch.bool)
        target[0, -1] = False
        full = model(input_ids=torch.cat([ids, nxt], 1), use_cache=False, target_mask=target).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_assisted_decoding_is_refused_clearly():
    model = _routed_model()
    inputs, _ = llava_inputs(model, [(3, 1, 4)])
    inputs.pop("position_ids")
    with torch.no_grad(), pytest.raises(NotImplementedError, match="Cropping a p-MoD KV cache"):
        model.generate(**inputs, max_new_tokens=6, prompt_lookup_num_tokens=2, do_sample=False)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [True, False])
def test_multi_token_continuation_with_cache_equals_recomputation(attn, padded):
    """A prompt continued by several tokens at once (chunked prefill / multi-turn reuse of the cache)."""
    model = _routed_model(attn)
    inputs, _ = llava_inputs(model, [(3, 1, 4), (2, 2, 1)] if padded else [(3, 1, 4), (3, 1, 4)])
    if not padded:
        inputs.pop("attention_mask")
    extra = torch.randint(1, 120, (2, 3), generator=torch.Generator().manual_seed(9))
    mask = inputs.get("attention_mask")
    mask = torch.cat([mask, torch.ones_like(extra)], 1) if mask is not None else None
    pos = inputs["position_ids"][:, -1:] + torch.arange(1, 4)
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
        step = model(input_ids=extra, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
        full = model(input_ids=torch.cat([inputs["input_ids"], extra], 1), attention_mask=mask,
                     position_ids=torch.cat([inputs["position_ids"], pos], 1), pixel_values=inputs["pixel_values"],
                     use_cache=False).logits[:, -3:]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
