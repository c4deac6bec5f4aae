"""Torch threads and OpenMP's wait policy on a busy machine: a tiny training step (the demo's model size), with 1 and
2 threads, spinning (ACTIVE, OpenMP's default here) and passive waiting, on an idle machine, with one other busy
single-threaded process (a pure-Python loop) and with another torch process computing on 2 threads (a user's laptop
always runs something).

Each setting runs in a fresh process (OpenMP reads its wait policy when torch loads); the settings alternate, and
each reports its median step time.

    python benchmarks/threads.py             # -> benchmarks/results/threads_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import LOADS, OUT_HELP, SCRATCH, machine, machine_load, write_result

STEP = """
import statistics, sys, time, torch
torch.set_num_threads({threads})
sys.path.insert(0, {root!r})
from pmod.tiny import tiny_llava
model = tiny_llava(num_layers=4, hidden_size=64)
ids = torch.randint(1, 100, (8, 40), generator=torch.Generator().manual_seed(0))
ids[:, 2:18] = model.config.image_token_id
pixels = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(1))
times, start = [], time.perf_counter()
while time.perf_counter() - start < {seconds}:
    begin = time.perf_counter()
    model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
    times.append(time.perf_counter() - begin)
print(statistics.median(times[1:] or times))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=6.0, help="seconds of steps per setting and repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--policies", nargs="+", choices=["ACTIVE", "PASSIVE"], default=["ACTIVE", "PASSIVE"])
    p.add_argument("--loads", nargs="+", choices=list(LOADS), default=list(LOADS))
    p.add_argument("--out", type=Path, default=SCRATCH / "threads_cpu.json", help=OUT_HELP)
    return p.parse_args(argv)


def step_ms(threads: int, policy: str, seconds: float) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    code = STEP.format(threads=threads, root=str(Path(__file__).resolve().parents[1]), seconds=seconds)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1]) * 1e3


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = [(threads, policy) for threads in args.threads for policy in args.policies]
    rows = []
    for name in args.loads:
        with machine_load(name) as load:
            times: dict[tuple[int, str], list[float]] = {s: [] for s in settings}
            for _ in range(args.reps):
                for threads, policy in settings:
                    times[(threads, policy)].append(step_ms(threads, policy, args.seconds))
        for (threads, policy), values in times.items():
            rows.append({"load": load, "threads": threads, "wait_policy": policy,
                         "step_ms": statistics.median(values), "runs_ms": values})
            print(f"{load:17s} threads {threads} {policy:8s} {statistics.median(values):8.1f} ms/step", file=sys.stderr)
    result = {"benchmark": "threads", "what": "median ms of a tiny LLaVA training step (4 layers, 64 wide, batch 8, "
              "forward + backward) per setting, each in a fresh process", "seconds": args.seconds, "reps": args.reps,
              "rows": rows, "machine": machine("cpu")}
    write_result(args.out, result)
    lines = ["| machine load | torch threads | OMP_WAIT_POLICY | ms / step |", "|---|---|---|---|"]
    lines += [f"| {r['load']} | {r['threads']} | {r['wait_policy']} | {r['step_ms']:.1f} |" for r in rows]
    info = result["machine"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + f"\n\n{info['cpu_count']} CPUs ({info['processor']}), "
                                           f"torch {info['torch']}.\n")
    print(f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
