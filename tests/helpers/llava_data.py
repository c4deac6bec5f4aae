"""Small LLaVA-format datasets written to disk for data and training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 30), "blue": (30, 30, 220)}


def colour_records(folder: Path, n: int = 48, seed: int = 0, size: int = 28) -> list[dict]:
    """Images of one coloured circle; the answer is its colour (learnable in a few dozen steps)."""
    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        colour = rng.choice(list(COLOURS))
        image = Image.new("RGB", (size, size), (240, 240, 240))
        ImageDraw.Draw(image).ellipse((4, 4, size - 4, size - 4), fill=COLOURS[colour])
        image.save(folder / f"img/{i}.png")
        records.append({
            "id": f"s{i}",
            "image": f"img/{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is the circle ?"},
                {"from": "gpt", "value": colour},
            ],
        })
    return records


def write_records(folder: Path, records: list[dict], name: str = "train.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(records))
    return path
