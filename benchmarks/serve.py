"""Load benchmark of `pmod serve`: concurrent clients (the official openai client, streaming) against a dense and a
p-MoD LLaVA-shaped model served side by side on localhost; throughput, latency and time-to-first-token percentiles
per concurrency level.

Each level runs the dense server, then the p-MoD one, ``--rounds`` times (the medians are reported). Every request
carries one image (576 vision tokens at the default shape) and a short question, and gets exactly ``--max-tokens``
tokens (end-of-sequence suppressed), so both models do the same work but for the tokens p-MoD skips. Closed loop:
each client sends its next request when its last one is answered.

    python benchmarks/serve.py                                  # concurrency 1, 4, 8
    python benchmarks/serve.py --concurrency 8 --requests 32 --out runs/benchmarks/serve_cpu_c8.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_HELP, SCRATCH, machine, write_result  # noqa: E402

import pmod  # noqa: E402
from pmod.pipelines.serve import ServeSettings, create_app, image_data_url, serving_in_thread  # noqa: E402
from pmod.tiny import randomize_routers, tiny_llava, tiny_llava_processor  # noqa: E402

WORDS = "USER ASSISTANT : what is in the image ? describe it a red blue green circle square triangle yes no".split()
# a word for every id of the tiny vocabulary (128: 4 specials, the words, <image> last), so that every generated token
# decodes to text and streams (an id without a word decodes to nothing)
WORDS += [f"w{i}" for i in range(128 - 1 - 4 - len(WORDS))]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16, help="decoder layers (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=256, help="decoder hidden size (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=336, help="image side; 14-pixel patches (default: %(default)s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="clients at once, per level")
    p.add_argument("--requests", type=int, default=16, help="requests per level and model (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=8, help="the servers' --max-batch-size (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=20,
                   help="the servers' --batch-wait-ms (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="dense / p-MoD alternations per level (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=SCRATCH / "serve_cpu.json", help=OUT_HELP)
    return p.parse_args(argv)


def models(args: argparse.Namespace):
    dense = tiny_llava(num_layers=args.layers, hidden_size=args.hidden, image_size=args.image_size, patch_size=14,
                       vision_hidden_size=64, vision_layers=2).eval()
    routed = pmod.apply_pmod(copy.deepcopy(dense), pmod.PModConfig()).eval()  # the paper's schedule
    randomize_routers(routed)
    return dense, routed, tiny_llava_processor(dense, WORDS)


def image_url(seed: int, size: int) -> str:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    return image_data_url(Image.fromarray(pixels))


def load(url: str, concurrency: int, n: int, max_tokens: int, images: list[str]) -> dict:
    """``n`` streaming requests from ``concurrency`` clients; per-request latency and time to first token."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    latencies, first_tokens, tokens, batch_sizes = [], [], [], []
    lock, counter = threading.Lock(), iter(range(n))

    def one(i: int) -> None:
        start = time.perf_counter()
        stream = client.chat.completions.create(
            model="m", max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[i % len(images)]}},
                                                   {"type": "text", "text": "describe it"}]}])
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
        with lock:
            latencies.append(time.perf_counter() - start)
            first_tokens.append(first if first is not None else latencies[-1])
            tokens.append(usage["completion_tokens"])
            batch_sizes.append(usage["pmod"]["batch_size"])

    def client_loop() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            one(i)

    one(0)  # warm-up: the first request pays for one-time set-up
    latencies.clear(), first_tokens.clear(), tokens.clear(), batch_sizes.clear()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client_loop) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "requests_per_s": n / wall, "tokens_per_s": sum(tokens) / wall,
            "latency_p50_s": percentile(latencies, 50), "latency_p90_s": percentile(latencies, 90),
            "latency_p99_s": percentile(latencies, 99), "ttft_p50_s": percentile(first_tokens, 50),
            "ttft_p90_s": percentile(first_tokens, 90), "mean_batch_size": statistics.fmean(batch_sizes),
            "completion_tokens": sum(tokens)}


def percentile(values: list[float], q: int) -> float:
    """The ``q``-th percentile (1-99), interpolated between the sorted values (one value: itself)."""
    return values[0] if len(values) == 1 else statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dense, routed, processor = models(args)
    eos = processor.tokenizer.eos_token_id
    images = [image_url(s, args.image_size) for s in range(4)]
    settings = ServeSettings(model_name="m", max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                             default_max_tokens=args.max_tokens, max_context=100_000)
    apps = {name: create_app(model, processor, settings.model_copy(), suppress_tokens=[eos])
            for name, model in (("dense", dense), ("pmod", routed))}
    rows = []
    for c in args.concurrency:
        runs: dict[str, list[dict]] = {"dense": [], "pmod": []}
        for _ in range(args.rounds):
            for name, app in apps.items():
                with serving_in_thread(app) as url:
                    runs[name].append(load(url, c, args.requests, args.max_tokens, images))
        med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
        row = {"concurrency": c, "dense": med["dense"], "pmod": med["pmod"],
               "throughput_ratio": med["pmod"]["requests_per_s"] / med["dense"]["requests_per_s"],
               "latency_p50_ratio": med["pmod"]["latency_p50_s"] / med["dense"]["latency_p50_s"],
               "ttft_p50_ratio": med["pmod"]["ttft_p50_s"] / med["dense"]["ttft_p50_s"]}
        rows.append(row)
        d, p = med["dense"], med["pmod"]
        print(f"concurrency {c}: throughput x{row['throughput_ratio']:.3f} (dense {d['requests_per_s']:.2f}, "
              f"p-MoD {p['requests_per_s']:.2f} req/s), latency p50 x{row['latency_p50_ratio']:.3f}, "
              f"TTFT p50 x{row['ttft_p50_ratio']:.3f}, mean batch {p['mean_batch_size']:.1f}", flush=True)
    vision_tokens = (args.image_size // 14) ** 2
    result = {"benchmark": "serve", "layers": args.layers, "hidden": args.hidden, "vision_tokens": vision_tokens,
              "requests": args.requests, "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size,
              "batch_wait_ms": args.batch_wait_ms, "rounds": args.rounds, "machine": machine("cpu"), "rows": rows}
    write_result(args.out, result)
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"-> {args.out}, {args.out.with_suffix('.md')}")


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"`pmod serve`, tiny LLaVA: {result['layers']} decoder layers x hidden {result['hidden']}, "
        f"{result['vision_tokens']} vision tokens per request, {result['max_tokens']} answer tokens, float32; "
        f"{result['requests']} streaming requests per level, servers batching up to {result['max_batch_size']} "
        f"(waiting {result['batch_wait_ms']:g} ms); median of {result['rounds']} dense / p-MoD alternations; "
        f"{m['processor']}, {m['torch_threads']} threads, torch {m['torch']}, transformers {m['transformers']}.",
        "",
        "| clients | requests/s dense / p-MoD | throughput ratio | latency p50 dense / p-MoD ms | p50 ratio | "
        "p90 dense / p-MoD ms | first token p50 dense / p-MoD ms | mean batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        d, p = r["dense"], r["pmod"]
        lines.append(
            f"| {r['concurrency']} | {d['requests_per_s']:.2f} / {p['requests_per_s']:.2f} | "
            f"**{r['throughput_ratio']:.3f}** | {d['latency_p50_s'] * 1e3:.0f} / {p['latency_p50_s'] * 1e3:.0f} | "
            f"**{r['latency_p50_ratio']:.3f}** | {d['latency_p90_s'] * 1e3:.0f} / {p['latency_p90_s'] * 1e3:.0f} | "
            f"{d['ttft_p50_s'] * 1e3:.0f} / {p['ttft_p50_s'] * 1e3:.0f} | {p['mean_batch_size']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
