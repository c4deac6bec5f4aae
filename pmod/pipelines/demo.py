"""The built-in demo: a miniature p-MoD experiment on CPU, run through the library's own pipeline.

It follows the paper's recipe in miniature: p-MoD is not trained from scratch but converted from a trained dense
model and fine-tuned, and the vision encoder comes pretrained and stays frozen. Per seed: stage 0 pretrains a tiny
LLaVA's vision tower on the images' per-cell shape and colour labels (`pmod.pipelines.vision_pretrain`, the miniature
of CLIP); stage 1 trains the dense model around the frozen tower on synthetic shapes VQA data (`pmod.data.synthetic`,
`pmod.pipelines.train`); stage 2 fine-tunes a dense model and a p-MoD model from that checkpoint with the same seed,
data and steps; all are evaluated on the test split (`pmod.pipelines.evaluate`). The report gives the accuracies over
seeds as mean and standard deviation, per question type too, next to prefill FLOPs and KV (`pmod.efficiency`), measured
prefill latency and training time: ``report.md``, ``report.json`` (with the architecture's name in them for other
architectures than LLaVA: ``report-qwen2-vl.md``), training curves and a kept-token map (`pmod.pipelines.viz`). Every
stage writes its results into the output folder and is skipped when they are already there, so an interrupted
demo continues where it stopped and ablations reuse the pretrained and dense models.
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

from ..errors import PModConfigError
from ..files import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)


@dataclass
class DemoSize:
    """How big the demo is: data, model, the two training stages, seeds and timing repetitions."""

    n_train: int
    n_test: int
    layers: int
    hidden: int
    pretrain_epochs: float  # stage 1: the dense model every variant of a seed starts from
    finetune_epochs: float  # stage 2: dense and p-MoD, each from the stage-1 model
    batch: int
    lr: float  # stage 1
    finetune_lr: float  # stage 2
    train_questions: int  # questions per training image: more supervision for the same vision compute
    seeds: int  # independent repetitions (model initialisation and batch order; the data stay)
    reps: int  # timing repetitions
    vision_hidden: int = 32
    # stage 0 (LLaVA only): steps of pretraining the vision tower on per-cell labels, which then stays frozen, as
    # LLaVA keeps its CLIP frozen; 0 = no stage 0, the vision tower starts random and trains with the rest
    vision_steps: int = 0
    grid: int = 2  # shapes sit in a grid x grid layout
    max_shapes: int = 3
    # side of a shape as a fraction of its cell's: at 14-pixel patches, circles of 0.55 are hard to tell from squares
    # (a tower pretrained 1500 steps: 78% of shapes right at (0.55, 0.8), 91% at (0.7, 0.9))
    shape_size: tuple[float, float] = (0.7, 0.9)
    n_val: int = 50


QUICK = DemoSize(n_train=1200, n_test=200, layers=6, hidden=64, pretrain_epochs=0.5, finetune_epochs=0.5, batch=8,
                 lr=2e-3, finetune_lr=1e-3, train_questions=4, seeds=1, reps=3, vision_steps=300)
# Chosen by measurement on 2 CPU cores (issue 19): with a 32-wide vision encoder the dense model learned to tell
# shapes apart on some seeds only (50% and 56% after 1500 steps, 44% answering by question type); 64 wide, 61%.
# A random vision tower trained through the answers never learned shapes (shape questions at the majority answer on
# every seed and setting tried); pretrained on per-cell labels and frozen (stage 0), it tells them apart.
FULL = DemoSize(n_train=6000, n_test=500, layers=8, hidden=128, pretrain_epochs=2.0, finetune_epochs=0.5, batch=8,
                lr=1e-3, finetune_lr=5e-4, train_questions=4, seeds=3, reps=7, vision_hidden=128, vision_steps=1500)
# The tiny Qwen2-VL at lr 1e-3 left its dense baseline at 49% and 51% (seeds 0, 1; majority baseline 44%);
# lr 5e-4 reached 58% in the same steps.
# (also the full size of the other non-LLaVA architectures, not tuned for them)
FULL_QWEN = dataclasses.replace(FULL, lr=5e-4, finetune_lr=2.5e-4, vision_steps=0)  # stage 0 is LLaVA-only


@dataclass
class DemoConfig:
    """Sizes and switches of the demo.

    Attributes:
        out: output folder.
        quick: the smoke-test size (one seed, under a minute on two CPU cores) instead of the full one.
        schedule: ``shifted_cos`` (progressive ratio decay) or ``constant`` (ablation: ``average_ratio`` from
            layer 2 on).
        tanh_norm, string: ablation switches (see `pmod.PModConfig`).
        seed: the base seed: of the data, and of the first repetition (the others use ``seed + 1``, ...).
        size: explicit sizes instead of the quick or full preset.
        arch: ``llava`` (tiny CLIP + Llama, LLaVA-1.5 layout), ``qwen2-vl`` / ``qwen2.5-vl`` (tiny Qwen2-VL-style
            model: dynamic-resolution patches, M-RoPE, ChatML), ``qwen3-vl`` (tiny Qwen3-VL-style model: as
            Qwen2-VL with interleaved M-RoPE and DeepStack) or ``gemma3`` (tiny Gemma 3-style model: a SigLIP-style
            tower pooled 2 x 2, sliding-window and global layers). Other architectures keep their models and
            reports apart (``qwen2-vl/``, ``report-qwen2-vl.md``), so runs of several architectures can
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

    def folder(self, name: str, seed: int) -> str:
        """The output subfolder of a trained variant: ``seed0/dense``, ``qwen2-vl/seed0/pmod``."""
        return f"seed{seed}/{name}" if self.arch == "llava" else f"{self.arch}/seed{seed}/{name}"

    def file(self, name: str) -> str:
        """The name of a report file (``report.md`` -> ``report-qwen2-vl.md`` for other architectures)."""
        if self.arch == "llava":
            return name
        stem, dot, ext = name.rpartition(".")
        return f"{stem}-{self.arch}{dot}{ext}"

    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.sizes()["seeds"])]

    def tiny_model(self, size: dict[str, Any], words: list[str], seed: int) -> dict[str, Any]:
        """`pmod.tiny.build_tiny` settings (`pmod.tiny.TinyModelSettings`): 64 vision tokens per image
        for every architecture."""
        common = {"num_layers": size["layers"], "hidden_size": size["hidden"], "seed": seed, "words": words}
        if self.arch == "llava":
            return {**common, "image_size": IMAGE_SIZE, "patch_size": PATCH,
                    "vision_hidden_size": size["vision_hidden"]}
        # 7-pixel patches merged (Qwen) or pooled (Gemma 3) 2 x 2: (112 / 14)^2 = 64 tokens, as LLaVA's 14-pixel
        # patches give
        return {**common, "arch": self.arch, "image_size": IMAGE_SIZE, "patch_size": PATCH // 2}

    def vision_stage(self) -> bool:
        """Whether a stage 0 pretrains (then freezes) the vision tower: LLaVA with ``vision_steps`` > 0."""
        return self.arch == "llava" and self.sizes()["vision_steps"] > 0

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
# A comparison needs a dense baseline that learned the task: this far above the majority-per-type answer on every
# seed (below LEARNED_MARGIN the comparison is inconclusive; TARGET_MARGIN is the demo's target for both models).
LEARNED_MARGIN, TARGET_MARGIN = 0.10, 0.14
ARCHES = ("llava", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "gemma3")
MODEL_NAMES = {"llava": "tiny LLaVA", "qwen2-vl": "tiny Qwen2-VL-style model",
               "qwen2.5-vl": "tiny Qwen2.5-VL-style model", "qwen3-vl": "tiny Qwen3-VL-style model",
               "gemma3": "tiny Gemma 3-style model"}


def _train_variant(name: str, seed: int, pmod: dict[str, Any] | None, data, demo: DemoConfig, out: Path,
                   init: Path | None = None, stage: str = "finetune") -> dict[str, Any]:
    """Train one model for ``stage`` (``pretrain``: stage 1, ``finetune``: stage 2) from ``init`` (a random tiny model
    when None), or reuse a finished run with the same recipe; returns its training summary."""
    from .recipe import TrainConfig
    from .train import train

    size = demo.sizes()
    folder = out / demo.folder(name, seed)
    source = ({"model_name_or_path": str(init)} if init
              else {"tiny_model": demo.tiny_model(size, data.vocabulary(), seed)})
    pretrain = stage == "pretrain"
    config = TrainConfig(
        output_dir=str(folder),
        **source,
        pmod=pmod,
        data_path=str(data.train_json),
        image_folder=str(data.image_dir),
        # a vision tower pretrained in stage 0 stays frozen (as LLaVA's CLIP); a random one has to learn too
        freeze_vision_tower=demo.vision_stage(),
        model_max_length=512,
        trainer={"learning_rate": size["lr"] if pretrain else size["finetune_lr"], "warmup_steps": 0.05,
                 "num_train_epochs": size["pretrain_epochs"] if pretrain else size["finetune_epochs"],
                 "per_device_train_batch_size": size["batch"], "logging_steps": 10, "save_steps": 200,
                 "seed": seed, "report_to": ["tensorboard"]},
    )
    summary_path = folder / "train_summary.json"
    finished = _finished(summary_path, config.to_dict(), data, demo)
    if finished:
        logger.info("%s (seed %d): reusing the finished training run in %s", name, seed, folder)
        return finished
    recipe = folder / "pmod_train.yaml"
    if folder.is_dir() and ((recipe.is_file() and yaml.safe_load(recipe.read_text()) != config.to_dict())
                            or not _same_stamp(folder, data, demo)):
        # A run of other settings (another size, other data) in this folder: the demo owns it, start it afresh
        # (its checkpoints and test predictions would otherwise be resumed and re-scored).
        logger.info("%s (seed %d): settings changed, discarding the earlier run in %s", name, seed, folder)
        shutil.rmtree(folder)
    _write_stamp(folder, data, demo)
    logger.info("seed %d: training %s (%s)", seed, name, "dense" if pmod is None else f"p-MoD {pmod}")
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


def _finished(summary_path: Path, recipe: dict[str, Any], data, demo: DemoConfig) -> dict[str, Any] | None:
    """The summary of a finished stage run with ``recipe`` on the same data and sizes (marked ``reused``), or None."""
    if not (summary_path.is_file() and _same_stamp(summary_path.parent, data, demo)):
        return None
    summary = json.loads(summary_path.read_text())
    return {**summary, "reused": True} if summary.get("recipe") == recipe else None


def _stamp(data, demo: DemoConfig) -> dict[str, Any]:
    """What every stage of a seed depends on besides its own recipe: the data (a recipe names only its path, and
    another ``--seed`` rewrites the data there) and the sizes (stage 1 names stage 0's folder, not its settings)."""
    return json.loads(json.dumps({"dataset": dataclasses.asdict(data.config), "size": demo.sizes()}))


def _same_stamp(folder: Path, data, demo: DemoConfig) -> bool:
    path = folder / "demo_stamp.json"
    return path.is_file() and json.loads(path.read_text()) == _stamp(data, demo)


def _write_stamp(folder: Path, data, demo: DemoConfig) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "demo_stamp.json", _stamp(data, demo))


def _pretrain_vision(seed: int, data, demo: DemoConfig, out: Path) -> dict[str, Any]:
    """Stage 0: a random tiny model whose vision tower is pretrained on the training images' per-cell labels
    (`pmod.pipelines.vision_pretrain`), saved with its processor to ``seedS/vision``; reuses a finished one with the
    same recipe. Returns the summary (held-out shape, colour and position accuracy)."""
    from ..data.images import load_image
    from ..tiny import TinyModelSettings, build_tiny
    from .vision_pretrain import pretrain_vision_tower

    size = demo.sizes()
    folder = out / demo.folder("vision", seed)
    # the data are in the stamp (`_stamp`)
    recipe = {"tiny_model": demo.tiny_model(size, data.vocabulary(), seed), "steps": size["vision_steps"],
              "batch": size["batch"], "lr": size["lr"]}
    summary_path = folder / "vision_summary.json"
    finished = _finished(summary_path, recipe, data, demo)
    if finished:
        logger.info("vision (seed %d): reusing the pretrained vision tower in %s", seed, folder)
        return finished
    logger.info("seed %d: pretraining the vision tower (%d steps)", seed, size["vision_steps"])
    model, processor = build_tiny(TinyModelSettings(**recipe["tiny_model"]), data.vocabulary())
    records = data.load("train")
    labels = data.cell_labels("train")
    images = [load_image(data.image_dir / r["image"]) for r in records]
    metrics = pretrain_vision_tower(model, processor, images, [labels[r["id"]] for r in records], grid=data.config.grid,
                                    steps=size["vision_steps"], batch_size=size["batch"], lr=size["lr"], seed=seed)
    _write_stamp(folder, data, demo)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    summary = {"recipe": recipe, **metrics}
    write_json_atomic(summary_path, summary)  # last: a folder without it is an unfinished stage
    return summary


def _evaluate_variant(model, processor, data, folder: Path, batch_size: int) -> dict[str, Any]:
    from ..data.synthetic import question_type
    from .evaluate import evaluate

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
    from ..data.conversation import prompt_and_answer, render
    from ..data.records import Encoder
    from .generation import encode

    names = list(models)
    records = data.load("test")[:16]
    encoder = Encoder(processor, data.image_dir)
    texts = [render(processor, prompt_and_answer(r)[0], add_generation_prompt=True) for r in records]
    images = [encoder.images(r) for r in records]
    # the inputs `pmod eval` gives each model (left-padded; for p-MoD with its routing counts from the host)
    inputs = {n: encode(models[n], processor, texts, images) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up
            models[n].eval()
            models[n](**inputs[n])
        for _ in range(reps):
            for n in names:
                start = time.perf_counter()
                models[n](**inputs[n])
                times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def _train_step_latency(models: dict[str, Any], processor, data, reps: int) -> dict[str, float]:
    """Median forward + backward time per model on one training batch, the models interleaved."""
    from ..data.records import LlavaCollator, LlavaDataset

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


def _plot_curves(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """One seed's training curves: the pretraining run, then both fine-tuning runs from its last step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    ax = fig.add_subplot(1, 2, 1)
    offset = 0
    for name, s in runs.items():
        rows = [h for h in s["log_history"] if "loss" in h]
        ax.plot([offset + h["step"] for h in rows], [h["loss"] for h in rows], label=name)
        if name == "pretrain":
            offset = s["steps"]
    ax.axvline(offset, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("step (fine-tuning starts at the dotted line)")
    ax.set_ylabel("training loss")
    if any("loss" in h for s in runs.values() for h in s["log_history"]):  # a run under one logging interval has none
        ax.set_yscale("log")
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    for name, s in runs.items():
        rows = [h for h in s["log_history"] if "routing/router_weight" in h]
        if rows:
            ax.plot([h["step"] for h in rows], [h["routing/router_weight"] for h in rows],
                    label=f"{name}: mean router weight")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("mean TanhNorm weight of vision tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _spread(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value) of a list."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise_accuracy(metrics: dict[int, dict[str, dict[str, Any]]], pmod_name: str,
                       majority: float | None) -> dict[str, Any]:
    """Accuracies over seeds: ``metrics[seed][variant]`` holds `_evaluate_variant`'s ``accuracy`` and
    ``accuracy_by_type`` for the variants ``pretrain``, ``dense`` and ``pmod_name``. Returns the report's
    ``accuracy`` (means; ``gap_points`` is p-MoD minus dense in points), ``accuracy_sd`` (sample standard
    deviations), ``accuracy_by_seed``, ``accuracy_by_type`` (means) and the accuracy ``targets``."""
    seeds = list(metrics)
    variants = list(metrics[seeds[0]])
    accuracy = {n: [metrics[s][n]["accuracy"] for s in seeds] for n in variants}
    accuracy["gap_points"] = [100 * (r - d) for r, d in zip(accuracy[pmod_name], accuracy["dense"])]
    spread = {n: _spread(a) for n, a in accuracy.items()}
    types = sorted({t for s in seeds for n in variants for t in metrics[s][n]["accuracy_by_type"]})
    lowest = min(min(accuracy["dense"]), min(accuracy[pmod_name]))
    return {
        "accuracy": {n: v["mean"] for n, v in spread.items()},
        "accuracy_sd": {n: v["sd"] for n, v in spread.items()},
        "accuracy_by_seed": {str(s): {n: accuracy[n][i] for n in accuracy} for i, s in enumerate(seeds)},
        "accuracy_by_type": {n: {t: statistics.fmean(metrics[s][n]["accuracy_by_type"].get(t, 0.0) for s in seeds)
                                 for t in types} for n in variants},
        "targets": {
            # a comparison with a baseline that barely beats answering by the question type says nothing
            "dense_baseline_learned": majority is None or min(accuracy["dense"]) >= majority + LEARNED_MARGIN,
            "both_far_above_prior_every_seed": majority is None or lowest >= majority + TARGET_MARGIN,
            "mean_accuracy_within_2_points": spread["gap_points"]["mean"] >= -2.0,
        },
    }


def run_demo(demo: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the report (also written to ``report.json`` and ``report.md`` in ``demo.out``, or
    to `DemoConfig.file` names for other architectures). One run at a time per output folder: each run rewrites
    the shared data folder."""
    from PIL import Image

    from ..data.conversation import prompt_and_answer
    from ..data.synthetic import SyntheticConfig, write_dataset
    from ..efficiency import prefill_cost, shape_from_config
    from ..loading import load_pretrained, load_processor
    from .viz import visualize

    start = time.perf_counter()
    # plots are the one thing that needs matplotlib (the bench and dev extras): without it, the report has none
    plots = importlib.util.find_spec("matplotlib") is not None
    if not plots:
        logger.warning("matplotlib is not installed: the report will have no plots (pip install 'pmod[bench]')")
    out = Path(demo.out)
    out.mkdir(parents=True, exist_ok=True)
    size = demo.sizes()
    seeds = demo.seeds()
    if "OMP_NUM_THREADS" not in os.environ:
        # one thread: for a model this small it is the fastest under the `pmod` command's passive OpenMP waiting and
        # the steadiest beside another busy process (benchmarks/results/threads_cpu.md: 14-17 ms a step whatever
        # runs beside it; 2 passive threads 22-27 ms); OMP_NUM_THREADS chooses otherwise
        torch.set_num_threads(1)

    logger.info("writing the synthetic shapes dataset")
    data = write_dataset(out / "data", SyntheticConfig(
        image_size=IMAGE_SIZE, n_train=size["n_train"], n_val=size["n_val"], n_test=size["n_test"], seed=demo.seed,
        grid=size["grid"], max_shapes=size["max_shapes"], train_questions=size["train_questions"],
        shape_size=size["shape_size"]))

    pmod_name = demo.pmod_name()
    variants = ("pretrain", "dense", pmod_name)
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    vision: dict[int, dict[str, Any]] = {}  # stage 0 summaries
    metrics: dict[int, dict[str, dict[str, Any]]] = {}
    models: dict[str, Any] = {}  # the first seed's, for timing and the kept-token map
    for i, seed in enumerate(seeds):
        logger.info("[seed %d: %d/%d] training the dense base model (stage 1), then fine-tuning dense and %s from it",
                    seed, i + 1, len(seeds), pmod_name)
        init = out / demo.folder("pretrain", seed)
        vision[seed] = _pretrain_vision(seed, data, demo, out) if demo.vision_stage() else {}
        runs[seed] = {"pretrain": _train_variant("pretrain", seed, None, data, demo, out, stage="pretrain",
                                                 init=out / demo.folder("vision", seed) if vision[seed] else None)}
        runs[seed]["dense"] = _train_variant("dense", seed, None, data, demo, out, init=init)
        runs[seed][pmod_name] = _train_variant(pmod_name, seed, demo.pmod_settings(), data, demo, out, init=init)
        logger.info("[seed %d: %d/%d] evaluating on %d test questions", seed, i + 1, len(seeds), size["n_test"])
        if not i:  # every seed's processor is the same (built from the same data)
            processor = load_processor(out / demo.folder(pmod_name, seed))
        metrics[seed] = {}
        for name in variants:
            model = load_pretrained(out / demo.folder(name, seed)).eval()
            metrics[seed][name] = _evaluate_variant(model, processor, data, out / demo.folder(name, seed),
                                                    batch_size=32)
            if i == 0 and name != "pretrain":
                models[name] = model
        logger.info("[seed %d] accuracy: dense base %.1f%%, dense %.1f%%, %s %.1f%%", seed,
                    *(100 * metrics[seed][n]["accuracy"] for n in ("pretrain", "dense")), pmod_name,
                    100 * metrics[seed][pmod_name]["accuracy"])

    logger.info("measuring prefill latency and counting FLOPs")
    latency = _prefill_latency(models, processor, data, size["reps"])
    step = _train_step_latency(models, processor, data, size["reps"])
    routed_model = models[pmod_name]
    vision_tokens = (IMAGE_SIZE // PATCH) ** 2
    text_tokens = _mean_text_tokens(processor, data)
    cost = prefill_cost(shape_from_config(routed_model.config, "demo"), vision_tokens, round(text_tokens),
                        resolved=routed_model.pmod, causal=True)

    if plots:
        logger.info("drawing training curves and kept-token maps")
        _plot_curves(runs[seeds[0]], out / demo.file("training_curves.png"))
        record = data.load("test")[0]
        question = prompt_and_answer(record)[0][0]["content"][-1]["text"]
        with Image.open(data.image_dir / record["image"]) as image:
            visualize(routed_model, processor, image.convert("RGB"), question, out / demo.file("routing.png"),
                      title=f"{pmod_name}: kept vision tokens per routed layer")

    majority = data.stats["test"]["per_type_majority_baseline"]
    seconds = {n: sum(runs[s][n]["train_seconds"] for s in seeds) for n in variants}
    report = {
        "settings": {**{k: v for k, v in dataclasses.asdict(demo).items() if k != "size"}, "out": str(out), **size,
                     "seed_list": seeds, "vision_tokens": vision_tokens, "mean_text_tokens": text_tokens,
                     "pmod": demo.pmod_settings(), "layer_ratios": routed_model.pmod.layer_ratios,
                     "torch_threads": torch.get_num_threads(),
                     "steps": {n: runs[seeds[0]][n]["steps"] for n in variants}},
        "vision_pretraining": ({k: statistics.fmean(vision[s][k] for s in seeds)
                                for k in ("shape_accuracy", "colour_accuracy", "position_accuracy")}
                               if demo.vision_stage() else None),
        "dataset": {"majority_answer_accuracy": majority,
                    "majority_answer_by_type": data.stats["test"].get("majority_baseline_by_type", {})},
        **summarise_accuracy(metrics, pmod_name, majority),
        "prefill_flops": {"dense": cost.dense_flops, pmod_name: cost.pmod_flops,
                          "ratio": cost.flops_ratio, "realised_ratio": metrics[seeds[0]][pmod_name]["flops_ratio"]},
        "kv_cache": {"vision_kv_ratio": cost.kv_ratio, "realised_kv_ratio": metrics[seeds[0]][pmod_name]["kv_ratio"],
                     "cache_bytes_ratio": metrics[seeds[0]][pmod_name]["kv_cache_ratio"]},
        "prefill_latency_s": {**latency, "ratio": latency[pmod_name] / latency["dense"]},
        "train_step_s": {**step, "ratio": step[pmod_name] / step["dense"]},
        "training_s": {**seconds, "ratio": seconds[pmod_name] / seconds["dense"]},
        # nan for runs shorter than one logging interval (tiny custom sizes)
        "final_loss": {n: statistics.fmean((runs[s][n]["losses"] or [math.nan])[-1] for s in seeds) for n in variants},
        "plots": plots,
        "seconds": time.perf_counter() - start,
        "reused_training": sorted({f"{n} (seed {s})" for s in seeds for n, r in runs[s].items() if r.get("reused")}),
        "machine": _machine(),
    }
    report["targets"]["flops_at_most_65_percent"] = cost.flops_ratio <= 0.65
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
    from ..data.conversation import prompt_and_answer, render

    records = data.load("test")
    counts = []
    for r in records:
        text = render(processor, prompt_and_answer(r)[0], add_generation_prompt=True)
        counts.append(len(processor.tokenizer(text)["input_ids"]) - 1)  # minus the one <image> placeholder
    return sum(counts) / len(counts)


def _markdown(r: dict[str, Any], name: str, demo: DemoConfig) -> str:
    s, acc, sd, fl, lat, tr, kv = (r[k] for k in ("settings", "accuracy", "accuracy_sd", "prefill_flops",
                                                     "prefill_latency_s", "training_s", "kv_cache"))
    st, targets, majority = r["train_step_s"], r["targets"], r["dataset"]["majority_answer_accuracy"]
    ok = {True: "met", False: "**not met**"}
    accuracy_verdict = ok[targets["mean_accuracy_within_2_points"]]
    if not targets.get("dense_baseline_learned", True):
        accuracy_verdict = (f"**inconclusive** (on some seed the dense model is less than {100 * LEARNED_MARGIN:.0f} "
                            "points above the majority-per-type answer: it did not learn enough to compare against)")
    n = len(r["accuracy_by_seed"])
    by_type_majority = r["dataset"].get("majority_answer_by_type", {})
    steps = s["steps"]
    vision = r.get("vision_pretraining")
    stage0 = (f"the vision tower is pretrained on per-cell shape and colour labels ({s['vision_steps']} steps; "
              f"held-out accuracy per cell, mean over seeds: shape {vision['shape_accuracy']:.1%}, colour "
              f"{vision['colour_accuracy']:.1%}, position {vision['position_accuracy']:.1%}) and then kept frozen, as "
              "LLaVA keeps its pretrained CLIP frozen; " if vision else "from scratch, ")
    lines = [
        "# p-MoD demo report",
        "",
        f"A {MODEL_NAMES[demo.arch]} with {s['layers']} layers (hidden size {s['hidden']}, {s['vision_tokens']} vision "
        f"tokens per image), trained on {s['n_train']} synthetic shapes images ({s['train_questions']} questions each) "
        f"in the paper's stages, in miniature: {stage0}a dense base model is trained (stage 1: "
        f"every weight but a frozen tower, as a recipe's `stage: finetune`, not the projector-only `stage: pretrain`; "
        f"{s['pretrain_epochs']} epoch(s), {steps['pretrain']} steps, learning rate {s['lr']:g}); from it, a dense "
        f"model and a p-MoD model are fine-tuned with the same seed, data and steps ({s['finetune_epochs']} "
        f"epoch(s), {steps['dense']} steps, learning rate {s['finetune_lr']:g}). Tested on {s['n_test']} questions; "
        f"{n} seed(s) "
        f"({', '.join(map(str, s['seed_list']))}: initial weights and batch order). p-MoD settings: {s['pmod']}. "
        f"Layer keep ratios: {', '.join(f'{x:.2f}' for x in s['layer_ratios'])}.",
        "",
        f"| | dense | {name} | difference |",
        "|---|---|---|---|",
        f"| test accuracy, mean ± sd over {n} seed(s) | {acc['dense']:.1%} ± {sd['dense']:.1%} | "
        f"{acc[name]:.1%} ± {sd[name]:.1%} | {acc['gap_points']:+.1f} ± {sd['gap_points']:.1f} points |",
        *[f"| seed {seed} | {a['dense']:.1%} | {a[name]:.1%} | {a['gap_points']:+.1f} points |"
          for seed, a in r["accuracy_by_seed"].items()],
        f"| the dense base model both start from (stage 1) | {acc['pretrain']:.1%} ± {sd['pretrain']:.1%} | | |",
        "",
        f"| cost (seed {s['seed_list'][0]}'s models) | dense | {name} | ratio |",
        "|---|---|---|---|",
        (f"| prefill FLOPs (decoder, analytic, causal) | {fl['dense'] / 1e6:.1f} M | {fl[name] / 1e6:.1f} M | "
         f"{fl['ratio']:.3f} |"),
        f"| prefill FLOPs realised on the test set | | | {fl['realised_ratio']:.3f} |",
        f"| vision-token KV entries | | | {kv['vision_kv_ratio']:.3f} (realised {kv['realised_kv_ratio']:.3f}) |",
        f"| KV-cache bytes after generation | | | {kv['cache_bytes_ratio']:.3f} |",
        (f"| prefill latency (batch 16, median of {s['reps']}) | {lat['dense'] * 1e3:.1f} ms | "
         f"{lat[name] * 1e3:.1f} ms | {lat['ratio']:.3f} |"),
        (f"| training step, forward + backward (batch 16, median of {s['reps']}) | {st['dense'] * 1e3:.1f} ms | "
         f"{st[name] * 1e3:.1f} ms | {st['ratio']:.3f} |"),
        (f"| fine-tuning time, all seeds (run one after the other) | {tr['dense']:.0f} s | {tr[name]:.0f} s | "
         f"{tr['ratio']:.3f} |"),
        f"| final training loss, mean over seeds | {r['final_loss']['dense']:.3f} | {r['final_loss'][name]:.3f} | |",
        "",
        f"Targets: both models at least {100 * TARGET_MARGIN:.0f} points above the majority-per-type answer on every "
        f"seed: {ok[targets['both_far_above_prior_every_seed']]}; mean accuracy within 2 points of dense: "
        f"{accuracy_verdict}; prefill FLOPs at most 65% of dense: {ok[targets['flops_at_most_65_percent']]}. "
        f"A single seed's accuracy on {s['n_test']} questions has a binomial standard error of about "
        f"{100 * math.sqrt(acc['dense'] * (1 - acc['dense']) / s['n_test']):.1f} points.",
        "",
        "Accuracy by question type (mean over seeds):",
        "",
        f"| type | majority answer | dense base | dense | {name} |",
        "|---|---|---|---|---|",
        *[f"| {t} | {by_type_majority.get(t, float('nan')):.1%} | {r['accuracy_by_type']['pretrain'][t]:.1%} | "
          f"{r['accuracy_by_type']['dense'][t]:.1%} | {r['accuracy_by_type'][name].get(t, float('nan')):.1%} |"
          for t in sorted(r["accuracy_by_type"]["dense"])],
        "",
        f"Always answering each question type's most common answer scores {majority or float('nan'):.1%}.",
        "",
        *([f"![training curves]({demo.file('training_curves.png')})", "",
           f"![kept vision tokens]({demo.file('routing.png')})", ""] if r.get("plots", True)
          else ["(No plots: matplotlib was not installed; `pip install 'pmod[bench]'` adds it.)", ""]),
        f"Wall time of this run: {r['seconds']:.0f} s"
        + (f" (training reused from an earlier run: {', '.join(r['reused_training'])})" if r["reused_training"] else "")
        + f" on {r['machine']['cpu']} ({r['machine']['cores']} cores, "
        f"{s['torch_threads']} torch thread{'s' if s['torch_threads'] != 1 else ''}; torch {r['machine']['torch']}, "
        f"transformers {r['machine']['transformers']}). Finished stages are reused "
        "when the demo is run again in the same folder. Latency on a small CPU model includes fixed per-layer "
        "costs that do not shrink with the token count, so its ratio sits above the FLOP ratio. The latency and "
        "training-step ratios are measured side by side (models interleaved); the whole-run times are not, and also "
        "carry data loading, optimizer steps and whatever else ran on the machine.",
        "",
    ]
    return "\n".join(lines)
