"""Dense vs p-MoD on a GPU at the 7B shape, every inference mode, in one command (a few minutes on an H200).

    python benchmarks/gpu.py                      # cuda, bf16, Vicuna-7B decoder shape, writes results/gpu_<name>.json
    python benchmarks/gpu.py --small --device cpu --backend eager  # the same cases at a tiny shape (a smoke test)

Both models are built directly on the device (random weights, seeded; the p-MoD one is a copy with the paper's
schedule and random routers, so routing is not trivially the first tokens). Every case times the two models
interleaved, rep by rep, and reports medians, their ratio and the quartiles of the paired ratios; absolute times
drift between runs, ratios measured side by side do not. Prefills also time the ideal one (the dense layers on
p-MoD's processed-token counts, no routing: `common.ideal_prefill_runner`), so p-MoD / ideal is the routing's own
cost on this GPU. Cases: prefill (batch 1 and 8 at 576 vision + 64 text tokens, batch 1 and 4 at 2880 + 200),
eager and compiled (fullgraph; p-MoD given ``target_counts``); one training step (forward and backward, batch 4,
576 + 64); and decoding steps after a prompt (batch 1 and 32 after 576 + 64, batch 8 after 2880 + 200) in each mode:
eager with the dynamic cache (cuDNN attention on and off), eager with a static cache, compiled (fullgraph) and
compiled with CUDA graphs (mode "reduce-overhead") on a static cache. Compilation happens in the warm-up, untimed.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from common import (
    RESULTS,
    compare,
    decode_runner,
    ideal_prefill_runner,
    interleaved,
    machine,
    prefill_runner,
    write_result,
)

import pmod
from pmod.efficiency import prefill_cost, shape_from_config
from pmod.tiny import randomize_routers

SHAPES = {  # layers, hidden, MLP width, heads
    "7b": (32, 4096, 11008, 32),
    "small": (32, 64, 176, 4),
}
PREFILL = [(1, 576, 64), (8, 576, 64), (1, 2880, 200), (4, 2880, 200)]  # batch, vision tokens, text tokens
TRAIN = [(4, 576, 64)]
DECODE = [(1, 576, 64), (32, 576, 64), (8, 2880, 200)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bf16 on cuda, fp32 else")
    p.add_argument("--small", action="store_true", help="a tiny shape and short sequences (test the script on CPU)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per model and case (after one warm-up)")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--only", nargs="*", choices=["prefill", "train", "decode"], default=None)
    p.add_argument("--decode-modes", nargs="*", choices=list(DECODE_MODES), default=list(DECODE_MODES))
    p.add_argument("--prefill-modes", nargs="*", choices=["eager", "compiled"], default=["eager", "compiled"])
    p.add_argument("--backend", default="inductor", help="torch.compile backend (eager: a quick check of the script)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def build(args: argparse.Namespace, dtype: torch.dtype):
    """Dense and p-MoD Llama decoders of the shape, created on the device in ``dtype`` (seconds, not minutes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, mlp, heads = SHAPES["small" if args.small else "7b"]
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads,
                         num_key_value_heads=heads, vocab_size=32000 if not args.small else 1024,
                         max_position_embeddings=4096, attn_implementation=args.attn)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            dense = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    routed = pmod.apply_pmod(copy.deepcopy(dense), pmod.PModConfig()).eval()
    randomize_routers(routed)
    return dense, routed


def inputs(args: argparse.Namespace, batch: int, vision: int, text: int, vocab: int) -> dict[str, torch.Tensor]:
    """input_ids and the vision-token mask: half the text, the image, the other half (the mask is the routing
    target of the p-MoD model; the dense model ignores it)."""
    gen = torch.Generator().manual_seed(batch * 7 + vision)
    ids = torch.randint(0, vocab, (batch, vision + text), generator=gen).to(args.device)
    target = torch.zeros(batch, vision + text, dtype=torch.bool, device=args.device)
    target[:, text // 2 : text // 2 + vision] = True
    return {"input_ids": ids, "target_mask": target}


def scaled(case: tuple[int, int, int], small: bool) -> tuple[int, int, int]:
    batch, vision, text = case
    return (batch, vision // 18, text // 4) if small else case  # 576 -> 32, 2880 -> 160 tokens


def prefill_case(dense, routed, args, case, mode: str = "eager") -> dict:
    x = inputs(args, *case, dense.config.vocab_size)
    options = None if mode == "eager" else {"fullgraph": True, "backend": args.backend}
    torch._dynamo.reset()
    runs = {"dense": prefill_runner(dense, x["input_ids"], None, options),
            "pmod": prefill_runner(routed, x["input_ids"], x["target_mask"], options),
            "ideal": ideal_prefill_runner(dense, routed, x["input_ids"], x["target_mask"], options)}
    with torch.no_grad():
        return compare(interleaved(runs, args.reps, args.device)[0])


def train_case(dense, routed, args, case) -> dict:
    x = inputs(args, *case, dense.config.vocab_size)

    def step(model, **kw):
        def run():
            model.zero_grad(set_to_none=True)
            model(input_ids=x["input_ids"], labels=x["input_ids"], use_cache=False, **kw).loss.backward()
        return run

    dense.train(), routed.train()
    try:
        runs = {"dense": step(dense), "pmod": step(routed, target_mask=x["target_mask"])}
        result = compare(interleaved(runs, max(3, args.reps // 2), args.device)[0])
    finally:
        for model in (dense, routed):
            model.zero_grad(set_to_none=True)
            model.eval()
    return result


# decoding modes: (cache, torch.compile options or None, cuDNN attention allowed)
DECODE_MODES = {
    "eager": ("dynamic", None, True),
    "eager-no-cudnn": ("dynamic", None, False),
    "eager-static": ("static", None, True),
    "compiled": ("static", {"fullgraph": True}, True),
    "cudagraphs": ("static", {"fullgraph": True, "mode": "reduce-overhead"}, True),
}


def decode_case(dense, routed, args, case, mode: str = "eager") -> dict:
    """Seconds per decoding step after the case's prompt, in ``mode`` (`DECODE_MODES`): the two models step in turn
    from their own prefilled caches; the first steps warm up (and compile), then medians of the timed steps."""
    x = inputs(args, *case, dense.config.vocab_size)
    cache_kind, options, cudnn = DECODE_MODES[mode]
    options = None if options is None else {**options, "backend": args.backend}
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    torch._dynamo.reset()
    try:
        warm = 3
        steps = args.decode_steps + warm
        runs = {"dense": decode_runner(dense, x["input_ids"], None, cache_kind, steps, options),
                "pmod": decode_runner(routed, x["input_ids"], x["target_mask"], cache_kind, steps, options)}
        times, _ = interleaved(runs, args.decode_steps, args.device, warmup=warm)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)
    result = compare(times)
    return {**result, "batch_tokens_per_s": {"dense": case[0] / result["dense_s"], "pmod": case[0] / result["pmod_s"]}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    )
    dense, routed = build(args, dtype)
    kinds = args.only or ["prefill", "train", "decode"]
    rows = []
    plan = [("prefill", PREFILL, prefill_case, args.prefill_modes), ("train", TRAIN, train_case, [None]),
            ("decode", DECODE, decode_case, args.decode_modes)]
    for kind, cases, run, modes in plan:
        if kind not in kinds:
            continue
        for case, mode in [(c, m) for c in cases for m in modes]:
            batch, vision, text = scaled(case, args.small)
            extra = {} if mode is None else {"mode": mode}
            row = {"case": kind, **extra, "batch": batch, "vision_tokens": vision, "text_tokens": text,
                   **run(dense, routed, args, (batch, vision, text), **extra)}
            cost = prefill_cost(shape_from_config(routed.config, "bench"), vision, text, resolved=routed.pmod,
                                causal=True)
            row["flops_ratio"] = cost.flops_ratio
            rows.append(row)
            print(f"{kind:8s} {mode or '':14s} batch {batch:3d} {vision:5d}+{text:<4d} dense "
                  f"{row['dense_s'] * 1e3:9.2f} ms  p-MoD {row['pmod_s'] * 1e3:9.2f} ms  ratio {row['ratio']:.3f}  "
                  f"(FLOPs {row['flops_ratio']:.3f})",
                  file=sys.stderr)
    layers, hidden, mlp, heads = SHAPES["small" if args.small else "7b"]
    result = {"machine": machine(args.device), "dtype": str(dtype).removeprefix("torch."), "attn": args.attn,
              "shape": {"layers": layers, "hidden": hidden, "intermediate": mlp, "heads": heads}, "reps": args.reps,
              "decode_steps": args.decode_steps, "rows": rows}
    name = machine(args.device).get("gpu", args.device).split()[-1].lower() if args.device.startswith("cuda") else "cpu"
    out = args.out or RESULTS / f"gpu_{name}.json"
    write_result(out, result)
    lines = ["| case | mode | batch | tokens | dense ms | p-MoD ms | p-MoD / dense | quartiles | FLOP ratio | "
             "ideal / dense | p-MoD / ideal |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r.get('mode', '')} | {r['batch']} | {r['vision_tokens']} + {r['text_tokens']} | "
              f"{r['dense_s'] * 1e3:.2f} | {r['pmod_s'] * 1e3:.2f} | {r['ratio']:.3f} | "
              f"{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} | {r['flops_ratio']:.3f} | "
              + (f"{r['ideal_ratio']:.3f} | {r['routing_overhead']:.3f} |" if "ideal_s" in r else "- | - |")
              for r in rows]
    out.with_suffix(".md").write_text(f"{result['machine']}\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
