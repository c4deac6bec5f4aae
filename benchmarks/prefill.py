"""Prefill latency of the decoder stack, dense vs p-MoD on the same weights, measured side by side.

A 32-layer Llama-shaped decoder (hidden size scaled down to fit a CPU) gets N vision tokens (marked with
``target_mask``) plus text tokens. The vision encoder is left out: it costs the same in both models.
Dense and p-MoD runs are interleaved, repeated, and the median is reported next to the ratio of tokens
processed by the decoder layers (the first-order prediction of the time ratio).

    python benchmarks/prefill.py                      # defaults: 576 vision + 64 text tokens, batch 1
    python benchmarks/prefill.py --vision-tokens 2880 --reps 3 --out benchmarks/results/prefill_2880.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from common import OUT_HELP, SCRATCH, add_model_args, clock, dense_and_pmod, machine, prompt, shape, write_result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", type=Path, default=SCRATCH / "prefill_cpu.json", help=OUT_HELP)
    return p.parse_args(argv)


def timed(model, inputs: dict, device: str) -> float:
    start = clock(device)
    with torch.no_grad():
        model(**inputs, use_cache=False, logits_to_keep=1)
    return clock(device) - start


def main() -> None:
    args = parse_args()
    dense, routed = dense_and_pmod(args)
    ids, target = prompt(args, args.batch)
    length = ids.shape[1]

    for _ in range(2):  # warm-up
        timed(dense, {"input_ids": ids}, args.device)
        timed(routed, {"input_ids": ids, "target_mask": target}, args.device)
    dense_t, routed_t = [], []
    for rep in range(args.reps):
        dense_t.append(timed(dense, {"input_ids": ids}, args.device))
        routed_t.append(timed(routed, {"input_ids": ids, "target_mask": target}, args.device))
        print(f"rep {rep + 1}/{args.reps}: dense {dense_t[-1] * 1e3:.1f} ms, p-MoD {routed_t[-1] * 1e3:.1f} ms",
              file=sys.stderr)

    routing = routed.routing()
    processed = sum(int(r.processed[0].sum()) for r in routing.values()) + length * (args.layers - len(routing))
    token_ratio = processed / (length * args.layers)
    d, r = statistics.median(dense_t), statistics.median(routed_t)
    result = {
        "benchmark": "prefill",
        "what": "decoder layers + final norm + last-position lm_head, no vision tower, no KV cache",
        "shape": {**shape(args), "batch": args.batch},
        "schedule": routed.pmod.to_dict(),
        "reps": args.reps,
        "dense_ms_median": d * 1e3,
        "pmod_ms_median": r * 1e3,
        "time_ratio": r / d,
        "processed_token_ratio": token_ratio,
        "dense_ms": [t * 1e3 for t in dense_t],
        "pmod_ms": [t * 1e3 for t in routed_t],
        "machine": machine(args.device),
    }
    write_result(args.out, result)
    print(
        f"dense {d * 1e3:.1f} ms | p-MoD {r * 1e3:.1f} ms | time ratio {r / d:.3f} | processed-token ratio "
        f"{token_ratio:.3f} -> {args.out}"
    )


if __name__ == "__main__":
    main()
