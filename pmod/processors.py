"""Video-model processors (Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE, LLaVA-OneVision, InternVL,
LLaVA-NeXT-Video, SmolVLM) on machines without torchvision.

transformers (5.x) builds the processors of these families only when torchvision is installed: their video processors
are torchvision code, and the processor's type check looks the video-processor base class up by a name transformers
exports only with torchvision. pmod does not depend on torchvision (CPU machines, CI), so this module supplies the two
missing pieces and keeps everything else transformers' own (placeholder expansion, Qwen3-VL's frame timestamps,
``mm_token_type_ids``, chat templates, saving):

- frame video processors: the model's video preprocessing of already-decoded frames, with PIL and numpy (Qwen's:
  the model's PIL image processor per frame). `Qwen2VLFrameVideoProcessor` lays patches out as transformers'
  torchvision processor does (time-major groups of ``temporal_patch_size`` frames, the last frame repeated to fill a
  group); `Qwen3VLFrameVideoProcessor` does the same after sizing the whole video as Qwen3-VL does;
  `LlavaOnevisionFrameVideoProcessor` and `InternVLFrameVideoProcessor` resize every frame to one size;
  `LlavaNextVideoFrameVideoProcessor` resizes the shortest edge and crops the centre; `SmolVLMFrameVideoProcessor`
  resizes every frame to one square global image with torch's own resampling kernel (the pixels of transformers'
  processor exactly) and pads the videos of a call to one length. All save their settings in the format of the
  transformers processor they stand in for, so a folder saved here loads with transformers' own classes where
  torchvision is installed, and the other way round.
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
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

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
        # unset optional settings are left out, as transformers leaves out its own (the class default applies)
        return {"video_processor_type": self.stands_in_for,
                **{k: getattr(self, k) for k in self.settings if getattr(self, k) is not None}}

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
    # the stood-in class's defaults
    default_size: ClassVar[dict[str, int]] = {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}
    default_patch_size: ClassVar[int] = 14
    default_mean: ClassVar[list[float]] = list(OPENAI_CLIP_MEAN)
    default_std: ClassVar[list[float]] = list(OPENAI_CLIP_STD)

    def __init__(
        self,
        size: dict[str, int] | None = None,
        patch_size: int | None = None,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        fps: float | None = None,
        do_sample_frames: bool = False,
        **kwargs: Any,
    ) -> None:
        for unused in ("min_pixels", "max_pixels"):  # older configs: folded into size below
            value = kwargs.pop(unused, None)
            if value is not None:
                size = {**(size or {}), ("shortest_edge" if unused == "min_pixels" else "longest_edge"): value}
        super().__init__(do_sample_frames=do_sample_frames, **kwargs)
        size = {**self.default_size, **(size or {})}
        self.size = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}
        self.patch_size = self.default_patch_size if patch_size is None else patch_size
        self.temporal_patch_size, self.merge_size = temporal_patch_size, merge_size
        self.image_mean = list(image_mean if image_mean is not None else self.default_mean)
        self.image_std = list(image_std if image_std is not None else self.default_std)
        self.fps = fps

    def _frame_processor(self, size: dict[str, int]):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(
            size=size, patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
            merge_size=self.merge_size, image_mean=self.image_mean, image_std=self.image_std,
        )

    def _resized(self, video: np.ndarray, size: dict[str, int]) -> tuple[np.ndarray, dict[str, int]]:
        """The frames before the per-frame image processor, and the ``size`` it gets: as they are for Qwen2-VL,
        whose image processor sizes each frame."""
        return video, size

    def preprocess(self, videos: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        from transformers.video_utils import VideoMetadata

        size, given_metadata = self._call_settings(kwargs)
        videos = _as_video_list(videos)
        if given_metadata is not None and len(given_metadata) != len(videos):
            raise PModInputError(f"video_metadata has {len(given_metadata)} entries for {len(videos)} videos")
        tp, p = self.temporal_patch_size, self.patch_size
        all_patches, grids, metadata = [], [], []
        for v, video in enumerate(videos):
            video, frame_size = self._resized(video, size)
            out = self._frame_processor(frame_size).preprocess(list(video), return_tensors=None)  # one size: one grid
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

    def get_number_of_video_patches(self, num_frames: int, height: int, width: int,
                                    videos_kwargs: dict | None = None) -> int:
        """`get_num_of_video_patches` under the name transformers 5.17's Qwen3-VL processor calls."""
        return self.get_num_of_video_patches(num_frames, height, width, videos_kwargs)


class Qwen3VLFrameVideoProcessor(Qwen2VLFrameVideoProcessor):
    """Qwen3-VL / Qwen3-VL-MoE video preprocessing of decoded frames: as `Qwen2VLFrameVideoProcessor` (same patch
    layout, ``video_grid_thw`` and ``video_metadata``), but the frame size is chosen for the whole video, as
    `Qwen3VLVideoProcessor` does: transformers' Qwen3-VL smart resize of T x H x W within ``size`` = {shortest_edge:
    min pixels, longest_edge: max pixels} of the video (so longer videos get smaller frames; with
    ``cap_pixels_per_frame``, qwen-vl-utils' per-frame cap of ``max_video_tokens``). Frames are resized to it with PIL
    bicubic. Qwen3-VL's processor writes a timestamp before each time step from ``video_metadata`` (frames_indices /
    fps: the call's metadata, else ``fps``, else transformers' 24 frames per second). A video needs at least
    ``temporal_patch_size`` frames, as with transformers' own."""

    stands_in_for = "Qwen3VLVideoProcessor"
    settings = Qwen2VLFrameVideoProcessor.settings + ("cap_pixels_per_frame", "max_video_tokens")
    default_size: ClassVar[dict[str, int]] = {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}
    default_patch_size: ClassVar[int] = 16
    default_mean: ClassVar[list[float]] = list(IMAGENET_STANDARD_MEAN)
    default_std: ClassVar[list[float]] = list(IMAGENET_STANDARD_STD)

    def __init__(self, *args: Any, cap_pixels_per_frame: bool | None = None, max_video_tokens: int = 768,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cap_pixels_per_frame = cap_pixels_per_frame  # None: transformers' default (no cap) and unsaved
        self.max_video_tokens = max_video_tokens

    def _frame_size(self, num_frames: int, height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        factor = self.patch_size * self.merge_size
        max_pixels = size["longest_edge"]
        if self.cap_pixels_per_frame:  # qwen-vl-utils' per-frame cap, computed as transformers computes it
            frame_cap = self.max_video_tokens * factor * factor
            per_frame = max(min(frame_cap, max_pixels // num_frames), int(size["shortest_edge"] * 1.05))
            max_pixels = per_frame * num_frames
        try:
            return smart_resize(num_frames, height, width, temporal_factor=self.temporal_patch_size, factor=factor,
                                min_pixels=size["shortest_edge"], max_pixels=max_pixels)
        except ValueError as exc:  # e.g. fewer frames than temporal_patch_size
            raise PModInputError(f"Qwen3-VL cannot take this video of {num_frames} frames of {height} x {width}: "
                                 f"{exc}") from exc

    def _resized(self, video: np.ndarray, size: dict[str, int]) -> tuple[np.ndarray, dict[str, int]]:
        t, height, width = video.shape[:3]
        h, w = self._frame_size(t, height, width, size)
        # the frames are on the patch grid now: pixel bounds of exactly h * w keep them as they are
        return _resize_frames(video, h, w), {"shortest_edge": h * w, "longest_edge": h * w}

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int,
                                 videos_kwargs: dict | None = None) -> int:
        h, w = self._frame_size(num_frames, height, width, self.size)
        groups = -(-num_frames // self.temporal_patch_size)
        return groups * (h // self.patch_size) * (w // self.patch_size)


class LlavaOnevisionFrameVideoProcessor(_FrameVideoProcessor):
    """LLaVA-OneVision video preprocessing of decoded frames: every frame resized (bicubic) to ``size`` =
    {height, width}, rescaled and normalised. Outputs ``pixel_values_videos`` (n_videos, T, 3, H, W); the videos
    of one call must have the same number of frames (they are stacked)."""

    stands_in_for = "LlavaOnevisionVideoProcessor"
    family: ClassVar[str] = "LLaVA-OneVision"
    settings = ("size", "image_mean", "image_std", "do_sample_frames")
    model_input_names: ClassVar[list[str]] = ["pixel_values_videos"]

    def __init__(self, size: dict[str, int] | None = None, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, do_sample_frames: bool = False, **kwargs: Any) -> None:
        super().__init__(do_sample_frames=do_sample_frames, **kwargs)
        self.size = ({"height": 384, "width": 384} if size is None
                     else {"height": size["height"], "width": size["width"]})
        self.image_mean = list(image_mean if image_mean is not None else OPENAI_CLIP_MEAN)
        self.image_std = list(image_std if image_std is not None else OPENAI_CLIP_STD)

    def preprocess(self, videos: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        size, _ = self._call_settings(kwargs)  # OneVision and InternVL do not use the frames' timing
        videos = _same_length(_as_video_list(videos), self.family)
        out = [_normalised(_resize_frames(video, size["height"], size["width"]), self.image_mean, self.image_std)
               for video in videos]  # (T, 3, H, W) each
        return BatchFeature(data={"pixel_values_videos": np.stack(out)}, tensor_type=return_tensors)


class InternVLFrameVideoProcessor(LlavaOnevisionFrameVideoProcessor):
    """InternVL video preprocessing of decoded frames, which is LLaVA-OneVision's (`InternVLVideoProcessor`: every
    frame resized, bicubic, to ``size`` = {height, width}, rescaled and normalised with CLIP's mean and std by
    default): ``pixel_values_videos`` (n_videos, T, 3, H, W), which InternVL's processor flattens into
    ``pixel_values`` after the images and expands as one <img>...</img> per frame."""

    stands_in_for = "InternVLVideoProcessor"
    family = "InternVL"


class LlavaNextVideoFrameVideoProcessor(_FrameVideoProcessor):
    """LLaVA-NeXT-Video video preprocessing of decoded frames (`LlavaNextVideoVideoProcessor`, CLIP's recipe): the
    shortest edge resized (bicubic) to ``size`` = {shortest_edge} (or every frame to {height, width}), the centre
    cropped to ``crop_size`` (``do_center_crop``; zero-padded first where the frame is smaller), rescaled and
    normalised. Outputs ``pixel_values_videos`` (n_videos, T, 3, H, W); the videos of one call must have the same
    number of frames (they are stacked)."""

    stands_in_for = "LlavaNextVideoVideoProcessor"
    settings = ("size", "crop_size", "do_center_crop", "image_mean", "image_std", "do_sample_frames")
    model_input_names: ClassVar[list[str]] = ["pixel_values_videos"]

    def __init__(self, size: dict[str, int] | None = None, crop_size: dict[str, int] | None = None,
                 do_center_crop: bool = True, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, do_sample_frames: bool = False, **kwargs: Any) -> None:
        super().__init__(do_sample_frames=do_sample_frames, **kwargs)
        self.size = dict(size) if size is not None else {"shortest_edge": 224}
        self.crop_size = ({"height": 224, "width": 224} if crop_size is None
                          else {"height": crop_size["height"], "width": crop_size["width"]})
        self.do_center_crop = do_center_crop
        self.image_mean = list(image_mean if image_mean is not None else OPENAI_CLIP_MEAN)
        self.image_std = list(image_std if image_std is not None else OPENAI_CLIP_STD)

    def preprocess(self, videos: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        from transformers.image_transforms import get_resize_output_image_size
        from transformers.image_utils import ChannelDimension

        size, _ = self._call_settings(kwargs)  # LLaVA-NeXT-Video does not use the frames' timing
        videos = _same_length(_as_video_list(videos), "LLaVA-NeXT-Video")
        out = []
        for video in videos:
            if "shortest_edge" in size:  # the size transformers' image and video processors compute alike
                height, width = get_resize_output_image_size(
                    video[0], size=size["shortest_edge"], default_to_square=False,
                    input_data_format=ChannelDimension.LAST)
            elif "height" in size and "width" in size:
                height, width = size["height"], size["width"]
            else:
                raise PModInputError(f"LLaVA-NeXT-Video's video size must be {{shortest_edge}} or {{height, width}}, "
                                     f"got {size}")
            frames = _resize_frames(video, height, width)
            if self.do_center_crop:
                frames = _center_crop(frames, self.crop_size["height"], self.crop_size["width"])
            out.append(_normalised(frames, self.image_mean, self.image_std))  # (T, 3, H, W)
        return BatchFeature(data={"pixel_values_videos": np.stack(out)}, tensor_type=return_tensors)


class SmolVLMFrameVideoProcessor(_FrameVideoProcessor):
    """SmolVLM video preprocessing of decoded frames (`SmolVLMVideoProcessor`; a video = a list of PIL images or HWC
    arrays, already sampled): each frame resized (``resample``, LANCZOS by default, with `_resize_frames_torch`) so
    its longest edge is ``size`` = {longest_edge} (the other edge kept in proportion and rounded up to an even number;
    or to ``size`` = {height, width}), then again to the ``max_image_size`` square (videos are never split into crops:
    one global image a frame), rescaled and normalised. The videos of one call are padded with zeros to the most
    frames (and to the largest frame, with ``do_resize=False``). Outputs ``pixel_values`` (n_videos, T, 3, H, W),
    ``pixel_attention_mask`` (n_videos, T, H, W; with ``do_pad``) and ``video_metadata``, from which SmolVLM's
    processor writes each frame's timestamp (frames_indices / fps: the call's metadata, else transformers' 24 frames
    per second). ``num_frames`` and ``fps`` are sampling settings: kept and saved (the processor's chat template
    passes them back) but not applied: frames come sampled."""

    stands_in_for = "SmolVLMVideoProcessor"
    settings = ("size", "max_image_size", "resample", "do_resize", "do_pad", "image_mean", "image_std",
                "do_sample_frames", "num_frames", "fps")
    also_read = ("video_sampling",)  # hub configs: {fps, max_frames, video_size}
    model_input_names: ClassVar[list[str]] = ["pixel_values", "pixel_attention_mask"]
    max_side: ClassVar[int] = 4096  # transformers' cap on a resized frame's longest edge (MAX_IMAGE_SIZE)

    def __init__(self, size: dict[str, int] | None = None, max_image_size: dict[str, int] | None = None,
                 resample: int = 1, do_resize: bool = True, do_pad: bool = True, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, do_sample_frames: bool = False, num_frames: int | None = None,
                 fps: float | None = None, video_sampling: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(do_sample_frames=do_sample_frames, **kwargs)
        if video_sampling:  # as transformers reads it: a given size wins over video_size, the sampling over the rest
            size = size or video_sampling.get("video_size")
            num_frames, fps = video_sampling.get("max_frames", num_frames), video_sampling.get("fps", fps)
        self.size = dict(size) if size is not None else {"longest_edge": 4 * 364}
        self.max_image_size = {"longest_edge": (max_image_size or {"longest_edge": 364})["longest_edge"]}
        self.resample = int(resample)  # a PIL resampling filter (1: LANCZOS), as transformers saves it
        self.do_resize, self.do_pad = do_resize, do_pad
        self.image_mean = list(image_mean if image_mean is not None else IMAGENET_STANDARD_MEAN)
        self.image_std = list(image_std if image_std is not None else IMAGENET_STANDARD_STD)
        self.num_frames, self.fps = num_frames, fps

    def _frame_size(self, height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
        """The first resize's output size, as transformers' SmolVLM ``get_resize_output_image_size`` computes it."""
        if "longest_edge" in size:
            side = min(self.max_side, size["longest_edge"])
            if width >= height:
                height, width = int(side / (width / height)), side
                height += height % 2  # rounded up to an even number
            else:
                height, width = side, int(side * (width / height))
                width += width % 2
            return max(height, 1), max(width, 1)
        if "height" in size and "width" in size:
            return size["height"], size["width"]
        raise PModInputError(f"SmolVLM's video size must be {{longest_edge}} or {{height, width}}, got {size}")

    def preprocess(self, videos: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        from transformers.video_utils import VideoMetadata

        for sampling in ("num_frames", "fps"):  # passed by SmolVLMProcessor.apply_chat_template; transformers uses
            kwargs.pop(sampling, None)  # them only to sample frames, which do_sample_frames (refused below) asks for
        do_resize, do_pad = kwargs.pop("do_resize", None), kwargs.pop("do_pad", None)
        do_resize = self.do_resize if do_resize is None else do_resize
        do_pad = self.do_pad if do_pad is None else do_pad
        size, given_metadata = self._call_settings(kwargs)
        videos = _as_video_list(videos)
        if given_metadata is not None and len(given_metadata) != len(videos):
            raise PModInputError(f"video_metadata has {len(given_metadata)} entries for {len(videos)} videos")
        square, out, metadata = self.max_image_size["longest_edge"], [], []
        for v, video in enumerate(videos):
            t, height, width = video.shape[:3]
            if do_resize:  # to the longest edge, then to the square one global image takes (never split)
                frames = _resize_frames_torch(video, *self._frame_size(height, width, size), self.resample)
                video = _resize_frames_torch(frames, square, square, self.resample)
            out.append(_normalised(video, self.image_mean, self.image_std, fused=True))  # (T, 3, H, W)
            meta = {"total_num_frames": t, "frames_indices": list(range(t)), "height": height, "width": width}
            if given_metadata is not None:  # the frames' own indices and rate: the timestamps the processor writes
                meta.update({key: value for key, value in dict(given_metadata[v]).items() if value is not None})
            metadata.append(VideoMetadata(**meta))  # fps None: the processor takes transformers' 24 per second
        if do_pad:
            frames_max = max(len(x) for x in out)
            height_max, width_max = max(x.shape[2] for x in out), max(x.shape[3] for x in out)
            # padded frames and pixels are zeros; the mask is 1 over a video's own height and width in every frame,
            # padded frames included, as transformers' is
            mask = np.zeros((len(out), frames_max, height_max, width_max), dtype=np.int64)  # (n, T, H, W)
            padded = np.zeros((len(out), frames_max, 3, height_max, width_max), dtype=np.float32)  # (n, T, 3, H, W)
            for i, x in enumerate(out):
                padded[i, :len(x), :, :x.shape[2], :x.shape[3]] = x
                mask[i, :, :x.shape[2], :x.shape[3]] = 1
            data = {"pixel_values": padded, "pixel_attention_mask": mask}
        elif len({x.shape for x in out}) > 1:
            raise PModInputError("SmolVLM stacks the videos of one call: without do_pad they need the same number of "
                                 f"frames and frame size, got {sorted({x.shape[:1] + x.shape[2:] for x in out})}")
        else:
            data = {"pixel_values": np.stack(out)}  # (n, T, 3, H, W)
        feature = BatchFeature(data=data, tensor_type=return_tensors)
        feature["video_metadata"] = metadata
        return feature


def _resize_frames(video: np.ndarray, height: int, width: int, resample: int = 3) -> np.ndarray:
    """(T, H, W, 3) uint8 frames resized to (T, height, width, 3) with PIL ``resample`` (3: bicubic; SmolVLM's 1:
    LANCZOS), in two passes, width then height, as torchvision's antialiased uint8 kernel (transformers' video
    processors) does: Pillow's one-call resize may take the height first, and the 8-bit rounding and clipping between
    the passes then differs by up to 13 steps on noisy frames (one step when the order is the same)."""
    from PIL import Image

    t, h, w = video.shape[:3]
    if (h, w) == (height, width):
        return video
    out = []
    for frame in video:
        image = Image.fromarray(frame)
        if w != width:
            image = image.resize((width, h), Image.Resampling(resample))
        if h != height:
            image = image.resize((width, height), Image.Resampling(resample))
        out.append(np.asarray(image))
    return np.stack(out)


# PIL resampling filters (transformers' ``resample``) that torch's antialiased uint8 kernel implements
TORCH_MODES = {1: "lanczos", 3: "bicubic"}


def _resize_frames_torch(video: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """(T, H, W, 3) uint8 frames resized to (T, height, width, 3) by torch's antialiased uint8 kernel, the call
    torchvision makes for transformers' video processors on CPU, so the pixels are theirs exactly (torch is pmod's
    dependency; torchvision is not). PIL's kernel keeps more bits of each weight and rounds some pixels one step
    apart per resize, which SmolVLM's two resizes compound to two (measured, LANCZOS and bicubic alike). Filters torch
    lacks here (lanczos before torch had it; nearest, bilinear, box, hamming): `_resize_frames` with PIL."""
    import torch
    import torch.nn.functional as F

    if video.shape[1:3] == (height, width):  # as torchvision: frames already at the size are kept as they are
        return video
    if resample in TORCH_MODES:
        frames = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W)
        try:
            out = F.interpolate(frames, size=[height, width], mode=TORCH_MODES[resample], align_corners=False,
                                antialias=True)
        except (NotImplementedError, RuntimeError, ValueError):  # this torch lacks the mode (or its uint8 kernel)
            pass
        else:
            return out.permute(0, 2, 3, 1).numpy()  # (T, height, width, 3)
    return _resize_frames(video, height, width, resample)


def _center_crop(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """The (height, width) centre of (T, H, W, 3) frames, zero-padded around first where they are smaller, with the
    offsets of transformers' centre crop (the extra pixel of an odd margin at the bottom / right)."""
    pad_h, pad_w = max(height - video.shape[1], 0), max(width - video.shape[2], 0)
    if pad_h or pad_w:
        video = np.pad(video, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    top, left = (video.shape[1] - height) // 2, (video.shape[2] - width) // 2
    return video[:, top:top + height, left:left + width]


def _normalised(video: np.ndarray, mean: list[float], std: list[float], fused: bool = False) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float32, rescaled to [0, 1] and normalised per channel. ``fused``: in one
    step, (x - 255 mean) / (255 std) in float32, as transformers' torchvision processors compute it (bit for bit;
    the two steps differ from it by up to 2.4e-7)."""
    if fused:
        x = video.astype(np.float32).transpose(0, 3, 1, 2)  # (T, 3, H, W)
        scale = np.float32(1 / (1 / 255))  # transformers' 1 / rescale_factor
        mean_255 = np.array(mean, dtype=np.float32).reshape(1, 3, 1, 1) * scale
        return (x - mean_255) / (np.array(std, dtype=np.float32).reshape(1, 3, 1, 1) * scale)
    x = video.astype(np.float32).transpose(0, 3, 1, 2) / 255.0  # (T, 3, H, W)
    return ((x - np.array(mean).reshape(1, 3, 1, 1)) / np.array(std).reshape(1, 3, 1, 1)).astype(np.float32)


def _same_length(videos: list[np.ndarray], family: str) -> list[np.ndarray]:
    """``videos``, refused unless they have one number of frames (the processor stacks them)."""
    if len({len(v) for v in videos}) > 1:
        raise PModInputError(
            f"{family} stacks the videos of one call: got {sorted({len(v) for v in videos})} frames; "
            "sample the same number of frames from each video"
        )
    return videos


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
    "Qwen3VLProcessor": Qwen3VLFrameVideoProcessor,  # Qwen3-VL-MoE's processor too
    "LlavaOnevisionProcessor": LlavaOnevisionFrameVideoProcessor,
    "InternVLProcessor": InternVLFrameVideoProcessor,
    "LlavaNextVideoProcessor": LlavaNextVideoFrameVideoProcessor,
    "SmolVLMProcessor": SmolVLMFrameVideoProcessor,
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
                parts = {"image_processor": AutoImageProcessor.from_pretrained(path, **kwargs),
                         "tokenizer": AutoTokenizer.from_pretrained(path, **kwargs),
                         "video_processor": saved_video_processor(path, processor_dict)}
                return [parts[a] for a in cls.get_attributes()]  # the __init__ order (LLaVA-NeXT-Video: video first)

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
    """Processor ``name`` (a key of `FRAME_VIDEO_PROCESSORS`: ``Qwen2VLProcessor``, ``Qwen3VLProcessor``,
    ``InternVLProcessor``, ...) from its parts; the video processor defaults to `default_video_processor`.
    ``kwargs`` go to the processor (``chat_template``, OneVision's ``num_image_tokens``, ...)."""
    cls = processor_class(name)  # refuses unknown names
    if video_processor is None:
        video_processor = default_video_processor(name, image_processor)
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, **kwargs)


def default_video_processor(name: str, image_processor: Any, **settings: Any) -> Any:
    """The video processor of processor ``name`` with ``image_processor``'s settings, ``settings`` (in the
    transformers video processor's names, e.g. Qwen3-VL's video ``size``) over them: transformers' own (torchvision
    code) where torchvision is installed, pmod's frame video processor elsewhere."""
    frame = FRAME_VIDEO_PROCESSORS[name].from_dict({**image_processor.to_dict(), **settings})
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
    """A saved processor of `FRAME_VIDEO_PROCESSORS` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL,
    LLaVA-NeXT-Video, SmolVLM) through `processor_class` when torchvision is missing (None when the folder holds another
    processor, or when transformers' own loading can be used)."""
    name = saved_processor_class(model_dir)
    if name not in FRAME_VIDEO_PROCESSORS or has_torchvision():
        return None
    logger.info("torchvision is not installed: loading %s with pmod's frame video processor", name)
    return processor_class(name).from_pretrained(model_dir)
