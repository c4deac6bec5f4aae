"""Routing-target and token counts found on the host (`PModModelMixin.routing_counts`), the prefill planned from
them (`RoutingPlan._from_counts`, no device read), and pmod's generation path passing them by itself."""

import pytest
import torch
from PIL import Image

import pmod
from pmod.compat import output_cache
from pmod.efficiency import kv_cache_report
from pmod.pipelines.generation import encode, generate, move_to_model
from pmod.routing import RoutingPlan
from pmod.tiny import (
    randomize_routers,
    tiny_causal_lm,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_processor,
    tiny_qwen2_vl,
)
from tests.helpers.inputs import llava_inputs, next_inputs
from tests.helpers.qwen_inputs import qwen_inputs


def _plans(monkeypatch) -> list[str]:
    """Which planner each forward used: "counts" (on the host) or "device" (reads the device)."""
    used = []
    build, from_counts = RoutingPlan.build.__func__, RoutingPlan._from_counts.__func__

    def spy_build(cls, *args, counts=None, **kwargs):
        used.append("device" if counts is None else "counts")
        return build(cls, *args, counts=counts, **kwargs)

    monkeypatch.setattr(RoutingPlan, "build", classmethod(spy_build))
    monkeypatch.setattr(RoutingPlan, "_from_counts", classmethod(from_counts))
    return used


def _check_counts_plan_the_same(model, inputs, monkeypatch):
    """routing_counts equal the forward's own targets and tokens per row, and a prefill given them gives the same
    logits, routing, processed widths and cache as one that reads the device; target counts alone give the same
    logits too."""
    counts = model.routing_counts(**inputs)
    used = _plans(monkeypatch)
    with torch.no_grad():
        plain = model(**inputs, use_cache=True)
        routed_plain = {i: r.processed.clone() for i, r in model.routing().items()}
        targets = next(iter(model.routing().values())).target.sum(1).tolist()
        given = model(**inputs, **counts, use_cache=True)
        targets_only = model(**inputs, target_counts=counts["target_counts"])
    assert counts["target_counts"] == targets
    mask = inputs.get("attention_mask")
    assert counts["token_counts"] == (
        mask.sum(1).tolist() if mask is not None else [inputs["input_ids"].shape[1]] * len(targets)
    )
    assert used == ["device", "counts", "counts"]
    torch.testing.assert_close(given.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(targets_only.logits, plain.logits, rtol=1e-5, atol=1e-5)
    for i, r in model.routing().items():
        assert torch.equal(r.processed, routed_plain[i])
    # with both counts the routed layers hold exactly what they processed: the cache is no larger
    assert [lay.physical_length() for lay in output_cache(given).layers] == [
        lay.physical_length() for lay in output_cache(plain).layers]
    return counts["target_counts"]


def test_llava_rows_with_zero_one_and_two_images(monkeypatch):
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=[1.0, 0.5, 0.3, 0.6]))
    randomize_routers(model)
    inputs, n_images = llava_inputs(model)
    counts = _check_counts_plan_the_same(model, inputs, monkeypatch)
    per_image = int((inputs["input_ids"][0] == model.config.image_token_id).sum()) // n_images[0]
    assert counts == [n * per_image for n in n_images]


def test_llava_next_high_resolution_targets(monkeypatch):
    model = pmod.apply_pmod(tiny_llava_next(num_layers=4),
                            pmod.PModConfig(schedule=[0.4, 1.0, 0.5, 0.2], targets="vision_hr"))
    randomize_routers(model)
    inputs, _ = next_inputs(model, [[(28, 56), (56, 56)], None, (84, 28), (56, 28)], [(2, 3), (6, 2), (3, 0), (1, 1)])
    counts = _check_counts_plan_the_same(model, inputs, monkeypatch)
    image = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert counts[1] == 0 and all(0 < c < n for c, n in zip(counts, image) if n)  # the base grids are not targets


def test_qwen2_vl_images_and_video(monkeypatch):
    model = pmod.apply_pmod(tiny_qwen2_vl(), pmod.PModConfig(schedule=[0.5, 1.0, 0.3, 0.6]))
    randomize_routers(model)
    inputs, _ = qwen_inputs(model)
    counts = _check_counts_plan_the_same(model, inputs, monkeypatch)
    ids = inputs["input_ids"]
    assert counts == ((ids == model.config.image_token_id) | (ids == model.config.video_token_id)).sum(1).tolist()
    assert counts[2] == 0 and counts[1] > 0  # a row without media; a row with a video


def test_every_token_a_target_with_padding(monkeypatch):
    model = pmod.apply_pmod(tiny_causal_lm(num_layers=3),
                            pmod.PModConfig(schedule=[0.5, 0.5, 0.5], routed_layers=[0, 1, 2], targets="all"))
    randomize_routers(model)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    inputs = {"input_ids": torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0)),
                  "attention_mask": mask}
    assert _check_counts_plan_the_same(model, inputs, monkeypatch) == [4, 6]


def test_text_only_prompt_counts_zero_and_bad_counts_are_refused():
    model = pmod.apply_pmod(tiny_llava(num_layers=2), pmod.PModConfig(schedule=[0.5, 1.0]))
    ids = torch.randint(1, 100, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert model.routing_counts(input_ids=ids, attention_mask=mask) == {"target_counts": [0, 0], "token_counts": [4, 5]}
    with pytest.raises(pmod.PModInputError, match="input_ids"):
        model.routing_counts(inputs_embeds=torch.zeros(1, 5, 8))
    with pytest.raises(pmod.PModInputError, match="pass both"):
        model(input_ids=ids, attention_mask=mask, token_counts=[4, 5])
    with pytest.raises(pmod.PModInputError, match="token_counts must hold 2 counts between 0 and 5"):
        model(input_ids=ids, attention_mask=mask, target_counts=[0, 0], token_counts=[4, 6])


def test_generation_path_plans_the_prefill_on_the_host(monkeypatch):
    """encode / generate add each row's count for a p-MoD model (none for a dense one), the prefill is planned
    from them, and the answers are those of a prefill that reads the device."""
    dense = tiny_llava(num_layers=4)
    processor = tiny_llava_processor(dense)
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=[1.0, 0.5, 0.3, 0.6]))
    randomize_routers(model)
    image = Image.new("RGB", (28, 28), (200, 30, 60))
    token = processor.image_token
    prompts = [f"{token} what is in the image", "what is in the image", f"{token} {token} a red circle"]
    images = [[image], [], [image, image]]
    assert "target_counts" not in encode(dense, processor, prompts, images)
    inputs = encode(model, processor, prompts, images)
    ids = inputs["input_ids"]
    assert inputs["target_counts"] == (ids == model.config.image_token_id).sum(1).tolist()
    assert inputs["token_counts"] == inputs["attention_mask"].sum(1).tolist()
    assert inputs["target_counts"][1] == 0
    used = _plans(monkeypatch)
    planned = generate(model, inputs, processor.tokenizer, max_new_tokens=4)
    assert used[0] == "counts"
    bare = {k: v for k, v in inputs.items() if k not in ("target_counts", "token_counts")}
    assert move_to_model(model, bare)["target_counts"] == inputs["target_counts"]  # generate() counts CPU inputs
    used.clear()
    with torch.no_grad():  # transformers' generate on the bare inputs: the prefill reads the device
        out = model.generate(**bare, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=0, suppress_tokens=[model.config.image_token_id])
    assert used[0] == "device"
    new = out.sequences[:, ids.shape[1]:].tolist()
    assert [row[: len(t)] for row, t in zip(new, planned.tokens)] == planned.tokens
    # the text-only row does not widen the routed layers: the cache holds what a device-planned prefill's holds
    assert planned.kv.ratio == kv_cache_report(output_cache(out)).ratio < 1
    # a count the inputs contradict is caught (on the device, no host read): never a silently different routing
    with pytest.raises(RuntimeError, match="target_counts / token_counts differ"), torch.no_grad():
        model(**{**inputs, "target_counts": [1, 0, 2]})
