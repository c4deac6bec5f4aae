"""The generation modes a transformers user reaches for, on p-MoD models: beam search when a routed layer kept no
token, generation from inputs_embeds, prompt-lookup and assisted (speculative) decoding. Each equals its dense
counterpart at keep ratio 1, and the decoding tricks equal plain greedy decoding of the same p-MoD model."""

import pytest
import torch

import pmod
from pmod.cache import PModCacheLayer
from pmod.tiny import randomize_routers, tiny_llava

ALL_ROUTED = pmod.PModConfig(schedule=[1.0] * 4, routed_layers=[0, 1, 2, 3])


def _prompt(model, seed=0):
    """One row: text, one image's tokens, text that repeats (so prompt lookup finds candidates)."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 100, (4,), generator=gen)
    tokens = model.config.image_seq_length
    ids = torch.cat([text, torch.full((tokens,), model.config.image_token_id), text, text[:2]])[None]
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28, generator=gen),
                suppress_tokens=[model.config.image_token_id], do_sample=False)


def test_beam_search_when_a_routed_layer_kept_no_token():
    """An image-only prompt whose deepest layers keep 0 of 4 vision tokens: their cache layers hold no entry, which
    beam reordering must skip (it crashed); at keep ratio 1 beams equal the dense model's."""
    model = pmod.apply_pmod(tiny_llava(num_layers=4, image_size=28, patch_size=14), pmod.PModConfig())
    ids = torch.full((1, 4), model.config.image_token_id)
    kw = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28), max_new_tokens=3, num_beams=2, do_sample=False)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=kw["pixel_values"])
        assert any(not layer.processed.any() for layer in model.routing().values())  # the case that crashed
        out = model.generate(**kw, num_return_sequences=2)
        assert out.shape == (2, 7)
        dense = tiny_llava(num_layers=4, image_size=28, patch_size=14)
        want = dense.generate(**kw)
        got = pmod.apply_pmod(tiny_llava(num_layers=4, image_size=28, patch_size=14), ALL_ROUTED).generate(**kw)
    assert torch.equal(got, want)


def test_a_routed_layer_with_no_entry_is_skipped_by_beam_reordering():
    cache = pmod.PModCache(2)
    dense, routed = cache.layers
    dense.update(torch.randn(2, 1, 4, 8), torch.randn(2, 1, 4, 8))
    routed.skip(4, batch=2, device=torch.device("cpu"))  # kept nothing: no entry, but columns of width 0
    cache.reorder_cache(torch.tensor([1, 1]))
    cache.batch_repeat_interleave(2)
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert routed.physical_length() == 0 and routed.columns.shape == (2, 0) and dense.keys.shape[0] == 2


def test_generation_from_inputs_embeds():
    """No image: nothing to route, so inputs_embeds work alone (they failed with 'Cannot find the vision tokens') and
    equal input_ids; with input_ids for the later steps too; at keep ratio 1 equal to the dense model."""
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=[1.0, 0.5, 0.3, 0.6]))
    randomize_routers(model)
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    embeds = model.get_input_embeddings()(ids).detach()
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(input_ids=ids).logits, rtol=0, atol=0)
        from_ids = model.generate(input_ids=ids, **kw)[:, ids.shape[1]:]
        assert torch.equal(model.generate(inputs_embeds=embeds, **kw), from_ids)
        assert torch.equal(model.generate(input_ids=ids, inputs_embeds=embeds, **kw)[:, ids.shape[1]:], from_ids)
        dense = tiny_llava(num_layers=4)
        routed = pmod.apply_pmod(tiny_llava(num_layers=4), ALL_ROUTED)
        assert torch.equal(routed.generate(inputs_embeds=embeds, **kw), dense.generate(inputs_embeds=embeds, **kw))
    with torch.no_grad(), pytest.raises(pmod.PModInputError, match="inputs_embeds with images"):
        model(inputs_embeds=embeds, pixel_values=torch.randn(1, 3, 28, 28))


@pytest.mark.parametrize("mode", [dict(prompt_lookup_num_tokens=3), "assistant"])
def test_speculative_decoding_equals_greedy(monkeypatch, mode):
    """Prompt lookup and assisted decoding verify drafted tokens and crop the cache back when one is rejected: the
    output equals plain greedy decoding of the same p-MoD model, and at keep ratio 1 the dense model's."""
    crops = []
    original = PModCacheLayer.crop
    monkeypatch.setattr(PModCacheLayer, "crop", lambda self, n: (crops.append(n), original(self, n))[1])
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=[1.0, 0.5, 0.3, 0.6]))
    randomize_routers(model)
    kw = _prompt(model)
    extra = dict(assistant_model=tiny_llava(num_layers=2, seed=3)) if mode == "assistant" else mode
    with torch.no_grad():
        greedy = model.generate(**kw, max_new_tokens=12)
        assert torch.equal(model.generate(**kw, max_new_tokens=12, **extra), greedy)
        assert any(n < 0 for n in crops)  # drafts were rejected and the p-MoD cache cropped
        dense = tiny_llava(num_layers=4)
        routed = pmod.apply_pmod(tiny_llava(num_layers=4), ALL_ROUTED)
        want = dense.generate(**kw, max_new_tokens=12, **extra)
        assert torch.equal(routed.generate(**kw, max_new_tokens=12, **extra), want)


def test_cropping_into_the_prompt_is_refused_and_a_static_cache_is_not_cropped():
    cache = pmod.PModCache(1)
    routed = cache.layers[0]
    routed.stage(torch.tensor([[0, 2, 3], [1, 3, -1]]), step_length=4, full=False)
    routed.update(torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8))
    routed.stage(torch.tensor([[4], [4]]), 1, full=True)
    routed.update(torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8))
    cache.crop(0)  # nothing
    cache.crop(-1)  # the decoded token: one trailing entry per row
    assert routed.get_seq_length() == 4 and routed.physical_length() == 3
    with pytest.raises(pmod.PModInputError, match="reaches into the prompt"):
        cache.crop(-1)
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=[1.0, 0.5, 0.3, 0.6]))
    # transformers refuses it itself ("requires a cache that can be cropped"; 5.17: "not supported with Static cache")
    with torch.no_grad(), pytest.raises(ValueError, match="cropped|Static cache"):
        model.generate(**_prompt(model), max_new_tokens=4, prompt_lookup_num_tokens=2, cache_implementation="static")


def test_generate_takes_the_prompts_target_mask_and_counts():
    """generate(target_mask=..., target_counts=...) on a causal LM (transformers refused both as unused model
    arguments): the prompt is routed by them, every step equals recomputing the sequence with the prompt's targets,
    beams repeat the counts, and at keep ratio 1 generation equals the dense model's."""
    from pmod.tiny import tiny_causal_lm

    lm = pmod.apply_pmod(tiny_causal_lm("llama", num_layers=4), pmod.PModConfig(schedule=[1.0, 0.5, 0.3, 0.6]))
    randomize_routers(lm)
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    target = torch.zeros(2, 12, dtype=torch.bool)
    target[:, 2:10] = True
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        out = lm.generate(input_ids=ids, target_mask=target, target_counts=[8, 8], **kw, return_dict_in_generate=True,
                          output_logits=True)
        for step, logits in enumerate(out.logits):
            seq = out.sequences[:, : 12 + step]
            full_target = torch.cat([target, torch.zeros(2, step, dtype=torch.bool)], 1)
            want = lm(input_ids=seq, target_mask=full_target).logits[:, -1]
            torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        assert lm.generate(input_ids=ids, target_mask=target, target_counts=[8, 8], num_beams=2, **kw).shape == (2, 16)
        dense = tiny_causal_lm("llama", num_layers=4)
        routed = pmod.apply_pmod(tiny_causal_lm("llama", num_layers=4), ALL_ROUTED)
        assert torch.equal(routed.generate(input_ids=ids, target_mask=target, **kw),
                           dense.generate(input_ids=ids, **kw))
