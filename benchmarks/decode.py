"""Decode latency per token and KV-cache bytes, dense vs p-MoD on the same weights, batch 1 and 8.

Each repetition prefills the prompt (576 vision + 64 text tokens by default) into a fresh cache, then times
``--steps`` single-token decoding steps (greedy, the step's own argmax fed back). Dense and p-MoD runs
alternate; the median step time is reported with the KV-cache bytes each model holds at the end.

    python benchmarks/decode.py                      # batch 1 and 8 -> benchmarks/results/decode_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from common import OUT_HELP, SCRATCH, add_model_args, clock, dense_and_pmod, machine, prompt, shape, write_result

from pmod.compat import cache_kwargs, output_cache
from pmod.efficiency import kv_cache_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=SCRATCH / "decode_cpu.json", help=OUT_HELP)
    return p.parse_args(argv)


def decode(model, ids: torch.Tensor, target: torch.Tensor | None, steps: int, device: str):
    """Prefill, then ``steps`` decoding steps; returns the step times and the final cache."""
    extra = {} if target is None else {"target_mask": target}
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **extra)
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            start = clock(device)
            out = model(input_ids=token, use_cache=True, **cache_kwargs(cache))
            token = out.logits[:, -1:].argmax(-1)
            times.append(clock(device) - start)
    return times, cache


def dense_cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def main() -> None:
    args = parse_args()
    dense, routed = dense_and_pmod(args)
    results = []
    for batch in args.batches:
        ids, target = prompt(args, batch)
        decode(dense, ids, None, 2, args.device)  # warm-up
        decode(routed, ids, target, 2, args.device)
        dense_t, routed_t = [], []
        for rep in range(args.reps):
            times, dense_cache = decode(dense, ids, None, args.steps, args.device)
            dense_t += times
            times, routed_cache = decode(routed, ids, target, args.steps, args.device)
            routed_t += times
            print(f"batch {batch} rep {rep + 1}/{args.reps}", file=sys.stderr)
        report = kv_cache_report(routed_cache)
        d, r = statistics.median(dense_t), statistics.median(routed_t)
        row = {
            "batch": batch,
            "dense_ms_per_token": d * 1e3,
            "pmod_ms_per_token": r * 1e3,
            "time_ratio": r / d,
            "dense_kv_bytes": dense_cache_bytes(dense_cache),
            "pmod_kv_bytes": report.bytes,
            "kv_ratio": report.bytes / dense_cache_bytes(dense_cache),
            "kv_ratio_reported": report.ratio,
            "predicted_kv_ratio": predicted_kv_ratio(routed, ids.shape[1] + args.steps, args.vision_tokens),
        }
        results.append(row)
        print(
            f"batch {batch}: {d * 1e3:.2f} -> {r * 1e3:.2f} ms/token (x{r / d:.3f}), KV "
            f"{row['dense_kv_bytes'] / 2**20:.1f} -> {row['pmod_kv_bytes'] / 2**20:.1f} MiB (x{row['kv_ratio']:.3f})"
        )
    out = {
        "benchmark": "decode",
        "what": "median time of one decoding step after a prefill; KV bytes held after the last step",
        "shape": {**shape(args), "steps": args.steps},
        "reps": args.reps,
        "results": results,
        "machine": machine(args.device),
    }
    write_result(args.out, out)
    print(f"-> {args.out}")


def predicted_kv_ratio(model, total_tokens: int, vision_tokens: int) -> float:
    """Cache entries the schedule predicts, p-MoD over dense: routed layers drop floor((1 - R) N_V) vision tokens."""
    ratios = model.pmod.layer_ratios
    kept = [total_tokens - vision_tokens + int(torch.tensor(vision_tokens, dtype=torch.float32) * torch.tensor(r))
            if i in model.pmod.routed_layers else total_tokens for i, r in enumerate(ratios)]
    return sum(kept) / (len(ratios) * total_tokens)


if __name__ == "__main__":
    main()
