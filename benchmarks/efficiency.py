"""Prefill latency, peak memory, KV bytes and training-step time, dense vs p-MoD, at several vision-token counts.

A 32-layer Llama-shaped decoder (hidden size scaled down to fit a CPU) with the paper's schedule. For each
vision-token count: dense and p-MoD prefill interleaved (median of --reps), the analytic FLOP ratio of that
exact shape (`pmod.efficiency.prefill_cost`), the KV-cache bytes after the prefill, the peak memory of one
prefill with a cache (each measured in a fresh process: peak RSS minus RSS before the forward on CPU,
`max_memory_allocated` on CUDA), and one training step (forward + backward with labels).

    python benchmarks/efficiency.py                         # -> results/efficiency_cpu.{json,md,png}
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from common import (
    OUT_HELP,
    SCRATCH,
    add_model_args,
    clock,
    dense_and_pmod,
    dense_model,
    machine,
    prompt,
    shape,
    write_result,
)

import pmod
from pmod.compat import output_cache
from pmod.efficiency import kv_cache_report, prefill_cost, shape_from_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--vision-counts", type=int, nargs="+", default=[576, 1152, 2880])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--train-reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=SCRATCH / "efficiency_cpu.json", help=OUT_HELP)
    p.add_argument("--memory-probe", choices=["dense", "pmod"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(args: argparse.Namespace) -> None:
    """Child process: one prefill with a KV cache; prints the peak extra memory in bytes."""
    model = dense_model(args)  # built alone: freeing a second copy first would hide allocations
    if args.memory_probe == "pmod":
        model = pmod.apply_pmod(model, pmod.PModConfig())
    ids, target = prompt(args, 1)
    extra = {} if args.memory_probe == "dense" else {"target_mask": target}
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
        base = _rss_kib("VmRSS") * 1024
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **extra)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    del out
    print(peak - base)


def peak_memory(kind: str, vision_tokens: int, argv: list[str]) -> int:
    cmd = [sys.executable, __file__, *argv, "--vision-tokens", str(vision_tokens), "--memory-probe", kind]
    # A fixed mmap threshold makes glibc return every large buffer to the OS when freed, so the RSS
    # high-water mark follows the live tensors instead of the allocator's retained heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return int(result.stdout.strip().splitlines()[-1])


def prefill_time(model, inputs, device: str) -> float:
    start = clock(device)
    with torch.no_grad():
        model(**inputs, use_cache=False, logits_to_keep=1)
    return clock(device) - start


def train_time(model, inputs, device: str) -> float:
    model.zero_grad(set_to_none=True)
    start = clock(device)
    loss = model(**inputs, labels=inputs["input_ids"], use_cache=False).loss
    loss.backward()
    return clock(device) - start


def main() -> None:
    args = parse_args()
    if args.memory_probe:
        memory_probe(args)
        return
    child_argv = [f"--{k.replace('_', '-')}={v}" for k, v in shape(args).items() if k != "vision_tokens"]
    child_argv.append(f"--device={args.device}")
    dense, routed = dense_and_pmod(args)
    rows = []
    for n_vision in args.vision_counts:
        args.vision_tokens = n_vision
        ids, target = prompt(args, 1)
        dense_in, routed_in = {"input_ids": ids}, {"input_ids": ids, "target_mask": target}
        prefill_time(dense, dense_in, args.device), prefill_time(routed, routed_in, args.device)  # warm-up
        d_t, r_t = [], []
        for _ in range(args.reps):
            d_t.append(prefill_time(dense, dense_in, args.device))
            r_t.append(prefill_time(routed, routed_in, args.device))
        dense.train(), routed.train()
        # warm-up: the first backward allocates autograd's buffers and, dense being timed first, made dense look slow
        train_time(dense, dense_in, args.device), train_time(routed, routed_in, args.device)
        d_tr, r_tr = [], []
        for _ in range(args.train_reps):
            d_tr.append(train_time(dense, dense_in, args.device))
            r_tr.append(train_time(routed, routed_in, args.device))
        dense.eval(), routed.eval()
        with torch.no_grad():
            cache = output_cache(routed(**routed_in, use_cache=True, logits_to_keep=1))
            dense_cache = output_cache(dense(**dense_in, use_cache=True, logits_to_keep=1))
        kv = kv_cache_report(cache)
        dense_kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense_cache.layers)
        cost = prefill_cost(shape_from_config(routed.config), n_vision, args.text_tokens, resolved=routed.pmod)
        causal = prefill_cost(shape_from_config(routed.config), n_vision, args.text_tokens, resolved=routed.pmod,
                              causal=True)
        mem_d = peak_memory("dense", n_vision, child_argv)
        mem_r = peak_memory("pmod", n_vision, child_argv)
        row = {
            "vision_tokens": n_vision,
            "text_tokens": args.text_tokens,
            "analytic_flops_ratio": cost.flops_ratio,
            "analytic_flops_ratio_causal": causal.flops_ratio,
            "prefill_dense_ms": statistics.median(d_t) * 1e3,
            "prefill_pmod_ms": statistics.median(r_t) * 1e3,
            "prefill_time_ratio": statistics.median(r_t) / statistics.median(d_t),
            "train_step_dense_ms": statistics.median(d_tr) * 1e3,
            "train_step_pmod_ms": statistics.median(r_tr) * 1e3,
            "train_step_time_ratio": statistics.median(r_tr) / statistics.median(d_tr),
            "kv_dense_bytes": dense_kv,
            "kv_pmod_bytes": kv.bytes,
            "kv_ratio": kv.bytes / dense_kv,
            "kv_vision_entry_ratio": cost.kv_ratio,
            "peak_memory_dense_bytes": mem_d,
            "peak_memory_pmod_bytes": mem_r,
            "peak_memory_ratio": mem_r / mem_d,
            "prefill_dense_ms_all": [t * 1e3 for t in d_t],
            "prefill_pmod_ms_all": [t * 1e3 for t in r_t],
        }
        rows.append(row)
        print(
            f"{n_vision} vision: prefill x{row['prefill_time_ratio']:.3f} (FLOPs x{cost.flops_ratio:.3f}), train step "
            f"x{row['train_step_time_ratio']:.3f}, KV x{row['kv_ratio']:.3f}, peak memory "
            f"x{row['peak_memory_ratio']:.3f}",
            file=sys.stderr,
        )
    result = {
        "benchmark": "efficiency",
        "shape": {k: v for k, v in shape(args).items() if k != "vision_tokens"},
        "reps": args.reps,
        "train_reps": args.train_reps,
        "rows": rows,
        "machine": machine(args.device),
    }
    write_result(args.out, result)
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(result, args.out.with_suffix(".png"))
    print(f"-> {args.out}, {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}")


def markdown(result: dict) -> str:
    s, m = result["shape"], result["machine"]
    lines = [
        f"Decoder {s['layers']} layers x hidden {s['hidden']} (MLP {s['intermediate']}, {s['heads']} heads), "
        f"{s['dtype']}, {s['attn']}, batch 1, {result['rows'][0]['text_tokens']} text tokens; "
        f"median of {result['reps']} prefills / {result['train_reps']} training steps; "
        f"{m.get('gpu') or m['processor']}, {m['torch_threads']} threads, torch {m['torch']}.",
        "",
        ("| vision tokens | FLOP ratio (paper's count) | FLOP ratio (causal attention) | prefill time ratio | "
         "train step time ratio | KV ratio | peak memory ratio | prefill dense / p-MoD ms |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['vision_tokens']} | {r['analytic_flops_ratio']:.3f} | {r['analytic_flops_ratio_causal']:.3f} | "
            f"**{r['prefill_time_ratio']:.3f}** | "
            f"**{r['train_step_time_ratio']:.3f}** | {r['kv_ratio']:.3f} | {r['peak_memory_ratio']:.3f} | "
            f"{r['prefill_dense_ms']:.0f} / {r['prefill_pmod_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["vision_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, label, style in [
        ("analytic_flops_ratio", "FLOPs (paper's count)", "k--"),
        ("analytic_flops_ratio_causal", "FLOPs (causal attention)", "k:"),
        ("prefill_time_ratio", "prefill time", "o-"),
        ("train_step_time_ratio", "training step time", "s-"),
        ("kv_ratio", "KV-cache bytes", "^-"),
        ("peak_memory_ratio", "prefill peak memory", "v-"),
    ]:
        ax.plot(x, [r[key] for r in rows], style, label=label)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("vision tokens")
    ax.set_ylabel("p-MoD / dense")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    s = result["shape"]
    ax.set_title(f"p-MoD vs dense, {s['layers']}-layer decoder (hidden {s['hidden']}), {s['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
