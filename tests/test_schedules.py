"""pmod.schedules: the per-layer keep ratios of each schedule, directly and through PModConfig (method.md section 3)."""

import math

import pytest

from pmod import PModConfig, schedules

VICUNA_TABLE = [0.8445, 0.8061, 0.7645, 0.7202, 0.6737, 0.6253, 0.5757, 0.5253, 0.4747, 0.4243, 0.3747, 0.3263,
                0.2798, 0.2355, 0.1939, 0.1555]


def test_shifted_cos_matches_paper_table_for_32_layers():
    ratios = PModConfig().layer_ratios(32)
    assert ratios[:8] == [1.0] * 8
    assert [round(r, 4) for r in ratios[8:24]] == VICUNA_TABLE
    assert ratios[24:] == [0.15] * 8
    assert round(sum(ratios) / 32, 4) == 0.5375
    assert PModConfig().resolve_routed_layers(32) == list(range(8, 32))


def test_shifted_cos_general_depth_and_linear_constant_interleave():
    r = PModConfig().layer_ratios(16)
    assert r[0] == 1.0 and r[-1] == 0.15 and all(a >= b for a, b in zip(r, r[1:]))
    lin = PModConfig(schedule="shifted_linear").layer_ratios(11)
    assert lin[2] == pytest.approx(0.8) and lin[5] == pytest.approx(0.5) and lin[10] == 0.15 and lin[1] == 1.0
    const = PModConfig(schedule="constant", average_ratio=0.4).layer_ratios(8)
    assert const == [1.0, 1.0, 0.4, 0.4, 0.4, 0.4, 0.4, 1.0]
    const_to_end = PModConfig(schedule="constant", average_ratio=0.4, constant_end=None).layer_ratios(8)
    assert const_to_end[-1] == 0.4
    inter = PModConfig(schedule="interleave", average_ratio=0.125).layer_ratios(6)
    assert inter == [1.0, 0.125, 1.0, 0.125, 1.0, 0.125]


def test_the_functions_give_none_for_dense_layers_and_clip_at_the_minimum():
    raw = [0.5 * math.cos(math.pi * i / 31) + 0.5 for i in range(32)]
    ratios = schedules.shifted_cos(32, 0.5, 0.85, 0.15)
    assert ratios[:8] == [None] * 8  # raw above the maximum: dense
    assert ratios[8:] == [max(r, 0.15) for r in raw[8:]]
    assert schedules.shifted_linear(3, 0.5, 0.85, 0.15) == [None, 0.5, 0.15]
    assert schedules.constant(6, 0.3, 2, -1) == [None, None, 0.3, 0.3, 0.3, None]
    assert schedules.constant(4, 0.3, 1, None) == [None, 0.3, 0.3, 0.3]
    assert schedules.interleave(4, 0.25) == [None, 0.25, None, 0.25]


def test_a_single_layer_model_has_no_decay_to_divide_by_zero():
    assert schedules.shifted_cos(1, 0.5, 0.85, 0.15) == [None]  # raw(0) = 1.0 > 0.85
    assert schedules.shifted_linear(1, 0.2, 0.85, 0.15) == [0.7]


@pytest.mark.parametrize("name", schedules.NAMES)
def test_every_schedule_gives_one_ratio_per_layer_within_bounds(name):
    for layers in (1, 2, 7, 32, 80):
        ratios = PModConfig(schedule=name).layer_ratios(layers)
        assert len(ratios) == layers and all(0 < r <= 1 for r in ratios)
