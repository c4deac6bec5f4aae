"""Generation with the p-MoD KV cache: cached decoding equals recomputation, batched equals one-by-one; one
prompt for the same question through `pmod chat`, `pmod eval` and the lmms-eval plugin."""

import json
import logging

import pytest
import torch
from PIL import Image

import pmod
from pmod.compat import output_cache
from pmod.data.conversation import VICUNA_V1_SYSTEM, VICUNA_V1_TEMPLATE, vicuna_v1_template
from pmod.pipelines.generation import (
    cut_at_stop,
    generate,
    generate_batch,
    is_pmod,
    load_for_inference,
    move_to_model,
    suppressed_tokens,
)
from pmod.tiny import randomize_routers, tiny_llava, tiny_llava_next, tiny_llava_processor
from tests.helpers.batches import rows_alone
from tests.helpers.inputs import all_routed, llava_inputs, next_inputs


def _routed_model(attn="sdpa", schedule=(0.5, 1.0, 0.3, 0.6)):
    model = pmod.apply_pmod(tiny_llava(num_layers=len(schedule), attn_implementation=attn),
                            pmod.PModConfig(schedule=list(schedule)))
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
        for _step in range(4):
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
        beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False,
                               suppress_tokens=_suppress(model))
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
        prompt_routing, held = model.routing(), [layer.physical_length() for layer in cache.layers]
        step = torch.full((1, 1), model.config.image_token_id)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], 1)
        model(input_ids=step, attention_mask=mask, past_key_values=cache)
    # a routed step would have replaced the records: a decoding step plans dense and keeps the prompt's
    assert all(model.routing()[i] is r for i, r in prompt_routing.items())
    assert [layer.physical_length() for layer in cache.layers] == [n + 1 for n in held]  # every layer took the token


def test_mistral_sliding_window_generation_is_exact():
    """Sliding-window layers keep every entry in the p-MoD cache; the mask still applies the window."""
    from pmod.tiny import tiny_causal_lm

    model = pmod.apply_pmod(
        tiny_causal_lm("mistral", num_layers=3, sliding_window=8),
        pmod.PModConfig(schedule=[0.5, 1.0, 0.5], targets="all")
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


# ---------------------------------------------------------------------------------------------- one prompt
QUESTION = "what is in the image ?"
SYSTEM_WORDS = VICUNA_V1_SYSTEM.replace(".", " . ").replace(",", " , ").replace("'", " ' ").split()


@pytest.fixture(scope="module")
def untemplated(tmp_path_factory):
    """A saved tiny p-MoD LLaVA whose processor has no chat template (each front-end chooses one; its vocabulary
    has the Vicuna system prompt's words), an image, and a data file asking about it."""
    path = tmp_path_factory.mktemp("prompt")
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=[1.0, 0.5, 0.3, 0.6]))
    model.save_pretrained(path / "model")
    processor = tiny_llava_processor(model, [*SYSTEM_WORDS, "USER", "ASSISTANT", ":", *QUESTION.split()])
    processor.chat_template = None
    processor.save_pretrained(path / "model")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path / "red.png")
    record = {"id": 0, "image": "red.png", "conversations": [{"from": "human", "value": "<image>\n" + QUESTION},
                                                             {"from": "gpt", "value": "red"}]}
    (path / "data.json").write_text(json.dumps([record]))
    # the original LLaVA vicuna_v1 prompt, written out
    text = f"{VICUNA_V1_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    expected = processor(text=[text], images=[Image.open(path / "red.png").convert("RGB")])["input_ids"]
    return path, torch.tensor(expected)


def _prompt_ids(monkeypatch) -> list[torch.Tensor]:
    """The input_ids of every generate call of a p-MoD LLaVA from now on."""
    from pmod.families import PModLlavaForConditionalGeneration as cls

    seen, generate = [], cls.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs["input_ids"])
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(cls, "generate", spy)
    return seen


def test_chat_and_eval_prompt_identically(untemplated, monkeypatch, tmp_path):
    """Same model, same question: `pmod chat` and `pmod eval` give the model the same tokens, the original vicuna_v1
    prompt (system prompt included) where the processor has no chat template."""
    from pmod.cli import main

    path, expected = untemplated
    seen = _prompt_ids(monkeypatch)
    assert main(["chat", str(path / "model"), "--image", str(path / "red.png"), "--prompt", QUESTION,
                 "--max-new-tokens", "1"]) == 0
    assert main(["eval", str(path / "model"), "--data", str(path / "data.json"), "--out", str(tmp_path),
                 "--max-new-tokens", "1", "--no-progress"]) == 0
    assert len(seen) == 2 and all(torch.equal(ids, expected) for ids in seen)


def test_the_lmms_eval_plugin_prompts_as_chat_and_eval(untemplated, monkeypatch):
    """lmms-eval's simple (doc_to_visual / doc_to_text) and chat (doc_to_messages) requests get the same tokens."""
    instance = pytest.importorskip("lmms_eval.api.instance").Instance
    from pmod.integrations.lmms_eval_plugin import PMod, PModChat

    path, expected = untemplated
    image = Image.open(path / "red.png").convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": QUESTION}]}]
    requests = {PMod: (QUESTION, {"max_new_tokens": 1}, lambda doc: [image], 0, "t", "test"),
                PModChat: ("", lambda doc: messages, {"max_new_tokens": 1}, 0, "t", "test")}
    seen = _prompt_ids(monkeypatch)
    for cls, args in requests.items():
        lm = cls(pretrained=str(path / "model"), device="cpu")
        lm.task_dict = {"t": {"test": [{}]}}
        lm.generate_until([instance(request_type="generate_until", arguments=args, idx=0,
                                    metadata={"task": "t", "doc_id": 0, "repeats": 1})])
    assert len(seen) == 2 and all(torch.equal(ids, expected) for ids in seen)


# ---------------------------------------------------------------------------------------- pmod.pipelines.generation
def test_generate_takes_encoded_inputs():
    """Raw token ids in a batch: placeholders are never generated, nothing is skipped, streaming needs one row."""
    model = _routed_model()
    ids = torch.randint(5, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    out = generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max_new_tokens=4,
                   suppress_tokens=[model.config.get_text_config().eos_token_id])
    assert out.texts == [] and out.new_tokens == [4, 4, 4] and out.prompt_tokens == [10, 10, 10]
    assert not any(model.config.image_token_id in row for row in out.tokens)
    assert out.decode_steps == 3 and out.decode_tokens_per_second > 0 and out.prefill_seconds > 0
    assert out.kv.ratio == 1.0 and out.kv_ratio == [1.0, 1.0, 1.0]  # text only: nothing to skip
    with pytest.raises(pmod.PModInputError, match="batch of one"):
        generate(model, {"input_ids": ids}, tiny_llava_processor(model).tokenizer, write=print, max_new_tokens=1)


def test_generate_batch_reports_costs():
    """Half-precision models answer images; a p-MoD model reports its costs, a dense one none."""
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    for model in (_routed_model().to(torch.bfloat16), tiny_llava(num_layers=4).to(torch.bfloat16)):
        processor = tiny_llava_processor(model)
        prompts = [f"USER: {processor.image_token}\nwhat is in the image ? ASSISTANT:", "USER: what ? ASSISTANT:"]
        out = generate_batch(model, processor, prompts, [[image], []], max_new_tokens=3, suppress_tokens=[3])
        assert out.new_tokens == [3, 3] and len(out.texts) == 2 and out.prompt_tokens[0] > out.prompt_tokens[1]
        if is_pmod(model):
            assert out.flops_ratio[0] < out.flops_ratio[1] and out.kv_ratio[1] == 1.0 and out.kv.ratio < 1
            assert out.costs(1) == {"flops_ratio": out.flops_ratio[1], "kv_ratio": 1.0, "kv_cache_ratio": out.kv.ratio}
            assert "KV cache" in out.summary()
        else:
            assert out.flops_ratio is out.kv_cache_ratio is out.kv is None and "KV cache" not in out.summary()
            assert out.costs(0) == {"flops_ratio": None, "kv_ratio": None, "kv_cache_ratio": None}
    with pytest.raises(pmod.PModInputError, match=r"2 prompts but lists of images / .* of \[1, 2\]"):
        generate_batch(model, processor, prompts, [[image]], video_fps=[2.0, 2.0])


def test_inputs_follow_the_model():
    model = tiny_llava(num_layers=2).to(torch.bfloat16)
    inputs = {"input_ids": torch.ones(1, 3, dtype=torch.long), "pixel_values": torch.zeros(1, 3, 28, 28),
              "pixel_values_videos": torch.zeros(1, 2), "image_sizes": [(28, 28)]}
    moved = move_to_model(model, inputs)
    assert moved["pixel_values"].dtype == moved["pixel_values_videos"].dtype == torch.bfloat16
    assert moved["input_ids"].dtype == torch.long and moved["image_sizes"] == [(28, 28)]


def test_stop_strings_and_placeholders():
    assert cut_at_stop(" red square\n\nblue ", ["\n\n", " square"]) == "red" and cut_at_stop(" red ", [""]) == "red"
    config = tiny_llava().config
    assert suppressed_tokens(config, [3, config.image_token_id]) == [3, config.image_token_id]
    assert suppressed_tokens(config) == [config.image_token_id]


def test_load_for_inference(untemplated, tmp_path, caplog):
    """The checkpoint as saved, converted or dense only; the chat template: given, the processor's, else vicuna_v1."""
    path, _ = untemplated
    with caplog.at_level(logging.WARNING, logger="pmod.data.conversation"):
        model, processor = load_for_inference(path / "model", dtype="bfloat16")
    assert is_pmod(model) and not model.training and model.dtype == torch.bfloat16
    assert processor.chat_template == VICUNA_V1_TEMPLATE and "has no chat template" in caplog.text
    assert load_for_inference(path / "model", chat_template="vicuna_v1")[1].chat_template == VICUNA_V1_TEMPLATE
    dense = tiny_llava(num_layers=4)
    dense.save_pretrained(tmp_path)
    tiny_llava_processor(dense).save_pretrained(tmp_path)
    model, processor = load_for_inference(tmp_path, need_images=True)
    assert not is_pmod(model) and processor.chat_template == vicuna_v1_template(system=None)  # its own template
    converted, _ = load_for_inference(tmp_path, dense=False, pmod_config=pmod.PModConfig(schedule=[1.0, 0.5, 1.0, 0.5]))
    assert converted.pmod.layer_ratios == [1.0, 0.5, 1.0, 0.5]
    with pytest.raises(pmod.PModConfigError, match="needs a dense checkpoint"):
        load_for_inference(path / "model", dense=True)
    with pytest.raises(pmod.PModConfigError, match="pass dense=False"):
        load_for_inference(tmp_path, pmod_config=pmod.PModConfig())
    with pytest.raises(pmod.PModConfigError, match="dtype must be"):
        load_for_inference(tmp_path, dtype="float17")


def test_a_prompt_without_its_image_placeholder_is_refused_clearly():
    """The README's generate_batch example with a plain question failed deep in transformers ("Found total 0 <image>
    tokens and 1 images"); each prompt's placeholders are counted against its images first."""
    model = _routed_model()
    processor = tiny_llava_processor(model)
    image = Image.new("RGB", (30, 20), (200, 10, 10))
    with pytest.raises(pmod.PModInputError, match=r"prompt 1 has 0 <image> placeholder\(s\) for 1 image\(s\): render"):
        generate_batch(model, processor, ["USER: <image> what ? ASSISTANT:", "what is it ?"], [[image], [image]],
                       max_new_tokens=2)
