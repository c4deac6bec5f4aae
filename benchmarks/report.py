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
    for marker, pattern, extra in (("{{COMPILED_TABLES}}", "compiled*.md", ".json"),
                                   ("{{THREADS_TABLES}}", "threads*.md", ".json"),
                                   ("{{EFFICIENCY_TABLES}}", "efficiency*.md", ".png"),
                                   ("{{SERVE_TABLES}}", "serve*.md", ".json")):
        text = text.replace(marker, "\n".join(_with_link(p, extra) for p in sorted((HERE / "results").glob(pattern))))
    (HERE / "README.md").write_text(text)


def _with_link(table: Path, extra: str) -> str:
    """A committed result table under a line linking it and its JSON data (or its plot)."""
    other = table.with_suffix(extra).name
    link = f"plot [{other}](results/{other})" if extra == ".png" else f"([{other}](results/{other}))"
    sep = ", " if extra == ".png" else " "
    return f"[{table.name}](results/{table.name}){sep}{link}:\n\n" + table.read_text()


if __name__ == "__main__":
    main()
