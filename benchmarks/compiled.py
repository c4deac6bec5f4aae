"""Compiled vs eager, p-MoD vs dense, side by side in one run: prefill and decoding steps of the benchmark decoder.

Modes, each timed for both models interleaved (medians, same weights; p-MoD with random routers):

- prefill, eager: one forward over the prompt (576 vision + 64 text tokens), no cache, logits of the last position;
  p-MoD is given ``target_counts`` so that it plans routing without reading the device.
- prefill, compiled: the same forward under ``torch.compile(fullgraph=True)``.
- decode, eager (dynamic cache): single-token steps with transformers' `DynamicCache` / `pmod.PModCache`.
- decode, eager (static cache): the same with `StaticCache` / `pmod.PModStaticCache` (every step has one shape).
- decode, compiled: the static-cache step under ``torch.compile(fullgraph=True)``: one graph for every step.

    python benchmarks/compiled.py --threads 2          # -> benchmarks/results/compiled_cpu.{json,md}
    python benchmarks/compiled.py --layers 4 --hidden 64 --intermediate 128 --heads 4 --backend eager  # smoke test

A static cache's step costs the same at every fill (attention reads the whole preallocated cache, masked), so each
decoding mode takes its steps one after another from a single prompt and reports the median step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import (
    OUT_HELP,
    SCRATCH,
    add_model_args,
    clock,
    decode_runner,
    dense_and_pmod,
    machine,
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
    p.add_argument("--out", type=Path, default=SCRATCH / "compiled_cpu.json", help=OUT_HELP)
    return p.parse_args(argv)


def interleaved(runs: dict, reps: int, device: str) -> dict:
    """Median ms of each model's callable, after one warm-up call each (compilation included, timed apart)."""
    start = time.perf_counter()
    for run in runs.values():
        run()
    warmup = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            begin = clock(device)
            run()
            times[name].append(clock(device) - begin)
    dense, routed = statistics.median(times["dense"]), statistics.median(times["pmod"])
    return {"dense_ms": dense * 1e3, "pmod_ms": routed * 1e3, "ratio": routed / dense, "warmup_s": warmup}


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
    for case, cache_kind, compiled in MODES:
        torch._dynamo.reset()
        options = {"fullgraph": True, "backend": args.backend} if compiled else None
        if case == "prefill":
            runs = {"dense": prefill_runner(dense, ids, None, options),
                    "pmod": prefill_runner(routed, ids, target, options)}
            with torch.no_grad():
                result = interleaved(runs, args.reps, args.device)
        else:
            steps = args.steps + 1  # one warm-up step
            runs = {"dense": decode_runner(dense, ids, None, cache_kind, steps, options),
                    "pmod": decode_runner(routed, ids, target, cache_kind, steps, options)}
            result = interleaved(runs, args.steps, args.device)
        row = {"case": case, "cache": cache_kind, "compiled": compiled, **result}
        rows.append(row)
        print(f"{case:7s} {'compiled' if compiled else 'eager':8s} cache={cache_kind:7s} dense "
              f"{row['dense_ms']:9.2f} ms  p-MoD {row['pmod_ms']:9.2f} ms  ratio {row['ratio']:.3f}  "
              f"(warm-up {row['warmup_s']:.1f} s)",
              file=sys.stderr)
    result = {
        "benchmark": "compiled",
        "what": "median ms of a prefill (batch 1, no cache) and of a decoding step after it, dense vs p-MoD "
                "interleaved, eager and torch.compile(fullgraph=True)",
        "shape": {**shape(args), "batch": 1, "backend": args.backend},
        "flops_ratio": cost.flops_ratio,
        "reps": args.reps,
        "steps": args.steps,
        "rows": rows,
        "machine": machine(args.device),
    }
    write_result(args.out, result)
    lines = ["| case | mode | cache | dense ms | p-MoD ms | p-MoD / dense |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {'compiled' if r['compiled'] else 'eager'} | {r['cache']} | {r['dense_ms']:.2f} | "
              f"{r['pmod_ms']:.2f} | {r['ratio']:.3f} |" for r in rows]
    info = result["machine"]
    note = (f"Analytic prefill FLOP ratio {cost.flops_ratio:.3f}. Backend {args.backend}; {info['torch_threads']} "
            f"torch threads on {info['cpu_count']} CPUs ({info['processor']}); torch {info['torch']}, transformers "
            f"{info['transformers']}.")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n\n" + note + "\n")
    print(f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
