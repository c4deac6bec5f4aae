import math

import torch

import pmod
from pmod.compat import output_cache
from pmod.efficiency import kv_cache_report
from pmod.tiny import randomize_routers, tiny_llava
from tests.helpers.inputs import llava_inputs

SCHEDULE = [0.5, 1.0, 0.3, 0.6]


def _model():
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=SCHEDULE))
    randomize_routers(model)
    return model


def _prefill_and_decode(model, inputs, steps=3):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
        mask = inputs.get("attention_mask")
        for _ in range(steps):
            new = torch.randint(1, 120, (inputs["input_ids"].shape[0], 1), generator=gen)
            mask = torch.cat([mask, torch.ones_like(new)], 1) if mask is not None else None
            model(input_ids=new, attention_mask=mask, past_key_values=cache)
    return cache


def test_kv_report_matches_schedule_prediction():
    model = _model()
    inputs, _ = llava_inputs(model, [(3, 1, 4), (3, 1, 4)])
    inputs.pop("attention_mask")
    length, steps, n_vision = inputs["input_ids"].shape[1], 3, 16
    cache = _prefill_and_decode(model, inputs, steps)
    report = kv_cache_report(cache)
    total = length + steps
    predicted = [total if r == 1.0 else total - n_vision + math.floor(n_vision * r) for r in SCHEDULE]
    assert [layer.entries // 2 for layer in report.layers] == predicted
    assert report.ratio == sum(predicted) / (len(SCHEDULE) * total)
    assert report.entry_ratio == report.ratio  # equal rows: no empty slots
    actual = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert report.bytes == actual
    per_token = [2 * k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()
                 for k in (layer.keys for layer in cache.layers)]
    assert report.dense_bytes == sum(per_token) * total
    assert [layer.routed for layer in report.layers] == [True, False, True, True]


def test_kv_report_counts_empty_slots_of_uneven_rows():
    model = _model()
    inputs, _ = llava_inputs(model)  # rows with 16, 32, 0 and 16 vision tokens
    report = kv_cache_report(_prefill_and_decode(model, inputs, 1))
    routed = [layer for layer in report.layers if layer.routed]
    assert all(layer.slots >= layer.entries for layer in routed)
    assert any(layer.slots > layer.entries for layer in routed)
    assert report.ratio >= report.entry_ratio
    assert report.ratio < 1.0
    assert report.to_dict()["layers"][1]["routed"] is False


# ---------------------------------------------------------------------- analytic accounting
import json  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pmod.cli import main  # noqa: E402
from pmod.efficiency import PRESETS, prefill_cost, realized_cost, shape_from_config  # noqa: E402
from pmod.tiny import tiny_causal_lm  # noqa: E402


def test_paper_settings():
    c15 = prefill_cost(PRESETS["llava-1.5-7b"], 576, 60)
    assert round(c15.kv_ratio_nominal, 4) == 0.5375
    assert round(c15.kv_ratio, 4) == 0.5369
    assert abs(c15.flops_ratio - 0.587) < 0.02
    assert abs(c15.dense_flops / 1e12 - 8.38) < 0.2
    for vision in (2500, 2880):
        nxt = prefill_cost(PRESETS["llava-next-7b"], vision, 200)
        assert abs(nxt.flops_ratio - 0.556) < 0.02
    assert abs(prefill_cost(PRESETS["llava-next-7b"], 2500, 200).dense_flops / 1e12 - 39.46) < 1.0


def _decoder_flops(model, **inputs):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs, use_cache=False)
    counts = counter.get_flop_counts()
    return sum(sum(v.values()) for k, v in counts.items() if re.search(r"\.layers\.\d+$", k))


def test_analytic_flops_match_flop_counter():
    dense = tiny_causal_lm("llama", num_layers=6, attn_implementation="eager", hidden_size=64, num_kv_heads=2)
    n_vision, n_text = 48, 16
    ids = torch.randint(1, 120, (1, n_vision + n_text))
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[0, 8 : 8 + n_vision] = True
    measured_dense = _decoder_flops(dense, input_ids=ids)
    model = pmod.apply_pmod(dense, pmod.PModConfig())
    randomize_routers(model)
    measured_pmod = _decoder_flops(model, input_ids=ids, target_mask=target)
    cost = prefill_cost(shape_from_config(model.config), n_vision, n_text, resolved=model.pmod)
    assert abs(cost.dense_flops / measured_dense - 1) < 0.05
    assert abs(cost.pmod_flops / measured_pmod - 1) < 0.05
    assert abs(cost.flops_ratio - measured_pmod / measured_dense) < 0.02
    # and the realised accounting of that very forward agrees with the analytic one
    realized = realized_cost(model)
    assert realized.flops_ratio[0] == pytest.approx(cost.flops_ratio, rel=1e-9)
    assert realized.kv_ratio[0] == pytest.approx(cost.kv_ratio, rel=1e-9)


def test_realized_cost_differs_per_row():
    model = _model()
    inputs, _ = llava_inputs(model)  # 16, 32, 0 and 16 vision tokens, different text lengths
    with torch.no_grad():
        model(**inputs)
    realized = realized_cost(model)
    assert realized.kv_ratio[2] == 1.0 and realized.flops_ratio[2] > 0.99  # no image: only the routers cost extra
    assert realized.kv_ratio[1] < 1.0 and realized.flops_ratio[1] < realized.flops_ratio[0]
    shape = shape_from_config(model.config)
    mask = inputs["attention_mask"]
    n_vision = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    expected = prefill_cost(shape, n_vision, int(mask[0].sum()) - n_vision, resolved=model.pmod)
    assert realized.flops_ratio[0] == pytest.approx(expected.flops_ratio, rel=1e-9)


def test_flops_cli(tmp_path, capsys):
    assert main(["flops", "--preset", "llava-1.5-7b", "--vision-tokens", "576", "--text-tokens", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.55 < out["flops_ratio"] < 0.6 and round(out["kv_ratio"], 4) == 0.5369
    assert len(out["layers"]) == 32 and out["assumptions"]
    assert main(["flops", "--preset", "llava-next-7b", "--vision-tokens", "2880", "--text-tokens", "200"]) == 0
    text = capsys.readouterr().out
    assert "TFLOPs" in text and "assumptions" in text
    model = _model()
    model.save_pretrained(tmp_path)
    assert main(["flops", "--model", str(tmp_path), "--vision-tokens", "16", "--text-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [layer["routed"] for layer in out["layers"]] == [True, False, True, True]
    # a tiny model's table is in a unit its numbers show in (it printed 0.0 GFLOPs on every row)
    assert main(["flops", "--model", str(tmp_path), "--vision-tokens", "16", "--text-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert "dense MFLOPs" in text and " 0.0 " not in text.split("decoder layers")[0]


def test_newer_architecture_presets_and_configs():
    from pmod.cli import PRESET_NAMES
    from pmod.efficiency import PRESETS, prefill_cost, shape_from_config
    from pmod.tiny import tiny_llava_onevision, tiny_qwen2_vl

    assert set(PRESET_NAMES) == set(PRESETS)
    for name in ("qwen2-vl-7b", "qwen2.5-vl-7b", "llava-onevision-7b"):
        cost = prefill_cost(PRESETS[name], 1024, 64, pmod.PModConfig())
        assert 0.45 < cost.flops_ratio < 0.65 and cost.kv_ratio == pytest.approx(0.5375, abs=0.01)
    qwen = shape_from_config(pmod.apply_pmod(tiny_qwen2_vl(), pmod.PModConfig()).config)
    assert qwen.vision is None and qwen.decoder.num_layers == 4 and qwen.decoder.num_kv_heads == 2
    onevision = shape_from_config(tiny_llava_onevision().config)
    assert onevision.vision.hidden == 32 and onevision.crops == 5


@pytest.mark.parametrize("family", ["qwen3-vl-moe", "gemma3-wide-heads", "mistral3", "internvl-qwen3",
                                    "llava-next-video", "idefics3"])
def test_analytic_flops_of_newer_families_match_flop_counter(family):
    """Head sizes wider than hidden / heads (Gemma 3, Mistral-Small), sparse MoE layers with a dense first layer
    (Qwen3-VL-MoE) and sliding-window layers: the cost model counts what the layers compute (eager attention
    computes the whole matrix, so the paper's full count applies)."""
    import transformers

    from pmod.tiny import tiny_gemma3, tiny_internvl, tiny_llava_next_video, tiny_mistral3, tiny_qwen3_vl, tiny_smolvlm

    if family == "qwen3-vl-moe":
        dense = tiny_qwen3_vl(moe=True, attn_implementation="eager")
        dense.set_experts_implementation("eager")  # FlopCounterMode does not count grouped_mm: one matmul per expert
    elif family == "gemma3-wide-heads":
        cfg = tiny_gemma3().config
        cfg.text_config.head_dim = 32  # query width 4 x 32 = 128 against hidden 64
        cfg.text_config.query_pre_attn_scalar = 32
        cfg._attn_implementation = cfg.text_config._attn_implementation = "eager"
        dense = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    elif family == "internvl-qwen3":  # a Qwen3 decoder: q/k norms, head_dim from the config
        dense = tiny_internvl(family="qwen3", attn_implementation="eager")
    elif family == "llava-next-video":
        dense = tiny_llava_next_video(attn_implementation="eager")
    elif family == "idefics3":
        dense = tiny_smolvlm(version="idefics3", attn_implementation="eager")
    else:
        dense = tiny_mistral3(attn_implementation="eager")
    shape = shape_from_config(dense.config)
    n_vision, n_text = 24, 8
    ids = torch.randint(5, 100, (1, n_vision + n_text))
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[0, 4 : 4 + n_vision] = True
    measured_dense = _decoder_flops(dense, input_ids=ids)
    model = pmod.apply_pmod(dense, pmod.PModConfig(schedule=[1.0, 0.5, 0.3, 0.25]))
    randomize_routers(model)
    measured_pmod = _decoder_flops(model, input_ids=ids, target_mask=target)
    cost = prefill_cost(shape, n_vision, n_text, resolved=model.pmod)
    assert abs(cost.dense_flops / measured_dense - 1) < 0.05
    assert abs(cost.pmod_flops / measured_pmod - 1) < 0.05
    if family == "qwen3-vl-moe":
        assert shape.decoder.moe_layers == (1, 2, 3) and shape.vision is None
    if family == "gemma3-wide-heads":
        assert shape.decoder.q_width == 128 and shape.decoder.sliding_layers == (0, 2)


def test_newer_family_presets():
    from pmod.efficiency import decoder_layer_flops

    for name in ("qwen3-vl-8b", "qwen3-vl-30b-a3b", "internvl3-8b", "gemma-3-12b", "mistral-small-3.1-24b"):
        cost = prefill_cost(PRESETS[name], 1024, 64, pmod.PModConfig())
        assert 0.4 < cost.flops_ratio < 0.7 and cost.kv_ratio < 0.65, name
        assert any("vision encoder and projector are not counted" in a for a in cost.assumptions)
    moe = PRESETS["qwen3-vl-30b-a3b"].decoder
    # about 3B of its 30B parameters are active: a token costs close to 2 x 3B FLOPs in its layers' matmuls
    per_token = sum(decoder_layer_flops(1, moe, layer=i) for i in range(moe.num_layers))
    assert 2 * 2.0e9 < per_token < 2 * 3.5e9
    gemma = PRESETS["gemma-3-12b"].decoder
    assert (decoder_layer_flops(8192, gemma, causal=True, layer=0)
            < decoder_layer_flops(8192, gemma, causal=True, layer=5))
