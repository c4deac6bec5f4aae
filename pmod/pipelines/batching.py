"""Dynamic batching for `pmod serve`: concurrent requests wait at most a few milliseconds for each other, then go
through pmod's one generation path (`encode` + `generate`, left-padded, as `pmod eval`) in one `generate` call.

Each row keeps its own limits inside the shared call: a `StoppingCriteria` ends a row at its own ``max_tokens``, at
its stop strings or when its client went away, and hands the text generated so far to streaming clients. The batch
runs until its last row ends, so a cancelled row stops costing tokens but keeps its place until then; requests that
were cancelled while queued are dropped before their batch starts.

Greedy requests batch with each other whatever their lengths; sampling requests batch with those of the same
temperature and top-p, and a seeded one runs alone so that its seed reproduces its answer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..data.conversation import render, tokenizer_of
from ..errors import PModError, PModInputError, one_line
from .generation import Generation, cut_at_stop, encode, eos_ids, generate

logger = logging.getLogger(__name__)


class ContextLengthError(PModInputError):
    """A request's prompt and ``max_tokens`` together exceed the model's context."""


@dataclass
class Completion:
    """One request's answer: its text, why it ended (``stop``: end of sequence or a stop string; ``length``:
    ``max_tokens``), its token counts and what its prefill cost against the dense model (None for a dense model)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    flops_ratio: float | None
    kv_ratio: float | None
    kv_cache_ratio: float | None
    batch_size: int
    queued_seconds: float
    seconds: float


@dataclass(eq=False)
class Request:
    """A chat request as the batcher needs it: ``messages`` in pmod's content format (``{"type": "image"}`` entries
    in place of the images), the decoded ``images`` in their order, and the generation settings. ``emit`` receives
    ``("delta", text)`` events while it is generated (``stream``), then ``("done", Completion)`` or
    ``("error", exception)``; it is called from the batcher's thread."""

    messages: list[dict[str, Any]]
    images: list[Any]
    max_tokens: int
    emit: Callable[[tuple[str, Any]], None]
    temperature: float | None = None  # None or 0: greedy
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def sampling(self) -> bool:
        return bool(self.temperature)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share a `generate` call."""
        if not self.sampling:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(self))  # alone: the seed then gives the same answer every time
        return ("sample", self.temperature, self.top_p if self.top_p is not None else 1.0)


class _Rows(StoppingCriteria):
    """Per-row ends inside one `generate` call: a row is done at its own token limit, at one of its stop strings
    (checked on the decoded text), or once its request is cancelled. Streaming rows get their new text each step,
    held back by the longest stop string's length less one (text a stop string may still cut) and while it ends in
    an incomplete character."""

    def __init__(self, requests: Sequence[Request], prompt_width: int, tokenizer: Any, eos: Sequence[int]):
        self.requests = list(requests)
        self.width = prompt_width
        self.tokenizer = tokenizer
        self.eos = set(eos)
        self.done = [False] * len(requests)
        self.reason = ["length"] * len(requests)
        self.length = [0] * len(requests)  # tokens generated per row until it ended (an end-of-sequence included)
        self.sent = [""] * len(requests)  # text already streamed per row

    def text(self, row: int, ids: list[int]) -> str:
        return cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), self.requests[row].stop)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.width :].tolist()  # (B, generated so far) on the host
        for row, req in enumerate(self.requests):
            if self.done[row]:
                continue
            ids = new[row]
            self.length[row] = len(ids)
            if ids and ids[-1] in self.eos:
                self.done[row], self.reason[row] = True, "stop"
                ids = ids[:-1]
            elif req.cancelled.is_set():
                self.done[row], self.reason[row] = True, "cancelled"
                continue
            elif len(ids) >= req.max_tokens:
                self.done[row] = True
            if not (req.stream or req.stop):
                continue
            raw = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            if any(s and s in raw for s in req.stop):
                self.done[row], self.reason[row] = True, "stop"
            if req.stream and not self.done[row]:
                hold = max((len(s) for s in req.stop), default=1) - 1
                safe = raw[: len(raw) - hold if hold else None].rstrip("\ufffd")  # no stop string in raw: not done
                self._send(row, safe)
        return torch.tensor(self.done, device=input_ids.device)

    def _send(self, row: int, text: str) -> None:
        if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            self.requests[row].emit(("delta", text[len(self.sent[row]) :]))
            self.sent[row] = text

    def finish(self, row: int, text: str) -> None:
        """Stream what is left of a row's final ``text``."""
        if self.requests[row].stream:
            if not text.startswith(self.sent[row]):  # a tokenizer whose decoded prefix changed: said, not hidden
                logger.warning("the streamed text of a row is not a prefix of its final text: %r vs %r",
                               self.sent[row], text)
            self._send(row, text)


class Batcher:
    """Collects requests on a queue and answers them in batches on one worker thread (the model and processor are
    used from that thread only).

    Args:
        model, processor: as `load_for_inference` gives them.
        max_batch_size: requests per `generate` call at most.
        batch_wait_ms: how long the first request of a batch waits for others.
        max_queue: requests waiting at most; `submit` refuses more (the server answers 503).
        max_context: prompt tokens plus ``max_tokens`` at most per request (None: no limit).
        generate_kwargs: more `model.generate` arguments for every call.
    """

    def __init__(self, model: Any, processor: Any, *, max_batch_size: int = 8, batch_wait_ms: float = 10.0,
                 max_queue: int = 256, max_context: int | None = None, **generate_kwargs: Any):
        if max_batch_size < 1 or batch_wait_ms < 0 or max_queue < 1:
            raise PModInputError(f"max_batch_size and max_queue must be positive and batch_wait_ms not negative, got "
                                 f"{max_batch_size}, {max_queue} and {batch_wait_ms}")
        self.model, self.processor = model, processor
        self.tokenizer = tokenizer_of(processor)
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait_ms / 1e3
        self.max_context = max_context
        self.generate_kwargs = generate_kwargs
        self._queue: queue.Queue[Request | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self.batches: list[int] = []  # the size of every batch run (for tests and the server's /health)
        self.dropped = 0  # requests cancelled before their batch started

    def start(self) -> Batcher:
        """Start the worker (again, after `stop`: an app served a second time)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="pmod-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the batch in progress and stop the worker."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def submit(self, request: Request) -> None:
        """Queue ``request``; `queue.Full` when ``max_queue`` requests are already waiting."""
        self._queue.put_nowait(request)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            pending, stopping = [first], False
            deadline = time.perf_counter() + self.batch_wait
            while len(pending) < self.max_batch_size:  # wait for company, at most batch_wait
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                pending.append(nxt)
            live = [r for r in pending if not r.cancelled.is_set()]
            self.dropped += len(pending) - len(live)
            groups: dict[tuple, list[Request]] = {}
            for r in live:
                groups.setdefault(r.batch_key(), []).append(r)
            for group in groups.values():
                self._answer(group)
            if stopping:
                return

    def _answer(self, requests: list[Request]) -> None:
        """Answer ``requests`` in one call; a request the processor or the limits refuse gets its error alone and
        the others are answered without it; an unexpected failure reaches every request of the call."""
        try:
            prompts = []
            for r in list(requests):
                try:
                    prompts.append(render(self.processor, r.messages, add_generation_prompt=True))
                except PModError as exc:
                    requests.remove(r)
                    r.emit(("error", exc))
            if not requests:
                return
            inputs = self._encode(requests, prompts)
            if inputs is None:
                return
            self._generate(requests, inputs)
        except Exception as exc:  # noqa: BLE001  (the server turns it into a 500 for each client; logged here)
            logger.exception("generation failed for a batch of %d", len(requests))
            for r in requests:
                r.emit(("error", exc))

    def _encode(self, requests: list[Request], prompts: list[str]) -> dict[str, Any] | None:
        try:
            inputs = encode(self.model, self.processor, prompts, [r.images for r in requests])
        except (PModError, ValueError) as exc:
            if len(requests) == 1:
                requests[0].emit(("error", PModInputError(one_line(exc))))
                requests.clear()
                return None
            # find the request the processor refuses: each alone, then the rest together
            kept = []
            for r, p in zip(list(requests), prompts):
                try:
                    encode(self.model, self.processor, [p], [r.images])
                except (PModError, ValueError) as alone:
                    requests.remove(r)
                    r.emit(("error", PModInputError(one_line(alone))))
                else:
                    kept.append(p)
            prompts[:] = kept
            if not requests:
                return None
            inputs = encode(self.model, self.processor, prompts, [r.images for r in requests])
        mask = inputs.get("attention_mask")
        lengths = mask.sum(dim=1).tolist() if mask is not None else [inputs["input_ids"].shape[1]] * len(requests)
        if self.max_context is not None:
            over = [(r, n) for r, n in zip(requests, lengths) if n + r.max_tokens > self.max_context]
            if over:
                for r, n in over:
                    r.emit(("error", ContextLengthError(
                        f"the prompt is {n} tokens (images included) and max_tokens {r.max_tokens}: more than the "
                        f"model's context of {self.max_context} tokens; shorten the prompt or lower max_tokens")))
                keep = [i for i, r in enumerate(requests) if r not in {o for o, _ in over}]
                prompts[:] = [prompts[i] for i in keep]
                requests[:] = [requests[i] for i in keep]
                return self._encode(requests, prompts) if requests else None
        return inputs

    def _generate(self, requests: list[Request], inputs: dict[str, Any]) -> None:
        started = time.perf_counter()
        first = requests[0]
        sampling: dict[str, Any] = {}
        if first.sampling:
            sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p or 1.0}
            if first.seed is not None:
                torch.manual_seed(first.seed)
        rows = _Rows(requests, inputs["input_ids"].shape[1], self.tokenizer, eos_ids(self.model, self.tokenizer))
        self.batches.append(len(requests))
        out: Generation = generate(
            self.model, inputs, self.tokenizer, max_new_tokens=max(r.max_tokens for r in requests),
            stopping_criteria=StoppingCriteriaList([rows]), **sampling, **self.generate_kwargs)
        seconds = time.perf_counter() - started
        for row, r in enumerate(requests):
            length = rows.length[row] if rows.done[row] else len(out.tokens[row])
            ids = out.tokens[row][:length]
            if ids and ids[-1] in rows.eos:
                rows.reason[row] = "stop"
            text = rows.text(row, [i for i in ids if i not in rows.eos])
            if rows.reason[row] == "cancelled":
                continue
            rows.finish(row, text)
            costs = out.costs(row)
            r.emit(("done", Completion(
                text=text, finish_reason=rows.reason[row], prompt_tokens=out.prompt_tokens[row],
                completion_tokens=len(ids), flops_ratio=costs["flops_ratio"], kv_ratio=costs["kv_ratio"],
                kv_cache_ratio=costs["kv_cache_ratio"], batch_size=len(requests),
                queued_seconds=started - r.submitted, seconds=seconds)))

