import json

import pytest

from pmod.cli import main


def test_schedule_json(capsys):
    assert main(["schedule", "--layers", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["routed_layers"] == list(range(8, 32))
    assert round(out["mean_ratio"], 4) == 0.5375


def test_schedule_error_is_reported_not_raised(capsys):
    assert main(["schedule", "--layers", "2", "--schedule", "constant"]) == 2
    assert "routes no layer" in capsys.readouterr().err


def test_demo_and_info(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--layers", "6"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["reload_exact"] is True
    assert summary["routed_layers"] == [2, 3, 4, 5]
    assert 0.3 < summary["processed_token_ratio"] < 1.0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "model")]) == 0
    assert '"routed_layers"' in capsys.readouterr().out


def test_info_on_missing_dir(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "pmod info: error" in capsys.readouterr().err
