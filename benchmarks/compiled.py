"""Compiled vs eager, p-MoD vs dense, side by side in one run: prefill and decoding steps of the benchmark decoder.

Modes, each timed for both models interleaved (medians, same weights; p-MoD with random routers):

- prefill, eager: one forward over the prompt (576 vision + 64 text tokens), no cache, logits of the last position;
  p-MoD is given ``target_counts`` so that it plans routing without reading the device. Timed beside them, the ideal
  prefill: the dense model's layers, each routed layer run on as many tokens as p-MoD's processes, without routing
  (`common.ideal_prefill_runner`). ideal / dense is what this machine's kernels give for fewer rows (a CPU's matrix
  multiply is less efficient on few rows than on many); p-MoD / ideal is the cost of routing itself.
- prefill, compiled: the same three forwards under ``torch.compile(fullgraph=True)``.
- decode, eager (dynamic cache): single-token steps with transformers' `DynamicCache` / `pmod.PModCache`.
- decode, eager (static cache): the same with `StaticCache` / `pmod.PModStaticCache` (every step has one shape).
- decode, compiled: the static-cache step under ``torch.compile(fullgraph=True)``: one graph for every step.

    python benchmarks/compiled.py --threads 2          # -> runs/benchmarks/compiled_cpu.{json,md}
    python benchmarks/compiled.py --threads 2 --load busy   # the same beside one busy process
    python benchmarks/compiled.py --layers 4 --hidden 64 --intermediate 128 --heads 4 --backend eager  # smoke test

A static cache's step costs the same at every fill (attention reads the whole preallocated cache, masked), so each
decoding mode takes its steps one after another from a single prompt and reports the median step.

The models take turns (dense, p-MoD, ideal; the next repetition in reverse order, so that a slow spell of a shared
machine falls on each alike); besides the ratio of the medians, each row gives the quartiles of the ratios of the
repetitions' adjacent pairs: how far one run of the benchmark can be trusted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import (
    LOADS,
    OUT_HELP,
    SCRATCH,
    add_model_args,
    compare,
    decode_runner,
    dense_and_pmod,
    ideal_prefill_runner,
    interleaved,
    machine,
    machine_load,
    prefill_runner,
    prompt,
    shape,
    write_result,
)

from pmod.efficiency import prefill_cost, shape_from_config
from pmod.tiny import randomize_routers

MODES = [("prefill", "none", False), ("prefill", "none", True), ("decode", "dynamic", False),
         ("decode", "static", False), ("decode", "static", True)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--reps", type=int, default=5, help="timed prefills per model and mode (after a warm-up)")
    p.add_argument("--steps", type=int, default=24, help="timed decoding steps per model and mode (after a warm-up)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (eager: a quick check of the graphs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--load", choices=list(LOADS), default="idle",
                   help="run beside a competing process: busy (a Python loop) or torch (a 2-thread matrix multiply)")
    p.add_argument("--out", type=Path, default=SCRATCH / "compiled_cpu.json", help=OUT_HELP)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dense, routed = dense_and_pmod(args)
    randomize_routers(routed)  # routing is not trivially the first tokens
    ids, target = prompt(args, 1)
    cost = prefill_cost(shape_from_config(routed.config, "bench"), args.vision_tokens, args.text_tokens,
                        resolved=routed.pmod, causal=True)
    rows = []
    with machine_load(args.load) as load:
        for case, cache_kind, compiled in MODES:
            rows.append(measure(args, dense, routed, ids, target, case, cache_kind, compiled))
    result = {
        "benchmark": "compiled",
        "what": "median ms of a prefill (batch 1, no cache) and of a decoding step after it, dense vs p-MoD "
                "interleaved, eager and torch.compile(fullgraph=True); for the prefill also the ideal one (dense "
                "layers on p-MoD's processed-token counts, no routing)",
        "shape": {**shape(args), "batch": 1, "backend": args.backend},
        "load": load,
        "flops_ratio": cost.flops_ratio,
        "reps": args.reps,
        "steps": args.steps,
        "rows": rows,
        "machine": machine(args.device),
    }
    write_result(args.out, result)
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"-> {args.out}", file=sys.stderr)
    return 0


def measure(args: argparse.Namespace, dense, routed, ids, target, case: str, cache_kind: str, compiled: bool) -> dict:
    """One row: dense and p-MoD (and, for a prefill, the ideal) timed side by side in one mode."""
    torch._dynamo.reset()
    options = {"fullgraph": True, "backend": args.backend} if compiled else None
    if case == "prefill":
        runs = {"dense": prefill_runner(dense, ids, None, options),
                "pmod": prefill_runner(routed, ids, target, options),
                "ideal": ideal_prefill_runner(dense, routed, ids, target, options)}
        with torch.no_grad():
            times, warmup = interleaved(runs, args.reps, args.device)
    else:
        steps = args.steps + 1  # one warm-up step
        runs = {"dense": decode_runner(dense, ids, None, cache_kind, steps, options),
                "pmod": decode_runner(routed, ids, target, cache_kind, steps, options)}
        times, warmup = interleaved(runs, args.steps, args.device)
    row = {"case": case, "cache": cache_kind, "compiled": compiled, **compare(times), "warmup_s": warmup}
    ideal = f"  ideal {row['ideal_ratio']:.3f}  routing x{row['routing_overhead']:.3f}" if "ideal_s" in row else ""
    print(f"{case:7s} {'compiled' if compiled else 'eager':8s} cache={cache_kind:7s} dense "
          f"{row['dense_s'] * 1e3:9.2f} ms  p-MoD {row['pmod_s'] * 1e3:9.2f} ms  ratio {row['ratio']:.3f} "
          f"({row['ratio_q1']:.3f}-{row['ratio_q3']:.3f}){ideal}  (warm-up {row['warmup_s']:.1f} s)", file=sys.stderr)
    return row


def markdown(result: dict) -> str:
    """The result as the table benchmarks/README.md shows."""
    lines = ["| case | mode | cache | dense ms | p-MoD ms | p-MoD / dense | quartiles | ideal / dense "
             "| p-MoD / ideal |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ideal = (f"{r['ideal_ratio']:.3f} | {r['routing_overhead']:.3f}" if "ideal_s" in r else "- | -")
        lines.append(f"| {r['case']} | {'compiled' if r['compiled'] else 'eager'} | {r['cache']} | "
                     f"{r['dense_s'] * 1e3:.2f} | {r['pmod_s'] * 1e3:.2f} | {r['ratio']:.3f} | "
                     f"{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} | {ideal} |")
    info = result["machine"]
    threads = f"{info['torch_threads']} torch thread{'s' * (info['torch_threads'] != 1)}"
    note = (f"Analytic prefill FLOP ratio {result['flops_ratio']:.3f}. Machine load: {result['load']}. Backend "
            f"{result['shape']['backend']}; {threads} on {info['cpu_count']} CPUs "
            f"({info['processor']}); torch {info['torch']}, transformers {info['transformers']}. Quartiles: of "
            f"p-MoD / dense over the {result['reps']} prefills ({result['steps']} decoding steps) of each model. "
            "Ideal: the dense layers on p-MoD's processed-token counts, without routing.")
    return "\n".join(lines) + "\n\n" + note + "\n"


if __name__ == "__main__":
    sys.exit(main())
