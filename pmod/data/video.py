"""Videos of records and lmms-eval documents: where their frames are, which frames to take, and decoding.

One sampling rule (`sample_frame_indices`) serves training records, `pmod eval` and the lmms-eval plugin, so the
same video with the same settings gives the same frames everywhere. Video files are decoded with
`transformers.video_utils.load_video` and the first installed decoder of `VIDEO_BACKENDS` (`decode_video`);
frame folders and lists need no decoder.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import PModInputError
from .conversation import FRAME_SUFFIXES, video_sources
from .images import load_image

logger = logging.getLogger(__name__)

DEFAULT_VIDEO_FPS = 2.0  # frames per second of a record's frames when it does not say ("fps"): Qwen2-VL's rate
# transformers.video_utils decoders, in the order tried (PyAV is transformers' default)
VIDEO_BACKENDS = ("pyav", "decord", "torchcodec", "opencv", "torchvision")


def video_paths(record: dict[str, Any], folder: Path | None = None) -> list[list[Path] | Path]:
    """Each of the record's videos: a video file (a `Path`) or its frame files (a folder's image files in natural
    name order, or the listed frames), relative paths resolved against ``folder``. A missing video, an empty
    folder or a single image is a `PModInputError` naming it."""
    rid = record.get("id")
    out: list[list[Path] | Path] = []
    for source in video_sources(record):
        if not isinstance(source, str):
            out.append([Path(p) if folder is None else Path(folder) / p for p in source])
            continue
        where = Path(source) if folder is None else Path(folder) / source
        if where.is_dir():
            paths = sorted((f for f in where.iterdir() if f.suffix.lower() in FRAME_SUFFIXES), key=_natural)
            if not paths:
                raise PModInputError(f"record {rid!r}: no frames ({', '.join(FRAME_SUFFIXES)}) in {where}")
            out.append(paths)
        elif not where.is_file():
            raise PModInputError(f"record {rid!r}: video not found: {where} (a video file or a folder of frames)")
        elif where.suffix.lower() in FRAME_SUFFIXES:
            raise PModInputError(f"record {rid!r}: video {where} is one image; give a video file, a folder of "
                                 "frames or a list of frame files")
        else:
            out.append(where)
    return out


def video_frame_paths(record: dict[str, Any], folder: Path | None = None) -> list[list[Path]]:
    """The frame files of each of the record's videos (`video_paths`); a video file is a `PModInputError`
    (`load_videos` decodes those)."""
    out = video_paths(record, folder)
    files = [source for source in out if isinstance(source, Path)]
    if files:
        raise PModInputError(f"record {record.get('id')!r}: video {files[0]} is a video file, not frames")
    return [source for source in out if isinstance(source, list)]


def record_fps(record: dict[str, Any]) -> float:
    """Frames per second of a record's video frames: its ``"fps"``, else `DEFAULT_VIDEO_FPS`. Frame folders and
    lists are taken at this rate; video files are sampled at it."""
    fps = record.get("fps", DEFAULT_VIDEO_FPS)
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or fps <= 0:
        raise PModInputError(f"record {record.get('id')!r}: 'fps' must be a positive number, got {fps!r}")
    return float(fps)


def record_max_frames(record: dict[str, Any]) -> int | None:
    """The most frames taken from each of a record's videos: its ``"max_frames"``, else None (no limit)."""
    value = record.get("max_frames")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise PModInputError(f"record {record.get('id')!r}: 'max_frames' must be a positive integer, got {value!r}")
    return value


def sample_frame_indices(total: int, fps: float | None, rate: float | None = None, max_frames: int | None = None,
                         start: float | None = None, end: float | None = None) -> tuple[list[int], float]:
    """Which of a video's ``total`` frames to take, and the rate of the frames taken: the one sampling rule of
    training records, `pmod eval` and the lmms-eval plugin, so the same video and settings give the same frames.

    ``rate`` is the video's frame rate (None: unknown, taken as ``fps``; frames given as images are at ``fps``),
    ``fps`` the rate to sample at (None: every frame, as lmms-eval takes them; a video no faster than ``fps`` also
    gives every frame). The rule, in three steps:

    1. window: frames ``int(start * rate)`` to ``int(end * rate)``, both kept, clamped to the video (default: all);
    2. count: of the window's ``n`` frames, ``max(1, int(n / rate * fps))`` at ``fps``, at most ``max_frames``;
    3. spread: frame ``first + i * n // count`` for ``i < count``, as transformers' `default_sample_indices_fn` (so
       its video processors) spread them: the window's first frame is always taken, its last only when all are.

    The rate returned is ``rate * count / n``, the mean rate of the frames taken.
    """
    if total < 1:
        raise ValueError("the video has no frames")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    if rate is None:
        if fps is None:
            raise ValueError("sampling needs the video's frame rate or a rate to sample at")
        rate = fps
    first = 0 if start is None else min(total - 1, max(0, int(start * rate)))
    last = total - 1 if end is None else max(first, min(total - 1, int(end * rate)))
    n = last - first + 1
    count = n if fps is None or fps >= rate else max(1, int(n / rate * fps))
    if max_frames is not None:
        count = min(count, max_frames)
    return [first + i * n // count for i in range(count)], rate * count / n


def video_backend() -> str | None:
    """The first installed `transformers.video_utils` decoder of `VIDEO_BACKENDS`, or None."""
    from transformers import video_utils

    available = {
        "pyav": video_utils.is_av_available, "decord": video_utils.is_decord_available,
        "torchcodec": video_utils.is_torchcodec_available, "opencv": video_utils.is_cv2_available,
        # torchvision 0.26 removed its video decoding
        "torchvision": getattr(video_utils, "is_torchvision_video_decoding_available", lambda: False),
    }
    return next((name for name in VIDEO_BACKENDS if available[name]()), None)


def require_video_backend(path: str | Path, what: str = "the record") -> str:
    """The decoder to read the video file ``path`` (of ``what``) with (`video_backend`); a `PModInputError` naming
    the file and what to install when there is none."""
    backend = video_backend()
    if backend is None:
        raise PModInputError(
            f"{what}: cannot read the video file {path}: no video decoder is installed; pip install av (or decord, "
            "torchcodec, opencv-python), or give the video as a folder of frames"
        )
    return backend


def load_video_file(path: str | Path, fps: float | None, max_frames: int | None = None, what: str = "the record", *,
                    start: float | None = None, end: float | None = None, backend: str | None = None,
                    default_rate: float | None = None) -> tuple[list[Image.Image], float]:
    """A video file's frames, sampled at ``fps`` (None: every frame) over the whole video or the ``start`` to ``end``
    seconds window, at most ``max_frames`` (`sample_frame_indices`), decoded with `transformers.video_utils.load_video`
    and ``backend`` (default: the first installed decoder), and the rate of the frames taken. ``default_rate`` is the
    video's rate when its header gives none (default: ``fps``, so every frame is taken). A missing decoder or an
    unreadable file is a `PModInputError`."""
    taken: dict[str, Any] = {}

    def choose(total: int, rate: float | None) -> list[int]:
        taken["indices"], taken["fps"] = sample_frame_indices(total, fps, rate or default_rate, max_frames, start, end)
        return taken["indices"]

    frames = decode_video(path, backend or require_video_backend(path, what), choose, what)
    logger.debug("%s: %d frames of %s at %.3g fps", what, len(frames), path, taken["fps"])
    return frames, taken["fps"]


def decode_video(path: Path, backend: str, choose: Callable[[int, float | None], list[int]],
                 what: str = "the record") -> list[Image.Image]:
    """The frames ``choose(total_frames, fps or None)`` picks from a video file, decoded with
    `transformers.video_utils.load_video` and ``backend``, as RGB images. Matroska / WebM headers give no frame count
    (it is counted from the packets); decoders that return channels first are handled."""
    from transformers import video_utils

    chosen: list[int] = []

    def indices(metadata: Any, **_: Any) -> np.ndarray:
        total = int(metadata.total_num_frames or 0) or _count_frames(path, backend)
        chosen[:] = choose(total, float(metadata.fps or 0) or None)
        return np.asarray(chosen)

    try:
        video, _ = video_utils.load_video(str(path), backend=backend, sample_indices_fn=indices)
    except Exception as exc:  # the decoders raise their own error types
        raise PModInputError(f"{what}: cannot decode the video {path} with {backend}: {exc}") from exc
    frames = np.asarray(video)
    if frames.ndim == 4 and frames.shape[-1] not in (1, 3, 4) and frames.shape[1] in (1, 3, 4):  # (T, C, H, W)
        frames = frames.transpose(0, 2, 3, 1)
    if len(frames) != len(chosen):  # the header promised more frames than the stream holds
        logger.warning("%s: %s gave %d of the %d frames sampled", what, path, len(frames), len(chosen))
    return [Image.fromarray(frame).convert("RGB") for frame in frames]


def _count_frames(path: Path, backend: str) -> int:
    """The frame count of a video whose header lacks one (Matroska, WebM): its video packets, counted without
    decoding (PyAV only; 0 otherwise)."""
    if backend != "pyav":
        return 0
    import av

    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def load_videos(sources: list[list[Path] | Path], fps: float, max_frames: int | None = None,
                what: str = "the record") -> tuple[list[list[Image.Image]], list[float]]:
    """The frames of each video of `video_paths` and their rate: a video file decoded at ``fps``
    (`load_video_file`), frame files read as they are, at ``fps``; at most ``max_frames`` of each, spread
    uniformly (the rate scaled down to match)."""

    videos, rates = [], []
    for source in sources:
        if isinstance(source, Path):
            frames, rate = load_video_file(source, fps, max_frames, what)
        else:
            chosen, rate = sample_frame_indices(len(source), fps, max_frames=max_frames)
            frames = [load_image(source[i]) for i in chosen]
        videos.append(frames)
        rates.append(rate)
    return videos, rates


def video_metadata(videos: list[list[Any]], fps: float | list[float]) -> list[dict[str, Any]]:
    """The ``video_metadata`` a processor gets with decoded frames: their rate, explicit for every processor, so
    that Qwen2.5-VL's temporal positions are the same with transformers' video processors and pmod's."""
    rates = fps if isinstance(fps, list) else [fps] * len(videos)
    return [
        {"fps": r, "total_num_frames": len(v), "frames_indices": list(range(len(v)))} for v, r in zip(videos, rates)
    ]


def _natural(path: Path) -> list[Any]:
    """Sort key: numbers in names compare as numbers (ffmpeg's %d.png: 1, 2, ..., 10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]
