import json


import pmod
from pmod.cli import main
from pmod.tiny import tiny_llava


def test_schedule_json(capsys):
    assert main(["schedule", "--layers", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["routed_layers"] == list(range(8, 32))
    assert round(out["mean_ratio"], 4) == 0.5375


def test_schedule_error_is_reported_not_raised(capsys):
    assert main(["schedule", "--layers", "2", "--schedule", "constant"]) == 2
    assert "routes no layer" in capsys.readouterr().err


def test_info(tmp_path, capsys):
    model = pmod.apply_pmod(tiny_llava(num_layers=6), pmod.PModConfig())
    model.save_pretrained(tmp_path / "model")
    assert main(["info", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    header, body = out.split("\n", 1)
    assert header.endswith("pmod_llava") and json.loads(body)["routed_layers"] == [2, 3, 4, 5]


def test_info_on_missing_dir(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "pmod info: error" in capsys.readouterr().err
