import json
import math
from pathlib import Path

import pytest

from pmod import PModConfig, PModConfigError, schedules
from pmod.cli import main
from pmod.config import ResolvedPMod


def test_schedule_names_are_listed_once(capsys):
    """pmod.schedules.NAMES is what config validation, the CLI and the glossary of docs/method.md accept and name."""
    glossary = (Path(__file__).parents[1] / "docs" / "method.md").read_text().split("## Glossary", 1)[1]
    for name in schedules.NAMES:
        assert PModConfig(schedule=name).schedule == name and f"`{name}`" in glossary
        assert main(["schedule", "--layers", "8", "--schedule", name, "--json"]) == 0
    with pytest.raises(PModConfigError, match=", ".join(schedules.NAMES)):
        PModConfig(schedule="cosine")
    with pytest.raises(SystemExit):
        main(["schedule", "--layers", "8", "--schedule", "cosine"])
    assert "invalid choice" in capsys.readouterr().err


def test_explicit_schedule_and_routed_layers():
    cfg = PModConfig(schedule=[1.0, 0.5, 1.0], routed_layers=[2, 1])
    assert cfg.layer_ratios(3) == [1.0, 0.5, 1.0]
    assert cfg.resolve_routed_layers(3) == [1, 2]
    assert PModConfig(schedule=[1.0, 0.5, 1.0]).resolve_routed_layers(3) == [1]


def test_routed_layers_add_to_the_schedule_and_a_saved_ratio_is_never_nominal():
    """routed_layers=[0] used to replace the schedule: layers 1-3 kept their ratios below 1 in the saved settings but
    were not routed (realised cost 1.0, reported 0.54). They are the union now, and a config.pmod whose ratio below
    1 sits on an unrouted layer is refused when it is read."""
    resolved = ResolvedPMod.resolve(PModConfig(schedule=[1.0, 0.75, 0.25, 0.15], routed_layers=[0]), 4)
    assert resolved.routed_layers == [0, 1, 2, 3] and [s.index for s in resolved.layers] == [0, 1, 2, 3]
    saved = resolved.to_dict()
    saved["routed_layers"] = [0]
    with pytest.raises(PModConfigError, match=r"layers \[1, 2, 3\] have keep ratios below 1"):
        ResolvedPMod.from_dict(saved)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(schedule=[0.5, 0.0]), "schedule\\[1\\]"),
        (dict(schedule=[1.5]), "keep ratio in \\(0, 1\\]"),
        (dict(schedule="cosine"), "Unknown schedule"),
        (dict(min_ratio=0.0), "min_ratio"),
        (dict(min_ratio=0.9), "larger than max_ratio"),
        (dict(schedule="constant", average_ratio=1.2), "average_ratio"),
        (dict(targets="text"), "targets"),
        (dict(average_ratio=math.nan), "finite"),
        # found by a probe: each of these used to give a silently wrong model
        (dict(alpha=math.nan), "alpha must be a finite number"),
        (dict(beta=math.inf), "beta must be a finite number"),
        (dict(alpha="0.2"), "alpha must be a finite number"),
        (dict(average_ratio=-0.5), "average_ratio must be a keep ratio"),  # kept 0.15 in every layer, layer 0 too
        (dict(average_ratio=0.9, max_ratio=1.5), "max_ratio must be a keep ratio"),  # derived ratios up to 1.4
        (dict(schedule=[0.5, math.nan]), "schedule\\[1\\]"),
        (dict(schedule=[0.5, True]), "schedule\\[1\\]"),
        (dict(tanh_norm="false"), "tanh_norm must be true or false"),  # a truthy string
        (dict(string=0), "string must be true or false"),
        (dict(router_bias="no"), "router_bias must be true or false"),
        (dict(router_zero_init=None), "router_zero_init must be true or false"),
        (dict(constant_start=1.5), "constant_start must be an integer"),
        (dict(routed_layers="8"), "routed_layers must be a list"),
        (dict(routed_layers=[8.5]), "routed_layers must be an integer"),
    ],
)
def test_invalid_settings_are_rejected(kwargs, message):
    with pytest.raises(PModConfigError, match=message):
        PModConfig(**kwargs)


def test_schedule_that_routes_nothing_is_an_error():
    with pytest.raises(PModConfigError, match="routes no layer"):
        PModConfig(schedule=[1.0, 1.0]).resolve_routed_layers(2)
    with pytest.raises(PModConfigError, match="routes no layer"):
        PModConfig(schedule="constant", constant_start=5).resolve_routed_layers(4)
    with pytest.raises(PModConfigError, match="3 ratios but the model has 4"):
        PModConfig(schedule=[0.5] * 3).layer_ratios(4)
    with pytest.raises(PModConfigError, match="out of range"):
        PModConfig(routed_layers=[7]).resolve_routed_layers(4)


def test_resolved_round_trips_through_json():
    resolved = ResolvedPMod.resolve(PModConfig(alpha=0.1), 12)
    again = ResolvedPMod.from_dict(json.loads(json.dumps(resolved.to_dict())))
    assert again == resolved
    with pytest.raises(PModConfigError, match="Unknown p-MoD settings"):
        PModConfig.from_dict({"schedul": "shifted_cos"})
    with pytest.raises(PModConfigError, match="malformed"):
        ResolvedPMod.from_dict({"settings": {}})
    # a config.json edited or corrupted on disk: NaN (json writes it as NaN), ratios out of range, wrong types
    saved = json.loads(json.dumps(resolved.to_dict()))
    for path, value, message in [(("settings", "alpha"), math.nan, "config.pmod: alpha must be a finite number"),
                                 (("layer_ratios", 3), 1.4, "layer_ratios\\[3\\] must be a keep ratio"),
                                 (("layer_ratios", 2), "0.5", "layer_ratios\\[2\\] must be a finite number"),
                                 (("routed_layers", 0), "8", "routed_layers must be an integer")]:
        bad = json.loads(json.dumps(saved))
        bad[path[0]][path[1]] = value
        with pytest.raises(PModConfigError, match=message):
            ResolvedPMod.from_dict(json.loads(json.dumps(bad)))
