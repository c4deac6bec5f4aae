"""Local evaluation of LLaVA-format question answering data, and an evaluation into a folder (`pmod eval`).

    result = evaluate(model, processor, records, image_folder, batch_size=8, predictions_path="preds.jsonl")
    print(result.accuracy, result.vqa_accuracy, result.flops_ratio, result.kv_ratio)

Each record is a LLaVA conversation (`pmod.data.conversation`); the prompt is every turn up to the last human turn,
the reference answer is the last gpt turn, and an optional ``"answers": [...]`` list (e.g. the ten human answers
of VQAv2 / OK-VQA / TextVQA) is scored with the VQA accuracy. Generation (`pmod.pipelines.generation.generate_batch`) is
batched, left-padded and greedy. For a p-MoD model the realised prefill FLOP ratio and vision KV ratio of every
example are recorded (`pmod.efficiency.realized_cost`), and the KV-cache bytes held at the end of each batch
against a dense cache (`pmod.efficiency.kv_cache_report`).

Predictions go to a JSONL file one batch at a time, so a killed run continues with ``resume=True`` (ids already
in the file are skipped and their stored predictions re-scored); metrics are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..data.conversation import image_paths, prompt_and_answer, render, video_sources
from ..data.images import load_image
from ..data.records import (
    check_processor_takes,
    load_records,  # noqa: F401  (part of this module's API)
)
from ..data.video import (
    DEFAULT_VIDEO_FPS,
    load_videos,
    record_fps,
    record_max_frames,
    require_video_backend,
    video_paths,
)
from ..errors import PModInputError
from ..files import check_output_apart, output_lock, write_json_atomic, write_text_atomic
from .generation import generate_batch, load_for_inference
from .scoring import exact_match, normalize_answer, vqa_score  # noqa: F401  (exact_match: part of this module's API)

logger = logging.getLogger(__name__)

# ====================================================================== evaluation
@dataclass
class QuestionResult:
    """One evaluated question (one line of the predictions JSONL)."""

    id: Any
    question: str
    prediction: str
    answer: str
    correct: bool
    answers: list[str] | None = None
    vqa_score: float | None = None
    flops_ratio: float | None = None
    kv_ratio: float | None = None
    kv_cache_ratio: float | None = None
    record_sha: str | None = None  # what was asked (`_record_sha`): a resume reuses the row only for the same record
    run_sha: str | None = None  # what answered (`_run_sha`): the model and the settings that change answers
    fields: dict[str, Any] | None = None  # the record's own other keys (a question type, a source), carried as given

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("id", "correct")}


@dataclass
class EvalResult:
    """Scores of one evaluation run.

    Attributes:
        n: questions scored (resumed ones included).
        accuracy: exact match with the reference answer after `normalize_answer`.
        vqa_accuracy: mean `vqa_score` over the ``n_vqa`` questions that have an ``answers`` list, else None.
        flops_ratio, kv_ratio: mean realised prefill decoder-FLOP ratio and vision-KV ratio per question
            (p-MoD over dense), None for a dense model.
        kv_cache_ratio: mean over questions of their batch's KV-cache bytes against a dense cache.
        seconds: wall time of this run (questions generated now, not the resumed ones).
        resumed: questions whose predictions were read back from an earlier run.
        records: the per-question results, in record order.
    """

    n: int
    accuracy: float
    vqa_accuracy: float | None
    n_vqa: int
    flops_ratio: float | None
    kv_ratio: float | None
    kv_cache_ratio: float | None
    seconds: float
    resumed: int = 0
    records: list[QuestionResult] = field(default_factory=list, repr=False)
    group_by: str | None = None
    groups: dict[str, dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The metrics, without the per-question records."""
        return {k: v for k, v in asdict(self).items()
                if k != "records" and (v is not None or k not in ("group_by", "groups"))}

    def summary(self) -> str:
        text = self._summary()
        for value, group in (self.groups or {}).items():
            text += f"\n  {self.group_by}={value}: accuracy {group['accuracy']:.2%} (n={group['n']})"
        return text

    def _summary(self) -> str:
        parts = [f"accuracy {self.accuracy:.2%} (n={self.n})"]
        if self.vqa_accuracy is not None:
            parts.append(f"VQA accuracy {self.vqa_accuracy:.2%} (n={self.n_vqa})")
        if self.flops_ratio is not None:
            parts.append(f"prefill FLOPs {self.flops_ratio:.1%} of dense")
        if self.kv_ratio is not None:
            parts.append(f"vision KV {self.kv_ratio:.1%} of dense")
        parts.append(f"{self.seconds:.1f} s")
        return " | ".join(parts)


@dataclass
class _Item:
    id: Any
    key: str
    messages: list[dict[str, Any]]
    answer: str
    answers: list[str] | None
    question: str
    images: list[Path]
    record: dict[str, Any] = field(default_factory=dict, repr=False)
    videos: list[list[Path] | Path] = field(default_factory=list)  # frame files or video file per video (pending)
    fps: float = DEFAULT_VIDEO_FPS
    max_frames: int | None = None
    sha: str = ""  # `_record_sha`: a fingerprint of what the record asks and expects


def _prepare(records: Sequence[dict[str, Any]], image_folder: Path | None) -> list[_Item]:
    items, seen = [], set()
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise PModInputError(f"record {index} is a {type(record).__name__}, expected a LLaVA record (dict)")
        rid = record.get("id", index)
        key = str(rid)
        if key in seen:
            raise PModInputError(f"record id {rid!r} appears twice; ids must be unique (they key the predictions file)")
        seen.add(key)
        messages, answer = prompt_and_answer(record)
        answers = record.get("answers")
        if answers is not None and (
            not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers)
        ):
            raise PModInputError(f"record {rid!r}: 'answers' must be a non-empty list of strings, got {answers!r}")
        question = "".join(c["text"] for c in messages[-1]["content"] if c["type"] == "text")
        paths = image_paths(record)
        if paths and image_folder is None:
            raise PModInputError(f"record {rid!r} has images; pass image_folder")
        images = [image_folder / p for p in paths] if paths and image_folder is not None else []
        if video_sources(record) and image_folder is None:
            raise PModInputError(f"record {rid!r} has videos; pass image_folder (where they are)")
        item = _Item(rid, key, messages, answer, answers, question, images, record)
        item.sha = _record_sha(item)  # once: the resume check and every score row read it
        items.append(item)
    return items


def _resolve_media(pending: list[_Item], processor: Any, folder: Path | None) -> None:
    """Before any generation: check that the processor takes the pending records' images and videos, resolve
    their videos (video files, frame files), rates and frame limits into the items, and check the videos are
    usable (a decoder for video files; frames of one size per video). LLaVA-OneVision's videos of different frame
    counts are answered in groups of one count (`pmod.pipelines.generation.stacking_groups`, the one rule)."""
    from PIL import Image

    for it in pending:
        has_videos = bool(video_sources(it.record))
        check_processor_takes(processor, f"record {it.id!r}", images=bool(it.images), videos=has_videos)
        if has_videos:
            it.videos = video_paths(it.record, folder)  # a missing video file is named here
            it.fps, it.max_frames = record_fps(it.record), record_max_frames(it.record)
    files = [(it.id, v) for it in pending for v in it.videos if isinstance(v, Path)]
    if files:
        require_video_backend(files[0][1], f"record {files[0][0]!r}")
    for it in pending:
        for frames in (v for v in it.videos if isinstance(v, list)):
            sizes = set()
            for f in frames:
                try:
                    with Image.open(f) as img:
                        sizes.add(img.size)
                except FileNotFoundError:
                    continue  # reported with the other missing files
                except OSError as exc:
                    raise PModInputError(f"record {it.id!r}: not a readable image file: {f}") from exc
            if len(sizes) > 1:
                raise PModInputError(f"record {it.id!r}: the frames of a video differ in size {sorted(sizes)}")


def _record_sha(item: _Item) -> str:
    """A fingerprint of what a record asks and expects: its conversation, media paths, answer(s)."""
    asked = {"messages": item.messages, "answer": item.answer, "answers": item.answers,
             "images": [str(p) for p in item.images], "videos": video_sources(item.record)}
    return hashlib.sha256(json.dumps(asked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_sha(model: Any, max_new_tokens: int, generate_kwargs: dict[str, Any]) -> str | None:
    """A fingerprint of what answers: the model (its config, dtype and a checksum of its weights) and the generation
    settings that change answers. None without a model (scoring predictions only)."""
    if model is None:
        return None
    import torch

    with torch.no_grad():
        sums = [float(p.detach().float().sum().cpu()) for p in model.parameters()]
    config = model.config.to_json_string() if hasattr(model, "config") else type(model).__name__
    made = {"config": config, "dtype": str(getattr(model, "dtype", "")), "weights": sums,
            "max_new_tokens": max_new_tokens, "generate": sorted((k, repr(v)) for k, v in generate_kwargs.items())}
    return hashlib.sha256(json.dumps(made, default=str).encode()).hexdigest()[:16]


def _check_resumable(path: Path, done: dict[str, dict[str, Any]], items: list[_Item], run_sha: str | None) -> None:
    """Refuse a resume whose rows were made by another model or settings, or answer other records than these (same
    ids, other questions): their old predictions would be scored against the new answers. Rows without the
    fingerprints (hand-made, or from an older pmod) are taken as they are."""
    by_key = {it.key: it for it in items}
    other_run = sorted(k for k, row in done.items() if run_sha and row.get("run_sha") not in (None, run_sha))
    other_record = sorted(k for k, row in done.items() if k in by_key and row.get("record_sha") is not None
                          and row["record_sha"] != by_key[k].sha)
    if other_run:
        raise PModInputError(f"{path}: {len(other_run)} prediction(s) (ids {other_run[:3]}) were made by another "
                             "model or other generation settings; rerun without --resume to replace them, or choose "
                             "another --out folder.")
    if other_record:
        raise PModInputError(f"{path}: the predictions for ids {other_record[:3]} ({len(other_record)} in all) answer "
                             "other questions, images or answers than the data now holds; rerun without --resume, or "
                             "choose another --out folder.")


def _read_done(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of an earlier run by id. A truncated last line (a killed run) is dropped and the file rewritten; rows
    without a text prediction are answered again; two text predictions for one id are refused. Anything else
    unreadable means the file is not pmod's predictions: refused, and left as it is."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise PModInputError(f"{path} is not a pmod eval predictions file (not UTF-8 text: {exc.reason} at byte "
                             f"{exc.start}); move it away or choose another --out folder.") from exc
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    done: dict[str, dict[str, Any]] = {}
    good_lines, dropped, unanswered = [], 0, 0
    for index, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            key = str(row["id"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            if index < len(numbered) - 1:  # only the last line can be cut off by a killed run
                raise PModInputError(f"{path}, line {number}: not a pmod eval predictions row ({exc!r}); move the file "
                                     "away or choose another --out folder.") from exc
            dropped += 1
            continue
        good_lines.append(line)
        if isinstance(row.get("prediction"), str):
            if key in done:
                raise PModInputError(f"{path}, line {number}: a second prediction for id {row['id']!r}; one of them "
                                     "would be scored silently. Keep one row per id, or rerun without --resume.")
            done[key] = row
        else:
            unanswered += 1
            done.pop(key, None)
    if unanswered:
        logger.warning("%s: %d row(s) without a text prediction; those questions are answered again", path, unanswered)
    if dropped:
        logger.warning("%s: dropped an unreadable last line left by an interrupted run", path)
        write_text_atomic(path, "".join(line + "\n" for line in good_lines))
    return done


def _unknown_words(processor: Any, items: Sequence[_Item]) -> None:
    """Warn about question and answer words the tokenizer turns into its unknown token: a word-level vocabulary
    (the tiny models' comes from their training file) loses them silently, and an answer made of one can never be
    matched. Byte-level tokenizers have no unknown token and are not checked."""
    tokenizer = getattr(processor, "tokenizer", processor)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not items or not getattr(tokenizer, "is_fast", False):  # offsets need a fast tokenizer
        return
    unknown: dict[str, set[str]] = {"question": set(), "answer": set()}
    for it in items:
        for where, text in (("question", it.question), ("answer", "\n".join([it.answer, *(it.answers or [])]))):
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            unknown[where].update(text[a:b] for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if t == unk)
    for where, words in unknown.items():
        if words:
            shown = ", ".join(repr(w) for w in sorted(words)[:8]) + (" ..." if len(words) > 8 else "")
            consequence = ("can never be predicted: those questions cannot be answered right" if where == "answer"
                           else "reach the model as one unknown token")
            logger.warning("%d %s word(s) are not in the tokenizer's vocabulary and %s: %s (a tiny model's vocabulary "
                           "is its training file's words: train on data that has them)", len(words), where,
                           consequence, shown)


def _score(item: _Item, prediction: str, costs: dict[str, Any], run_sha: str | None = None) -> QuestionResult:
    return QuestionResult(
        id=item.id,
        question=item.question,
        prediction=prediction,
        answer=item.answer,
        correct=exact_match(prediction, item.answer),
        answers=item.answers,
        vqa_score=vqa_score(prediction, item.answers) if item.answers else None,
        flops_ratio=costs.get("flops_ratio"),
        kv_ratio=costs.get("kv_ratio"),
        kv_cache_ratio=costs.get("kv_cache_ratio"),
        record_sha=item.sha,
        run_sha=run_sha if run_sha is not None else costs.get("run_sha"),
        fields={k: v for k, v in item.record.items() if k not in RECORD_KEYS} or None,
    )


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def evaluate(
    model: Any,
    processor: Any,
    records: Sequence[dict[str, Any]],
    image_folder: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    predictions_path: str | os.PathLike | None = None,
    metrics_path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    group_by: str | None = None,
    **generate_kwargs: Any,
) -> EvalResult:
    """Answer every record with ``model`` and score the answers.

    Args:
        model: a p-MoD (or dense) LLaVA / LLaVA-NeXT / causal LM, in eval mode.
        processor: its processor (tokenizer + image processor, with a chat template), or a tokenizer for a
            text-only model.
        records: LLaVA records; image paths are relative to ``image_folder``.
        batch_size: questions per `generate` call (left-padded).
        max_new_tokens: answer length limit.
        predictions_path: JSONL file written one batch at a time (id, question, prediction, answer, correct,
            and scores / cost ratios).
        metrics_path: JSON file for `EvalResult.to_dict`, written atomically at the end.
        resume: keep the rows already in ``predictions_path`` and answer only the other records. Without it
            an existing file is replaced. Rows record what was asked and what answered (``record_sha``,
            ``run_sha``): a resume with another model, other settings or other records under the same ids is refused.
        progress: show a progress bar on stderr.
        group_by: a record key (e.g. a question type): accuracy is also given per value of it (``groups``; records
            without the key count under "(none)"). Every record key pmod does not read is carried into the
            predictions as ``fields``.
        generate_kwargs: more `model.generate` arguments (greedy by default).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise PModInputError(f"batch_size and max_new_tokens must be positive, got {batch_size} and {max_new_tokens}")
    folder = Path(image_folder) if image_folder is not None else None
    items = _prepare(records, folder)
    if group_by is not None and items and not any(group_by in it.record for it in items):
        _groups(items, [], group_by)  # refused before anything is generated
    preds_file = Path(predictions_path) if predictions_path is not None else None
    done: dict[str, dict[str, Any]] = {}
    run_sha = _run_sha(model, max_new_tokens, generate_kwargs) if preds_file is not None else None
    if preds_file is not None and resume and preds_file.exists():
        done = _read_done(preds_file)
        _check_resumable(preds_file, done, items, run_sha)
    pending = [it for it in items if it.key not in done]
    _unknown_words(processor, pending)
    _resolve_media(pending, processor, folder)
    frames = {it.key: [f for v in it.videos if isinstance(v, list) for f in v] for it in pending}
    missing = [(it.id, p) for it in pending for p in it.images + frames[it.key] if not p.is_file()]
    if missing:
        rid, path = missing[0]
        more = f" (and {len(missing) - 1} more missing images)" if len(missing) > 1 else ""
        raise PModInputError(f"record {rid!r}: image file not found: {path}{more}")

    from tqdm.auto import tqdm

    results: dict[str, QuestionResult] = {}
    for it in items:
        if it.key in done:
            row = done[it.key]
            results[it.key] = _score(it, row["prediction"], row)
    if done:
        logger.info("resuming: %d of %d questions already answered in %s", len(results), len(items), preds_file)

    handle = None
    if preds_file is not None:
        preds_file.parent.mkdir(parents=True, exist_ok=True)
        handle = preds_file.open("a" if resume else "w", encoding="utf-8")
    start = time.perf_counter()
    bar = tqdm(total=len(items), initial=len(results), desc="pmod eval", unit="q", disable=not progress,
               file=sys.stderr)
    try:
        for b in range(0, len(pending), batch_size):
            batch = pending[b : b + batch_size]
            prompts = [render(processor, it.messages, add_generation_prompt=True) for it in batch]
            images = [[load_image(p) for p in it.images] for it in batch]
            videos, fps = zip(*(load_videos(it.videos, it.fps, it.max_frames, f"record {it.id!r}") for it in batch))
            out = generate_batch(model, processor, prompts, images, max_new_tokens=max_new_tokens, videos=videos,
                                 video_fps=fps, labels=[f"record {it.id!r}" for it in batch], **generate_kwargs)
            lines = []
            for j, it in enumerate(batch):
                res = _score(it, out.texts[j], out.costs(j), run_sha)
                results[it.key] = res
                lines.append(json.dumps(res.to_dict(), ensure_ascii=False) + "\n")
            if handle is not None:
                handle.write("".join(lines))
                handle.flush()
                os.fsync(handle.fileno())  # a killed run keeps every finished batch
            bar.update(len(batch))
            bar.set_postfix(acc=f"{sum(r.correct for r in results.values()) / len(results):.3f}")
    finally:
        bar.close()
        if handle is not None:
            handle.close()
    seconds = time.perf_counter() - start

    ordered = [results[it.key] for it in items]
    vqa = [r.vqa_score for r in ordered if r.vqa_score is not None]
    result = EvalResult(
        n=len(ordered),
        accuracy=sum(r.correct for r in ordered) / len(ordered) if ordered else 0.0,
        vqa_accuracy=sum(vqa) / len(vqa) if vqa else None,
        n_vqa=len(vqa),
        flops_ratio=_mean(r.flops_ratio for r in ordered),
        kv_ratio=_mean(r.kv_ratio for r in ordered),
        kv_cache_ratio=_mean(r.kv_cache_ratio for r in ordered),
        seconds=seconds,
        resumed=len(items) - len(pending),
        records=ordered,
        group_by=group_by,
        groups=_groups(items, ordered, group_by) if group_by is not None else None,
    )
    logger.info("evaluation: %s", result.summary())
    predictions = {r.prediction.strip() for r in ordered}
    if len(ordered) >= 3 and len(predictions) == 1:  # a model that learnt nothing looks like a finished evaluation
        what = "empty" if predictions == {""} else f"the same answer ({next(iter(predictions))[:40]!r})"
        logger.warning("every one of the %d predictions is %s: the model answers nothing useful (an untrained or "
                       "barely trained model?)", len(ordered), what)
    if metrics_path is not None:
        write_json_atomic(metrics_path, result.to_dict())
    return result


# the keys of a LLaVA record that pmod reads; any other key is the user's, carried into the predictions
RECORD_KEYS = ("id", "image", "video", "conversations", "answers", "fps", "max_frames")


def _groups(items: Sequence[_Item], results: Sequence[QuestionResult], key: str) -> dict[str, dict[str, Any]]:
    """Accuracy (and VQA accuracy where scored) per value of the records' ``key``."""
    if not any(key in it.record for it in items):
        raise PModInputError(f"group_by={key!r}: no record has that key; the records' keys are "
                             f"{sorted({k for it in items for k in it.record})}")
    groups: dict[str, list[QuestionResult]] = {}
    for it, res in zip(items, results):
        groups.setdefault(str(it.record.get(key, "(none)")), []).append(res)
    out = {}
    for value, rows in sorted(groups.items()):
        vqa = [r.vqa_score for r in rows if r.vqa_score is not None]
        out[value] = {"n": len(rows), "accuracy": sum(r.correct for r in rows) / len(rows),
                      **({"vqa_accuracy": sum(vqa) / len(vqa)} if vqa else {})}
    return out


# ====================================================================== an evaluation into a folder (`pmod eval`)
def run_eval(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_folder: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    limit: int | None = None,
    resume: bool = False,
    force: bool = False,
    group_by: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate a saved model on a LLaVA-format data file into the folder ``out``: ``out/predictions.jsonl`` (one row
    per question, written batch by batch) and ``out/metrics.json`` (`EvalResult.to_dict` with the model, data file,
    batch size and answer length). What `pmod eval` runs.

    Args:
        model_dir: a saved p-MoD (or dense) model with its processor; a dense baseline is evaluated dense, a
            text-only model with its tokenizer as processor.
        data: LLaVA-format records, .json (a list) or .jsonl.
        out: the output folder; it may not lie inside the model folder, and is held for the run
            (`pmod.files.output_lock`): a second run into it is refused.
        image_folder: the folder the records' image and video paths are relative to (default: the data file's).
        limit: evaluate the first ``limit`` records only.
        resume: keep the answers already in ``out/predictions.jsonl`` (see `evaluate`).
        force: replace the predictions and metrics already in ``out``. Without ``resume`` or ``force`` an earlier
            evaluation in ``out`` is refused; with both, too.
        dtype, device: how to load the model (`pmod.pipelines.generation.load_for_inference`).
        batch_size, max_new_tokens, group_by, progress: as for `evaluate`.
    """
    check_output_apart(out, {"model folder": model_dir}, PModInputError)
    records = load_records(data)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise PModInputError(f"{data} holds no records")
    out = Path(out)
    if resume and force:
        raise PModInputError("--resume keeps the predictions in the output folder and --force replaces them; pass one.")
    with output_lock(out, "pmod eval", PModInputError):
        earlier = [name for name in ("predictions.jsonl", "metrics.json") if (out / name).exists()]
        if earlier and not (resume or force):
            raise PModInputError(
                f"{out} holds an earlier evaluation ({', '.join(earlier)}): pass --resume to keep its answers, --force "
                "to replace them, or --out another folder."
            )
        folder = Path(image_folder) if image_folder else Path(data).resolve().parent
        # a dense baseline stays dense; text-only models evaluate too (a bare tokenizer as processor)
        model, processor = load_for_inference(model_dir, dtype=dtype, device=device)
        out.mkdir(parents=True, exist_ok=True)
        result = evaluate(
            model,
            processor,
            records,
            folder,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            predictions_path=out / "predictions.jsonl",
            resume=resume,
            progress=progress,
            group_by=group_by,
        )
        metrics = {
            "model": str(model_dir),
            "data": str(data),
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            **result.to_dict(),
        }
        write_json_atomic(out / "metrics.json", metrics)
    return result
