"""LLaVA-format conversations: validation, conversion to chat messages, prompt rendering.

A LLaVA record is ``{"id", "image" (path | list of paths | absent), "conversations": [{"from": "human" | "gpt",
"value": ...}, ...]}`` with ``<image>`` placeholders in the human turns. Video records (LLaVA-Video style) name
``"video"``: a video file, a folder of frames, a list of frame paths, or a list of such videos, with ``<video>``
placeholders. Training (`pmod.data.records`) and evaluation (`pmod.pipelines.evaluate`) both go through this module so
that a prompt is rendered the same way in both.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from ..errors import PModConfigError, PModInputError

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
PLACEHOLDERS = {IMAGE_PLACEHOLDER: "image", VIDEO_PLACEHOLDER: "video"}
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# video files that records name (any other existing file is offered to the decoder too)
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".wmv", ".flv", ".3gp",
                  ".ogv")
# "<video>" is a placeholder only in records with videos (elsewhere it may be text, e.g. about HTML)
_SPLIT = {True: re.compile("(<image>|<video>)"), False: re.compile("(<image>)")}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# The original LLaVA "vicuna_v1" conversation template (system prompt, "USER: ... ASSISTANT: ...</s>").
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def vicuna_v1_template(system: str | None = VICUNA_V1_SYSTEM) -> str:
    """The original LLaVA ``vicuna_v1`` chat template, opening with ``system`` unless the conversation has a system
    turn. ``system=None`` leaves the default system prompt out (`pmod.tiny`'s word vocabularies have none of its
    words); everything else uses `VICUNA_V1_TEMPLATE`."""
    return (
        ("{% if messages[0]['role'] != 'system' %}" + system + " {% endif %}" if system else "")
        + "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %} "
        "{% elif message['role'] == 'user' %}USER: "
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %} "
        "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


VICUNA_V1_TEMPLATE = vicuna_v1_template()


def tokenizer_of(processor: Any) -> Any:
    """The tokenizer of a processor; a bare tokenizer (a text-only model's "processor") is its own."""
    return getattr(processor, "tokenizer", processor)


def use_chat_template(processor: Any, setting: str | None = None, source: Any = "the model") -> None:
    """Give ``processor`` the chat template every front-end (`pmod chat`, `pmod eval`, lmms-eval) prompts with:
    ``setting`` (see `resolve_chat_template`) if given, else its own or its tokenizer's, else `VICUNA_V1_TEMPLATE`
    (the original LLaVA-1.5 format, with a warning naming ``source``)."""
    if setting is not None:
        processor.chat_template = resolve_chat_template(setting)
    elif not getattr(processor, "chat_template", None) and not getattr(tokenizer_of(processor), "chat_template", None):
        logger.warning("%s has no chat template: using the LLaVA-1.5 (Vicuna v1) conversation format", source)
        processor.chat_template = VICUNA_V1_TEMPLATE


def resolve_chat_template(value: str) -> str:
    """A chat template from a setting: ``vicuna_v1`` (the original LLaVA format), a file holding one, or Jinja text."""
    if value == "vicuna_v1":
        return VICUNA_V1_TEMPLATE
    if "{%" not in value and Path(value).is_file():
        return Path(value).read_text(encoding="utf-8")
    if "{%" not in value and "{{" not in value:
        raise PModConfigError(f"chat_template {value!r} is neither vicuna_v1, a file, nor a Jinja template")
    return value


def image_paths(record: dict[str, Any]) -> list[str]:
    """The record's image paths, in placeholder order ([] for a text-only record)."""
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(p, str) for p in image):
        return list(image)
    raise PModInputError(f"record {record.get('id')!r}: 'image' must be a path or a list of paths, got {image!r}")


def video_sources(record: dict[str, Any]) -> list[str | list[str]]:
    """The record's videos, in placeholder order: each a video file or frame folder, or a list of frame paths
    ([] for none).

    ``"video"`` is a video file or a folder (one video), a list of image files (the frames of one video), a list
    of video files or folders (several videos), or a list whose items are those or lists of image files.
    """
    video = record.get("video")
    if video is None:
        return []
    if isinstance(video, str):
        return [video]
    if isinstance(video, list) and video and all(isinstance(p, str) for p in video):
        frames = [p.lower().endswith(FRAME_SUFFIXES) for p in video]
        if all(frames):
            return [list(video)]  # the frames of one video
        if not any(frames):
            return list(video)  # video files or frame folders, one per video
    elif isinstance(video, list) and video and all(isinstance(v, str) or (isinstance(v, list) and v and all(
            isinstance(p, str) for p in v)) for v in video):
        return list(video)
    raise PModInputError(
        f"record {record.get('id')!r}: 'video' must be a video file ({', '.join(VIDEO_SUFFIXES[:6])}, ...), a frame "
        f"folder, a list of frame files ({', '.join(FRAME_SUFFIXES)}), a list of video files or folders, or a list "
        f"of those; got {video!r}"
    )


def to_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Turn a LLaVA record into chat messages (`{"role", "content": [{"type": "image" | "video" | "text"}]}`).

    The number of ``<image>`` (``<video>``) placeholders must equal the number of images (videos). A record that
    has images but no placeholder gets one at the start of its first human turn, as the original LLaVA data
    loader does; likewise for videos.
    """
    rid = record.get("id")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise PModInputError(f"record {rid!r}: 'conversations' must be a non-empty list of turns")
    videos = len(video_sources(record))
    kinds = [(IMAGE_PLACEHOLDER, len(image_paths(record)), "image")] + (
        [(VIDEO_PLACEHOLDER, videos, "video")] if videos else []
    )
    for placeholder, count, key in kinds:
        n_placeholders = sum(str(t.get("value", "")).count(placeholder) for t in turns if isinstance(t, dict))
        if n_placeholders == 0 and count:
            first = next((i for i, t in enumerate(turns) if ROLES.get(t.get("from")) == "user"), None)
            if first is None:
                raise PModInputError(f"record {rid!r}: has an {key} but no human turn to attach it to")
            turns = list(turns)
            turns[first] = {**turns[first], "value": placeholder + "\n" + turns[first]["value"]}
            n_placeholders = 1
        if n_placeholders != count:
            raise PModInputError(
                f"record {rid!r}: {n_placeholders} '{placeholder}' placeholders but {count} {key}s; "
                f"put one '{placeholder}' in the human turns per {key} listed under '{key}'"
            )
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise PModInputError(
                f"record {rid!r}, turn {i}: expected {{'from': 'human' | 'gpt', 'value': str}}, got {turn!r}"
            )
        role = ROLES[turn["from"]]
        content: list[dict[str, str]] = []
        pieces = _SPLIT[bool(videos)].split(turn["value"])  # text, placeholder, text, ...
        if role != "user" and len(pieces) > 1:
            raise PModInputError(f"record {rid!r}, turn {i}: '<image>' / '<video>' are only allowed in human turns")
        for j, piece in enumerate(pieces):
            if j % 2:
                content.append({"type": PLACEHOLDERS[piece]})
                continue
            # LLaVA data writes "<image>\nquestion": the template adds its own separator after an image.
            text = piece.strip("\n") if len(pieces) > 1 else piece
            if text:
                content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles or roles[0] != "user" or any(a == b for a, b in zip(roles, roles[1:])):
        raise PModInputError(f"record {rid!r}: turns must alternate human, gpt, human, ... starting with human")
    return messages


def render(processor: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """Render messages with the processor's (or tokenizer's) chat template, as text with ``<image>``-style tokens."""
    owner = processor if getattr(processor, "chat_template", None) else tokenizer_of(processor)
    if not getattr(owner, "chat_template", None):
        raise PModInputError(
            "the processor has no chat template; set one (e.g. pmod.data.conversation.VICUNA_V1_TEMPLATE for the "
            "original LLaVA-1.5 models: processor.chat_template = VICUNA_V1_TEMPLATE) and save it with the processor"
        )
    return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(processor: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant replies in it (end-of-turn text included).

    Found by rendering growing prefixes of the conversation: the reply to turn i is what
    ``render(messages[:i + 1])`` adds to ``render(messages[:i], add_generation_prompt=True)``.
    """
    full = render(processor, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(processor, messages[:i], add_generation_prompt=True)
        upto = render(processor, messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(before):
            raise PModInputError(
                "the chat template does not render a conversation as a sequence of growing prefixes, so the assistant "
                "replies cannot be located for label masking; use a template without turn-dependent text"
            )
        start = len(before)
        while start < len(upto) and upto[start].isspace():  # the separator after "ASSISTANT:" is not a reply token
            start += 1
        spans.append((start, len(upto)))
    return full, spans


def prompt_and_answer(record: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """For evaluation: the messages up to the last human turn, and the reference answer (the last gpt turn)."""
    messages = to_messages(record)
    if messages[-1]["role"] != "assistant":
        raise PModInputError(f"record {record.get('id')!r}: the last turn must be the reference answer (from 'gpt')")
    answer = "".join(c["text"] for c in messages[-1]["content"] if c["type"] == "text")
    return messages[:-1], answer
