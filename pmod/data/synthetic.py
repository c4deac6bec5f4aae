"""A synthetic visual question-answering dataset in the LLaVA conversation format (the demo's training data).

Each image shows one to a few coloured shapes on a plain light background, each in its own cell of a coarse
grid, so most image patches are background: the redundancy that p-MoD's routers should learn to skip. Every
question needs one or a few image regions and has an exact one-word answer derived from the scene.

Everything is deterministic given the seed: sample ``i`` of a split uses its own generator seeded with
``(seed, split, i)``, so changing one split's size leaves the other splits unchanged.

    from pmod.data.synthetic import SyntheticConfig, write_dataset
    data = write_dataset("shapes-vqa", SyntheticConfig(n_train=2000))
    data.train_json, data.image_dir, data.vocabulary(), data.stats["train"]["majority_baseline"]
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 195, 20),
    "purple": (130, 50, 170),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Words the prompts add around the questions (Vicuna template "USER: <image>\n... ASSISTANT:").
PROMPT_WORDS = ("USER", "ASSISTANT", ":")
SPLITS = ("train", "validation", "test")
QUESTION_TYPES = ("colour_of_shape", "shape_at", "colour_at", "count_all", "count_colour", "count_shape", "exists",
                  "relation")

_ROW_NAMES = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COL_NAMES = {2: ("left", "right"), 3: ("left", "center", "right")}


@dataclass
class SyntheticConfig:
    """Settings of the generator.

    Attributes:
        image_size: side of the square images in pixels.
        grid: the image is divided into grid x grid cells (2 or 3); each shape occupies its own cell.
        max_shapes: shapes per image are drawn uniformly from 1..max_shapes (at most grid * grid).
        colours: colour names (from `PALETTE`).
        shapes: shape names (from `SHAPES`).
        n_train, n_val, n_test: samples per split.
        seed: base seed of every random choice.
        multi_turn: fraction of training samples with two question/answer pairs about the same image (0 = single
            turn); validation and test samples always have one.
        train_questions: questions per training image (distinct types, one conversation turn each); more
            supervision per image for the same vision compute. Overrides ``multi_turn`` when above 1.
        shape_size: (smallest, largest) side of a shape as a fraction of its cell's side, drawn uniformly.
    """

    image_size: int = 112
    grid: int = 3
    max_shapes: int = 4
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = SHAPES
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 200
    seed: int = 0
    multi_turn: float = 0.0
    train_questions: int = 1
    shape_size: tuple[float, float] = (0.55, 0.8)

    def __post_init__(self) -> None:
        self.colours = tuple(self.colours)
        self.shapes = tuple(self.shapes)
        self.shape_size = tuple(self.shape_size)
        if len(self.shape_size) != 2 or not 0.2 <= self.shape_size[0] <= self.shape_size[1] <= 0.95:
            raise ValueError("shape_size must be (smallest, largest) with 0.2 <= smallest <= largest <= 0.95 of a "
                             f"cell, got {self.shape_size}.")
        if self.grid not in _ROW_NAMES:
            raise ValueError(f"grid must be 2 or 3 (positions are named top left ... bottom right), got {self.grid}.")
        if not 1 <= self.max_shapes <= self.grid * self.grid:
            raise ValueError(f"max_shapes must be in 1..{self.grid * self.grid} for a {self.grid}x{self.grid} grid.")
        if self.image_size < 8 * self.grid:
            raise ValueError(f"image_size {self.image_size} is too small for a {self.grid}x{self.grid} grid.")
        unknown = [c for c in self.colours if c not in PALETTE] + [s for s in self.shapes if s not in SHAPES]
        if unknown or len(self.colours) < 2 or len(self.shapes) < 2:
            raise ValueError(
                f"need at least two colours from {sorted(PALETTE)} and two shapes from {SHAPES}; unknown: {unknown}."
            )
        if len(set(self.colours)) != len(self.colours) or len(set(self.shapes)) != len(self.shapes):
            raise ValueError("colours and shapes must not repeat.")
        if not 1 <= self.train_questions <= len(self.question_types):
            raise ValueError(f"train_questions must be in 1..{len(self.question_types)}, got {self.train_questions}.")
        if min(self.n_train, self.n_val, self.n_test) < 0 or not 0.0 <= self.multi_turn <= 1.0:
            raise ValueError("split sizes must be >= 0 and multi_turn in [0, 1].")

    @property
    def question_types(self) -> tuple[str, ...]:
        """Question types this configuration can pose (relations need two shapes in one image)."""
        return tuple(t for t in QUESTION_TYPES if t != "relation" or self.max_shapes >= 2)

    def position_name(self, row: int, col: int) -> str:
        """Words naming grid cell (row, col): "top left", "center", "middle right", ..."""
        r, c = _ROW_NAMES[self.grid][row], _COL_NAMES[self.grid][col]
        return "center" if (r, c) == ("middle", "center") else f"{r} {c}"

    def answers(self) -> set[str]:
        """Every answer the generator can give."""
        return set(self.colours) | set(self.shapes) | set(NUMBER_WORDS[: self.max_shapes + 1]) | {"yes", "no"}

    def question_words(self) -> set[str]:
        """Every word a question can contain (from the templates, whether or not sampled)."""
        words = set(" ".join(_TEMPLATE_WORDS).split()) | set(self.colours) | set(self.shapes)
        words |= {f"{s}s" for s in self.shapes}  # "how many circles are there ?"
        for row in range(self.grid):
            for col in range(self.grid):
                words |= set(self.position_name(row, col).split())
        return words


# The fixed words of the question templates (the rest are colour, shape and position words).
_TEMPLATE_WORDS = (
    "what colour is the ?",
    "what shape is at the ?",
    "what colour is the shape at the ?",
    "how many shapes are there ?",
    "is there a ?",
    "is the left of the ?",
    "is the above the ?",
)


@dataclass(frozen=True)
class PlacedShape:
    """One shape of a scene: its kind, colour, grid cell and pixel box (x0, y0, x1, y1), inclusive."""

    shape: str
    colour: str
    row: int
    col: int
    box: tuple[int, int, int, int]


# ---------------------------------------------------------------------- scenes and images
def _random_scene(rng: random.Random, config: SyntheticConfig) -> list[PlacedShape]:
    n = rng.randint(1, config.max_shapes)
    cells = rng.sample(range(config.grid * config.grid), n)
    cell = config.image_size / config.grid
    placed = []
    for index in sorted(cells):  # raster order keeps the description easy to read
        row, col = divmod(index, config.grid)
        side = rng.uniform(*config.shape_size) * cell
        # Jitter the shape inside its cell (1 px margin) so images are not pixel-identical per cell.
        x0 = col * cell + 1 + rng.uniform(0, cell - side - 2)
        y0 = row * cell + 1 + rng.uniform(0, cell - side - 2)
        box = (round(x0), round(y0), round(x0 + side), round(y0 + side))
        placed.append(PlacedShape(rng.choice(config.shapes), rng.choice(config.colours), row, col, box))
    return placed


def _draw(scene: list[PlacedShape], config: SyntheticConfig, background: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (config.image_size, config.image_size), background)
    draw = ImageDraw.Draw(image)
    for s in scene:
        x0, y0, x1, y1 = s.box
        fill = PALETTE[s.colour]
        if s.shape == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.shape == "square":
            draw.rectangle(s.box, fill=fill)
        else:  # triangle pointing up
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def _describe(scene: list[PlacedShape], config: SyntheticConfig, background: tuple[int, int, int]) -> dict[str, Any]:
    return {
        "image_size": config.image_size,
        "grid": config.grid,
        "background": list(background),
        "shapes": [{**asdict(s), "box": list(s.box)} for s in scene],
    }


# ---------------------------------------------------------------------- questions
# Each generator returns (question, answer), or None when the scene cannot support the question type
# unambiguously (the caller then draws another scene).
QA = tuple[str, str]


def _unique_kinds(scene: list[PlacedShape]) -> list[PlacedShape]:
    counts = Counter(s.shape for s in scene)
    return [s for s in scene if counts[s.shape] == 1]


def _q_colour_of_shape(rng: random.Random, scene: list[PlacedShape], config: SyntheticConfig) -> QA | None:
    unique = _unique_kinds(scene)  # "the circle" must name exactly one shape
    if not unique:
        return None
    s = rng.choice(unique)
    return f"what colour is the {s.shape} ?", s.colour


def _q_shape_at(rng: random.Random, scene: list[PlacedShape], config: SyntheticConfig) -> QA | None:
    s = rng.choice(scene)
    return f"what shape is at the {config.position_name(s.row, s.col)} ?", s.shape


def _q_colour_at(rng: random.Random, scene: list[PlacedShape], config: SyntheticConfig) -> QA | None:
    s = rng.choice(scene)
    return f"what colour is the shape at the {config.position_name(s.row, s.col)} ?", s.colour


def _q_count_all(rng: random.Random, scene: list[PlacedShape], config: SyntheticConfig) -> QA | None:
    return "how many shapes are there ?", NUMBER_WORDS[len(scene)]


def _q_count_colour(rng: random.Random, scene: list[PlacedShape], config: SyntheticConfig) -> QA | None:
    colour = rng.choice(config.colours)
    return f"how many {colour} shapes are there ?", NUMBER_WORDS[sum(s.colour == colour for s in scene)]


def _q_count_shape(rng: random.Random, scene: list[PlacedShape], config: SyntheticConfig) -> QA | None:
    # Needs shapes told apart but no position: a signal for shape features that does not wait for localisation.
    shape = rng.choice(config.shapes)
    return f"how many {shape}s are there ?", NUMBER_WORDS[sum(s.shape == shape for s in scene)]


def _q_exists(rng: random.Random, scene: list[PlacedShape], config: SyntheticConfig) -> QA | None:
    present = {(s.colour, s.shape) for s in scene}
    if rng.random() < 0.5:  # decide the answer first so yes and no are equally frequent
        colour, shape = rng.choice(sorted(present))
        return f"is there a {colour} {shape} ?", "yes"
    absent = [(c, s) for c in config.colours for s in config.shapes if (c, s) not in present]
    if not absent:  # every colour/shape combination is in the image (only with few colours and many shapes)
        return None
    colour, shape = rng.choice(absent)
    return f"is there a {colour} {shape} ?", "no"


def _q_relation(rng: random.Random, scene: list[PlacedShape], config: SyntheticConfig) -> QA | None:
    unique = _unique_kinds(scene)
    pairs = [(a, b) for a in unique for b in unique if a.shape < b.shape]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    axis = rng.choice(("left", "above"))
    key = (lambda s: s.col) if axis == "left" else (lambda s: s.row)
    if key(a) == key(b):  # same column (row): "left of" ("above") would be a matter of pixels, not cells
        return None
    if rng.random() < 0.5:  # ask in the order that makes the answer "yes" or "no" with equal probability
        a, b = b, a
    relation = "left of" if axis == "left" else "above"
    return f"is the {a.shape} {relation} the {b.shape} ?", "yes" if key(a) < key(b) else "no"


_GENERATORS: dict[str, Callable[[random.Random, list[PlacedShape], SyntheticConfig], QA | None]] = {
    "colour_of_shape": _q_colour_of_shape,
    "shape_at": _q_shape_at,
    "colour_at": _q_colour_at,
    "count_all": _q_count_all,
    "count_colour": _q_count_colour,
    "count_shape": _q_count_shape,
    "exists": _q_exists,
    "relation": _q_relation,
}

_TYPE_PATTERNS = [
    ("colour_at", re.compile(r"^what colour is the shape at the [a-z ]+ \?$")),
    ("colour_of_shape", re.compile(r"^what colour is the [a-z]+ \?$")),
    ("shape_at", re.compile(r"^what shape is at the [a-z ]+ \?$")),
    ("count_all", re.compile(r"^how many shapes are there \?$")),
    ("count_shape", re.compile(r"^how many (circle|square|triangle)s are there \?$")),
    ("count_colour", re.compile(r"^how many [a-z]+ shapes are there \?$")),
    ("exists", re.compile(r"^is there a [a-z]+ [a-z]+ \?$")),
    ("relation", re.compile(r"^is the [a-z]+ (left of|above) the [a-z]+ \?$")),
]


def question_type(question: str) -> str:
    """The type (one of `QUESTION_TYPES`) of a generated question, from its template; for per-type evaluation."""
    question = question.replace("<image>", "").strip()
    for name, pattern in _TYPE_PATTERNS:
        if pattern.match(question):
            return name
    raise ValueError(f"Not a question of the synthetic dataset: {question!r}")


def make_sample(
    rng: random.Random, config: SyntheticConfig, question_types: Sequence[str] | None = None
) -> tuple[Image.Image, dict[str, Any], list[tuple[str, str]]]:
    """One image, its scene description and its (question, answer) pairs, one per entry of ``question_types``.

    ``question_types`` defaults to one type drawn uniformly from ``config.question_types``. Scenes are redrawn
    until every requested question can be asked unambiguously, so the answers are exact.
    """
    if question_types is None:
        question_types = [rng.choice(config.question_types)]
    unknown = [t for t in question_types if t not in config.question_types]
    if unknown:
        raise ValueError(f"Unknown or impossible question types {unknown}; this config allows {config.question_types}.")
    for _ in range(1000):
        scene = _random_scene(rng, config)
        pairs = [_GENERATORS[t](rng, scene, config) for t in question_types]
        if all(p is not None for p in pairs):
            break
    else:  # unreachable for valid configs (every type is feasible for some scene with probability > 0.1)
        raise RuntimeError(f"Could not draw a scene for question types {list(question_types)}.")
    shade = rng.randint(228, 250)
    background = (shade, shade, max(shade - rng.randint(0, 10), 0))  # light grey to light cream
    return _draw(scene, config, background), _describe(scene, config, background), pairs  # type: ignore[return-value]


# ---------------------------------------------------------------------- the dataset on disk
@dataclass
class SyntheticDataset:
    """A written dataset: LLaVA-format JSON per split; image paths in them are relative to ``image_dir``."""

    root: Path
    train_json: Path
    val_json: Path
    test_json: Path
    image_dir: Path
    stats_json: Path
    config: SyntheticConfig
    answers: set[str]
    stats: dict[str, Any] = field(default_factory=dict)
    scenes_json: Path | None = None  # what each image shows: {sample id: [{"shape", "colour", "row", "col"}, ...]}

    @property
    def splits(self) -> dict[str, Path]:
        return {"train": self.train_json, "validation": self.val_json, "test": self.test_json}

    def load(self, split: str) -> list[dict[str, Any]]:
        """The entries of one split ("train", "validation" or "test")."""
        if split not in self.splits:
            raise ValueError(f"Unknown split {split!r}; choose from {list(self.splits)}.")
        return json.loads(self.splits[split].read_text())

    def cell_labels(self, split: str) -> dict[str, list[tuple[int, int]]]:
        """Per image of a split, per grid cell in raster order: (shape, colour) as 1-based indices into
        ``config.shapes`` and ``config.colours``, (0, 0) for an empty cell. Labels for pretraining a vision encoder."""
        if self.scenes_json is None or not self.scenes_json.is_file():
            raise FileNotFoundError(f"{self.root}: no scenes.json; write the dataset again with this version of pmod.")
        scenes = json.loads(self.scenes_json.read_text())
        ids = [entry["id"] for entry in self.load(split)]
        labels = {}
        for sample_id in ids:
            cells = [(0, 0)] * (self.config.grid * self.config.grid)
            for s in scenes[sample_id]:
                cells[s["row"] * self.config.grid + s["col"]] = (self.config.shapes.index(s["shape"]) + 1,
                                                                 self.config.colours.index(s["colour"]) + 1)
            labels[sample_id] = cells
        return labels

    def vocabulary(self) -> list[str]:
        """Sorted list of every word that can appear in questions, answers and the chat prompt around them."""
        return sorted(self.config.question_words() | self.answers | set(PROMPT_WORDS))


def _entry(sample_id: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    conversations = []
    for turn, (question, answer) in enumerate(pairs):
        value = f"<image>\n{question}" if turn == 0 else question  # one image per sample, in the first turn
        conversations += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return {"id": sample_id, "image": f"images/{sample_id}.png", "conversations": conversations}


def _split_stats(entries: list[dict[str, Any]]) -> dict[str, Any]:
    answers: Counter[str] = Counter()
    by_type: dict[str, Counter[str]] = {}
    for entry in entries:
        turns = entry["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            answers[gpt["value"]] += 1
            by_type.setdefault(question_type(human["value"]), Counter())[gpt["value"]] += 1
    total = sum(answers.values())
    majority, majority_count = answers.most_common(1)[0] if answers else ("", 0)
    return {
        "samples": len(entries),
        "questions": total,
        "answer_counts": dict(sorted(answers.items())),
        "majority_answer": majority,
        # Accuracy of always giving the most frequent answer, and of giving the most frequent answer of each
        # question type (a model that reads the question but ignores the image).
        "majority_baseline": majority_count / total if total else 0.0,
        "per_type_majority_baseline": sum(c.most_common(1)[0][1] for c in by_type.values()) / total if total else 0.0,
        "question_type_counts": {t: sum(c.values()) for t, c in sorted(by_type.items())},
        "majority_baseline_by_type": {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in sorted(by_type.items())},
    }


def write_dataset(out_dir: str | Path, config: SyntheticConfig | None = None) -> SyntheticDataset:
    """Generate the three splits into ``out_dir``: ``train.json``, ``validation.json``, ``test.json``,
    ``images/<id>.png`` and ``dataset.json`` (the config and per-split statistics). Returns their paths.
    """
    config = config or SyntheticConfig()
    root = Path(out_dir)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    types = config.question_types
    sizes = {"train": config.n_train, "validation": config.n_val, "test": config.n_test}
    start = time.perf_counter()
    written: set[str] = set()
    stats: dict[str, Any] = {}
    scenes: dict[str, list[dict[str, Any]]] = {}
    for split, n in sizes.items():
        entries = []
        for i in range(n):
            rng = random.Random(f"{config.seed}/{split}/{i}")  # str seeds hash with SHA-512: stable across runs
            # Round-robin over question types: every type equally often, so no answer class dominates.
            wanted = [types[i % len(types)]]
            # Evaluation splits stay single-question: a second turn would put an answer in the prompt.
            if split == "train" and config.train_questions > 1:
                wanted += rng.sample([t for t in types if t != wanted[0]], config.train_questions - 1)
            elif split == "train" and rng.random() < config.multi_turn:
                wanted.append(rng.choice([t for t in types if t != wanted[0]]))
            image, scene, pairs = make_sample(rng, config, wanted)
            sample_id = f"{split}-{i:06d}"
            scenes[sample_id] = [{k: s[k] for k in ("shape", "colour", "row", "col")} for s in scene["shapes"]]
            image.save(images / f"{sample_id}.png", format="PNG")
            written.add(f"{sample_id}.png")
            entries.append(_entry(sample_id, pairs))
            if (i + 1) % 1000 == 0:
                logger.info("%s: %d/%d samples (%.1f s)", split, i + 1, n, time.perf_counter() - start)
        (root / f"{split}.json").write_text(json.dumps(entries, indent=1) + "\n")
        stats[split] = _split_stats(entries)
        logger.info(
            "%s: %d samples, majority answer %r = %.1f%%", split, n, stats[split]["majority_answer"],
            100 * stats[split]["majority_baseline"],
        )
    # Images of an earlier, larger run in the same folder would otherwise linger next to the new ones.
    for path in images.glob("*.png"):
        if re.fullmatch(r"(train|validation|test)-\d{6}\.png", path.name) and path.name not in written:
            path.unlink()
    (root / "scenes.json").write_text(json.dumps(scenes) + "\n")
    stats_json = root / "dataset.json"
    stats_json.write_text(json.dumps({"config": asdict(config), "splits": stats}, indent=2) + "\n")
    logger.info("wrote %d images to %s in %.1f s", len(written), images, time.perf_counter() - start)
    return SyntheticDataset(
        root=root,
        train_json=root / "train.json",
        val_json=root / "validation.json",
        test_json=root / "test.json",
        image_dir=root,
        stats_json=stats_json,
        config=config,
        answers=config.answers(),
        stats=stats,
        scenes_json=root / "scenes.json",
    )
