"""Write benchmarks/README.md's result table from the JSON files in benchmarks/results/."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    rows = []
    for path in sorted((HERE / "results").glob("prefill*.json")):
        r = json.loads(path.read_text())
        s, m = r["shape"], r["machine"]
        where = m.get("gpu") or f"{m['processor']}, {m['torch_threads']} threads"
        rows.append(
            f"| [{path.name}](results/{path.name}) | {s['layers']}x{s['hidden']} {s['dtype']} {s['attn']} | "
            f"{s['vision_tokens']}+{s['text_tokens']} | {s['batch']} | {r['dense_ms_median']:.1f} | "
            f"{r['pmod_ms_median']:.1f} | **{r['time_ratio']:.3f}** | {r['processed_token_ratio']:.3f} | "
            f"{r['reps']} | {where} |"
        )
    decode_rows = []
    for path in sorted((HERE / "results").glob("decode*.json")):
        r = json.loads(path.read_text())
        s, m = r["shape"], r["machine"]
        where = m.get("gpu") or f"{m['processor']}, {m['torch_threads']} threads"
        for row in r["results"]:
            decode_rows.append(
                f"| [{path.name}](results/{path.name}) | {s['layers']}x{s['hidden']} {s['dtype']} {s['attn']} | "
                f"{s['vision_tokens']}+{s['text_tokens']} | {row['batch']} | {row['dense_ms_per_token']:.2f} | "
                f"{row['pmod_ms_per_token']:.2f} | **{row['time_ratio']:.3f}** | {row['dense_kv_bytes'] / 2**20:.1f} | "
                f"{row['pmod_kv_bytes'] / 2**20:.1f} | **{row['kv_ratio']:.4f}** | {row['predicted_kv_ratio']:.4f} | "
                f"{where} |"
            )
    decode_table = "\n".join(
        [
            ("| result | decoder | prompt tokens | batch | dense ms/token | p-MoD ms/token | time ratio | "
             "dense KV MiB | p-MoD KV MiB | KV ratio | predicted | machine |"),
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *decode_rows,
        ]
    )
    table = "\n".join(
        [
            ("| result | decoder | vision+text tokens | batch | dense ms | p-MoD ms | time ratio | "
             "processed-token ratio | reps | machine |"),
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    text = (HERE / "README.template.md").read_text().replace("{{PREFILL_TABLE}}", table)
    text = text.replace("{{DECODE_TABLE}}", decode_table)
    compiled = sorted((HERE / "results").glob("compiled*.md"))
    text = text.replace("{{COMPILED_TABLES}}", "\n".join(
        f"[{p.name}](results/{p.name}) ([{p.with_suffix('.json').name}](results/{p.with_suffix('.json').name})):\n\n"
        + p.read_text() for p in compiled
    ))
    threads = sorted((HERE / "results").glob("threads*.md"))
    text = text.replace("{{THREADS_TABLES}}", "\n".join(
        f"[{p.name}](results/{p.name}) ([{p.with_suffix('.json').name}](results/{p.with_suffix('.json').name})):\n\n"
        + p.read_text() for p in threads
    ))
    efficiency = sorted((HERE / "results").glob("efficiency*.md"))
    text = text.replace("{{EFFICIENCY_TABLES}}", "\n".join(
        f"[{p.name}](results/{p.name}), plot [{p.with_suffix('.png').name}](results/{p.with_suffix('.png').name}):\n\n"
        + p.read_text() for p in efficiency
    ))
    serve = sorted((HERE / "results").glob("serve*.md"))
    text = text.replace("{{SERVE_TABLES}}", "\n".join(
        f"[{p.name}](results/{p.name}) ([{p.with_suffix('.json').name}](results/{p.with_suffix('.json').name})):\n\n"
        + p.read_text() for p in serve
    ))
    (HERE / "README.md").write_text(text)


if __name__ == "__main__":
    main()
