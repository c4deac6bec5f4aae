"""Generation for every pmod front-end: `pmod eval` (`pmod.pipelines.evaluate`, which the demo runs too), `pmod chat`
(`pmod.pipelines.chat`) and the lmms-eval plugin.

    model, processor = load_for_inference("path/to/model")
    out = generate_batch(model, processor, [prompt], [[image]], max_new_tokens=32)
    print(out.texts[0], out.flops_ratio, out.summary())

`load_for_inference` loads a model and its processor with the one chat-template choice
(`pmod.data.conversation.use_chat_template`). `generate_batch` answers rendered prompts in left-padded batches
(`encode`; `stacking_groups`), inputs on the model (`move_to_model`), placeholders suppressed (`suppressed_tokens`),
answers cut at stop strings, with what it cost (`Generation`); `generate` does so for encoded inputs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, TextStreamer

from ..cache import PModCache
from ..compat import output_cache
from ..config import PModConfig
from ..data.conversation import tokenizer_of, use_chat_template
from ..data.records import check_processor_takes
from ..data.video import DEFAULT_VIDEO_FPS, video_metadata
from ..efficiency import KVCacheReport, kv_cache_report, realized_cost
from ..errors import PModConfigError, PModInputError
from ..loading import load_model, load_pretrained, load_processor
from ..modeling import PModModelMixin

# config fields naming tokens a model must not generate: image / video placeholders (their features come only
# from pixels) and Qwen2-VL's vision start / end markers
PLACEHOLDER_TOKENS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


# ====================================================================== loading
def usable_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that this machine has; a `PModInputError` saying what is wrong otherwise (a name
    torch does not know, a CUDA device on a build of torch without CUDA or a machine without a GPU, an index past the
    devices there are)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PModInputError(f"Unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps.") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this build of torch has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise PModInputError(f"Device {str(device)!r} asked for, but {why}; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PModInputError(f"Device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise PModInputError(f"Device {str(device)!r} asked for, but MPS is not available here; use --device cpu.")
    return device


def load_for_inference(
    path: str | os.PathLike,
    *,
    dense: bool | None = None,
    pmod_config: PModConfig | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    chat_template: str | None = None,
    need_images: bool = False,
    **from_pretrained_kwargs: Any,
) -> tuple[PreTrainedModel, Any]:
    """A saved model in eval mode (moved to ``device``) and its processor, with the chat template of
    `use_chat_template` (``chat_template``: a setting for it).

    ``dense``: None: the checkpoint as it is (a dense baseline stays dense); False: p-MoD, a dense checkpoint
    converted with ``pmod_config`` (routers at zero); True: a dense checkpoint only. ``dtype``: a torch dtype, its
    name or ``"auto"``. ``need_images``: refuse a processor without an image processor (a bare tokenizer serves a
    text-only model). ``from_pretrained_kwargs`` (``attn_implementation``, ...) go to ``from_pretrained``.
    """
    if pmod_config is not None and dense is not False:
        raise PModConfigError("pmod_config converts a dense checkpoint into p-MoD: pass dense=False with it")
    if device is not None:
        device = usable_device(device)
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise PModConfigError(f"dtype must be auto, float16, bfloat16 or float32, got {dtype!r}")
        dtype = getattr(torch, dtype)
    if dtype is not None:
        from_pretrained_kwargs["dtype"] = dtype
    if dense is False:
        model = load_model(path, pmod_config, **from_pretrained_kwargs)
    else:
        model = load_pretrained(path, **from_pretrained_kwargs)
        if dense and is_pmod(model):
            raise PModConfigError(f"dense=True needs a dense checkpoint; {path} is a p-MoD model")
    model.eval()
    if device is not None:
        model.to(device)
    processor = load_processor(path, need_images=need_images)
    use_chat_template(processor, chat_template, path)
    return model, processor


def is_pmod(model: Any) -> bool:
    """Whether ``model`` is a p-MoD model (routes tokens and records its realised cost)."""
    return isinstance(model, PModModelMixin)


# ====================================================================== inputs
def suppressed_tokens(config: Any, suppress: Sequence[int] | None = None) -> list[int]:
    """``suppress`` plus the ids a model must never generate (`PLACEHOLDER_TOKENS`): an image or video token
    without its features would break the next forward."""
    ids = list(suppress or [])
    placeholders = (getattr(config, name, None) for name in PLACEHOLDER_TOKENS)
    return ids + [i for i in placeholders if isinstance(i, int) and i not in ids]


def move_to_model(model: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """A processor's output with its tensors on the model's device and its pixels in the model's dtype
    (processors give float32 pixels; a half-precision vision tower needs its own dtype). For a p-MoD model, each
    row's number of routing targets and of tokens is added (`routing_counts`: ``target_counts``, ``token_counts``,
    counted before the move, where the inputs are), so that the prefill plans its routing without waiting for the
    device."""
    inputs = dict(inputs)
    if is_pmod(model) and "input_ids" in inputs and not {"target_counts", "target_mask"} & inputs.keys():
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        on_host = [t.device.type == "cpu" for t in (ids, mask) if isinstance(t, torch.Tensor)]
        if on_host and all(on_host):  # counting on a device would wait for it
            inputs.update(model.routing_counts(**inputs))
    moved = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in moved:
            moved[key] = moved[key].to(model.dtype)
    return moved


def _check_rows(prompts: Sequence[str], *per_prompt: Sequence[Any] | None) -> None:
    lengths = [len(values) for values in per_prompt if values is not None]
    if any(n != len(prompts) for n in lengths):
        raise PModInputError(f"{len(prompts)} prompts but lists of images / videos / frame rates of {lengths}")


def _check_placeholders(processor: Any, prompts: Sequence[str], images: Sequence[Sequence[Any]],
                        videos: Sequence[Sequence[Any]] | None) -> None:
    """Each prompt names each of its images (videos) with the processor's placeholder: a plain question with an
    image failed deep in transformers ("Found total 0 <image> tokens and 1 images")."""
    for kind, media in (("image", images), ("video", videos)):
        token = getattr(processor, f"{kind}_token", None)
        if not isinstance(token, str) or media is None:
            continue
        for i, (prompt, given) in enumerate(zip(prompts, media)):
            if prompt.count(token) != len(given):
                raise PModInputError(
                    f"prompt {i} has {prompt.count(token)} {token} placeholder(s) for {len(given)} {kind}(s): render "
                    "prompts with the chat template (pmod.data.conversation.render, with one {'type': "
                    f"'{kind}'}} entry per {kind}), which writes the placeholders")


PER_ROW_IMAGE_PROCESSORS = ("Gemma3Processor", "Idefics3Processor", "SmolVLMProcessor")


def encode(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Sequence[Any]],
    videos: Sequence[Sequence[Sequence[Any]]] | None = None,
    video_fps: Sequence[float | Sequence[float]] | None = None,
) -> dict[str, Any]:
    """The model's inputs for rendered ``prompts`` (one placeholder per image or video), left-padded, on the
    model (`move_to_model`). ``images[i]`` are the PIL images of prompt i in placeholder order ([] for none);
    ``videos[i]`` its videos, each a list of PIL frames, and ``video_fps[i]`` their frame rate (default
    `DEFAULT_VIDEO_FPS`) or one rate per video. ``processor`` may be a bare tokenizer for text-only prompts."""
    _check_rows(prompts, images, videos, video_fps)
    _check_placeholders(processor, prompts, images, videos)
    flat = [img for row in images for img in row]
    has_videos = videos is not None and any(videos)
    check_processor_takes(processor, "the batch", images=bool(flat), videos=has_videos)
    # processors that count images per prompt (Gemma 3, Idefics3, SmolVLM) take them nested by row; others flat
    nested = type(processor).__name__ in PER_ROW_IMAGE_PROCESSORS
    media: dict[str, Any] = {"images": [list(row) for row in images] if nested else flat} if flat else {}
    if has_videos:
        rates = list(video_fps) if video_fps is not None else [DEFAULT_VIDEO_FPS] * len(videos)
        per_video = [list(r) if isinstance(r, Sequence) else [r] * len(row) for row, r in zip(videos, rates)]
        if any(len(r) != len(row) for r, row in zip(per_video, videos)):
            raise PModInputError("video_fps: give each prompt one frame rate, or one per video")
        flat_videos = [v for row in videos for v in row]
        media.update(videos=flat_videos,
                     video_metadata=video_metadata(flat_videos, [r for row in per_video for r in row]))
    tokenizer = tokenizer_of(processor)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: every row must end at the last column
    try:
        inputs = processor(text=list(prompts), return_tensors="pt", padding=True, **media)
    finally:
        tokenizer.padding_side = side
    return move_to_model(model, inputs)


def stacking_groups(processor: Any, labels: Sequence[str], videos: Sequence[Sequence[Any]]) -> list[list[int]]:
    """Rows of a batch that go into one generate call: all of them, or, where LLaVA-OneVision (it stacks the
    videos of a call) has videos of different frame counts, groups of one count. ``labels`` name the rows in the
    error for a row whose own videos differ."""
    counts = [frozenset(len(v) for v in row) for row in videos]
    if "LlavaOnevision" not in type(getattr(processor, "video_processor", None)).__name__ or len(
            frozenset().union(*counts)) <= 1:
        return [list(range(len(videos)))]
    groups: dict[frozenset[int], list[int]] = {}
    for j, c in enumerate(counts):
        if len(c) > 1:
            raise PModInputError(f"{labels[j]}: LLaVA-OneVision stacks the videos of a prompt, and its videos "
                                 f"have {sorted(c)} frames: give them one frame count (e.g. with 'max_frames')")
        groups.setdefault(c, []).append(j)
    return list(groups.values())


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first of the (non-empty) ``stop`` strings in it, stripped."""
    for s in filter(None, stop):
        text = text.split(s, 1)[0]
    return text.strip()


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The end-of-sequence ids of the model's generation config and of its tokenizer."""
    values = (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
              getattr(tokenizer, "eos_token_id", None))
    return list(dict.fromkeys(int(i) for v in values for i in (v if isinstance(v, (list, tuple)) else [v])
                              if i is not None))


# ====================================================================== generation
@dataclass
class Generation:
    """Answers of a generation and what they cost; lists hold one value per prompt.

    Attributes:
        texts: answers (special tokens removed, cut at the first stop string, stripped); [] without a tokenizer.
        tokens: generated ids, up to and including the first end-of-sequence token.
        prompt_tokens: prompt tokens, padding excluded.
        flops_ratio, kv_ratio: the prefill's decoder FLOPs and kept vision KV entries against the dense model
            (`pmod.efficiency.realized_cost`); None for a dense model, as are the next two.
        kv_cache_ratio: KV-cache bytes held at the end of the prompt's generate call (its batch, padding
            included) against a dense cache.
        kv: the KV caches held at the end of the generate calls, per layer (`pmod.efficiency.kv_cache_report`).
        seconds, prefill_seconds: wall time of the generate calls, and of their prefills (vision encoder
            included, up to the first generated token).
        decode_steps, decode_seconds: decoding steps after the first token (each gives every row a token), and
            their time.
    """

    texts: list[str]
    tokens: list[list[int]]
    prompt_tokens: list[int]
    flops_ratio: list[float] | None
    kv_ratio: list[float] | None
    kv_cache_ratio: list[float] | None
    kv: KVCacheReport | None
    seconds: float
    prefill_seconds: float
    decode_steps: int
    decode_seconds: float

    @property
    def new_tokens(self) -> list[int]:
        """Generated tokens per prompt, up to and including the first end-of-sequence token."""
        return [len(t) for t in self.tokens]

    @property
    def decode_tokens_per_second(self) -> float:
        """Decoding steps per second after the first token; NaN for answers of one token."""
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else math.nan

    def costs(self, row: int) -> dict[str, float | None]:
        """The cost ratios of one prompt: ``flops_ratio``, ``kv_ratio``, ``kv_cache_ratio`` (None: dense model)."""
        return {name: None if getattr(self, name) is None else getattr(self, name)[row]
                for name in ("flops_ratio", "kv_ratio", "kv_cache_ratio")}

    def summary(self) -> str:
        """One line: prefill time, decoding speed and, for p-MoD, the KV cache against a dense one."""
        speed = self.decode_tokens_per_second
        speed_text = "no decoding steps" if math.isnan(speed) else f"{speed:.1f} tokens/s"  # a one-token answer
        parts = [f"prefill {self.prefill_seconds * 1e3:.0f} ms ({sum(self.prompt_tokens)} prompt tokens)",
                 f"{speed_text} ({sum(self.new_tokens)} new)"]
        if self.kv is not None:
            parts.append(f"KV cache {self.kv.bytes / 2**20:.2f} MiB vs dense {self.kv.dense_bytes / 2**20:.2f} MiB "
                         f"({self.kv.ratio:.1%})")
        return " | ".join(parts)


class _Streamer(TextStreamer):
    """A TextStreamer that writes the answer's text to a callback."""

    def __init__(self, tokenizer: Any, write: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._write = write

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self._write(text + ("\n" if stream_end else ""))


def generate(
    model: Any,
    inputs: Mapping[str, Any],
    tokenizer: Any = None,
    *,
    stop: Sequence[str] = (),
    write: Callable[[str], None] | None = None,
    **generate_kwargs: Any,
) -> Generation:
    """``model.generate(**inputs)`` (one call) with the answers decoded by ``tokenizer`` and cut at ``stop``,
    the answer's text streamed to ``write`` (a batch of one), and what it cost.

    Greedy unless ``generate_kwargs`` say otherwise; placeholder tokens are never generated
    (`suppressed_tokens`); inputs are moved to the model (`move_to_model`).
    """
    inputs = move_to_model(model, inputs)
    ids = inputs["input_ids"]
    if write is not None and (tokenizer is None or ids.shape[0] != 1):
        raise PModInputError("Streaming text needs a tokenizer and a batch of one; pass write=None for batches.")
    eos = eos_ids(model, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
                              **({"eos_token_id": eos} if eos else {}), **generate_kwargs}
    kwargs["suppress_tokens"] = suppressed_tokens(model.config, kwargs.get("suppress_tokens"))
    if not kwargs["do_sample"]:
        for unused in ("temperature", "top_p", "top_k"):
            kwargs.pop(unused, None)  # transformers warns about sampling settings in greedy mode
    if write is not None:
        kwargs["streamer"] = _Streamer(tokenizer, write)

    pmod_model = is_pmod(model)
    ends: list[float] = []  # when each forward of generate() ended: the prefill, then one per decoding step
    costs = []

    def record(module, args, output) -> None:
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)  # time what the GPU did, not what was queued
        ends.append(time.perf_counter())
        if pmod_model and len(ends) == 1:
            costs.append(realized_cost(module))  # routing records of the prefill

    hook = model.register_forward_hook(record)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(**inputs, return_dict_in_generate=True, **kwargs)
    finally:
        hook.remove()
    seconds = time.perf_counter() - start
    ends = ends or [start + seconds]  # no forward call: nothing was generated

    new = out.sequences[:, ids.shape[1] :]
    decoded = tokenizer.batch_decode(new, skip_special_tokens=True) if tokenizer is not None else []
    texts = [cut_at_stop(t.strip(), stop) for t in decoded]
    tokens = []
    for row in new.tolist():
        at = next((i for i, t in enumerate(row) if t in eos), None)
        tokens.append(row[: at + 1] if at is not None else row)
    mask = inputs.get("attention_mask")
    prompt = mask.sum(dim=1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
    cache = output_cache(out)
    kv = kv_cache_report(cache) if isinstance(cache, PModCache) else None
    return Generation(
        texts, tokens, prompt,
        flops_ratio=list(costs[0].flops_ratio) if costs else None,
        kv_ratio=list(costs[0].kv_ratio) if costs else None,
        kv_cache_ratio=[kv.ratio] * len(tokens) if kv is not None and kv.dense_bytes else None,
        kv=kv, seconds=seconds, prefill_seconds=ends[0] - start, decode_steps=len(ends) - 1,
        decode_seconds=ends[-1] - ends[0],
    )


def generate_batch(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Sequence[Any]],
    max_new_tokens: int = 32,
    videos: Sequence[Sequence[Sequence[Any]]] | None = None,
    video_fps: Sequence[float | Sequence[float]] | None = None,
    *,
    labels: Sequence[str] | None = None,
    stop: Sequence[str] = (),
    write: Callable[[str], None] | None = None,
    **generate_kwargs: Any,
) -> Generation:
    """Answer rendered ``prompts`` with their media (see `encode`) in left-padded batches: one, or one per
    `stacking_groups` group (``labels`` name the prompts in its errors). ``processor`` is the model's processor,
    or a tokenizer for a text-only model; ``stop``, ``write`` and ``generate_kwargs`` go to `generate`."""
    _check_rows(prompts, images, videos, video_fps)
    labels = labels if labels is not None else [f"prompt {i}" for i in range(len(prompts))]
    groups = stacking_groups(processor, labels, videos if videos is not None else [[]] * len(prompts))
    parts = []
    for rows in groups:
        picked = [[v[j] for j in rows] if v is not None else None for v in (prompts, images, videos, video_fps)]
        parts.append(generate(model, encode(model, processor, *picked), tokenizer_of(processor), stop=stop,
                              write=write, max_new_tokens=max_new_tokens, **generate_kwargs))
    if len(parts) == 1:
        return parts[0]
    order = [j for rows in groups for j in rows]  # the prompt of each row of the parts, in turn

    def per_prompt(name: str) -> list[Any] | None:
        if any(getattr(p, name) is None for p in parts):
            return None
        by_prompt = dict(zip(order, (value for p in parts for value in getattr(p, name))))
        return [by_prompt[j] for j in range(len(prompts))]

    kv = None if any(p.kv is None for p in parts) else KVCacheReport([layer for p in parts for layer in p.kv.layers])
    per_row = ("texts", "tokens", "prompt_tokens", "flops_ratio", "kv_ratio", "kv_cache_ratio")
    totals = ("seconds", "prefill_seconds", "decode_steps", "decode_seconds")
    return Generation(*map(per_prompt, per_row), kv, *(sum(getattr(p, name) for p in parts) for name in totals))
