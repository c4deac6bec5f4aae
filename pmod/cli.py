"""The `pmod` command line.

    pmod schedule --layers 32 [--schedule shifted_cos] [--json]   per-layer keep ratios of a schedule
    pmod info MODEL_DIR                                           p-MoD settings of a saved model
    pmod chat MODEL_DIR --image PATH [--prompt TEXT]              answer (or converse) about an image
    pmod convert dense SRC OUT [schedule options] [--force]      dense checkpoint -> untrained p-MoD
    pmod convert original SRC OUT [--vision-tower DIR] [--force] released p-MoD checkpoint -> pmod
    pmod flops (--preset NAME | --model DIR) --vision-tokens N --text-tokens N [--json]
                                                                  analytic prefill FLOPs and KV cache
    pmod train CONFIG.yaml [key=value ...]                        train with a recipe (configs/*.yaml)
    pmod eval MODEL_DIR --data FILE [--image-folder DIR] [--out DIR] [--batch-size N] [--resume | --force]
                                                                  answer and score LLaVA-format questions
    pmod serve MODEL_DIR [--host H] [--port N] [--max-batch-size N] [--batch-wait-ms N] [--image-root DIR]
                                                                  an OpenAI-compatible chat endpoint, batched
    pmod viz MODEL_DIR --image PATH --prompt TEXT [--out PNG]    which vision tokens each routed layer kept
    pmod demo [--out DIR] [--quick] [--arch A] [ablation flags]  miniature p-MoD experiment (dense vs p-MoD)
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import get_args

from . import __version__, schedules
from .argtypes import (
    finite_float,
    int_list,
    integer,
    layer_count,
    nonnegative_float,
    nonnegative_int,
    optional_int,
    port,
    positive_float,
    positive_int,
    ratio,
    schedule_value,
    temperature,
)
from .config import PModConfig, TargetKind
from .errors import PModError, one_line

# Kept in step with pmod.efficiency.PRESETS and pmod.pipelines.demo.ARCHES by a test; listed here so that
# `pmod --help` does not import torch.
DEMO_ARCHES = ("llava", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "gemma3")
DTYPES = ("float32", "bfloat16", "float16")
PRESET_NAMES = ("llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "llava-next-13b", "llava-onevision-7b", "qwen2-vl-7b",
                "qwen2.5-vl-7b", "qwen3-vl-8b", "qwen3-vl-30b-a3b", "internvl3-8b", "gemma-3-12b",
                "mistral-small-3.1-24b")

logger = logging.getLogger("pmod.cli")


def _emit(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _pmod_args(p: argparse.ArgumentParser) -> None:
    """One flag per `PModConfig` field (``--average-ratio``, ``--no-string``, ...), with the field's own default and
    help text (config.py): every setting can be given on the command line, and its default is written once."""
    group = p.add_argument_group("p-MoD settings (pmod.PModConfig)")
    for f in dataclasses.fields(PModConfig):
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type)
        text = f.metadata["help"] + " (default: %(default)s)"
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        elif f.name == "schedule":
            group.add_argument(flag, type=schedule_value, default=f.default, metavar="{" + ",".join(schedules.NAMES)
                               + "} | R0,R1,...", help=text)
        elif f.name == "targets":
            group.add_argument(flag, choices=get_args(TargetKind), default=f.default, help=text)
        elif kind == "float":
            group.add_argument(flag, type=ratio if f.name.endswith("_ratio") else finite_float, default=f.default,
                               help=text)
        elif kind == "int":
            group.add_argument(flag, type=integer, default=f.default, help=text)
        elif kind == "int | None":
            group.add_argument(flag, type=optional_int, default=f.default, help=text)
        elif kind == "list[int] | None":
            group.add_argument(flag, type=int_list, default=f.default, metavar="I,J,...", help=text)
        else:  # a new field needs its flag written here (a test builds every field's flag)
            raise TypeError(f"no command-line flag for PModConfig.{f.name} ({kind})")


def _config_from(args: argparse.Namespace) -> PModConfig:
    return PModConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PModConfig)})


def cmd_schedule(args: argparse.Namespace) -> int:
    config = _config_from(args)
    ratios = config.layer_ratios(args.layers)
    routed = config.resolve_routed_layers(args.layers)
    mean = sum(ratios) / len(ratios)
    if args.json:
        _emit(json.dumps({"layer_ratios": ratios, "routed_layers": routed, "mean_ratio": mean}))
        return 0
    _emit(f"{config.schedule} schedule, {args.layers} layers")
    routed_set = set(routed)
    for i, r in enumerate(ratios):
        _emit(f"  layer {i:3d}  {'routed' if i in routed_set else 'dense '}  keep {r:.4f}")
    _emit(f"mean keep ratio over all layers (dense = 1): {mean:.4f}")
    return 0


def _flops_unit(value: float) -> tuple[float, str]:
    """The largest of TFLOPs, GFLOPs, MFLOPs, kFLOPs in which ``value`` is at least 1 (FLOPs below that)."""
    return next(((scale, f"{prefix}FLOPs") for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
                 if value >= scale), (1.0, "FLOPs"))


def cmd_info(args: argparse.Namespace) -> int:
    from .config import ResolvedPMod

    config_file = Path(args.model_dir).expanduser() / "config.json"
    try:  # a local folder's config.json as JSON: no torch or transformers to import (seconds) to read it
        saved = json.loads(config_file.read_text(encoding="utf-8"))
        model_type, settings = saved.get("model_type"), saved.get("pmod")
        if not isinstance(model_type, str):
            raise ValueError("no model_type")
    except (OSError, ValueError, AttributeError):  # a hub id, or a file transformers should explain
        from .loading import read_checkpoint_config

        config = read_checkpoint_config(args.model_dir)
        model_type, settings = config.model_type, getattr(config, "pmod", None)
    if not model_type.startswith("pmod_"):  # an answer, not a failure
        _emit(f"{args.model_dir}: dense {model_type!r} checkpoint (no p-MoD settings; pmod convert dense converts it)")
        return 0
    resolved = ResolvedPMod.from_dict(settings if isinstance(settings, dict) else {})
    _emit(f"{args.model_dir}: {model_type}")
    _emit(json.dumps(resolved.to_dict(), indent=2))
    return 0


def cmd_convert_dense(args: argparse.Namespace) -> int:
    from .integrations.convert import convert_dense

    out = convert_dense(args.src, args.out, _config_from(args), force=args.force)
    _emit(f"wrote {out}")
    return 0


def cmd_convert_original(args: argparse.Namespace) -> int:
    from .integrations.convert import convert_original

    out = convert_original(args.src, args.out, vision_tower=args.vision_tower, force=args.force)
    _emit(f"wrote {out}")
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from . import models  # noqa: F401  (registers the p-MoD model types)
    from .config import ResolvedPMod
    from .efficiency import PRESETS, prefill_cost, shape_from_config

    resolved = None
    if args.preset:
        shape = PRESETS[args.preset]
    else:
        config = AutoConfig.from_pretrained(args.model)
        shape = shape_from_config(config, name=str(args.model))
        if getattr(config, "pmod", None):
            resolved = ResolvedPMod.from_dict(config.pmod)
    if args.crops is not None:
        shape = shape.with_crops(args.crops)
    if args.frames:  # a video prompt: its frames, and image crops only where --crops asks for them
        shape = shape.with_frames(args.frames).with_crops(args.crops or 0)
    cost = prefill_cost(shape, args.vision_tokens, args.text_tokens, _config_from(args), resolved, causal=args.causal)
    if args.json:
        _emit(json.dumps(cost.to_dict()))
        return 0
    _emit(f"{cost.model}: {args.vision_tokens} vision + {args.text_tokens} text tokens, prefill")
    scale, unit = _flops_unit(max(cost.dense_layer_flops))  # a tiny model's layers are MFLOPs, a 7B model's GFLOPs
    _emit(f"{'layer':>5} {'keep':>7} {'vision kept':>11} {f'dense {unit}':>13} {f'p-MoD {unit}':>13}")
    for i, (r, k, d, p) in enumerate(zip(cost.layer_ratios, cost.kept_vision, cost.dense_layer_flops,
                                         cost.pmod_layer_flops)):
        _emit(f"{i:>5} {r:>7.4f} {k:>11d} {d / scale:>13.1f} {p / scale:>13.1f}")
    scale, unit = _flops_unit(cost.dense_flops)
    _emit(f"decoder layers: {cost.dense_flops / scale:.2f} -> {cost.pmod_flops / scale:.2f} {unit} "
          f"({cost.flops_ratio:.1%})")
    _emit(f"vision encoder {cost.vision_encoder_flops / scale:.3f}, projector {cost.projector_flops / scale:.3f}, "
          f"LM head {cost.lm_head_flops / scale:.4f} {unit} (the same in both)")
    _emit(f"whole model: {(cost.dense_flops + cost.shared_flops) / scale:.2f} -> "
          f"{(cost.pmod_flops + cost.shared_flops) / scale:.2f} {unit} ({cost.total_flops_ratio:.1%})")
    _emit(f"KV cache: {cost.dense_kv_bytes / 2**20:.1f} -> {cost.pmod_kv_bytes / 2**20:.1f} MiB "
          f"({cost.pmod_kv_bytes / cost.dense_kv_bytes:.1%}); vision-token entries {cost.kv_ratio:.2%} "
          f"(nominal mean keep ratio {cost.kv_ratio_nominal:.2%})")
    _emit("assumptions:")
    for a in cost.assumptions:
        _emit(f"  - {a}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .pipelines.chat import ChatSession, chat_loop, load_image
    from .pipelines.generation import is_pmod, load_for_inference

    image = load_image(args.image)
    # one rule for every verb: a folder is used as it is (a dense checkpoint stays dense, and is said to be)
    model, processor = load_for_inference(args.model_dir, dtype=args.dtype, device=args.device, need_images=True)
    if not is_pmod(model):
        sys.stderr.write(f"pmod chat: {args.model_dir} is a dense checkpoint: chatting with the dense model (pmod "
                         "convert dense makes a p-MoD one)\n")
    session = ChatSession(model, processor, image, max_new_tokens=args.max_new_tokens, temperature=args.temperature)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.prompt is not None:
        _, stats = session.ask(args.prompt, write)
        _emit(stats.summary())
        return 0
    interactive = sys.stdin.isatty()

    def marker() -> None:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()

    def complain(message: str) -> None:
        sys.stderr.write(f"pmod chat: {message}\n")

    if interactive:
        sys.stderr.write("Ask about the image; 'exit' or Ctrl-D ends the session.\n")
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes stay escaped: one bad line is refused, not the session
        sys.stdin.reconfigure(errors="surrogateescape")
    chat_loop(session, sys.stdin, write, marker, complain)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train with a recipe; the final model and its processor land in the recipe's output_dir."""
    from .pipelines.recipe import load_config
    from .pipelines.train import train

    config = load_config(args.config, args.overrides)
    logging.getLogger("pmod").setLevel(logging.INFO)  # progress of data preparation and resuming
    result = train(config)
    # no loss is logged when the run is shorter than logging_steps
    last = f", last logged loss {result.losses[-1]:.4f}" if result.losses else ""
    _emit(
        f"trained {result.global_step} steps in {result.seconds:.0f} s{last}"
        + (f", {result.skipped_records} records skipped" if result.skipped_records else "")
    )
    if not result.completed:  # a callback stopped it (e.g. the Trainer's checkpoint-on-SIGTERM): resumable
        print(f"pmod train: stopped at step {result.global_step} of {result.max_steps} before the end; no final model "
              f"was saved: run the same command to resume from the last checkpoint in {result.output_dir}",
              file=sys.stderr)
        return 1
    _emit(f"model saved to {result.output_dir} (load it with pmod.load_model)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """`pmod eval`: evaluate a saved model on a LLaVA-format data file; writes predictions.jsonl and metrics.json.
    The output folder is held for the run (`pmod.files.output_lock`): a second run into it is refused."""
    from .pipelines.evaluate import run_eval

    result = run_eval(args.model_dir, args.data, args.out, image_folder=args.image_folder, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, limit=args.limit, resume=args.resume, force=args.force,
                      group_by=args.group_by, dtype=args.dtype, device=args.device, progress=not args.no_progress)
    out = Path(args.out)
    _emit(result.summary())
    _emit(f"predictions: {out / 'predictions.jsonl'}  metrics: {out / 'metrics.json'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model over HTTP until interrupted (OpenAI's chat completions API)."""
    from .pipelines.serve import serve

    logging.getLogger("pmod").setLevel(logging.INFO)
    settings = {"max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms, "max_queue": args.max_queue,
                "max_images": args.max_images, "default_max_tokens": args.max_tokens,
                "request_timeout_s": args.request_timeout, "image_root": args.image_root,
                "max_context": args.max_context}
    if args.model_name:
        settings["model_name"] = args.model_name
    serve(args.model_dir, host=args.host, port=args.port, device=args.device, dtype=args.dtype, settings=settings)
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    """`pmod viz`: plot which vision tokens each routed layer kept for one image and prompt."""
    from .pipelines.viz import visualize

    maps = visualize(args.model_dir, None, args.image, args.prompt, args.out)
    for index, m in sorted(maps.items()):
        _emit(f"layer {index:3d}: keep ratio {m.keep_ratio:.3f}, kept {m.kept}/{m.total} vision tokens")
    _emit(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The miniature p-MoD experiment: data, dense and p-MoD training, evaluation, costs, report."""
    from .pipelines.demo import DemoConfig, run_demo

    logging.getLogger("pmod").setLevel(logging.INFO)  # the demo's stage-by-stage progress
    demo = DemoConfig(out=args.out, quick=args.quick, schedule=args.schedule, tanh_norm=not args.no_tanh_norm,
                      string=not args.no_string, seed=args.seed, arch=args.arch)
    report = run_demo(demo)
    name = demo.pmod_name()
    acc, sd, fl, lat = report["accuracy"], report["accuracy_sd"], report["prefill_flops"], report["prefill_latency_s"]
    _emit(f"test accuracy over {len(report['accuracy_by_seed'])} seed(s), mean ± sd: dense {acc['dense']:.1%} ± "
          f"{sd['dense']:.1%}, {name} {acc[name]:.1%} ± {sd[name]:.1%} ({acc['gap_points']:+.1f} ± "
          f"{sd['gap_points']:.1f} points)")
    _emit(f"prefill FLOPs ratio {fl['ratio']:.3f} (realised {fl['realised_ratio']:.3f}), "
          f"prefill latency ratio {lat['ratio']:.3f}, training step time ratio {report['train_step_s']['ratio']:.3f}")
    _emit(f"report: {Path(args.out) / demo.file('report.md')} ({report['seconds']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `pmod` command's parser. It imports nothing heavy: commands import what they need when they run."""
    parser = argparse.ArgumentParser(prog="pmod", description="p-MoD for Hugging Face multimodal LLMs")
    parser.add_argument("--version", action="version", version=f"pmod {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("schedule", help="print the per-layer keep ratios of a schedule")
    p.add_argument("--layers", type=layer_count, default=32, help="decoder layers (default: 32)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _pmod_args(p)
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("info", help="print the p-MoD settings of a saved model")
    p.add_argument("model_dir", help="a saved model folder (only config.json is read)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert checkpoints into p-MoD checkpoints")
    kinds = p.add_subparsers(dest="kind", required=True)
    c = kinds.add_parser("dense",
                         help="a dense transformers checkpoint of a supported family -> p-MoD, routers at zero")
    c.add_argument("src", help="the dense checkpoint folder")
    c.add_argument("out", help="the folder to write the p-MoD checkpoint to")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _pmod_args(c)
    c.set_defaults(func=cmd_convert_dense)
    c = kinds.add_parser("original", help="a checkpoint of the original p-MoD code (LLaVA layout) -> pmod")
    c.add_argument("src", help="the original checkpoint folder")
    c.add_argument("out", help="the folder to write the pmod checkpoint to")
    c.add_argument("--vision-tower", help="local CLIP checkpoint directory, when the config names a hub id")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    c.set_defaults(func=cmd_convert_original)

    p = sub.add_parser("flops", help="analytic prefill FLOPs and KV cache, dense vs p-MoD")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESET_NAMES), help="a released model's shape")
    source.add_argument("--model", help="a checkpoint directory (only config.json is read)")
    p.add_argument("--vision-tokens", type=nonnegative_int, required=True,
                   help="vision tokens of the prompt (e.g. 576)")
    p.add_argument("--text-tokens", type=nonnegative_int, required=True, help="text tokens of the prompt")
    p.add_argument("--crops", type=positive_int, default=None,
                   help="crops, tiles or images through the vision tower per example (default: the preset's or "
                        "config's; tiled families: as many as the vision tokens fill)")
    p.add_argument("--frames", type=nonnegative_int, default=0,
                   help="a video prompt: frames through the vision tower (LLaVA-NeXT-Video pools them; Qwen3-VL "
                        "takes them in pairs); with --crops, image crops besides")
    p.add_argument("--causal", action="store_true",
                   help="count causal attention (half matrix), as sdpa/flash compute it")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _pmod_args(p)
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("chat", help="answer questions about an image with a p-MoD model")
    p.add_argument("model_dir", help="a saved model folder with its processor")
    p.add_argument("--image", required=True, help="the image to ask about (a file)")
    p.add_argument("--prompt", help="one-shot question; without it, read questions from standard input")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="answer length limit (default: %(default)s)")
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy, at most 100 (default: 0)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="load the weights in this type (default: as saved)")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, mps, cpu (default: where the model loads)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("train", help="train a p-MoD (or dense baseline) model with a recipe")
    p.add_argument("config", help="a YAML recipe, e.g. configs/tiny-cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, dotted keys reaching into "
                   "sections: trainer.max_steps=100 pmod.average_ratio=0.3 pmod=null")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model on LLaVA-format question answering data")
    p.add_argument("model_dir", help="a saved p-MoD (or dense LLaVA) model with its processor")
    p.add_argument("--data", required=True, help="LLaVA-format records, .json (a list) or .jsonl")
    p.add_argument("--image-folder", default=None, help="folder the records' image paths are relative to "
                   "(default: the data file's folder)")
    p.add_argument("--out", default="outputs/eval", help="output folder for predictions.jsonl and metrics.json")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="questions per generate call (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="answer length limit (default: %(default)s)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N records only")
    p.add_argument("--resume", action="store_true", help="keep the answers already in OUT/predictions.jsonl")
    p.add_argument("--force", action="store_true", help="replace the predictions and metrics already in OUT")
    p.add_argument("--group-by", default=None, metavar="KEY",
                   help="also score each value of this record key apart (e.g. a question type)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="load the weights in this type (default: as saved)")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: where the model loads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="serve a model over HTTP: OpenAI's chat completions API, requests batched")
    p.add_argument("model_dir", help="a saved p-MoD (or dense) model with its processor")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=port, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--model-name", default=None, help="the model id clients ask for (default: the folder's name)")
    p.add_argument("--max-batch-size", type=positive_int, default=8,
                   help="requests answered in one generate call at most (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=nonnegative_float, default=10.0,
                   help="how long a request waits for others to batch with (default: %(default)s)")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="requests waiting at most; more are refused with 503 (default: %(default)s)")
    p.add_argument("--max-images", type=nonnegative_int, default=4,
                   help="images per request at most (default: %(default)s)")
    p.add_argument("--max-tokens", type=positive_int, default=256,
                   help="answer length when a request gives no max_tokens (default: %(default)s)")
    p.add_argument("--max-context", type=positive_int, default=None,
                   help="prompt plus answer tokens per request at most (default: the model's max_position_embeddings)")
    p.add_argument("--request-timeout", type=positive_float, default=600.0,
                   help="seconds a request may wait for its answer (default: %(default)s)")
    p.add_argument("--image-root", type=Path, default=None,
                   help="a folder whose image files requests may name (default: none; images come as data URLs)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="load the weights in this type (default: as saved)")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: where the model loads)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("viz", help="draw which vision tokens each routed layer kept")
    p.add_argument("model_dir", help="a saved p-MoD model with its processor")
    p.add_argument("--image", required=True, help="the image to route (a file)")
    p.add_argument("--prompt", required=True, help="the question asked about it")
    p.add_argument("--out", default="outputs/viz/routing.png", help="the PNG to write (default: %(default)s)")
    p.set_defaults(func=cmd_viz)

    p = sub.add_parser("demo", help="a miniature p-MoD experiment on CPU: train dense and p-MoD, evaluate, report")
    p.add_argument("--out", default="demo-output", help="folder for the runs, data and report (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke-test size (one seed, under a minute)")
    p.add_argument("--schedule", choices=["shifted_cos", "constant"], default="shifted_cos",
                   help="constant: the ratio-schedule ablation")
    p.add_argument("--no-tanh-norm", action="store_true", help="ablation: unbounded router weight alpha * s + beta")
    p.add_argument("--no-string", action="store_true", help="ablation: skipped tokens pass unchanged (no STRing)")
    p.add_argument("--seed", type=int, default=0, help="base seed: of the data and the first of the repetitions")
    p.add_argument("--arch", choices=DEMO_ARCHES, default="llava",
                   help="the tiny model's architecture (qwen2-vl: dynamic-resolution patches, M-RoPE; gemma3: "
                        "sliding-window and global layers)")
    p.set_defaults(func=cmd_demo)
    return parser


# packages that pmod's extras bring (pyproject.toml), by the import name an ImportError names
_EXTRAS = {"accelerate": "train", "tensorboard": "train", "pydantic": "train", "matplotlib": "bench", "peft": "lora",
           "av": "video", "fastapi": "serve", "uvicorn": "serve", "lmms_eval": "eval", "datasets": "eval",
           "evaluate": "eval", "loguru": "eval", "sacrebleu": "eval", "num2words": "smolvlm"}


def _missing_extra(exc: BaseException) -> str | None:
    """The pmod extra that installs the package an ImportError is about, if any."""
    if not isinstance(exc, ImportError):
        return None
    text = f"{exc.name or ''} {exc}"
    return next((extra for package, extra in _EXTRAS.items() if re.search(rf"(?<![\w.-]){package}(?![\w-])", text)),
                None)


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the disk running out of space."""
    while exc is not None:
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    """Run one command. Expected failures (bad settings, inputs or files) print one line on stderr and return 2;
    anything else prints one line naming the exception and returns 1. ``--debug`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # transformers' "Loading weights" / "Writing model shards" bars on every load and save (they follow
        # huggingface_hub's switch, read when transformers is imported, which the commands do after this); pmod's own
        # bars (training, evaluation) stay
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write(f"pmod {args.command}: interrupted\n")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        expected = isinstance(exc, (PModError, OSError, UnicodeDecodeError, json.JSONDecodeError))
        message = one_line(exc, limit=2000)
        if _disk_full(exc):  # safetensors and others wrap ENOSPC in their own exception types
            expected, message = True, f"the disk is full (free space, or write elsewhere): {message}"
        elif extra := _missing_extra(exc):  # `pip install .` has no extras: training needs accelerate, plots matplotlib
            expected, message = True, f"{message} (this needs pmod's '{extra}' extra: pip install 'pmod[{extra}]')"
        what = "error" if expected else f"unexpected {type(exc).__name__}"
        hint = "" if expected else " (rerun with --debug for the traceback, and please report it)"
        sys.stderr.write(f"pmod {args.command}: {what}: {message}{hint}\n")
        return 2 if expected else 1


if __name__ == "__main__":
    sys.exit(main())
