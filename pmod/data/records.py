"""LLaVA-format instruction data for training: lazy loading, label masking, truncation, batching.

Each record becomes ``input_ids`` with the processor's expanded image tokens, ``labels`` that train only on
the assistant replies (``-100`` elsewhere), and the images through the model's own HF image processor
(LLaVA-1.5 "pad": `padding_image_processor`; LLaVA-NeXT anyres: the processor's tiling).
A record whose image is missing or unreadable, or that cannot be truncated without cutting an image, is
skipped: the dataset returns a marker that `LlavaCollator` drops and counts, so a bad file never stops a run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import PModConfigError, PModInputError
from .conversation import (
    IMAGE_PLACEHOLDER,
    VIDEO_SUFFIXES,
    assistant_spans,
    image_paths,
    to_messages,
    tokenizer_of,
    video_sources,
)
from .images import load_image
from .video import load_videos, record_fps, record_max_frames, require_video_backend, video_metadata, video_paths

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SKIP_KEY = "pmod_skipped"
# processor outputs with one value per token (Gemma 3: image)
TOKEN_LEVEL_INPUTS = ("mm_token_type_ids", "token_type_ids")


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a LLaVA JSON file (a list of records) or a JSONL file (one record per line)."""
    path = Path(path)
    if not path.is_file():
        raise PModInputError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PModInputError(f"{path} is not UTF-8 text ({exc}); expected LLaVA-format JSON or JSONL") from exc
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as exc:
                raise PModInputError(f"{path}, line {number} is not valid JSON ({_json_problem(exc)}); expected one "
                                     "LLaVA record per line") from exc
    else:
        try:
            records = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise PModInputError(f"{path} is not valid JSON ({_json_problem(exc)}); expected a list of LLaVA "
                                 "records") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise PModInputError(f"{path}: expected a JSON list of records ({{'id', 'image', 'conversations'}})")
    for i, r in enumerate(records):
        r.setdefault("id", str(i))
    return records


def _json_problem(exc: Exception) -> str:
    return "nested too deeply to be LLaVA records" if isinstance(exc, RecursionError) else str(exc)


def check_records(records: list[dict[str, Any]], source: str | Path = "the data") -> None:
    """A `PModInputError` naming ``source`` when there are no records, a record's conversation is malformed
    (not a list of human / gpt turns, placeholders that do not match its images), or a record names a video file
    and no video decoder is installed, before any model is loaded."""
    if not records:
        raise PModInputError(f"{source} holds no records; expected a list of LLaVA records "
                             "({'id', 'image', 'conversations'})")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise PModInputError(f"{source}: record {i} is a {type(record).__name__}, not a mapping "
                                 "({'id', 'image', 'conversations'})")
        try:
            to_messages(record)
        except PModInputError as exc:
            raise PModInputError(f"{source}: {exc} (the record at index {i})") from exc
    named = next(((r, s) for r in records for s in video_sources(r)
                  if isinstance(s, str) and s.lower().endswith(VIDEO_SUFFIXES)), None)
    if named is not None:
        require_video_backend(named[1], f"{source}: record {named[0].get('id')!r}")


def padding_image_processor(image_processor: Any) -> Any:
    """LLaVA-1.5 "pad" as part of the processor: transformers' LLaVA image processor with ``do_pad`` (a square of
    the mean colour before resizing), carrying over the given processor's settings. Saved with the model, so
    evaluation, chat and lmms-eval pad exactly as training did."""
    name = type(image_processor).__name__
    if name.startswith("LlavaImageProcessor") and getattr(image_processor, "do_pad", False):
        return image_processor
    if hasattr(image_processor, "image_grid_pinpoints"):
        raise PModConfigError("pad_images is LLaVA-1.5 preprocessing; LLaVA-NeXT models tile images (anyres) instead")
    import transformers

    pil = name.endswith("Pil") or not hasattr(transformers, "LlavaImageProcessor")
    cls = getattr(transformers, "LlavaImageProcessorPil" if pil else "LlavaImageProcessor")
    keys = ("size", "crop_size", "image_mean", "image_std", "resample", "do_resize", "do_center_crop", "do_rescale",
            "rescale_factor", "do_normalize", "do_convert_rgb")
    settings = {k: getattr(image_processor, k) for k in keys if getattr(image_processor, k, None) is not None}
    for key in ("size", "crop_size"):  # SizeDict -> plain dict for the constructor
        if key in settings and not isinstance(settings[key], dict):
            settings[key] = {k: v for k, v in dict(settings[key]).items() if v is not None}
    return cls(**settings, do_pad=True)


@dataclass
class Encoder:
    """Turns one LLaVA record into model inputs with a processor.

    Attributes:
        processor: the model's HF processor (tokenizer + image processor + chat template).
        image_folder: where relative image paths are resolved.
        model_max_length: longest sequence kept (tokens, image tokens included).
    """

    processor: Any
    image_folder: Path | None = None
    model_max_length: int = 2048

    def __post_init__(self) -> None:
        self.tokenizer = tokenizer_of(self.processor)
        # the processor's own placeholder ("<image>" for LLaVA, "<|image_pad|>" for Qwen2-VL)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(
            getattr(self.processor, "image_token", IMAGE_PLACEHOLDER)
        )
        video = getattr(self.processor, "video_token", None)
        video_id = self.tokenizer.convert_tokens_to_ids(video) if video else None
        # SmolVLM's processor names "<video>" whether or not its tokenizer has that token: an unknown one (the
        # unknown-word id) is no placeholder, or words outside the vocabulary would pass for video tokens
        self.placeholder_ids = {self.image_token_id} | (
            {video_id} if video_id is not None and video_id != self.tokenizer.unk_token_id else set()
        )

    def images(self, record: dict[str, Any]) -> list[Image.Image]:
        out = []
        for p in image_paths(record):
            path = Path(p) if self.image_folder is None else Path(self.image_folder) / p
            out.append(load_image(path))
        return out

    def videos(self, record: dict[str, Any]) -> list[list[Image.Image]]:
        """The record's videos as frame lists (`video_frames`)."""
        return self.video_frames(record)[0]

    def video_frames(self, record: dict[str, Any]) -> tuple[list[list[Image.Image]], list[float]]:
        """The record's videos as frame lists, and each one's frame rate: a video file decoded at the record's
        ``"fps"``, a folder's image files in name order, or the listed frames; at most ``"max_frames"`` each."""
        return load_videos(video_paths(record, self.image_folder), record_fps(record), record_max_frames(record),
                           f"record {record.get('id')!r}")

    def encode(self, record: dict[str, Any], images: list[Image.Image] | None = None) -> dict[str, Any]:
        """Model inputs for one record; raises `PModInputError` for a record that cannot be used."""
        messages = to_messages(record)
        images = self.images(record) if images is None else images
        check_processor_takes(self.processor, f"record {record.get('id')!r}", videos=bool(video_sources(record)))
        videos, rates = self.video_frames(record)
        text, spans = assistant_spans(self.processor, messages)
        text, spans = self._terminate_replies(text, spans)
        if videos:
            enc = self.processor(text=text, images=images or None, videos=videos,
                                 video_metadata=video_metadata(videos, rates), return_tensors="pt")
        elif images:
            enc = self.processor(text=text, images=images, return_tensors="pt")
        else:
            enc = self.tokenizer(text, return_tensors="pt")
        ids = enc["input_ids"][0]
        labels = self._labels(text, spans, ids)
        if ids.shape[0] > self.model_max_length:
            ids, labels = self._truncate(record, ids, labels)
        if not (labels != IGNORE_INDEX).any():
            raise PModInputError(f"record {record.get('id')!r}: no assistant tokens left to train on")
        out: dict[str, Any] = {"input_ids": ids, "labels": labels}
        for key, value in enc.items():  # vision inputs (pixels, sizes, grids) and per-token inputs, as given
            if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
                continue
            out[key] = value[0][: ids.shape[0]] if key in TOKEN_LEVEL_INPUTS else value
        return out

    def _terminate_replies(self, text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        """Append the end-of-sequence token to replies whose template ends them with plain text (the llava-hf
        template does), so the model learns to stop, as the original LLaVA training does."""
        eos = self.tokenizer.eos_token
        if not eos:
            return text, spans
        specials = [t for t in self.tokenizer.all_special_tokens if t]
        out: list[tuple[int, int]] = []
        for s, e in reversed(spans):
            reply = text[s:e].rstrip()
            cut = s + len(reply)  # trailing template whitespace belongs to the next token ("▁USER")
            if any(reply.endswith(t) for t in specials):
                out.append((s, cut))
                continue
            text = text[:cut] + eos + text[cut:]
            out = [(a + len(eos), b + len(eos)) for a, b in out]  # later replies move right
            out.append((s, cut + len(eos)))
        return text, out[::-1]

    def _labels(self, text: str, spans: list[tuple[int, int]], ids: torch.Tensor) -> torch.Tensor:
        """Labels for the processor's ids: reply tokens located by character offsets on the unexpanded text."""
        plain = self.tokenizer(text, return_offsets_mapping=True)
        # Overlap, not containment: SentencePiece / byte-level tokens carry their leading space ("▁Red", "ĠRed"),
        # so the first reply token starts one character before the reply.
        trained = [b > a and a < e and b > s for a, b in plain["offset_mapping"] for s, e in [_span_of(a, b, spans)]]
        unexpanded = plain["input_ids"]
        expandable = self.placeholder_ids
        seq = ids.tolist()
        # plain positions next to a placeholder: where a processor may write more than the placeholder's expansion
        # (Qwen3-VL writes each video frame as a timestamp, then the frame's tokens between vision markers)
        near_media = {k + d for k, t in enumerate(unexpanded) if t in expandable for d in (-1, 0, 1)}
        labels, i, j = [], 0, 0
        # Walk both sequences: each run of image (video) tokens in the processor's ids is one run in the plain ids;
        # tokens the processor inserts next to media are never trained.
        while i < len(seq):
            expected = unexpanded[j] if j < len(unexpanded) else None
            if seq[i] in expandable and expected == seq[i]:
                token = seq[i]
                while i < len(seq) and seq[i] == token:
                    labels.append(IGNORE_INDEX)
                    i += 1
                while j < len(unexpanded) and unexpanded[j] == token:
                    j += 1
            elif seq[i] == expected and seq[i] not in expandable:
                labels.append(seq[i] if trained[j] else IGNORE_INDEX)
                i += 1
                j += 1
            elif j in near_media or j - 1 in near_media:
                labels.append(IGNORE_INDEX)  # inserted by the processor around media
                i += 1
            else:
                break
        if i != len(seq) or j != len(unexpanded):
            raise PModInputError(
                "the processor's token ids do not match the tokenizer's on the same text (apart from image "
                "expansion), so labels cannot be aligned; check that the processor's tokenizer is the model's"
            )
        return torch.tensor(labels, dtype=torch.long)

    def _truncate(self, record: dict[str, Any], ids: torch.Tensor, labels: torch.Tensor):
        n = self.model_max_length
        placeholders = torch.tensor(sorted(self.placeholder_ids), device=ids.device)
        image_at = torch.isin(ids, placeholders).nonzero().flatten()  # image and video tokens
        if image_at.numel() and int(image_at[-1]) >= n:
            raise PModInputError(
                f"record {record.get('id')!r}: {ids.shape[0]} tokens exceed model_max_length={n} and the cut would "
                "fall inside or before an image's tokens"
            )
        return ids[:n], labels[:n]

    def length(self, record: dict[str, Any], tokens_per_image: int) -> int:
        """A cheap length estimate for length-grouped batching, no image decoding: words + image tokens, a video
        as one image per two listed frames (a frame folder or video file, not read here, as four images)."""
        words = sum(len(str(t.get("value", "")).split()) for t in record.get("conversations", []))
        videos = sum(max(1, len(v) // 2) if isinstance(v, list) else 4 for v in video_sources(record))
        return words + tokens_per_image * (len(image_paths(record)) + videos)


def check_processor_takes(processor: Any, what: str, images: bool = False, videos: bool = False) -> None:
    """A `PModInputError` when ``processor`` cannot take the images or videos that ``what`` (a record, a batch)
    has: a bare tokenizer has no image processor, a LLaVA / LLaVA-NeXT processor no video processor."""
    if images and getattr(processor, "image_processor", None) is None:
        raise PModInputError(f"{what} has images, but {type(processor).__name__} has no image processor: pass the "
                             "model's processor")
    if videos and getattr(processor, "video_processor", None) is None:
        raise PModInputError(
            f"{what} has a video, but {type(processor).__name__} has no video processor (video needs a video model: "
            "LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL)"
        )


def _span_of(a: int, b: int, spans: list[tuple[int, int]]) -> tuple[int, int]:
    """The reply span a token (a, b) overlaps, or an empty span."""
    for s, e in spans:
        if a < e and b > s:
            return s, e
    return 0, 0


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA-format records encoded lazily (images are read when an item is asked for)."""

    def __init__(
        self,
        records: list[dict[str, Any]] | str | Path,
        processor: Any,
        image_folder: str | Path | None = None,
        model_max_length: int = 2048,
        tokens_per_image: int = 576,
        check: bool = True,
    ):
        """``check``: validate every record now (`check_records`); off when the caller already has."""
        source = records if isinstance(records, (str, Path)) else "the dataset"
        self.records = load_records(records) if isinstance(records, (str, Path)) else list(records)
        self.encoder = Encoder(processor, Path(image_folder) if image_folder else None, model_max_length)
        self.tokens_per_image = tokens_per_image
        if check:  # no records, or malformed conversations, fail now, not hours into a run
            check_records(self.records, source)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> list[int]:
        return [self.encoder.length(r, self.tokens_per_image) for r in self.records]

    def __getitem__(self, index: int) -> dict[str, Any]:
        # A bad record is replaced by the next usable one (as the original LLaVA loader does), so batches keep
        # their size. Only the record at `index` counts as skipped here: a bad replacement candidate is counted
        # when its own index comes up, so each bad record is counted once per epoch.
        skipped = []
        attempts = min(len(self.records), 32)
        for attempt in range(attempts):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                item = self.encoder.encode(record)
            except (OSError, PModInputError, SyntaxError, ValueError) as exc:  # PIL raises all of these on bad files
                level = logging.WARNING if attempt == 0 else logging.DEBUG
                logger.log(level, "skipping record %r: %s: %s", record.get("id"), type(exc).__name__, exc)
                skipped.append(str(record.get("id")))
                continue
            if attempt > 0:
                item[SKIP_KEY] = skipped[:1]
            return item
        raise PModInputError(
            f"records {', '.join(skipped[:5])}{'...' if len(skipped) > 5 else ''} ({attempts} in a row from index "
            f"{index}) are all unusable; "
            "see the warnings above, and check the image folder and the data file"
        )


@dataclass
class LlavaCollator:
    """Pads a list of encoded records into a batch (right padding for training) and counts skipped ones.

    LLaVA-NeXT items carry ``pixel_values`` of shape (n_images, n_tiles, 3, H, W) with a per-image tile count;
    tiles are zero-padded to the batch's largest count (the model reads the real count from ``image_sizes``).
    """

    pad_token_id: int
    padding_side: str = "right"
    count_in_batch: bool = False  # put the number of skipped records in the batch (read by `pmod.pipelines.train`)
    skipped: list[str] = field(default_factory=list)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        skipped = [rid for item in items for rid in item.get(SKIP_KEY, [])]
        self.skipped.extend(skipped)
        width = max(item["input_ids"].shape[0] for item in items)
        ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = item["input_ids"].shape[0]
            cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            ids[row, cols] = item["input_ids"]
            labels[row, cols] = item["labels"]
            mask[row, cols] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        # per-token inputs (Qwen2-VL modality types, Gemma 3 token types) pad like the ids, with 0
        for key in TOKEN_LEVEL_INPUTS:
            if any(key in item for item in items):
                values = torch.zeros((len(items), width), dtype=torch.long)
                for row, item in enumerate(items):
                    n = item["input_ids"].shape[0]
                    cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
                    values[row, cols] = item.get(key, torch.zeros(n, dtype=torch.long))
                batch[key] = values
        for key in sorted({k for item in items for k in item} - set(batch) - {"labels", SKIP_KEY, *TOKEN_LEVEL_INPUTS}):
            # vision inputs of every image in the batch, in row order: pixels, patches, sizes, grids
            parts = [item[key] for item in items if key in item]
            if key == "pixel_values_videos" and len({p.shape[1:] for p in parts}) > 1:
                raise PModInputError(
                    f"videos of one batch have different shapes {sorted({tuple(p.shape[1:]) for p in parts})}: this "
                    "model stacks them; sample the same number of frames per video (or use batch size 1)"
                )
            if key == "pixel_values" and parts[0].dim() == 4 and len({p.shape[-2:] for p in parts}) > 1:
                # images of their own sizes (Pixtral: (n_images, 3, H, W), image_sizes says each one's): zero-padded to
                # the largest, as the processor pads a batch
                h, w = max(p.shape[-2] for p in parts), max(p.shape[-1] for p in parts)
                parts = [torch.nn.functional.pad(p, (0, w - p.shape[-1], 0, h - p.shape[-2])) for p in parts]
            if key == "pixel_values" and parts[0].dim() == 5:  # (n_images, n_tiles, 3, H, W): pad the tiles
                tiles = max(p.shape[1] for p in parts)
                parts = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in parts]
            if key == "pixel_attention_mask" and parts[0].dim() == 4:
                # SmolVLM / Idefics3: (1, n_crops, H, W) with the pixels' (1, n_crops, 3, H, W), a row's crop count its
                # own: padded as the pixels are (padding crops masked out; the model drops their all-zero pixels)
                tiles = max(p.shape[1] for p in parts)
                parts = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, tiles - p.shape[1])) for p in parts]
            batch[key] = torch.cat(parts)
        if self.count_in_batch:
            batch[SKIP_KEY] = torch.tensor(len(skipped))
        return batch
