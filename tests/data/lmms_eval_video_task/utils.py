"""Document functions of the pmod_tiny_video and pmod_tiny_chat tasks (tests/test_lmms_eval.py)."""

from pathlib import Path

from PIL import Image

from pmod.evaluate import exact_match

HERE = Path(__file__).resolve().parent
SYSTEM = "answer in one word"


def doc_to_visual(doc):
    """An image file path (some documents), then the video: a folder of frames."""
    return ([str(HERE / doc["image"])] if doc["image"] else []) + [str(HERE / doc["video"])]


def doc_to_text(doc):
    return doc["question"]


def doc_to_messages(doc):
    """Chat messages: the video as a folder path, or (document 3) as a list of PIL frames after a first turn."""
    user = [{"type": "text", "text": "look at"}]
    if doc["image"]:
        user += [{"type": "image", "url": str(HERE / doc["image"])}, {"type": "text", "text": "and"}]
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}]
    if doc["question_id"] == 3:
        frames = []
        for path in sorted((HERE / doc["video"]).glob("*.png")):
            with Image.open(path) as img:
                frames.append(img.convert("RGB"))
        messages += [
            {"role": "user", "content": [{"type": "text", "text": "what is a circle ?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a colour"}]},
        ]
        user.append({"type": "video", "url": frames})
    else:
        user.append({"type": "video", "url": str(HERE / doc["video"])})
    user.append({"type": "text", "text": doc["question"]})
    return messages + [{"role": "user", "content": user}]


def process_results(doc, results):
    return {"exact_match": float(exact_match(results[0], doc["answer"]))}
