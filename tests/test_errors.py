"""Bad input gets a clear pmod error, never a silent wrong answer or a deep stack trace."""

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, StaticCache

import pmod
from pmod.tiny import tiny_causal_lm, tiny_llava
from tests.helpers.inputs import llava_inputs


def _model(**kw):
    return pmod.apply_pmod(tiny_llava(num_layers=2, **kw), pmod.PModConfig(schedule=[0.5, 1.0]))


def test_image_token_count_mismatch():
    model = _model()
    ids = torch.randint(1, 100, (1, 20))
    ids[0, 2:12] = model.config.image_token_id  # 10 tokens, the image has 16 features
    with pytest.raises(pmod.PModInputError, match=(r"hold \[10\] image tokens per row .* for 1 image\(s\); "
                                                   r"this model needs 16 image tokens per image")):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28))
    # under generate() the images arrive encoded: still counted (it said "0 image(s)")
    with torch.no_grad(), pytest.raises(pmod.PModInputError, match=r"for 1 image\(s\); this model needs 16"):
        model.generate(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28), max_new_tokens=2)


def test_image_token_count_mismatch_on_qwen2_vl():
    """Qwen2-VL with more image tokens than features: the message was an AttributeError (no vision image_size)."""
    from pmod.tiny import tiny_qwen2_vl
    from tests.helpers.qwen_inputs import qwen_inputs

    model = pmod.apply_pmod(tiny_qwen2_vl(), pmod.PModConfig(schedule=[0.5, 1.0, 0.3, 0.6]))
    inputs, _ = qwen_inputs(model, rows=[(("image", 1, 4, 4), (2, 3))])
    extra = torch.full((1, 2), model.config.image_token_id)
    inputs["input_ids"] = torch.cat([inputs["input_ids"][:, :3], extra, inputs["input_ids"][:, 3:]], 1)
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"][:, :3], torch.ones_like(extra),
                                             inputs["mm_token_type_ids"][:, 3:]], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad(), pytest.raises(pmod.PModInputError, match=r"hold \[6\] image tokens per row .* for 1 image"):
        model(**inputs)


@pytest.mark.parametrize("dtype, alpha", [(torch.float32, 1e39), (torch.float16, 1e5), (torch.bfloat16, 3.4e38)])
def test_router_weights_beyond_the_dtype_range_are_refused(dtype, alpha):
    """alpha finite in Python but not in the dtype the model runs in gave NaN logits and empty answers."""
    model = pmod.apply_pmod(tiny_llava(num_layers=2), pmod.PModConfig(schedule=[0.5, 1.0], alpha=alpha)).to(dtype)
    inputs, _ = llava_inputs(model, [(3, 1, 4)])
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad(), pytest.raises(pmod.PModConfigError, match=f"router weights up to .* beyond what {dtype}"):
        model(**inputs)
    fine = pmod.apply_pmod(tiny_llava(num_layers=2), pmod.PModConfig(schedule=[0.5, 1.0], alpha=1e4)).to(torch.float32)
    with torch.no_grad():
        assert torch.isfinite(fine(**llava_inputs(fine, [(3, 1, 4)])[0]).logits).all()


def test_unsupported_model_family():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(pmod.UnsupportedModelError,
                       match="does not support GPT2LMHeadModel.*LlavaForConditionalGeneration"):
        pmod.apply_pmod(gpt2)


def test_already_converted():
    model = _model()
    with pytest.raises(pmod.PModConfigError, match="already a p-MoD model"):
        pmod.apply_pmod(model)


def test_unsupported_attention_backend():
    dense = tiny_llava(num_layers=2)
    dense.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(pmod.UnsupportedModelError, match="flash_attention_2.*sdpa"):
        pmod.apply_pmod(dense, pmod.PModConfig(schedule=[0.5, 1.0]))
    # Switched after conversion: caught at forward time.
    model = _model()
    model.config.text_config._attn_implementation = "flex_attention"
    ids = torch.randint(1, 100, (1, 8))
    with pytest.raises(pmod.UnsupportedModelError, match="flex_attention"):
        model(input_ids=ids)


def test_schedule_routing_no_layer():
    with pytest.raises(pmod.PModConfigError, match="routes no layer"):
        pmod.apply_pmod(tiny_llava(num_layers=2), pmod.PModConfig(schedule=[1.0, 1.0]))


def test_vision_targets_need_image_tokens():
    lm = pmod.apply_pmod(tiny_causal_lm("llama", num_layers=2), pmod.PModConfig(schedule=[0.5, 1.0]))
    with pytest.raises(pmod.PModInputError, match="target_mask"):
        lm(input_ids=torch.randint(1, 100, (1, 8)))
    with pytest.raises(pmod.PModInputError, match="target_mask must have shape"):
        lm(input_ids=torch.randint(1, 100, (1, 8)), target_mask=torch.ones(1, 7, dtype=torch.bool))


def test_bad_attention_mask_and_foreign_caches():
    model = _model()
    ids = torch.randint(1, 100, (2, 8))
    with pytest.raises(pmod.PModInputError, match="2-D padding mask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 8, 8))
    static = StaticCache(config=model.config, max_cache_len=16)  # an empty one is replaced by a PModStaticCache
    assert isinstance(model(input_ids=ids, past_key_values=static).past_key_values, pmod.PModStaticCache)
    static.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
    with pytest.raises(pmod.PModInputError, match="StaticCache with content"):
        model(input_ids=ids, past_key_values=static)
    filled = DynamicCache()
    filled.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
    with pytest.raises(pmod.PModInputError, match="DynamicCache with content"):
        model(input_ids=ids, past_key_values=filled)
    try:
        offloaded = StaticCache(config=model.config, max_cache_len=16, offloading=True)
    except RuntimeError as exc:  # a CUDA build of torch on a machine without a GPU driver cannot make its stream
        pytest.skip(f"no offloaded cache on this machine: {exc}")
    with pytest.raises(pmod.PModInputError, match="offloaded"):
        model(input_ids=ids, past_key_values=offloaded)


def test_inner_language_model_called_directly():
    model = _model()
    with pytest.raises(pmod.PModInputError, match="without a routing plan"):
        model.model.language_model(input_ids=torch.randint(1, 100, (1, 8)))


def test_offloaded_caches_are_refused():
    model = _model()
    ids = torch.randint(1, 100, (1, 8))
    try:
        offloaded = DynamicCache(offloading=True)
    except RuntimeError as exc:  # a CUDA build of torch on a machine without a GPU driver cannot make its stream
        pytest.skip(f"no offloaded cache on this machine: {exc}")
    with pytest.raises(pmod.PModInputError, match="DynamicCache"):
        model(input_ids=ids, past_key_values=offloaded)


def test_settings_in_other_shapes_and_caches_of_another_depth():
    """Raw numpy / AttributeError / IndexError became answers or clear errors: a schedule given as an array, settings
    given as a dict, a cache made for another depth."""
    import numpy as np

    assert pmod.PModConfig(schedule=np.array([1.0, 0.5])).schedule == [1.0, 0.5]
    assert pmod.PModConfig(schedule=torch.tensor([0.5, 1.0])).schedule == [0.5, 1.0]
    with pytest.raises(pmod.PModConfigError, match="one number"):
        pmod.PModConfig(schedule=np.float64(0.5))
    model = pmod.apply_pmod(tiny_llava(num_layers=4), {"average_ratio": 0.3})
    assert model.pmod.settings.average_ratio == 0.3
    with pytest.raises(pmod.PModConfigError, match="takes a pmod.PModConfig"):
        pmod.apply_pmod(tiny_llava(num_layers=2), [0.5, 1.0])
    with torch.no_grad(), pytest.raises(pmod.PModInputError, match="has 2 layers but the model has 4"):
        model(input_ids=torch.randint(1, 100, (1, 8)), past_key_values=pmod.PModCache(2))
