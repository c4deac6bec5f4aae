"""The demo end to end at its smoke-test size (`pmod demo --quick`), reruns reuse finished stages."""

import json
import time

import pytest
from PIL import Image

from pmod.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out, time.perf_counter() - start


def test_quick_demo_writes_a_complete_report(demo_dir):
    out, seconds = demo_dir
    assert seconds < 240  # budget 2 minutes on 2 free cores; slack for a loaded CI machine
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == {"dense", "pmod", "gap_points"}
    assert 0.0 <= report["accuracy"]["pmod"] <= 1.0
    # nominal and realised FLOP ratios agree (every test image has the same number of vision tokens)
    assert 0.45 < report["prefill_flops"]["ratio"] < 0.65
    assert report["prefill_flops"]["realised_ratio"] == pytest.approx(report["prefill_flops"]["ratio"], abs=0.03)
    assert report["kv_cache"]["vision_kv_ratio"] == pytest.approx(report["kv_cache"]["realised_kv_ratio"])
    assert report["prefill_latency_s"]["ratio"] > 0 and report["training_s"]["ratio"] > 0
    for name in ("training_curves.png", "routing.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 300 and img.size[1] > 200
    md = (out / "report.md").read_text()
    assert "| test accuracy |" in md and "routing.png" in md
    assert (out / "pmod/test_predictions.jsonl").is_file() and (out / "data/train.json").is_file()


def test_rerun_reuses_training_and_ablation_reuses_the_baseline(demo_dir, caplog):
    out, _ = demo_dir
    dense_summary = (out / "dense/train_summary.json").stat().st_mtime
    with caplog.at_level("INFO", logger="pmod.demo"):
        assert main(["demo", "--quick", "--out", str(out), "--no-string"]) == 0
    assert "dense: reusing the finished training run" in caplog.text
    assert (out / "dense/train_summary.json").stat().st_mtime == dense_summary
    report = json.loads((out / "report.json").read_text())
    assert "pmod-no-string" in report["accuracy"] and report["settings"]["pmod"]["string"] is False
    config = json.loads((out / "pmod-no-string/config.json").read_text())
    assert config["pmod"]["settings"]["string"] is False


def test_qwen2_vl_demo_shares_the_folder_without_touching_the_llava_run(demo_dir):
    out, _ = demo_dir
    llava_report = (out / "report.md").read_text()
    dense_summary = (out / "dense/train_summary.json").stat().st_mtime
    assert main(["demo", "--quick", "--arch", "qwen2-vl", "--out", str(out)]) == 0
    report = json.loads((out / "report-qwen2-vl.json").read_text())
    assert report["settings"]["arch"] == "qwen2-vl" and report["settings"]["vision_tokens"] == 64
    assert 0.0 <= report["accuracy"]["pmod"] <= 1.0
    assert report["prefill_flops"]["realised_ratio"] == pytest.approx(report["prefill_flops"]["ratio"], abs=0.03)
    config = json.loads((out / "qwen2-vl-pmod/config.json").read_text())
    assert config["model_type"] == "pmod_qwen2_vl"
    with Image.open(out / "routing-qwen2-vl.png") as img:
        assert img.size[0] > 300
    assert "tiny Qwen2-VL-style model" in (out / "report-qwen2-vl.md").read_text()
    assert (out / "report.md").read_text() == llava_report
    assert (out / "dense/train_summary.json").stat().st_mtime == dense_summary


def test_report_calls_a_comparison_with_an_unlearned_baseline_inconclusive():
    from pathlib import Path

    from pmod.demo import DemoConfig, _markdown

    report = json.loads((Path(__file__).parent.parent / "docs/demo/report-qwen2-vl.json").read_text())
    assert report["targets"]["dense_baseline_learned"]
    assert "accuracy within 2 points of dense: **not met**" in _markdown(report, "pmod", DemoConfig(arch="qwen2-vl"))
    report["accuracy"].update(dense=0.49, pmod=0.60, gap_points=11.0)
    report["targets"].update(dense_baseline_learned=False, accuracy_within_2_points=True)
    text = _markdown(report, "pmod", DemoConfig(arch="qwen2-vl"))
    assert "**inconclusive**" in text and "standard error of 3.1 points" in text


def test_without_matplotlib_the_report_has_no_plots(demo_dir, monkeypatch, caplog):
    """matplotlib comes only with the bench / dev extras: `pmod demo` still runs, and says what is missing."""
    import importlib.util

    out, _ = demo_dir
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    (out / "routing.png").unlink()
    with caplog.at_level("WARNING", logger="pmod.demo"):
        assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert "matplotlib is not installed" in caplog.text
    report = json.loads((out / "report.json").read_text())
    assert report["plots"] is False and not (out / "routing.png").exists()
    md = (out / "report.md").read_text()
    assert "No plots" in md and "routing.png" not in md
