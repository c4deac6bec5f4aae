"""lmms-eval model ``pmod``: evaluate p-MoD models with lmms-eval (0.7.x).

    lmms-eval eval --model pmod --model_args pretrained=DIR --tasks gqa,textvqa_val --batch_size 8

lmms-eval finds the model through the ``lmms_eval.models`` entry point that pmod's package metadata declares
(`manifest`). Like lmms-eval's own models it has two classes: `PModChat` (the default), which answers a task's
``doc_to_messages`` chat messages (lmms-eval builds them from ``doc_to_visual`` / ``doc_to_text`` for tasks
without), and `PMod` (``--force_simple``), which answers ``doc_to_visual`` / ``doc_to_text`` requests and also
scores ``loglikelihood`` ones. ``model_args``:

    pretrained           a saved p-MoD model, or a dense LLaVA / LLaVA-NeXT / Llama / Qwen2 / Mistral checkpoint
    schedule, average_ratio, max_ratio, min_ratio, constant_start, constant_end, alpha, beta, targets,
    routed_layers, ...   `pmod.PModConfig` fields: convert a dense checkpoint with these settings (routers at zero).
                         A list is written as JSON: schedule='[1.0,0.5,...]'. Not allowed for a p-MoD checkpoint.
    dense=True           evaluate a dense checkpoint as it is (the baseline), without converting it
    device, dtype        default cuda (cuda:LOCAL_RANK under `accelerate launch`) and float16, else cpu and float32;
                         dtype=auto keeps the checkpoint's dtype
    attn_implementation  sdpa (default) or eager
    chat_template        vicuna_v1, a template string or a file; default: the processor's own template, else vicuna_v1
    max_new_tokens       used when a task does not set it (default 128)
    max_frames           the most frames taken of a video (or of its window), spread over all its frames as
                         training and ``pmod eval`` spread them (`pmod.data.video.sample_frame_indices`; default 32;
                         a task's ``metadata: sample_frames`` overrides it)
    video_fps            the frame rate of videos given as frames (a folder of images, a list; default 2)
    video_backend        the transformers video decoder for video files (pyav, decord, torchcodec, opencv,
                         torchvision); default: the first one installed

Video models (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) answer video documents: a video file (decoded with
``transformers.video_utils``), a folder of frames (natural name order), or a list of frames (PIL images or image
files); a task whose ``metadata`` says ``task_type: video`` gives a video as a flat list of PIL frames. Other models
refuse a video document, naming the task. Audio is refused.

Generation is batched (``--batch_size``, left padding, the p-MoD KV cache); a task's ``until`` strings cut the
answers. After each batch of requests the realised prefill FLOP ratio and vision KV ratio (p-MoD over dense,
`pmod.efficiency.realized_cost`) and the KV-cache bytes against a dense cache are logged, overall and per task,
and recorded with lmms-eval's generation metrics, so they appear under ``"throughput"`` in the results file
(``avg_pmod_flops_ratio``, ``avg_pmod_kv_ratio``, ``avg_pmod_flops_ratio/<task>``, ...) next to the scores.
`PMod.efficiency` holds the same figures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from ..config import PModConfig
from ..data.conversation import FRAME_SUFFIXES, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, render, to_messages, tokenizer_of
from ..data.images import load_image
from ..data.records import check_processor_takes
from ..data.video import DEFAULT_VIDEO_FPS, VIDEO_BACKENDS, load_video_file, sample_frame_indices, video_frame_paths
from ..efficiency import realized_cost
from ..errors import PModConfigError, PModInputError
from ..pipelines.generation import encode, generate_batch, is_pmod, load_for_inference

logger = logging.getLogger(__name__)

MODEL_NAME = "pmod"
_PMOD_OPTIONS = {f.name for f in dataclasses.fields(PModConfig)}
# Generation settings a task may give that are passed to model.generate; others are ignored (with a note).
_GENERATE_KEYS = {
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "suppress_tokens",
}


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: registers model name ``pmod`` (an lmms-eval ModelManifest): `PModChat`,
    or `PMod` under ``--force_simple``."""
    # Imported here, not at the top: lmms_eval.models loads the entry points while it is being imported, so a
    # top-level import would make importing this module first a circular import that drops the registration.
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_NAME, simple_class_path=f"{__name__}.PMod", chat_class_path=f"{__name__}.PModChat"
    )


def _eval_logger():
    try:  # lmms-eval configures loguru for its console output; python logging is usually silent there
        from loguru import logger as loguru_logger

        return loguru_logger
    except ImportError:  # pragma: no cover - loguru is an lmms-eval dependency
        return logger


def _parse_option(name: str, value: Any) -> Any:
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise PModConfigError(f"model_args {name}={value!r} is not a JSON list: {exc}") from exc
    return value


@dataclasses.dataclass
class _Media:
    """One image or video of a document, not yet read."""

    kind: str  # "image" or "video"
    source: Any  # an image: a PIL image or a file; a video: a file, a frame folder, or a list of frames
    start: float | None = None  # a video's window, in seconds
    end: float | None = None


@dataclasses.dataclass
class _Prompt:
    """One rendered prompt and its media, in placeholder order: what `generate_batch` takes for a row."""

    text: str
    images: list[Image.Image]
    videos: list[list[Image.Image]]
    fps: float  # the frame rate of its videos


def _what(task: str, doc_id: Any) -> str:
    return f"task {task!r} document {doc_id}"


def _media_of(value: Any, what: str, kind: str | None = None, start: float | None = None,
              end: float | None = None) -> _Media:
    """A visual of a task as an image or a video: a PIL image or an image file is an image (``kind``, a chat
    content type, is overruled: lmms-eval labels every path a video in some places); a frame folder, a list of
    frames or another file is a video; a dict is a video with its window (lmms-eval's ``video_start`` /
    ``video_end``) unless it holds audio."""
    if isinstance(value, Image.Image):
        return _Media("image", value)
    if isinstance(value, dict):
        if "array" in value or "sampling_rate" in value:
            raise PModInputError(f"{what} has audio: the {MODEL_NAME!r} model does not take audio")
        source = next((value[k] for k in ("path", "url", "video") if value.get(k) is not None), None)
        return _media_of(source, what, "video", value.get("video_start", start), value.get("video_end", end))
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if kind == "image" or path.suffix.lower() in FRAME_SUFFIXES:
            return _Media("image", path)
        return _Media("video", path, start, end)
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(f, (Image.Image, str, os.PathLike)) for f in value
    ):
        return _Media("video", list(value), start, end)
    raise PModInputError(
        f"{what}: cannot use a {type(value).__name__} visual; the {MODEL_NAME!r} model takes PIL images, image files, "
        "and videos as files, frame folders or lists of frames"
    )


def _media_of_visuals(visuals: Any, what: str, frames_are_video: bool = False) -> list[_Media]:
    """A ``doc_to_visual`` result as media. With ``frames_are_video`` (a task's ``metadata: task_type: video``)
    a list of PIL images is the frames of one video, as lmms-eval's LLaVA-OneVision reads it."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    visuals = [v for v in visuals if v is not None]
    if frames_are_video and visuals and all(isinstance(v, Image.Image) for v in visuals):
        return [_Media("video", list(visuals))]
    return [_media_of(v, what) for v in visuals]


class _CostLog:
    """Per-task realised costs collected over the requests of a run."""

    def __init__(self) -> None:
        self.by_task: dict[str, dict[str, list[float]]] = {}
        self.new_tokens = 0
        self.seconds = 0.0

    def add(self, task: str, costs: dict[str, Any], new_tokens: int = 0, seconds: float = 0.0) -> None:
        """Add per-row ratios: ``costs`` maps ``flops_ratio``, ``kv_ratio``, ``kv_cache_ratio`` to lists (or None:
        a dense model), as a `pmod.pipelines.generation.Generation` holds them."""
        entry = self.by_task.setdefault(task, {"flops_ratio": [], "kv_ratio": [], "kv_cache_ratio": []})
        for key, values in entry.items():
            values.extend(costs.get(key) or [])
        self.new_tokens += new_tokens
        self.seconds += seconds

    def summary(self) -> dict[str, Any]:
        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        keys = ("flops_ratio", "kv_ratio", "kv_cache_ratio")
        overall = {k: mean([v for e in self.by_task.values() for v in e[k]]) for k in keys}
        return {
            **overall,
            "n": sum(len(e["flops_ratio"]) for e in self.by_task.values()),
            "by_task": {t: {k: mean(v) for k, v in e.items()} for t, e in self.by_task.items()},
        }


class PMod(lmms):
    """lmms-eval model for p-MoD checkpoints (and dense ones converted on load). See the module docstring."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        attn_implementation: str = "sdpa",
        chat_template: str | None = None,
        max_new_tokens: int = 128,
        dense: bool = False,
        max_frames: int = 32,
        video_fps: float = DEFAULT_VIDEO_FPS,
        video_backend: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(options) - _PMOD_OPTIONS)
        if unknown:
            raise PModConfigError(
                f"unknown model_args {unknown} for model {MODEL_NAME!r}; accepted: pretrained, device, dtype, "
                f"batch_size, attn_implementation, chat_template, max_new_tokens, dense, max_frames, video_fps, "
                f"video_backend, and the p-MoD settings "
                f"{sorted(_PMOD_OPTIONS)}"
            )
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError) as exc:
            raise PModConfigError(f"batch_size must be a positive integer, got {batch_size!r}") from exc
        if self.batch_size_per_gpu < 1:
            raise PModConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.max_new_tokens = int(max_new_tokens)
        self.max_frames, self.video_fps = int(max_frames), float(video_fps)
        if self.max_frames < 1 or self.video_fps <= 0:
            raise PModConfigError(f"max_frames and video_fps must be positive, got {max_frames!r} and {video_fps!r}")
        if video_backend is not None and video_backend not in VIDEO_BACKENDS:
            raise PModConfigError(f"video_backend must be one of {list(VIDEO_BACKENDS)}, got {video_backend!r}")
        self.video_backend = video_backend

        # Data parallel under `accelerate launch` / torchrun: lmms-eval shards the requests by rank.
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if device is None or (self._world_size > 1 and str(device).startswith("cuda")):
            # Under `accelerate launch` every process takes its own GPU, whatever `device` says.
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        if dtype is None:
            dtype = "float16" if self._device.type == "cuda" else "float32"

        self.pretrained = str(pretrained)
        settings = {k: _parse_option(k, v) for k, v in options.items()}
        if dense and settings:
            raise PModConfigError(f"dense=True evaluates the checkpoint as it is: drop {sorted(settings)}")
        # a dense checkpoint is converted unless dense=True; local video-model folders load without torchvision too
        self._model, self.processor = load_for_inference(
            self.pretrained, dense=bool(dense), pmod_config=PModConfig(**settings) if settings else None, dtype=dtype,
            device=self._device, chat_template=chat_template, attn_implementation=attn_implementation,
        )
        self._costs = _CostLog()  # the whole run, for `efficiency`
        self._unreported = _CostLog()  # since the last report to lmms-eval
        _eval_logger().info(
            f"pmod: loaded {type(self._model).__name__} from {self.pretrained} on {self._device} "
            f"({'dense baseline' if dense else 'p-MoD'}), batch size {self.batch_size_per_gpu}"
        )

    # ------------------------------------------------------------------ properties lmms-eval reads
    @property
    def model(self) -> Any:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return tokenizer_of(self.processor)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def efficiency(self) -> dict[str, Any]:
        """Realised cost so far: mean flops_ratio, kv_ratio, kv_cache_ratio (None for a dense model), n, by_task."""
        return self._costs.summary()

    # ------------------------------------------------------------------ prompts
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError) as exc:
            raise PModInputError(f"no document {doc_id} in task {task!r} split {split!r}") from exc

    def _load(self, media: list[_Media], what: str, metadata: dict[str, Any] | None = None) -> _Prompt:
        """Read a document's media (after checking that the processor takes them): a prompt without its text."""
        check_processor_takes(self.processor, what, images=any(m.kind == "image" for m in media),
                              videos=any(m.kind == "video" for m in media))
        given = (metadata or {}).get("sample_frames") or self.max_frames
        max_frames = int(given) if isinstance(given, int) or (isinstance(given, str) and given.isdigit()) else 0
        if isinstance(given, bool) or max_frames < 1:
            raise PModInputError(f"{what}: the task's metadata sample_frames must be a positive whole number, got "
                                 f"{given!r}")
        for m in media:  # a window from a task's documents: numbers of seconds, or not given
            for name, value in (("start", m.start), ("end", m.end)):
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or not math.isfinite(value)):
                    raise PModInputError(f"{what}: the video's {name} time must be a finite number of seconds, got "
                                         f"{value!r}")
        images, videos, rates = [], [], []
        try:
            for m in media:
                if m.kind == "image":
                    images.append(
                        m.source.convert("RGB") if isinstance(m.source, Image.Image) else load_image(m.source)
                    )
                else:
                    frames, fps = self._video(m, what, max_frames)
                    videos.append(frames)
                    rates.append(fps)
        except PModInputError as exc:  # name the document where the message does not
            if str(exc).startswith(what):
                raise
            raise PModInputError(f"{what}: {exc}") from exc
        if len(set(rates)) > 1:  # generate_batch takes one rate per prompt
            logger.warning("%s: videos at %s frames per second; all are given %s", what, rates, rates[0])
        return _Prompt("", images, videos, rates[0] if rates else self.video_fps)

    def _video(self, media: _Media, what: str, max_frames: int) -> tuple[list[Image.Image], float]:
        """A video's frames, sampled down to ``max_frames``, and their frame rate. Every frame of the video (or of its
        window) is a candidate: lmms-eval's tasks size videos by frame count, not rate. The frames are spread by
        `sample_frame_indices`, the rule of training and ``pmod eval`` (not np.linspace, as lmms-eval's own models
        spread them, which also keeps the last frame), so a model is evaluated on frames picked as in training."""
        source = media.source
        if isinstance(source, Path) and source.is_dir():
            if not any(f.suffix.lower() in FRAME_SUFFIXES for f in source.iterdir()):
                raise PModInputError(f"{what}: no frames ({', '.join(FRAME_SUFFIXES)}) in the video folder {source}")
            (source,) = video_frame_paths({"id": what, "video": str(source)})  # its frame files, in name order
        if isinstance(source, list):
            indices, fps = sample_frame_indices(len(source), self.video_fps, max_frames=max_frames, start=media.start,
                                                end=media.end)
            frames = [source[i] for i in indices]
            return [f.convert("RGB") if isinstance(f, Image.Image) else load_image(f) for f in frames], fps
        return self._decode(source, media, what, max_frames)

    def _decode(self, path: Path, media: _Media, what: str, max_frames: int) -> tuple[list[Image.Image], float]:
        """Frames of a video file, read with a transformers video decoder."""
        if not path.is_file():
            raise PModInputError(f"{what}: video not found: {path} (a video file or a folder of frames)")
        # fps None: every frame of the window is a candidate; video_fps stands in for a rate the header lacks
        return load_video_file(path, None, max_frames, what, start=media.start, end=media.end,
                               backend=self.video_backend, default_rate=self.video_fps)

    def _visual_prompt(self, context: str, visuals: Any, metadata: dict[str, Any], task: str, doc_id: Any) -> _Prompt:
        """A ``doc_to_visual`` / ``doc_to_text`` request's prompt: one placeholder per image or video in front of
        the context (as LLaVA's own evaluation does), rendered with the chat template."""
        what = _what(task, doc_id)
        media = _media_of_visuals(visuals, what, frames_are_video=metadata.get("task_type") == "video")
        prompt = self._load(media, what, metadata)
        prompt.text = self._prompt(context, [m.kind for m in media], doc_id)
        return prompt

    def _prompt(self, context: str, kinds: Sequence[str], doc_id: Any) -> str:
        """The rendered prompt for a task's context with images and videos of ``kinds``, in that order."""
        marks = {"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}
        text = context
        if kinds and not any(mark in text for mark in marks.values()):
            text = "\n".join(marks[k] for k in kinds) + "\n" + text
        n_images, n_videos = kinds.count("image"), kinds.count("video")
        record = {
            "id": doc_id,
            "image": [f"visual-{i}" for i in range(n_images)] or None,
            "video": [f"video-{i}" for i in range(n_videos)] or None,
            "conversations": [{"from": "human", "value": text}],
        }
        return render(self.processor, to_messages(record), add_generation_prompt=True)

    def _request_prompt(self, req: Instance) -> _Prompt:
        context, _, doc_to_visual, doc_id, task, split = req.args
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None
        return self._visual_prompt(context, visuals, req.metadata, task, doc_id)

    @staticmethod
    def _request_gen_kwargs(req: Instance) -> Any:
        return req.args[1]

    def _generate_kwargs(self, gen_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """A task's generation settings as `generate_batch` arguments: its ``until`` strings are ``stop``."""
        gen = dict(gen_kwargs or {})  # requests share one dict: never change it
        until = gen.pop("until", None)
        if until is not None and not isinstance(until, (str, list, tuple)):
            raise PModInputError(f"gen_kwargs 'until' must be a string or a list, got {type(until).__name__}")
        kwargs = {k: v for k, v in gen.items() if k in _GENERATE_KEYS and v is not None}
        ignored = sorted(set(gen) - _GENERATE_KEYS)
        if ignored:
            logger.debug("ignoring generation settings %s", ignored)
        kwargs["max_new_tokens"] = int(kwargs.get("max_new_tokens", self.max_new_tokens))
        kwargs.setdefault("do_sample", float(kwargs.get("temperature") or 0) > 0)
        return {**kwargs, "stop": [s for s in ([until] if isinstance(until, str) else until or []) if s]}

    def _run(self, task: str, prompts: list[_Prompt], kwargs: dict[str, Any]) -> list[str]:
        """Answers to ``prompts``, generated together; their costs are logged."""
        out = generate_batch(
            self._model, self.processor, [p.text for p in prompts], [p.images for p in prompts],
            videos=[p.videos for p in prompts], video_fps=[p.fps for p in prompts],
            labels=[f"task {task!r} (row {i} of a batch)" for i in range(len(prompts))], **kwargs,
        )
        for log in (self._costs, self._unreported):
            log.add(task, vars(out), sum(out.new_tokens), out.seconds)
        return out.texts

    # ------------------------------------------------------------------ lmms API
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or the task's sampling) answers, in batches of requests with the same task and settings."""
        from tqdm.auto import tqdm

        groups: dict[tuple[str, str, str], list[int]] = {}
        for i, req in enumerate(requests):
            task, split = req.args[4:6]
            key = (task, split, json.dumps(self._request_gen_kwargs(req), sort_keys=True, default=str))
            groups.setdefault(key, []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="pmod generating", disable=self.rank != 0)
        for (task, _split, _), indices in groups.items():
            kwargs = self._generate_kwargs(self._request_gen_kwargs(requests[indices[0]]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self._run(task, [self._request_prompt(requests[i]) for i in chunk], kwargs)
                for i, text in zip(chunk, texts):
                    results[i] = text
                bar.update(len(chunk))
        bar.close()
        if requests:
            self._report()
        return [r if r is not None else "" for r in results]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Multi-round generation: after each answer the task's ``doc_to_text(doc, previous_output=...,
        round_idx=..., previous_round_info=...)`` gives the next round's visuals and context, until it signals
        the end. Returns every round's answer per request."""
        results = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            kwargs = self._generate_kwargs(gen_kwargs)
            doc = self._doc(task, split, doc_id)
            visuals = doc_to_visual(doc) if doc_to_visual is not None else None
            outputs: list[str] = []
            info = None
            round_idx = 0
            while True:
                if round_idx > 0:
                    visuals, context, terminal, previous, info = doc_to_text(
                        doc, previous_output=outputs, round_idx=round_idx, previous_round_info=info
                    )
                    outputs = list(previous) if previous is not None else outputs
                    if terminal:
                        break
                prompt = self._visual_prompt(context, visuals, req.metadata, task, doc_id)
                outputs.append(self._run(task, [prompt], kwargs)[0])
                round_idx += 1
            results.append(outputs)
        if requests:
            self._report()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of the log-probabilities of each continuation's tokens after its prompt, and whether greedy
        decoding would produce exactly those tokens. The continuation is tokenized on its own and appended
        to the prompt's tokens (the lm-evaluation-harness convention)."""
        from tqdm.auto import tqdm

        tokenizer = self.tokenizer
        results = []
        for req in tqdm(requests, desc="pmod log-likelihood", disable=self.rank != 0):
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            visuals = doc_to_visual(doc) if doc_to_visual is not None else None
            prompt = self._visual_prompt(context, visuals, req.metadata, task, doc_id)
            enc = encode(self._model, self.processor, [prompt.text], [prompt.images], [prompt.videos], [prompt.fps])
            cont_ids = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            if cont_ids.shape[1] == 0:
                results.append((0.0, True))
                continue
            n_prompt = enc["input_ids"].shape[1]
            inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
            inputs["input_ids"] = torch.cat([enc["input_ids"], cont_ids.to(enc["input_ids"].device)], dim=1)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            with torch.no_grad():
                logits = self._model(**inputs, use_cache=False).logits[0]
            # Position t predicts token t + 1: the continuation is scored by the logits before each of its tokens.
            logprobs = torch.log_softmax(logits[n_prompt - 1 : -1].float(), dim=-1)
            tokens = cont_ids[0].to(logprobs.device)
            total = logprobs.gather(1, tokens[:, None]).sum().item()
            greedy = bool((logprobs.argmax(dim=-1) == tokens).all())
            results.append((total, greedy))
            if is_pmod(self._model):
                cost = realized_cost(self._model)
                for log in (self._costs, self._unreported):
                    log.add(task, {"flops_ratio": cost.flops_ratio, "kv_ratio": cost.kv_ratio})
        if requests:
            self._report()
        return results

    # ------------------------------------------------------------------ reporting
    def _report(self) -> None:
        """Log the realised costs of the requests since the last report and record them with lmms-eval's
        generation metrics, which the results file carries under "throughput" (averaged over reports)."""
        log, self._unreported = self._unreported, _CostLog()
        summary = log.summary()
        extra: dict[str, float] = {}
        for key in ("flops_ratio", "kv_ratio", "kv_cache_ratio"):
            if summary[key] is not None:
                extra[f"pmod_{key}"] = summary[key]
            for task, values in summary["by_task"].items():
                if values[key] is not None:
                    extra[f"pmod_{key}/{task}"] = values[key]
        if extra:  # a dense model skips nothing and has no ratios
            line = ", ".join(f"{k} {v:.4f}" for k, v in extra.items())
            _eval_logger().info(f"p-MoD realised cost (p-MoD / dense, {summary['n']} examples): {line}")
            logger.info("p-MoD realised cost (p-MoD / dense, %d examples): %s", summary["n"], line)
        try:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics
        except ImportError:  # an lmms-eval without generation metrics: the log line above is the record
            return
        if log.seconds > 0 or extra:
            log_metrics(
                total_elapsed_time=log.seconds,
                total_gen_tokens=log.new_tokens,
                avg_speed=log.new_tokens / log.seconds if log.seconds > 0 else 0.0,
                additional_metrics=extra,
            )


class PModChat(PMod):
    """The lmms-eval chat model ``pmod`` (the default; `PMod` under ``--force_simple``): answers a task's
    ``doc_to_messages`` chat messages, rendered with the chat template, images and videos in message order.
    lmms-eval builds such messages from ``doc_to_visual`` / ``doc_to_text`` for tasks that have none; it sends a
    chat model no ``loglikelihood`` requests (run those tasks with ``--force_simple``)."""

    is_simple = False

    @staticmethod
    def _request_gen_kwargs(req: Instance) -> Any:
        return req.args[2]

    def _request_prompt(self, req: Instance) -> _Prompt:
        _, doc_to_messages, _, doc_id, task, split = req.args
        return self._messages_prompt(doc_to_messages(self._doc(task, split, doc_id)), req.metadata, task, doc_id)

    def _messages_prompt(self, raw: Any, metadata: dict[str, Any], task: str, doc_id: Any) -> _Prompt:
        what = _what(task, doc_id)
        messages, media = _chat_messages(raw, what)
        prompt = self._load(media, what, metadata)
        prompt.text = render(self.processor, messages, add_generation_prompt=True)
        return prompt

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Multi-round generation: round 0 answers ``doc_to_messages(doc)``; each later round
        ``doc_to_messages(doc, round_idx=..., previous_output=..., previous_round_info=...)``, which gives
        ``(messages, terminal, previous_output, round_info)``, until it signals the end or gives no such tuple."""
        results = []
        for req in requests:
            _, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            kwargs = self._generate_kwargs(gen_kwargs)
            doc = self._doc(task, split, doc_id)
            raw, outputs, info, round_idx = doc_to_messages(doc), [], None, 0
            while True:
                prompt = self._messages_prompt(raw, req.metadata, task, doc_id)
                outputs.append(self._run(task, [prompt], kwargs)[0])
                round_idx += 1
                step = doc_to_messages(doc, round_idx=round_idx, previous_output=list(outputs),
                                       previous_round_info=info)
                if not (isinstance(step, tuple) and len(step) == 4):
                    break
                raw, terminal, previous, info = step
                outputs = list(previous) if previous is not None else outputs
                if terminal:
                    break
            results.append(outputs)
        if requests:
            self._report()
        return results


def _chat_messages(raw: Any, what: str) -> tuple[list[dict[str, Any]], list[_Media]]:
    """lmms-eval chat messages (``[{"role", "content": [{"type": "text" | "image" | "video", "text" | "url"}]}]``,
    or its ``ChatMessages``) as pmod's chat messages for `render`, and their images and videos in order."""
    if hasattr(raw, "model_dump"):  # lmms_eval.protocol.ChatMessages
        raw = raw.model_dump()
    if isinstance(raw, dict) and "messages" in raw:
        raw = raw["messages"]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise PModInputError(f"{what}: doc_to_messages gave {type(raw).__name__}, expected a list of chat messages")
    messages, media = [], []
    for message in raw:
        message = message.model_dump() if hasattr(message, "model_dump") else message
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise PModInputError(f"{what}: a chat message needs a role system, user or assistant; got {message!r}")
        content = message.get("content")
        content = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        items: list[dict[str, Any]] = []
        for c in content:
            kind = c.get("type") if isinstance(c, dict) else None
            if kind == "text":
                items.append({"type": "text", "text": str(c.get("text", ""))})
            elif kind in ("image", "video"):
                value = next((c[k] for k in ("url", kind, "path") if c.get(k) is not None), None)
                item = _media_of(value, what, kind, c.get("start_time"), c.get("end_time"))
                media.append(item)
                items.append({"type": item.kind})
            elif kind == "audio":
                raise PModInputError(f"{what} has audio: the {MODEL_NAME!r} model does not take audio")
            else:
                raise PModInputError(f"{what}: unknown chat content {c!r} (text, image and video are supported)")
        messages.append({"role": role, "content": items})
    return messages, media
