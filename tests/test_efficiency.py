import math

import torch
from test_models import llava_inputs

import pmod
from pmod.efficiency import kv_cache_report
from pmod.tiny import randomize_routers, tiny_llava

SCHEDULE = [0.5, 1.0, 0.3, 0.6]


def _model():
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=SCHEDULE))
    randomize_routers(model)
    return model


def _prefill_and_decode(model, inputs, steps=3):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
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
    per_token = [2 * k.shape[0] * k.shape[1] * k.shape[3] * k.element_size() for k in (l.keys for l in cache.layers)]
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
