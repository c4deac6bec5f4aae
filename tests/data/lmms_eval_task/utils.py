"""Document functions of the pmod_tiny_vqa task (tests/test_lmms_eval.py)."""

from pathlib import Path

from PIL import Image

from pmod.evaluate import exact_match

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    if not doc["image"]:
        return []
    with Image.open(HERE / doc["image"]) as img:
        return [img.convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(exact_match(results[0], doc["answer"]))}
