import json
import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pmod.data.synthetic import (
    PALETTE,
    QUESTION_TYPES,
    SyntheticConfig,
    make_sample,
    question_type,
    write_dataset,
)

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ROWS = {"top": 0, "middle": 1, "bottom": 2}
COLS = {"left": 0, "center": 1, "right": 2}


def cell_of(words: list[str]) -> tuple[int, int]:
    """Position words of a 3x3 grid -> (row, col), written independently of the generator's naming."""
    if words == ["center"]:
        return 1, 1
    row, col = words
    return ROWS[row], COLS[col]


def derive_answer(question: str, scene: dict) -> str:
    """The answer to a question, re-derived from the scene description alone."""
    shapes = scene["shapes"]
    words = question.split()
    assert words[-1] == "?"
    words = words[:-1]
    if words[:4] == ["what", "colour", "is", "the"] and words[4:7] == ["shape", "at", "the"]:
        row, col = cell_of(words[7:])
        (match,) = [s for s in shapes if (s["row"], s["col"]) == (row, col)]
        return match["colour"]
    if words[:4] == ["what", "colour", "is", "the"]:
        (match,) = [s for s in shapes if s["shape"] == words[4]]  # the question must name exactly one shape
        return match["colour"]
    if words[:5] == ["what", "shape", "is", "at", "the"]:
        row, col = cell_of(words[5:])
        (match,) = [s for s in shapes if (s["row"], s["col"]) == (row, col)]
        return match["shape"]
    if words == ["how", "many", "shapes", "are", "there"]:
        return NUMBERS[len(shapes)]
    if words[:2] == ["how", "many"] and words[2].endswith("s"):  # "how many circles are there"
        return NUMBERS[sum(s["shape"] + "s" == words[2] for s in shapes)]
    if words[:2] == ["how", "many"]:
        return NUMBERS[sum(s["colour"] == words[2] for s in shapes)]
    if words[:3] == ["is", "there", "a"]:
        return "yes" if any((s["colour"], s["shape"]) == (words[3], words[4]) for s in shapes) else "no"
    if words[:2] == ["is", "the"]:
        first = words[2]
        second = words[-1]
        (a,) = [s for s in shapes if s["shape"] == first]
        (b,) = [s for s in shapes if s["shape"] == second]
        if "left" in words:
            assert a["col"] != b["col"]
            return "yes" if a["col"] < b["col"] else "no"
        assert words[3] == "above" and a["row"] != b["row"]
        return "yes" if a["row"] < b["row"] else "no"
    raise AssertionError(f"unexpected question {question!r}")


def check_scene_geometry(image: Image.Image, scene: dict, config: SyntheticConfig) -> None:
    """Shapes sit in distinct cells, inside their cell, and their colour is where the scene says."""
    cells = [(s["row"], s["col"]) for s in scene["shapes"]]
    assert len(set(cells)) == len(cells)
    cell = config.image_size / config.grid
    pixels = np.asarray(image)
    assert pixels.shape == (config.image_size, config.image_size, 3)
    for s in scene["shapes"]:
        x0, y0, x1, y1 = s["box"]
        assert s["col"] * cell <= x0 < x1 <= (s["col"] + 1) * cell
        assert s["row"] * cell <= y0 < y1 <= (s["row"] + 1) * cell
        # Every shape kind covers the point 3/4 of the way down its vertical centre line.
        cx, cy = (x0 + x1) // 2, y0 + 3 * (y1 - y0) // 4
        assert tuple(pixels[cy, cx]) == PALETTE[s["colour"]]
    # Shapes keep a 1 px margin inside their cell, so the image corner is background.
    assert tuple(pixels[0, 0]) == tuple(scene["background"])


def test_answers_are_exact():
    config = SyntheticConfig()
    rng = random.Random(123)
    seen = Counter()
    for i in range(400):
        types = [QUESTION_TYPES[i % len(QUESTION_TYPES)], QUESTION_TYPES[(i * 3 + 1) % len(QUESTION_TYPES)]]
        image, scene, pairs = make_sample(rng, config, types)
        check_scene_geometry(image, scene, config)
        assert len(pairs) == 2
        for (question, answer), wanted in zip(pairs, types):
            assert question_type(question) == wanted
            assert derive_answer(question, scene) == answer, (question, scene)
            seen[wanted, answer] += 1
    # Both yes and no answers occur for the yes/no types; zero counts occur for colour counts.
    assert seen["exists", "yes"] and seen["exists", "no"] and seen["relation", "yes"] and seen["relation", "no"]
    assert seen["count_colour", "zero"] and seen["count_shape", "zero"] and seen["count_shape", "two"]


def test_make_sample_default_type_and_errors():
    config = SyntheticConfig(image_size=64, grid=2, max_shapes=3, colours=("red", "blue"), shapes=("circle", "square"))
    image, scene, pairs = make_sample(random.Random(0), config)
    assert image.size == (64, 64) and len(pairs) == 1 and 1 <= len(scene["shapes"]) <= 3
    for i in range(100):
        image, scene, pairs = make_sample(random.Random(i), config)
        check_scene_geometry(image, scene, config)
        (question, answer), = pairs
        assert set(question.split()) <= config.question_words()
        assert answer in config.answers()
    with pytest.raises(ValueError, match="question types"):
        make_sample(random.Random(0), config, ["colour_of_cube"])
    with pytest.raises(ValueError, match="relation"):
        make_sample(random.Random(0), SyntheticConfig(max_shapes=1), ["relation"])
    with pytest.raises(ValueError, match="grid"):
        SyntheticConfig(grid=5)
    with pytest.raises(ValueError, match="max_shapes"):
        SyntheticConfig(grid=2, max_shapes=5)
    with pytest.raises(ValueError, match="unknown"):
        SyntheticConfig(colours=("red", "mauve"))


def test_question_type_rejects_other_text():
    with pytest.raises(ValueError):
        question_type("what is in the image ?")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    config = SyntheticConfig(n_train=140, n_val=30, n_test=30, seed=7, multi_turn=0.25)
    return write_dataset(tmp_path_factory.mktemp("synthetic") / "data", config)


def test_splits_and_llava_format(dataset):
    sizes = {"train": 140, "validation": 30, "test": 30}
    ids = set()
    multi = 0
    for split, path in dataset.splits.items():
        entries = json.loads(path.read_text())
        assert entries == dataset.load(split)
        assert len(entries) == sizes[split]
        for entry in entries:
            assert set(entry) == {"id", "image", "conversations"}
            assert entry["image"] == f"images/{entry['id']}.png"
            assert (dataset.image_dir / entry["image"]).is_file()
            turns = entry["conversations"]
            assert len(turns) in ((2, 4) if split == "train" else (2,))  # evaluation splits: one question
            multi += len(turns) == 4
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            # Exactly one image placeholder, at the start of the first human turn.
            assert sum(t["value"].count("<image>") for t in turns) == 1
            assert turns[0]["value"].startswith("<image>\n")
            ids.add(entry["id"])
    assert len(ids) == 200
    assert 15 < multi < 60  # multi_turn=0.25 of 140 training samples
    assert len(list((dataset.image_dir / "images").glob("*.png"))) == 200
    stats = json.loads(dataset.stats_json.read_text())
    assert stats["splits"]["train"]["samples"] == 140 and stats["config"]["seed"] == 7


def test_vocabulary_covers_every_word(dataset):
    vocab = dataset.vocabulary()
    assert vocab == sorted(set(vocab))
    assert {"USER", "ASSISTANT", ":"} <= set(vocab)
    for split in dataset.splits:
        for entry in dataset.load(split):
            for turn in entry["conversations"]:
                text = turn["value"].replace("<image>", "")
                assert re.fullmatch(r"[a-z?\s]+", text), text  # lowercase, "?" the only punctuation
                assert set(text.split()) <= set(vocab), text
                if turn["from"] == "gpt":
                    assert text in dataset.answers


def test_vocabulary_fits_a_word_tokenizer(dataset):
    """A tiny processor built from the vocabulary encodes every prompt and answer without <unk>."""
    from pmod.tiny import tiny_llava, tiny_llava_processor

    processor = tiny_llava_processor(tiny_llava(num_layers=1), words=dataset.vocabulary())
    tokenizer = processor.tokenizer
    for entry in dataset.load("validation"):
        turns = entry["conversations"]
        messages = [
            {"role": "user" if t["from"] == "human" else "assistant",
             "content": [{"type": "text", "text": t["value"].replace("<image>\n", "")}]}
            for t in turns
        ]
        messages[0]["content"].insert(0, {"type": "image"})
        text = processor.apply_chat_template(messages)
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text


def test_answers_balanced_and_stats(dataset):
    answers = Counter()
    types = Counter()
    for entry in dataset.load("train"):
        turns = entry["conversations"]
        answers.update(t["value"] for t in turns[1::2])
        types[question_type(turns[0]["value"])] += 1
    total = sum(answers.values())
    assert max(answers.values()) / total <= 0.4
    assert max(types.values()) - min(types.values()) <= 1  # first turns cycle through the types
    stats = dataset.stats["train"]
    assert stats["answer_counts"] == dict(sorted(answers.items()))
    assert stats["majority_baseline"] == pytest.approx(max(answers.values()) / total)
    assert stats["majority_answer"] == answers.most_common(1)[0][0]
    assert stats["majority_baseline"] <= stats["per_type_majority_baseline"] < 0.6


def test_deterministic(tmp_path):
    config = SyntheticConfig(n_train=12, n_val=4, n_test=4, seed=3, multi_turn=0.5)
    a = write_dataset(tmp_path / "a", config)
    b = write_dataset(tmp_path / "b", config)
    for name in ("train.json", "validation.json", "test.json", "dataset.json"):
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes()
    pngs = sorted(p.name for p in (a.root / "images").iterdir())
    assert len(pngs) == 20
    for name in pngs:
        assert (a.root / "images" / name).read_bytes() == (b.root / "images" / name).read_bytes()
    # Another seed gives other data; a larger train split leaves validation and test unchanged.
    c = write_dataset(tmp_path / "c", SyntheticConfig(n_train=12, n_val=4, n_test=4, seed=4, multi_turn=0.5))
    assert c.train_json.read_text() != a.train_json.read_text()
    d = write_dataset(tmp_path / "a", SyntheticConfig(n_train=20, n_val=4, n_test=4, seed=3, multi_turn=0.5))
    assert d.test_json.read_text() == b.test_json.read_text()
    assert d.load("train")[:12] == b.load("train")
    # Rewriting a smaller dataset into the same folder removes the images it no longer lists.
    write_dataset(tmp_path / "a", SyntheticConfig(n_train=2, n_val=1, n_test=1, seed=3))
    assert len(list((tmp_path / "a" / "images").iterdir())) == 4


def test_speed(tmp_path):
    import time

    start = time.perf_counter()
    write_dataset(tmp_path / "speed", SyntheticConfig(n_train=300, n_val=0, n_test=0))
    assert time.perf_counter() - start < 4.5  # 2000 images must stay well under 30 s on one core


def test_cell_labels_match_the_drawn_pixels(dataset):
    """scenes.json's per-cell labels say what is drawn: the colour at each labelled shape's centre line, and
    background in the middle of every cell labelled empty."""
    config = dataset.config
    labels = dataset.cell_labels("test")
    assert list(labels) == [e["id"] for e in dataset.load("test")]
    cell = config.image_size / config.grid
    for sample_id, cells in labels.items():
        assert len(cells) == config.grid * config.grid
        pixels = np.asarray(Image.open(dataset.image_dir / "images" / f"{sample_id}.png").convert("RGB"))
        background = tuple(pixels[0, 0])
        shapes = [c for c in cells if c != (0, 0)]
        assert 1 <= len(shapes) <= config.max_shapes
        for index, (shape, colour) in enumerate(cells):
            row, col = divmod(index, config.grid)
            if (shape, colour) == (0, 0):
                # an empty cell is background all over (sampled on a coarse lattice)
                ys = [round(row * cell + f * cell) for f in (0.1, 0.5, 0.9)]
                xs = [round(col * cell + f * cell) for f in (0.1, 0.5, 0.9)]
                assert all(tuple(pixels[y, x]) == background for y in ys for x in xs)
                continue
            assert 1 <= shape <= len(config.shapes) and 1 <= colour <= len(config.colours)
            rgb = PALETTE[config.colours[colour - 1]]
            block = pixels[int(row * cell):int((row + 1) * cell), int(col * cell):int((col + 1) * cell)]
            assert (block == rgb).all(-1).sum() > 0.15 * cell * cell  # the labelled colour fills part of the cell
    # the answers re-derived from the labels agree with the written ones for position questions
    for entry in dataset.load("test"):
        question, answer = (entry["conversations"][0]["value"].removeprefix("<image>\n"),
                            entry["conversations"][1]["value"])
        if question_type(question) == "shape_at":
            words = question.split()[5:-1]
            row, col = cell_of(words)
            assert config.shapes[labels[entry["id"]][row * config.grid + col][0] - 1] == answer


def test_cell_labels_need_the_scenes_file(tmp_path):
    data = write_dataset(tmp_path / "d", SyntheticConfig(n_train=2, n_val=1, n_test=1))
    data.scenes_json.unlink()
    with pytest.raises(FileNotFoundError, match="scenes.json"):
        data.cell_labels("train")


def test_shape_size_sets_the_side_of_every_shape():
    config = SyntheticConfig(image_size=120, grid=2, max_shapes=3, shape_size=(0.7, 0.9))
    cell = config.image_size / config.grid
    sides = []
    for i in range(60):
        image, scene, _ = make_sample(random.Random(i), config)
        check_scene_geometry(image, scene, config)
        sides += [(s["box"][2] - s["box"][0]) / cell for s in scene["shapes"]]
    assert min(sides) >= 0.69 and max(sides) <= 0.91 and max(sides) - min(sides) > 0.1
    with pytest.raises(ValueError, match="shape_size"):
        SyntheticConfig(shape_size=(0.8, 0.6))
    with pytest.raises(ValueError, match="shape_size"):
        SyntheticConfig(shape_size=(0.5, 1.0))
