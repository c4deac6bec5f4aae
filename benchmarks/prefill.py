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
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pmod  # noqa: E402
from pmod.tiny import tiny_causal_lm  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vision-tokens", type=int, default=576)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefill_cpu.json")
    return p.parse_args()


def machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    import transformers

    info["transformers"] = transformers.__version__
    return info


def timed(model, inputs: dict, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs, use_cache=False, logits_to_keep=1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    dense = tiny_causal_lm(
        "llama",
        num_layers=args.layers,
        attn_implementation=args.attn,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        vocab_size=1024,
    ).to(device=args.device, dtype=dtype)
    routed = pmod.apply_pmod(copy.deepcopy(dense), pmod.PModConfig())
    length = args.vision_tokens + args.text_tokens
    ids = torch.randint(0, 1024, (args.batch, length), device=args.device)
    target = torch.zeros(args.batch, length, dtype=torch.bool, device=args.device)
    start = args.text_tokens // 2  # system prompt, then the image, then the question
    target[:, start : start + args.vision_tokens] = True

    for _ in range(2):  # warm-up
        timed(dense, {"input_ids": ids}, args.device)
        timed(routed, {"input_ids": ids, "target_mask": target}, args.device)
    dense_t, routed_t = [], []
    for rep in range(args.reps):
        dense_t.append(timed(dense, {"input_ids": ids}, args.device))
        routed_t.append(timed(routed, {"input_ids": ids, "target_mask": target}, args.device))
        print(f"rep {rep + 1}/{args.reps}: dense {dense_t[-1] * 1e3:.1f} ms, p-MoD {routed_t[-1] * 1e3:.1f} ms", file=sys.stderr)

    routing = routed.routing()
    processed = sum(int(r.processed[0].sum()) for r in routing.values()) + length * (args.layers - len(routing))
    token_ratio = processed / (length * args.layers)
    d, r = statistics.median(dense_t), statistics.median(routed_t)
    result = {
        "benchmark": "prefill",
        "what": "decoder layers + final norm + last-position lm_head, no vision tower, no KV cache",
        "shape": {
            "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
            "vision_tokens": args.vision_tokens, "text_tokens": args.text_tokens, "batch": args.batch,
            "attn": args.attn, "dtype": args.dtype,
        },
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"dense {d * 1e3:.1f} ms | p-MoD {r * 1e3:.1f} ms | time ratio {r / d:.3f} | processed-token ratio "
        f"{token_ratio:.3f} -> {args.out}"
    )


if __name__ == "__main__":
    main()
