"""Smoke tests of the benchmark scripts on tiny shapes: they run and write the result files they promise."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` leaves these out

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "4", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--text-tokens", "16"]


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], check=True, capture_output=True,
                          text=True)


def test_prefill_benchmark(tmp_path):
    out = tmp_path / "prefill.json"
    run("prefill.py", *TINY, "--vision-tokens", "32", "--reps", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["time_ratio"] > 0 and 0 < result["processed_token_ratio"] < 1
    assert result["machine"]["torch"]


def test_decode_benchmark(tmp_path):
    out = tmp_path / "decode.json"
    run("decode.py", *TINY, "--vision-tokens", "32", "--steps", "2", "--reps", "1", "--batches", "1", "2",
        "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["kv_ratio"] == pytest.approx(r["predicted_kv_ratio"]) for r in rows)


def test_efficiency_benchmark(tmp_path):
    out = tmp_path / "eff.json"
    run("efficiency.py", *TINY, "--vision-counts", "32", "64", "--reps", "1", "--train-reps", "1", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["vision_tokens"] for r in rows] == [32, 64]
    assert all(r["peak_memory_dense_bytes"] > 0 and 0 < r["analytic_flops_ratio"] < 1 for r in rows)
    assert out.with_suffix(".md").read_text().count("\n| ") >= 3
    assert out.with_suffix(".png").stat().st_size > 1000


def test_gpu_benchmark_script_at_a_small_shape(tmp_path):
    """benchmarks/gpu.py (issue 15's cases) runs end to end on CPU at a tiny shape: GPU time is too scarce to debug it
    there."""
    out = tmp_path / "gpu.json"
    run("gpu.py", "--small", "--device", "cpu", "--reps", "1", "--decode-steps", "1", "--only", "prefill", "decode",
        "--prefill-modes", "compiled", "--decode-modes", "cudagraphs", "--backend", "eager", "--out", str(out))
    result = json.loads(out.read_text())
    assert [(r["case"], r["mode"], r["batch"]) for r in result["rows"]] == [
        ("prefill", "compiled", 1), ("prefill", "compiled", 8), ("prefill", "compiled", 1), ("prefill", "compiled", 4),
        ("decode", "cudagraphs", 1), ("decode", "cudagraphs", 32), ("decode", "cudagraphs", 8)]
    assert all(r["dense_s"] > 0 and r["pmod_s"] > 0 and 0.5 < r["flops_ratio"] < 0.75 for r in result["rows"])
    ideal = [r for r in result["rows"] if "ideal_s" in r]  # every prefill, and only prefills, times the ideal one
    assert [r["case"] for r in ideal] == ["prefill"] * 4 and all(r["ideal_s"] > 0 for r in ideal)
    assert result["machine"]["torch"] and out.with_suffix(".md").read_text().count("\n| ") == 8  # header + rows


def test_compiled_benchmark(tmp_path):
    """benchmarks/compiled.py: every mode (eager and compiled prefill, dynamic, static and compiled decoding) for both
    models, at a tiny shape with the eager backend (the graphs, not inductor's compile time)."""
    out = tmp_path / "compiled.json"
    run("compiled.py", *TINY, "--vision-tokens", "32", "--reps", "1", "--steps", "2", "--backend", "eager",
        "--out", str(out))
    result = json.loads(out.read_text())
    assert [(r["case"], r["cache"], r["compiled"]) for r in result["rows"]] == [
        ("prefill", "none", False), ("prefill", "none", True), ("decode", "dynamic", False),
        ("decode", "static", False), ("decode", "static", True)]
    assert all(r["dense_s"] > 0 and r["pmod_s"] > 0 and r["ratio_q1"] <= r["ratio_q3"] for r in result["rows"])
    assert [r["case"] for r in result["rows"] if r.get("ideal_s", 0) > 0] == ["prefill", "prefill"]
    assert 0 < result["flops_ratio"] < 1 and result["load"] == "idle"
    assert out.with_suffix(".md").read_text().count("\n| ") == 5  # a row per mode


def test_threads_benchmark(tmp_path):
    out = tmp_path / "threads.json"
    run("threads.py", "--seconds", "0.3", "--reps", "1", "--threads", "2", "--policies", "PASSIVE", "--loads", "idle",
        "busy", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["load"], r["threads"], r["wait_policy"]) for r in rows] == [
        ("idle", 2, "PASSIVE"), ("one busy process", 2, "PASSIVE")]
    assert all(r["step_ms"] > 0 for r in rows) and out.with_suffix(".md").read_text().count("\n| ") == 2  # rows


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_ideal_prefill_computes_what_pmod_computes(attn, monkeypatch):
    """compiled.py's ideal prefill (dense layers on p-MoD's processed counts, no routing) is p-MoD's computation, at
    every position: equal to p-MoD when p-MoD processes the first tokens (text first, then the targets; zero routers
    rank by position, so each layer keeps the first k targets, and skipped ones pass with g = beta = 1), and to dense
    when every routed layer keeps every token."""
    import copy

    import torch

    import pmod

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from common import dense_model, ideal_prefill_runner, prefill_runner

    args = type("Args", (), dict(layers=6, hidden=64, intermediate=128, heads=4, attn=attn, dtype="float32",
                                 device="cpu"))()
    dense = dense_model(args)
    ids = torch.randint(0, 1024, (2, 40))
    target = (torch.arange(40) >= 8).expand(2, 40)  # 8 text tokens, then 32 targets
    routed = pmod.apply_pmod(copy.deepcopy(dense), pmod.PModConfig())
    assert len({spec.keep_ratio for spec in routed.pmod.layers}) > 1  # routed layers process different counts
    with torch.no_grad():
        ideal = ideal_prefill_runner(dense, routed, ids, target, logits_to_keep=0)()  # (B, T, V)
        torch.testing.assert_close(ideal, prefill_runner(routed, ids, target, logits_to_keep=0)())
        assert not torch.allclose(ideal, prefill_runner(dense, ids, None, logits_to_keep=0)(), atol=1e-3)
        keep_all = pmod.apply_pmod(copy.deepcopy(dense), pmod.PModConfig(schedule=[1.0] * 6, routed_layers=[2, 4]))
        torch.testing.assert_close(ideal_prefill_runner(dense, keep_all, ids, target, logits_to_keep=0)(),
                                   prefill_runner(dense, ids, None, logits_to_keep=0)())
    with pytest.raises(ValueError, match="same number of routing targets"):
        ideal_prefill_runner(dense, routed, ids, target & (torch.arange(2)[:, None] == 0))


@pytest.mark.parametrize("script", ["prefill", "decode", "efficiency", "compiled", "threads"])
def test_a_run_by_hand_never_writes_the_committed_results(script, monkeypatch):
    """Trying a benchmark writes under runs/benchmarks/ (ignored by git); only `make bench` passes --out into
    benchmarks/results/."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module(script)
    out = module.parse_args([]).out
    assert out.resolve().is_relative_to(ROOT / "runs" / "benchmarks"), out
    makefile = (ROOT / "Makefile").read_text()
    assert f"benchmarks/{script}.py" in makefile and f"--out benchmarks/results/{script}_cpu.json" in makefile


def test_serve_benchmark(tmp_path):
    """benchmarks/serve.py: dense and p-MoD servers on localhost under concurrent streaming clients, at a tiny shape."""
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    out = tmp_path / "serve.json"
    run("serve.py", "--layers", "4", "--hidden", "64", "--image-size", "56", "--concurrency", "1", "2", "--requests",
        "3", "--max-tokens", "2", "--rounds", "1", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    for r in rows:
        for name in ("dense", "pmod"):
            assert r[name]["completion_tokens"] == 3 * 2 and r[name]["requests_per_s"] > 0
            assert 0 < r[name]["ttft_p50_s"] <= r[name]["latency_p90_s"]
    assert out.with_suffix(".md").read_text().count("\n| ") == 3
