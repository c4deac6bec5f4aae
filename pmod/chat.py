"""Streaming generation with timing and KV-cache statistics, and the conversation loop behind `pmod chat`."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TextStreamer

from .compat import output_cache
from .conversation import render
from .efficiency import KVCacheReport, kv_cache_report
from .data import load_image  # noqa: F401  (part of this module's API: pmod.chat.load_image)
from .errors import PModInputError
from .models import placeholder_token_ids

logger = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    """What one generation cost.

    Attributes:
        prompt_tokens: tokens in the prompt (per example, padding included).
        new_tokens: tokens generated (per example).
        prefill_seconds: time from the call to the first generated token (vision encoder + prefill + one step).
        decode_tokens_per_second: generated tokens per second after the first one (per example).
        kv: KV-cache bytes held at the end, per layer, against a dense model's cache.
    """

    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_tokens_per_second: float
    kv: KVCacheReport

    def summary(self) -> str:
        # a one-token answer has no decoding steps to time
        speed = "no decoding steps" if math.isnan(self.decode_tokens_per_second) else f"{self.decode_tokens_per_second:.1f} tokens/s"
        return (
            f"prefill {self.prefill_seconds * 1e3:.0f} ms ({self.prompt_tokens} prompt tokens) | "
            f"{speed} ({self.new_tokens} new) | KV cache "
            f"{self.kv.bytes / 2**20:.2f} MiB vs dense {self.kv.dense_bytes / 2**20:.2f} MiB ({self.kv.ratio:.1%})"
        )


class _TimedStreamer(TextStreamer):
    """TextStreamer that writes to a callback and records when each generated token arrives."""

    def __init__(self, tokenizer, write: Callable[[str], None] | None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._write = write
        self.token_times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            self.token_times.append(time.perf_counter())
        if self._write is None:
            self.next_tokens_are_prompt = False
            return
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self._write is not None:
            self._write(text + ("\n" if stream_end else ""))


def generate_with_stats(
    model, inputs: dict[str, Any], tokenizer=None, write: Callable[[str], None] | None = None, **generate_kwargs
) -> tuple[torch.Tensor, GenerationStats]:
    """`model.generate(**inputs)` with text streamed to ``write`` (needs ``tokenizer``) and cost statistics.

    Returns the generated token ids (prompt excluded) and `GenerationStats`. Works for a batch; streaming
    text needs batch size 1.
    """
    prompt_len = inputs["input_ids"].shape[1]
    streamer = _TimedStreamer(tokenizer, write if tokenizer is not None else None)
    if write is not None and inputs["input_ids"].shape[0] != 1:
        raise PModInputError("Streaming text needs a batch of one; pass write=None for batched generation.")
    suppress = list(generate_kwargs.pop("suppress_tokens", None) or [])
    suppress += [i for i in placeholder_token_ids(model.config) if i not in suppress]  # placeholders need pixels
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs, streamer=streamer, return_dict_in_generate=True, suppress_tokens=suppress, **generate_kwargs
        )
    end = time.perf_counter()
    times = streamer.token_times or [end]
    new = out.sequences[:, prompt_len:]
    n_new = new.shape[1]
    decode_time = times[-1] - times[0]
    stats = GenerationStats(
        prompt_tokens=prompt_len,
        new_tokens=n_new,
        prefill_seconds=times[0] - start,
        decode_tokens_per_second=(n_new - 1) / decode_time if n_new > 1 and decode_time > 0 else float("nan"),
        kv=kv_cache_report(output_cache(out)),
    )
    return new, stats


@dataclass
class ChatSession:
    """A conversation about one image with a p-MoD model and its processor (multi-turn, history re-encoded)."""

    model: Any
    processor: Any
    image: Any
    max_new_tokens: int = 128
    temperature: float = 0.0
    messages: list[dict] = field(default_factory=list)

    def ask(self, prompt: str, write: Callable[[str], None] | None = None) -> tuple[str, GenerationStats]:
        content = [{"type": "text", "text": prompt}]
        if not self.messages:
            content.insert(0, {"type": "image"})
        self.messages.append({"role": "user", "content": content})
        text = render(self.processor, self.messages, add_generation_prompt=True)
        inputs = self.processor(images=self.image, text=text, return_tensors="pt").to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        new, stats = generate_with_stats(
            self.model, dict(inputs), self.processor.tokenizer, write, max_new_tokens=self.max_new_tokens, **sampling
        )
        answer = self.processor.tokenizer.decode(new[0], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer, stats


def chat_loop(session: ChatSession, lines: Iterable[str], write: Callable[[str], None], prompt_marker: Callable[[], None]) -> int:
    """Answer each non-empty line until it ends or says exit/quit; returns the number of turns."""
    turns = 0
    prompt_marker()
    for line in lines:
        line = line.strip()
        if line in ("exit", "quit"):
            break
        if line:
            _, stats = session.ask(line, write)
            write(f"[{stats.summary()}]\n")
            turns += 1
        prompt_marker()
    return turns
