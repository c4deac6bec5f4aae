"""Video-model processors (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision) on machines without torchvision.

transformers (5.x) builds `Qwen2VLProcessor`, `Qwen2_5_VLProcessor` and `LlavaOnevisionProcessor` only when
torchvision is installed: their video processors are torchvision code, and the processor's type check looks the
video-processor base class up by a name transformers exports only with torchvision. pmod does not depend on
torchvision (CPU machines, CI), so this module supplies the two missing pieces and keeps everything else
transformers' own (placeholder expansion, ``mm_token_type_ids``, chat templates, saving):

- frame video processors: the model's video preprocessing of already-decoded frames, with the model's PIL image
  processor per frame. `Qwen2VLFrameVideoProcessor` lays patches out as transformers' torchvision processor
  does (time-major groups of ``temporal_patch_size`` frames, the last frame repeated to fill a group);
  `LlavaOnevisionFrameVideoProcessor` resizes every frame to one square. Both save their settings in the
  format of the transformers processor they stand in for, so a folder saved here loads with transformers'
  own classes where torchvision is installed, and the other way round.
- `processor_class` / `build_processor` / `load_video_model_processor`: the installed processor class,
  subclassed only to accept such a video processor, used when torchvision is missing (with torchvision,
  transformers' classes as they are).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from transformers.feature_extraction_utils import BatchFeature

from .compat import VideoProcessorBase, subprocessor_hook
from .errors import PModInputError

logger = logging.getLogger(__name__)

VIDEO_CONFIG = "video_preprocessor_config.json"


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class _FrameVideoProcessor(VideoProcessorBase):
    """Shared plumbing: settings, calling, saving and loading in the stood-in transformers class's format."""

    stands_in_for: ClassVar[str] = ""
    settings: ClassVar[tuple[str, ...]] = ()  # saved, in the stood-in class's names
    also_read: ClassVar[tuple[str, ...]] = ()  # older names read when loading

    def __init__(self, do_sample_frames: bool = False, **kwargs: Any) -> None:
        kwargs.pop("video_processor_type", None)
        super().__init__(**kwargs)
        self.do_sample_frames = do_sample_frames  # saved as it was read; frames are always taken as given
        if do_sample_frames:
            logger.warning("%s takes frames as given (already sampled); the saved do_sample_frames=True only applies "
                           "to transformers' own video processor", type(self).__name__)

    def __call__(self, videos: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        return self.preprocess(videos, return_tensors=return_tensors, **kwargs)

    def _call_settings(self, kwargs: dict[str, Any]) -> tuple[dict[str, int], list[Any] | None]:
        """The call's ``size`` (or the saved one) and ``video_metadata``; any other setting that would change
        the output is refused, rather than ignored (frames come decoded and sampled)."""
        size = kwargs.pop("size", None) or self.size
        metadata = kwargs.pop("video_metadata", None)
        kwargs.pop("return_metadata", None)  # the processor drops the metadata from its output itself
        if kwargs.pop("do_sample_frames", None):
            raise PModInputError("pmod's frame video processors take frames already sampled: do_sample_frames=True, "
                                 "num_frames and fps sampling need transformers' own video processor (torchvision)")
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise PModInputError(
                f"{type(self).__name__} does not implement the video settings {unsupported}; pass decoded, sampled "
                "frames, or install torchvision to use transformers' own video processor"
            )
        return dict(size), metadata

    def to_dict(self) -> dict[str, Any]:
        return {"video_processor_type": self.stands_in_for, **{k: getattr(self, k) for k in self.settings}}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        path = Path(save_directory) / VIDEO_CONFIG
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return [str(path)]

    @classmethod
    def from_image_processor(cls, image_processor: Any) -> _FrameVideoProcessor:
        """The video processor with the model's image processor's settings (frames are processed like images)."""
        return cls.from_dict(image_processor.to_dict())

    @classmethod
    def from_dict(cls, saved: dict[str, Any], **kwargs: Any) -> _FrameVideoProcessor:
        """From `to_dict` output, or from the settings transformers' own video processor saved."""
        return cls(**{k: saved[k] for k in cls.settings + cls.also_read if saved.get(k) is not None}, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs: Any) -> _FrameVideoProcessor:
        """From a saved processor folder: the ``video_processor`` entry of processor_config.json (how processors
        save their parts) or a standalone video_preprocessor_config.json."""
        # where transformers looks too: the processor's entry, the video config, then the image processor's
        # settings (hub folders written before video processors existed)
        for name, key in (("processor_config.json", "video_processor"), (VIDEO_CONFIG, None),
                          ("preprocessor_config.json", None)):
            path = Path(directory) / name
            if path.is_file():
                saved = json.loads(path.read_text())
                saved = saved.get(key) if key else saved
                if isinstance(saved, dict):
                    return cls.from_dict(saved, **kwargs)
        raise PModInputError(
            f"{directory} has no video processor settings (processor_config.json, {VIDEO_CONFIG} or "
            "preprocessor_config.json)"
        )


class Qwen2VLFrameVideoProcessor(_FrameVideoProcessor):
    """Qwen2-VL / Qwen2.5-VL video preprocessing of decoded frames (a video = a list of PIL images or HWC arrays,
    already sampled at ``fps`` frames per second), numpy and PIL only.

    Each frame goes through `Qwen2VLImageProcessorPil` (smart resize to a multiple of ``patch_size *
    merge_size`` within ``size`` = {shortest_edge: min pixels, longest_edge: max pixels}, rescale, normalise);
    frames are then grouped in time, as the vision tower's 3-D patch embedding expects. Outputs
    ``pixel_values_videos`` (sum of t*h*w, C*tp*p*p), ``video_grid_thw`` and ``video_metadata`` (Qwen2.5-VL
    derives its temporal rotary step from the frames' rate: ``video_metadata`` fps when the call gives it, else
    ``fps``, which is not saved: transformers' processors read a saved fps as a sampling rate; without either,
    transformers' own default for frames without metadata, 24 frames per second, so that both processors agree).
    """

    stands_in_for = "Qwen2VLVideoProcessor"
    settings = ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                "do_sample_frames")
    also_read = ("min_pixels", "max_pixels")
    model_input_names: ClassVar[list[str]] = ["pixel_values_videos", "video_grid_thw"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        fps: float | None = None,
        do_sample_frames: bool = False,
        **kwargs: Any,
    ) -> None:
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        for unused in ("min_pixels", "max_pixels"):  # older configs: folded into size below
            value = kwargs.pop(unused, None)
            if value is not None:
                size = {**(size or {}), ("shortest_edge" if unused == "min_pixels" else "longest_edge"): value}
        super().__init__(do_sample_frames=do_sample_frames, **kwargs)
        size = dict(size or {})
        self.size = {"shortest_edge": size.get("shortest_edge", 128 * 28 * 28),
                     "longest_edge": size.get("longest_edge", 768 * 28 * 28)}
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.image_mean = list(image_mean if image_mean is not None else OPENAI_CLIP_MEAN)
        self.image_std = list(image_std if image_std is not None else OPENAI_CLIP_STD)
        self.fps = fps

    def _frame_processor(self, size: dict[str, int]):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(
            size=size, patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
            merge_size=self.merge_size, image_mean=self.image_mean, image_std=self.image_std,
        )

    def preprocess(self, videos: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        from transformers.video_utils import VideoMetadata

        size, given_metadata = self._call_settings(kwargs)
        videos = _as_video_list(videos)
        if given_metadata is not None and len(given_metadata) != len(videos):
            raise PModInputError(f"video_metadata has {len(given_metadata)} entries for {len(videos)} videos")
        frames = self._frame_processor(size)
        tp, p = self.temporal_patch_size, self.patch_size
        all_patches, grids, metadata = [], [], []
        for v, video in enumerate(videos):
            out = frames.preprocess(list(video), return_tensors=None)  # frames share one size: one grid
            _, gh, gw = (int(g) for g in np.asarray(out["image_grid_thw"])[0])
            n = gh * gw
            # the image processor repeats each frame over the temporal axis: keep one copy per frame -> (T, n, C, p, p)
            per_frame = np.asarray(out["pixel_values"]).reshape(len(video), n, -1, tp, p, p)[:, :, :, 0]
            if pad := -len(video) % tp:  # fill the last group by repeating the last frame, as transformers does
                per_frame = np.concatenate([per_frame, np.repeat(per_frame[-1:], pad, axis=0)])
            groups = per_frame.shape[0] // tp
            grouped = per_frame.reshape(groups, tp, n, -1, p, p).transpose(0, 2, 3, 1, 4, 5)  # (t, n, C, tp, p, p)
            all_patches.append(grouped.reshape(groups * n, -1))  # (t*h*w, C*tp*p*p)
            grids.append([groups, gh, gw])
            meta = {"total_num_frames": len(video), "fps": self.fps, "frames_indices": list(range(len(video)))}
            if given_metadata is not None:  # the frames' own rate, e.g. from the data record
                meta.update({key: value for key, value in dict(given_metadata[v]).items() if value is not None})
            metadata.append(VideoMetadata(**meta))
        data = {"pixel_values_videos": np.concatenate(all_patches), "video_grid_thw": np.array(grids, dtype=np.int64)}
        feature = BatchFeature(data=data, tensor_type=return_tensors)
        feature["video_metadata"] = metadata
        return feature

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int,
                                 videos_kwargs: dict | None = None) -> int:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        h, w = smart_resize(height, width, factor, min_pixels=self.size["shortest_edge"],
                            max_pixels=self.size["longest_edge"])
        groups = -(-num_frames // self.temporal_patch_size)
        return groups * (h // self.patch_size) * (w // self.patch_size)


class LlavaOnevisionFrameVideoProcessor(_FrameVideoProcessor):
    """LLaVA-OneVision video preprocessing of decoded frames: every frame resized (bicubic) to ``size`` =
    {height, width}, rescaled and normalised. Outputs ``pixel_values_videos`` (n_videos, T, 3, H, W); the videos
    of one call must have the same number of frames (they are stacked)."""

    stands_in_for = "LlavaOnevisionVideoProcessor"
    settings = ("size", "image_mean", "image_std", "do_sample_frames")
    model_input_names: ClassVar[list[str]] = ["pixel_values_videos"]

    def __init__(self, size: dict[str, int] | None = None, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, do_sample_frames: bool = False, **kwargs: Any) -> None:
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        super().__init__(do_sample_frames=do_sample_frames, **kwargs)
        self.size = ({"height": 384, "width": 384} if size is None
                     else {"height": size["height"], "width": size["width"]})
        self.image_mean = list(image_mean if image_mean is not None else OPENAI_CLIP_MEAN)
        self.image_std = list(image_std if image_std is not None else OPENAI_CLIP_STD)

    def preprocess(self, videos: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        from PIL import Image

        size, _ = self._call_settings(kwargs)  # OneVision does not use the frames' timing
        videos = _as_video_list(videos)
        if len({len(v) for v in videos}) > 1:
            raise PModInputError(
                f"LLaVA-OneVision stacks the videos of one call: got {sorted({len(v) for v in videos})} frames; "
                "sample the same number of frames from each video"
            )
        height, width = size["height"], size["width"]
        mean, std = np.array(self.image_mean).reshape(3, 1, 1), np.array(self.image_std).reshape(3, 1, 1)
        out = []
        for video in videos:
            frames = []
            for frame in video:  # (H, W, 3) uint8, checked by _as_video_list
                # PIL bicubic, as transformers' PIL image processors; torchvision's antialiased resize differs by a
                # few 1/255 steps on frames that are not already at the target size
                image = Image.fromarray(frame)
                x = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
                frames.append((x.transpose(2, 0, 1) / 255.0 - mean) / std)  # (3, H, W)
            out.append(np.stack(frames).astype(np.float32))  # (T, 3, H, W)
        return BatchFeature(data={"pixel_values_videos": np.stack(out)}, tensor_type=return_tensors)


def _as_video_list(videos: Any) -> list[np.ndarray]:
    """Videos as transformers batches them (`make_batched_videos`: one video as a list of frames or a (T, H, W,
    C) array, a list of videos, or a list of such lists per sample) -> (T, H, W, 3) uint8 arrays."""
    from transformers.video_utils import make_batched_videos

    if isinstance(videos, (str, os.PathLike)) or (
            isinstance(videos, (list, tuple)) and any(isinstance(v, (str, os.PathLike)) for v in videos)):
        raise PModInputError(
            "videos must be decoded frames (PIL images or (T, H, W, 3) uint8 arrays), not paths: decode video files "
            "first (e.g. with torchcodec or PyAV), or install torchvision to use transformers' own video processor"
        )
    try:
        batched = make_batched_videos(videos)
    except (ValueError, TypeError) as exc:
        raise PModInputError(
            f"videos could not be read as frames ({exc}); every frame of a video must have one size"
        ) from exc
    out = []
    for i, video in enumerate(batched):
        array = np.asarray(video)
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise PModInputError(
                f"video {i}: expected RGB frames as (T, H, W, 3) uint8 (or PIL images), got shape {array.shape} "
                f"{array.dtype}; convert float or channel-first frames first"
            )
        out.append(array)
    return out


# processor class name -> the frame video processor that stands in for its torchvision one
FRAME_VIDEO_PROCESSORS: dict[str, type[_FrameVideoProcessor]] = {
    "Qwen2VLProcessor": Qwen2VLFrameVideoProcessor,
    "Qwen2_5_VLProcessor": Qwen2VLFrameVideoProcessor,
    "LlavaOnevisionProcessor": LlavaOnevisionFrameVideoProcessor,
}
_CLASSES: dict[str, type] = {}


def processor_class(name: str) -> type:
    """The installed processor class ``name`` (a key of `FRAME_VIDEO_PROCESSORS`); without torchvision, a
    subclass that accepts the frame video processor (nothing else differs)."""
    import transformers

    if name not in FRAME_VIDEO_PROCESSORS:
        raise ValueError(f"no frame video processor for {name}; known: {', '.join(FRAME_VIDEO_PROCESSORS)}")
    base = getattr(transformers, name)
    if has_torchvision():
        return base
    if name not in _CLASSES:
        video_cls = FRAME_VIDEO_PROCESSORS[name]

        def check_argument_for_proper_class(self, argument_name: str, argument: Any):
            if argument_name == "video_processor":  # transformers looks this base class up by an unexported name
                if not isinstance(argument, _FrameVideoProcessor):
                    raise TypeError(f"video_processor must be a video processor, got {type(argument).__name__}")
                return type(argument)
            return base.check_argument_for_proper_class(self, argument_name, argument)

        def saved_video_processor(path, processor_dict) -> _FrameVideoProcessor:
            video = (processor_dict or {}).get("video_processor")
            return video_cls.from_dict(video) if isinstance(video, dict) else video_cls.from_pretrained(path)

        # supply the saved frame video processor through whichever hook the installed transformers loads parts with
        if subprocessor_hook() == "_resolve_subprocessors":  # 5.25+: a part already in processor_dict is kept

            @classmethod
            def _resolve_subprocessors(cls, path, processor_dict, **kwargs):
                processor_dict = {**processor_dict, "video_processor": saved_video_processor(path, processor_dict)}
                return base._resolve_subprocessors.__func__(cls, path, processor_dict, **kwargs)

            hook = {"_resolve_subprocessors": _resolve_subprocessors}
        else:  # up to 5.24: the class hook builds the list of parts

            @classmethod
            def _get_arguments_from_pretrained(cls, path, processor_dict=None, **kwargs):
                from transformers import AutoTokenizer

                # not `from transformers import AutoImageProcessor`: without torchvision, transformers 5.17 exports a
                # placeholder there that demands torchvision, while the class in its own module works
                from transformers.models.auto.image_processing_auto import AutoImageProcessor

                kwargs.pop("subfolder", None)
                return [AutoImageProcessor.from_pretrained(path, **kwargs),
                        AutoTokenizer.from_pretrained(path, **kwargs),
                        saved_video_processor(path, processor_dict)]

            hook = {"_get_arguments_from_pretrained": _get_arguments_from_pretrained}

        # __name__ stays transformers' (saved as processor_class, so transformers loads the folder); the
        # qualified name is this module's attribute, so that the processor pickles (dataloader workers)
        _CLASSES[name] = type(name, (base,), {
            "__module__": __name__,
            "__qualname__": FRAME_PREFIX + name,
            "__doc__": f"transformers' {name} with a `{video_cls.__name__}` (no torchvision here).",
            "check_argument_for_proper_class": check_argument_for_proper_class,
            **hook,
        })
    return _CLASSES[name]


FRAME_PREFIX = "Frame"


def __getattr__(attribute: str) -> type:
    """``FrameQwen2VLProcessor`` etc.: the subclasses `processor_class` makes, for unpickling."""
    if attribute.startswith(FRAME_PREFIX) and attribute[len(FRAME_PREFIX):] in FRAME_VIDEO_PROCESSORS:
        return processor_class(attribute[len(FRAME_PREFIX):])
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


def build_processor(name: str, image_processor: Any, tokenizer: Any, video_processor: Any | None = None,
                    **kwargs: Any) -> Any:
    """Processor ``name`` (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``, ``LlavaOnevisionProcessor``) from its
    parts; the video processor defaults to `default_video_processor`.
    ``kwargs`` go to the processor (``chat_template``, OneVision's ``num_image_tokens``, ...)."""
    cls = processor_class(name)  # refuses unknown names
    if video_processor is None:
        video_processor = default_video_processor(name, image_processor)
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, **kwargs)


def default_video_processor(name: str, image_processor: Any) -> Any:
    """The video processor of processor ``name`` with ``image_processor``'s settings: transformers' own (torchvision
    code) where torchvision is installed, pmod's frame video processor elsewhere."""
    frame = FRAME_VIDEO_PROCESSORS[name].from_image_processor(image_processor)
    if not has_torchvision():
        return frame
    import transformers

    own = getattr(transformers, frame.stands_in_for)  # the class the frame processor saves itself as
    return own(**{k: v for k, v in frame.to_dict().items() if k != "video_processor_type"})


def saved_processor_class(model_dir: str | os.PathLike) -> str | None:
    """The processor class named in a saved model folder, if any."""
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            try:
                found = json.loads(path.read_text()).get("processor_class")
            except (json.JSONDecodeError, AttributeError):
                continue
            if found:
                return found
    return None


def load_video_model_processor(model_dir: str | os.PathLike) -> Any | None:
    """A saved Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision processor through `processor_class` when torchvision is
    missing (None when the folder holds another processor, or when transformers' own loading can be used)."""
    name = saved_processor_class(model_dir)
    if name not in FRAME_VIDEO_PROCESSORS or has_torchvision():
        return None
    logger.info("torchvision is not installed: loading %s with pmod's frame video processor", name)
    return processor_class(name).from_pretrained(model_dir)
