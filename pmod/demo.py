"""The built-in demo: a miniature p-MoD experiment on CPU, run through the library's own pipeline.

Synthetic shapes VQA data (`pmod.synthetic`) -> a dense baseline and a p-MoD model trained with the same seed,
data and steps (`pmod.train`) -> both evaluated on the test split (`pmod.evaluate`) -> prefill FLOPs and KV
(`pmod.efficiency`), measured prefill latency, training time -> ``report.md``, ``report.json`` (with the
architecture's name in them for other architectures than LLaVA: ``report-qwen2-vl.md``), training curves
and a kept-token map (`pmod.viz`). Every stage writes its results into the output folder and is skipped when
they are already there, so an interrupted demo continues where it stopped and ablations reuse the baseline.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import PModConfigError
from .files import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)


@dataclass
class DemoSize:
    """How big the demo is: data, model, training and timing repetitions."""

    n_train: int
    n_test: int
    layers: int
    hidden: int
    epochs: float
    batch: int
    lr: float
    train_questions: int  # questions per training image: more supervision for the same vision compute
    reps: int  # timing repetitions
    grid: int = 2  # shapes sit in a grid x grid layout
    max_shapes: int = 3
    n_val: int = 50


# Chosen by measurement on 2 CPU cores: small batches (many steps) and four questions per training image are
# what lets a from-scratch tiny LLaVA learn to look at the image within minutes.
QUICK = DemoSize(n_train=1200, n_test=200, layers=6, hidden=64, epochs=1, batch=8, lr=2e-3, train_questions=4, reps=3)
FULL = DemoSize(n_train=6000, n_test=500, layers=8, hidden=128, epochs=2, batch=8, lr=1e-3, train_questions=4, reps=7)
# The tiny Qwen2-VL at FULL's lr 1e-3 left its dense baseline at 49% and 51% (seeds 0, 1; majority baseline 44%);
# lr 5e-4 reached 58% in the same steps (3 epochs at 1e-3: 59%), measured with dense runs on this data.
FULL_QWEN = dataclasses.replace(FULL, lr=5e-4)


@dataclass
class DemoConfig:
    """Sizes and switches of the demo.

    Attributes:
        out: output folder.
        quick: the smoke-test size (about two minutes on two CPU cores) instead of the full one (about ten).
        schedule: ``shifted_cos`` (progressive ratio decay) or ``constant`` (ablation: ``average_ratio`` from
            layer 2 on).
        tanh_norm, string: ablation switches (see `pmod.PModConfig`).
        seed: seed of the data, the initial weights and the batch order (both models share it).
        size: explicit sizes instead of the quick or full preset.
        arch: ``llava`` (tiny CLIP + Llama, LLaVA-1.5 layout) or ``qwen2-vl`` / ``qwen2.5-vl`` (tiny Qwen2-VL-style
            model: dynamic-resolution patches, M-RoPE, ChatML). Other architectures keep their models and
            reports apart (``qwen2-vl-dense/``, ``report-qwen2-vl.md``), so runs of several architectures can
            share the output folder, one run after the other (each run rewrites the shared ``data/``).
    """

    out: str | os.PathLike = "demo-output"
    quick: bool = False
    schedule: str = "shifted_cos"
    tanh_norm: bool = True
    string: bool = True
    seed: int = 0
    size: DemoSize | None = None
    arch: str = "llava"

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise PModConfigError(f"demo arch must be one of {', '.join(ARCHES)}, got {self.arch!r}")

    def folder(self, name: str) -> str:
        """The output subfolder of a trained variant."""
        return name if self.arch == "llava" else f"{self.arch}-{name}"

    def file(self, name: str) -> str:
        """The name of a report file (``report.md`` -> ``report-qwen2-vl.md`` for other architectures)."""
        if self.arch == "llava":
            return name
        stem, dot, ext = name.rpartition(".")
        return f"{stem}-{self.arch}{dot}{ext}"

    def tiny_model(self, size: dict[str, Any], words: list[str]) -> dict[str, Any]:
        """`pmod.train.build_tiny` settings: 64 vision tokens per image for every architecture."""
        common = {"num_layers": size["layers"], "hidden_size": size["hidden"], "seed": self.seed, "words": words}
        if self.arch == "llava":
            return {**common, "image_size": IMAGE_SIZE, "patch_size": PATCH}
        # 7-pixel patches merged 2 x 2: (112 / 14)^2 = 64 tokens, as LLaVA's 14-pixel patches give
        return {**common, "arch": self.arch, "image_size": IMAGE_SIZE, "patch_size": PATCH // 2}

    def sizes(self) -> dict[str, Any]:
        full = FULL if self.arch == "llava" else FULL_QWEN
        return dataclasses.asdict(self.size or (QUICK if self.quick else full))

    def pmod_settings(self) -> dict[str, Any]:
        if self.schedule not in ("shifted_cos", "constant"):
            raise PModConfigError(f"demo schedule must be 'shifted_cos' or 'constant', got {self.schedule!r}")
        settings: dict[str, Any] = {"schedule": self.schedule, "tanh_norm": self.tanh_norm, "string": self.string}
        if self.schedule == "constant":
            settings.update(average_ratio=0.5, constant_start=2, constant_end=None)
        return settings

    def pmod_name(self) -> str:
        parts = ["pmod"]
        if self.schedule != "shifted_cos":
            parts.append(self.schedule)
        if not self.tanh_norm:
            parts.append("no-tanhnorm")
        if not self.string:
            parts.append("no-string")
        return "-".join(parts)


IMAGE_SIZE, PATCH = 112, 14  # 8 x 8 = 64 vision tokens per image
LEARNED_MARGIN = 0.10  # the dense baseline must beat the majority-per-type answer by this much to compare against
ARCHES = ("llava", "qwen2-vl", "qwen2.5-vl")
MODEL_NAMES = {"llava": "tiny LLaVA", "qwen2-vl": "tiny Qwen2-VL-style model", "qwen2.5-vl": "tiny Qwen2.5-VL-style model"}


def _train_variant(name: str, pmod: dict[str, Any] | None, data, demo: DemoConfig, out: Path) -> dict[str, Any]:
    """Train one model (or reuse a finished run with the same recipe); returns its training summary."""
    from .train import TrainConfig, train

    size = demo.sizes()
    folder = out / demo.folder(name)
    config = TrainConfig(
        output_dir=str(folder),
        tiny_model=demo.tiny_model(size, data.vocabulary()),
        pmod=pmod,
        data_path=str(data.train_json),
        image_folder=str(data.image_dir),
        freeze_vision_tower=False,  # the tiny vision encoder starts random: it has to learn too
        model_max_length=512,
        trainer={"learning_rate": size["lr"], "warmup_steps": 0.05, "num_train_epochs": size["epochs"],
                 "per_device_train_batch_size": size["batch"], "logging_steps": 10, "save_steps": 200,
                 "seed": demo.seed, "report_to": ["tensorboard"]},
    )
    summary_path = folder / "train_summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("recipe") == config.to_dict():
            logger.info("%s: reusing the finished training run in %s", name, folder)
            return {**summary, "reused": True}
    recipe = folder / "pmod_train.yaml"
    if recipe.is_file() and yaml.safe_load(recipe.read_text()) != config.to_dict():
        # A run of other settings (another seed or size) in this folder: the demo owns it, start it afresh
        # (its checkpoints and test predictions would otherwise be resumed and re-scored).
        logger.info("%s: settings changed, discarding the earlier run in %s", name, folder)
        shutil.rmtree(folder)
    logger.info("training %s (%s)", name, "dense baseline" if pmod is None else f"p-MoD {pmod}")
    result = train(config)
    summary = {
        "recipe": config.to_dict(),
        "steps": result.global_step,
        "seconds": result.seconds,
        "train_seconds": next((h["train_runtime"] for h in result.log_history if "train_runtime" in h), result.seconds),
        "losses": result.losses,
        "log_history": result.log_history,
        "resumed_from": result.resumed_from,
    }
    write_json_atomic(summary_path, summary)
    return summary


def _evaluate_variant(model, processor, data, folder: Path, batch_size: int) -> dict[str, Any]:
    from .evaluate import evaluate
    from .synthetic import question_type

    records = data.load("test")
    result = evaluate(model.eval(), processor, records, data.image_dir, batch_size=batch_size, max_new_tokens=4,
                      predictions_path=folder / "test_predictions.jsonl", metrics_path=folder / "test_metrics.json",
                      resume=True)
    by_type: dict[str, list[bool]] = {}
    for q in result.records:
        by_type.setdefault(question_type(q.question), []).append(q.correct)
    metrics = result.to_dict()
    metrics["accuracy_by_type"] = {k: sum(v) / len(v) for k, v in sorted(by_type.items())}
    return metrics


def _prefill_latency(models: dict[str, Any], processor, data, reps: int) -> dict[str, float]:
    """Median prefill (one forward over a batch of test prompts) per model, the models interleaved."""
    from .conversation import prompt_and_answer, render
    from .data import Encoder

    names = list(models)
    records = data.load("test")[:16]
    encoder = Encoder(processor, data.image_dir)
    texts = [render(processor, prompt_and_answer(r)[0], add_generation_prompt=True) for r in records]
    images = [img for r in records for img in encoder.images(r)]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up
            models[n].eval()
            models[n](**inputs)
        for _ in range(reps):
            for n in names:
                start = time.perf_counter()
                models[n](**inputs)
                times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def _train_step_latency(models: dict[str, Any], processor, data, reps: int) -> dict[str, float]:
    """Median forward + backward time per model on one training batch, the models interleaved."""
    from .data import LlavaCollator, LlavaDataset

    names = list(models)
    dataset = LlavaDataset(data.load("train")[:16], processor, data.image_dir)
    batch = LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id or 0)([dataset[i] for i in range(len(dataset))])
    times: dict[str, list[float]] = {n: [] for n in names}
    for model in models.values():
        model.train()
    for rep in range(reps + 1):
        for n in names:
            start = time.perf_counter()
            models[n](**batch).loss.backward()
            if rep:  # the first round warms up
                times[n].append(time.perf_counter() - start)
            models[n].zero_grad(set_to_none=True)
    for model in models.values():
        model.eval()
    return {n: statistics.median(t) for n, t in times.items()}


def _plot_curves(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    ax = fig.add_subplot(1, 2, 1)
    for name, s in summaries.items():
        steps = [h["step"] for h in s["log_history"] if "loss" in h]
        ax.plot(steps, [h["loss"] for h in s["log_history"] if "loss" in h], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    for name, s in summaries.items():
        rows = [h for h in s["log_history"] if "routing/router_weight" in h]
        if rows:
            ax.plot([h["step"] for h in rows], [h["routing/router_weight"] for h in rows], label=f"{name}: mean router weight")
    ax.set_xlabel("step")
    ax.set_ylabel("mean TanhNorm weight of vision tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_demo(demo: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the report (also written to ``report.json`` and ``report.md`` in ``demo.out``, or
    to `DemoConfig.file` names for other architectures). One run at a time per output folder: each run rewrites
    the shared data folder."""
    from PIL import Image

    from .conversation import prompt_and_answer
    from .efficiency import prefill_cost, shape_from_config
    from .models import load_pretrained, load_processor
    from .synthetic import SyntheticConfig, write_dataset
    from .viz import visualize

    start = time.perf_counter()
    # plots are the one thing that needs matplotlib (the bench and dev extras): without it, the report has none
    plots = importlib.util.find_spec("matplotlib") is not None
    if not plots:
        logger.warning("matplotlib is not installed: the report will have no plots (pip install 'pmod[bench]')")
    out = Path(demo.out)
    out.mkdir(parents=True, exist_ok=True)
    size = demo.sizes()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    logger.info("[1/6] writing the synthetic shapes dataset")
    data = write_dataset(out / "data", SyntheticConfig(
        image_size=IMAGE_SIZE, n_train=size["n_train"], n_val=size["n_val"], n_test=size["n_test"], seed=demo.seed,
        grid=size["grid"], max_shapes=size["max_shapes"], train_questions=size["train_questions"]))

    logger.info("[2/6] training the dense baseline")
    pmod_name = demo.pmod_name()
    summaries = {"dense": _train_variant("dense", None, data, demo, out)}
    logger.info("[3/6] training %s", pmod_name)
    summaries[pmod_name] = _train_variant(pmod_name, demo.pmod_settings(), data, demo, out)

    # Both variants share the tokenizer and image processor (built from the same data); each model is loaded once.
    models = {n: load_pretrained(out / demo.folder(n)).eval() for n in summaries}
    processor = load_processor(out / demo.folder(pmod_name))
    logger.info("[4/6] evaluating on %d test questions", size["n_test"])
    metrics = {n: _evaluate_variant(m, processor, data, out / demo.folder(n), batch_size=32) for n, m in models.items()}

    logger.info("[5/6] measuring prefill latency and counting FLOPs")
    latency = _prefill_latency(models, processor, data, size["reps"])
    step = _train_step_latency(models, processor, data, size["reps"])
    routed_model = models[pmod_name]
    vision_tokens = (IMAGE_SIZE // PATCH) ** 2
    text_tokens = _mean_text_tokens(processor, data)
    cost = prefill_cost(shape_from_config(routed_model.config, "demo"), vision_tokens, round(text_tokens),
                        resolved=routed_model.pmod, causal=True)

    if plots:
        logger.info("[6/6] drawing training curves and kept-token maps")
        _plot_curves(summaries, out / demo.file("training_curves.png"))
        record = data.load("test")[0]
        question = prompt_and_answer(record)[0][0]["content"][-1]["text"]
        with Image.open(data.image_dir / record["image"]) as image:
            visualize(routed_model, processor, image.convert("RGB"), question, out / demo.file("routing.png"),
                      title=f"{pmod_name}: kept vision tokens per routed layer")

    dense, routed = metrics["dense"], metrics[pmod_name]
    majority = data.stats["test"]["per_type_majority_baseline"]
    accuracy_gap = routed["accuracy"] - dense["accuracy"]
    report = {
        "settings": {**{k: v for k, v in dataclasses.asdict(demo).items() if k != "size"}, "out": str(out), **size, "vision_tokens": vision_tokens,
                     "mean_text_tokens": text_tokens, "pmod": demo.pmod_settings(),
                     "layer_ratios": routed_model.pmod.layer_ratios, "torch_threads": torch.get_num_threads()},
        "dataset": {"majority_answer_accuracy": majority},
        "accuracy": {"dense": dense["accuracy"], pmod_name: routed["accuracy"], "gap_points": 100 * accuracy_gap},
        "accuracy_by_type": {"dense": dense["accuracy_by_type"], pmod_name: routed["accuracy_by_type"]},
        "prefill_flops": {"dense": cost.dense_flops, pmod_name: cost.pmod_flops,
                          "ratio": cost.flops_ratio, "realised_ratio": routed["flops_ratio"]},
        "kv_cache": {"vision_kv_ratio": cost.kv_ratio, "realised_kv_ratio": routed["kv_ratio"],
                     "cache_bytes_ratio": routed["kv_cache_ratio"]},
        "prefill_latency_s": {**latency, "ratio": latency[pmod_name] / latency["dense"]},
        "train_step_s": {**step, "ratio": step[pmod_name] / step["dense"]},
        "training_s": {"dense": summaries["dense"]["train_seconds"], pmod_name: summaries[pmod_name]["train_seconds"],
                       "ratio": summaries[pmod_name]["train_seconds"] / summaries["dense"]["train_seconds"]},
        "final_loss": {n: s["losses"][-1] for n, s in summaries.items()},
        "targets": {
            # a comparison with a baseline that barely beats answering by the question type says nothing
            "dense_baseline_learned": majority is None or dense["accuracy"] >= majority + LEARNED_MARGIN,
            "accuracy_within_2_points": abs(accuracy_gap) <= 0.02 or accuracy_gap > 0,
            "flops_at_most_65_percent": cost.flops_ratio <= 0.65,
        },
        "plots": plots,
        "seconds": time.perf_counter() - start,
        "reused_training": [n for n, s in summaries.items() if s.get("reused")],
        "machine": _machine(),
    }
    write_json_atomic(out / demo.file("report.json"), report)
    write_text_atomic(out / demo.file("report.md"), _markdown(report, pmod_name, demo))
    return report


def _machine() -> dict[str, Any]:
    """What the timings were measured on."""
    import platform

    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _mean_text_tokens(processor, data) -> float:
    """Mean number of non-image prompt tokens of the test questions (what the decoder sees besides the image)."""
    from .conversation import prompt_and_answer, render

    records = data.load("test")
    counts = []
    for r in records:
        text = render(processor, prompt_and_answer(r)[0], add_generation_prompt=True)
        counts.append(len(processor.tokenizer(text)["input_ids"]) - 1)  # minus the one <image> placeholder
    return sum(counts) / len(counts)


def _markdown(r: dict[str, Any], name: str, demo: DemoConfig) -> str:
    s, acc, fl, lat, tr, kv = r["settings"], r["accuracy"], r["prefill_flops"], r["prefill_latency_s"], r["training_s"], r["kv_cache"]
    st = r["train_step_s"]
    ok = {True: "met", False: "**not met**"}
    targets = r["targets"]
    accuracy_verdict = ok[targets["accuracy_within_2_points"]]
    if not targets.get("dense_baseline_learned", True):
        accuracy_verdict = (f"**inconclusive** (the dense baseline is less than {100 * LEARNED_MARGIN:.0f} points above the "
                            "majority-per-type answer: it did not learn enough to compare against)")
    types = sorted(r["accuracy_by_type"]["dense"])
    # binomial standard errors of the two accuracies, combined (independent test answers)
    difference_se = 100 * math.sqrt(sum(a * (1 - a) for a in (acc["dense"], acc[name])) / s["n_test"])
    lines = [
        "# p-MoD demo report",
        "",
        f"A {MODEL_NAMES[demo.arch]} with {s['layers']} layers (hidden size {s['hidden']}, {s['vision_tokens']} vision tokens per image) trained "
        f"from scratch on {s['n_train']} synthetic shapes images ({s['train_questions']} questions each) for {s['epochs']} "
        f"epoch(s), dense and p-MoD with the "
        f"same seed, data and steps; tested on {s['n_test']} questions. p-MoD settings: {s['pmod']}. "
        f"Layer keep ratios: {', '.join(f'{x:.2f}' for x in s['layer_ratios'])}.",
        "",
        "| | dense | " + name + " | ratio |",
        "|---|---|---|---|",
        f"| test accuracy | {acc['dense']:.1%} | {acc[name]:.1%} | {acc['gap_points']:+.1f} points |",
        f"| prefill FLOPs (decoder, analytic, causal) | {fl['dense'] / 1e6:.1f} M | {fl[name] / 1e6:.1f} M | {fl['ratio']:.3f} |",
        f"| prefill FLOPs realised on the test set | | | {fl['realised_ratio']:.3f} |",
        f"| vision-token KV entries | | | {kv['vision_kv_ratio']:.3f} (realised {kv['realised_kv_ratio']:.3f}) |",
        f"| KV-cache bytes after generation | | | {kv['cache_bytes_ratio']:.3f} |",
        f"| prefill latency (batch 16, median of {s['reps']}) | {lat['dense'] * 1e3:.1f} ms | {lat[name] * 1e3:.1f} ms | {lat['ratio']:.3f} |",
        f"| training step, forward + backward (batch 16, median of {s['reps']}) | {st['dense'] * 1e3:.1f} ms | {st[name] * 1e3:.1f} ms | {st['ratio']:.3f} |",
        f"| whole training run (run one after the other) | {tr['dense']:.0f} s | {tr[name]:.0f} s | {tr['ratio']:.3f} |",
        f"| final training loss | {r['final_loss']['dense']:.3f} | {r['final_loss'][name]:.3f} | |",
        "",
        f"Targets: accuracy within 2 points of dense: {accuracy_verdict}; "
        f"prefill FLOPs at most 65% of dense: {ok[r['targets']['flops_at_most_65_percent']]}. "
        f"On {s['n_test']} questions the accuracy difference has a standard error of {difference_se:.1f} points.",
        "",
        "Accuracy by question type:",
        "",
        "| type | dense | " + name + " |",
        "|---|---|---|",
        *[f"| {t} | {r['accuracy_by_type']['dense'][t]:.1%} | {r['accuracy_by_type'][name].get(t, float('nan')):.1%} |" for t in types],
        "",
        "Always answering each question type's most common answer scores "
        f"{r['dataset']['majority_answer_accuracy'] or float('nan'):.1%}.",
        "",
        *([f"![training curves]({demo.file('training_curves.png')})", "",
           f"![kept vision tokens]({demo.file('routing.png')})", ""] if r.get("plots", True)
          else ["(No plots: matplotlib was not installed; `pip install 'pmod[bench]'` adds it.)", ""]),
        f"Wall time of this run: {r['seconds']:.0f} s"
        + (f" (training reused from an earlier run: {', '.join(r['reused_training'])})" if r["reused_training"] else "")
        + f" on {r['machine']['cpu']} ({r['machine']['cores']} cores, "
        f"{s['torch_threads']} torch threads; torch {r['machine']['torch']}, transformers "
        f"{r['machine']['transformers']}). Finished stages are reused "
        "when the demo is run again in the same folder. Latency on a small CPU model includes fixed per-layer "
        "costs that do not shrink with the token count, so its ratio sits above the FLOP ratio. The latency and "
        "training-step ratios are measured side by side (models interleaved); the whole-run times are not, and also "
        "carry data loading, optimizer steps and whatever else ran on the machine.",
        "",
    ]
    return "\n".join(lines)
