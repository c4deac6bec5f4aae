"""Shared pieces of the benchmarks: the scaled-down Vicuna-shaped decoder, inputs, and the machine record."""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pmod  # noqa: E402
from pmod.tiny import tiny_causal_lm  # noqa: E402

RESULTS = Path(__file__).parent / "results"  # the committed results: written on purpose (`make bench`, or --out)
# where a run writes by default: an ignored folder, so that trying a benchmark never replaces a committed result
SCRATCH = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"
OUT_HELP = "result file (default under runs/benchmarks/, ignored by git; `make bench` rewrites benchmarks/results/)"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vision-tokens", type=int, default=576)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def shape(args: argparse.Namespace) -> dict:
    keys = ("layers", "hidden", "intermediate", "heads", "vision_tokens", "text_tokens", "attn", "dtype")
    return {k: getattr(args, k) for k in keys}


def dense_model(args: argparse.Namespace):
    """A random-weight Llama decoder of the benchmark shape (seeded: the same weights every time)."""
    return tiny_causal_lm(
        "llama",
        num_layers=args.layers,
        attn_implementation=args.attn,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        vocab_size=1024,
    ).to(device=args.device, dtype=getattr(torch, args.dtype))


def dense_and_pmod(args: argparse.Namespace):
    """The dense decoder and its p-MoD conversion (paper schedule, zero routers), same weights."""
    dense = dense_model(args)
    return dense, pmod.apply_pmod(copy.deepcopy(dense), pmod.PModConfig())


def prompt(args: argparse.Namespace, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and the vision-token mask: half the text, the image, the other half of the text."""
    length = args.vision_tokens + args.text_tokens
    ids = torch.randint(0, 1024, (batch, length), device=args.device)
    target = torch.zeros(batch, length, dtype=torch.bool, device=args.device)
    start = args.text_tokens // 2
    target[:, start : start + args.vision_tokens] = True
    return ids, target


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(device: str) -> float:
    sync(device)
    return time.perf_counter()


def machine(device: str) -> dict:
    import transformers

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def interleaved(runs: dict, reps: int, device: str, warmup: int = 1) -> tuple[dict[str, list[float]], float]:
    """Seconds of each no-argument callable in ``runs`` over ``reps`` repetitions, after ``warmup`` untimed rounds of
    calls (compilation included; their seconds returned apart). The callables take turns, in reverse order every other
    repetition, so that a slow spell of a shared machine falls on each alike."""
    start = time.perf_counter()
    for _ in range(warmup):
        for run in runs.values():
            run()
    warmup_s = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            begin = clock(device)
            runs[name]()
            times[name].append(clock(device) - begin)
    return times, warmup_s


def compare(times: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds of "dense", "pmod" and, when timed, "ideal" (`ideal_prefill_runner`), their ratios, and the
    quartiles of p-MoD / dense over the repetitions (each p-MoD run over the dense run beside it): how far one run of
    a benchmark can be trusted."""
    median = {name: statistics.median(values) for name, values in times.items()}
    pairs = [routed / dense for routed, dense in zip(times["pmod"], times["dense"])]
    if len(pairs) < 2:
        low, high = min(pairs), max(pairs)
    else:
        low, _, high = statistics.quantiles(pairs, n=4, method="inclusive")
    result = {"dense_s": median["dense"], "pmod_s": median["pmod"], "ratio": median["pmod"] / median["dense"],
              "ratio_q1": low, "ratio_q3": high}
    if "ideal" in median:
        result.update(ideal_s=median["ideal"], ideal_ratio=median["ideal"] / median["dense"],
                      routing_overhead=median["pmod"] / median["ideal"])
    return result


def write_result(path: Path, result: dict) -> None:
    """A benchmark's result as indented JSON (its folder made as needed)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def prefill_runner(model, ids: torch.Tensor, target: torch.Tensor | None, compile_options: dict | None = None,
                   logits_to_keep: int = 1):
    """One prefill of ``ids`` (no cache, logits of the last ``logits_to_keep`` positions; 0: all) as a no-argument
    callable; p-MoD models get the routing targets and their per-row counts (``target_counts``: routing planned
    without reading the device). ``compile_options``: ``torch.compile`` keyword arguments (None: eager)."""
    extra = {} if target is None else {"target_mask": target, "target_counts": target.sum(1).tolist()}

    def run(ids):
        return model(input_ids=ids, use_cache=False, logits_to_keep=logits_to_keep, **extra).logits

    run = torch.compile(run, **compile_options) if compile_options is not None else run
    return lambda: run(ids)


def ideal_prefill_runner(dense, routed, ids: torch.Tensor, target: torch.Tensor, compile_options: dict | None = None,
                         logits_to_keep: int = 1):
    """The time any p-MoD implementation pays for a prefill on this machine: ``dense``'s own layers, each routed layer
    of ``routed`` run on as many tokens as it processes (the first S_l of the prompt: no router, no selection, no
    gather; the layer's output written back into the full hidden states, as p-MoD writes its processed slots back).
    It computes what p-MoD computes, row for row (the same matrix multiplies, causal attention over S_l tokens), so
    p-MoD / ideal is the cost of routing itself, and ideal / dense what this machine's kernels give for fewer rows.
    A Llama-layout decoder (the benchmark's), a prompt without padding, ``target`` its (B, T) routing targets, the same
    number in every row; ``compile_options`` and ``logits_to_keep`` as `prefill_runner`'s.
    """
    from pmod.routing import keep_count

    inner = dense.model
    length = ids.shape[1]
    counts = set(target.sum(dim=1).tolist())
    if len(counts) != 1:
        raise ValueError(f"ideal_prefill_runner needs the same number of routing targets in every row, got {counts}")
    targets = counts.pop()
    # the rows each routed layer processes: its kept targets and every other token
    processed = {spec.index: keep_count(targets, spec.keep_ratio) + length - targets for spec in routed.pmod.layers}
    position_ids = torch.arange(length, device=ids.device)[None]  # (1, T)
    attn = dense.config._attn_implementation
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"ideal_prefill_runner runs sdpa or eager attention, not {attn!r}")
    # sdpa is causal without a mask; eager attention needs one: (1, 1, n, n) additive, per token count, made here
    low = torch.finfo(dense.dtype).min
    masks = {n: torch.full((n, n), low, dtype=dense.dtype, device=ids.device).triu(1)[None, None] if attn == "eager"
             else None for n in {length, *processed.values()}}

    def run(ids):
        x = inner.embed_tokens(ids)  # (B, T, D)
        cos, sin = inner.rotary_emb(x, position_ids=position_ids)  # (1, T, d) each
        for index, layer in enumerate(inner.layers):
            rows = processed.get(index)
            if rows is None:
                x = layer(x, attention_mask=masks[length], position_embeddings=(cos, sin))
            else:
                out = x.clone()  # p-MoD writes into a fresh tensor too
                out[:, :rows] = layer(x[:, :rows], attention_mask=masks[rows],
                                      position_embeddings=(cos[:, :rows], sin[:, :rows]))
                x = out
        return dense.lm_head(inner.norm(x)[:, -logits_to_keep:])  # (B, logits_to_keep or T, V), normed as the model

    run = torch.compile(run, **compile_options) if compile_options is not None else run
    return lambda: run(ids)


# machine load -> (label, the competing process's code or None)
LOADS = {
    "idle": ("idle", None),
    "busy": ("one busy process", "import time\nend = time.time() + 3600\nwhile time.time() < end: pass"),
    "torch": ("a torch process on 2 threads",
              ("import time, torch\ntorch.set_num_threads(2)\na = torch.randn(256, 256)\n"
               "end = time.time() + 3600\nwhile time.time() < end: a @ a")),
}


@contextmanager
def machine_load(name: str) -> Iterator[str]:
    """Run the body beside the competing process ``LOADS[name]`` (none for "idle"), killed on exit; yields the load's
    label. Users' laptops are busy: the benchmarks measure beside one other process too."""
    label, code = LOADS[name]
    competitor = None
    if code is not None:
        competitor = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(2.0)  # let it start spinning
    try:
        yield label
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


def decode_runner(model, ids: torch.Tensor, target: torch.Tensor | None, cache_kind: str, steps: int,
                  compile_options: dict | None = None):
    """Prefill ``ids`` into a fresh cache, then return a no-argument callable that runs one greedy decoding step (the
    previous step's token fed back). ``cache_kind``: "dynamic" (`DynamicCache` / `pmod.PModCache`, inputs grow by
    one column a step) or "static" (`StaticCache` / `pmod.PModStaticCache` sized for ``steps`` more tokens, inputs
    padded to its length: every step has the same shapes). ``compile_options``: ``torch.compile`` keyword arguments
    for the step (None: eager); compile only static steps."""
    from transformers import DynamicCache, StaticCache

    from pmod.compat import cache_kwargs
    from pmod.modeling import PModModelMixin

    routed = isinstance(model, PModModelMixin)
    batch, length = ids.shape
    capacity = length + steps
    if cache_kind == "dynamic":
        cache = pmod.PModCache(model.config.num_hidden_layers) if routed else DynamicCache(config=model.config)
    elif cache_kind == "static":
        cache = (pmod.PModStaticCache.for_model(model, capacity) if routed
                 else StaticCache(config=model.config, max_cache_len=capacity))
    else:
        raise ValueError(f"cache_kind must be 'dynamic' or 'static', got {cache_kind!r}")
    extra = {"target_mask": target, "target_counts": target.sum(1).tolist()} if routed and target is not None else {}
    with torch.no_grad():
        token = model(input_ids=ids, logits_to_keep=1, **extra, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)

    def step(token, mask, position):
        return model(input_ids=token, attention_mask=mask, position_ids=position, logits_to_keep=1,
                     **cache_kwargs(cache)).logits[:, -1:].argmax(-1)

    step = torch.compile(step, **compile_options) if compile_options is not None else step
    mask = torch.ones(batch, capacity, dtype=torch.long, device=ids.device)
    state = {"token": token, "length": length}

    def advance() -> None:
        n = state["length"]
        if n >= capacity:
            raise RuntimeError(f"decode_runner was sized for {steps} steps")
        position = torch.full((batch, 1), n, device=ids.device)
        if compile_options is not None and compile_options.get("mode") == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the previous step's outputs may be overwritten
        with torch.no_grad():
            state["token"] = step(state["token"], mask if cache_kind == "static" else mask[:, : n + 1], position)
        state["length"] = n + 1

    return advance
