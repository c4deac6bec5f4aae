"""`pmod serve`: an OpenAI-compatible chat endpoint for a p-MoD (or dense) model, on FastAPI and uvicorn.

    POST /v1/chat/completions   text and images (data URLs, or files under --image-root); streaming or not
    GET  /v1/models             the one model served
    GET  /health                ready, queue length and batch sizes so far

Concurrent requests are batched (`pmod.pipelines.batching`) through pmod's one generation path, so a greedy answer
is the one `pmod eval` gives to the same question, alone or in a batch. Each response's ``usage`` adds p-MoD's own
numbers to the token counts: ``pmod.prefill_flops_ratio`` (decoder prefill FLOPs against the dense model),
``pmod.kv_ratio`` (vision-token KV entries kept) and ``pmod.kv_cache_ratio`` (KV-cache bytes against a dense cache).

transformers' own ``transformers serve`` cannot carry these models: it looks model classes up by name in
transformers and serves vision models one request at a time. Errors follow OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``) with 4xx codes for what the client can fix.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import queue
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..data.conversation import PLACEHOLDERS
from ..data.images import load_image
from ..errors import PModError, PModInputError, one_line
from .batching import Batcher, Completion, ContextLengthError, Request

logger = logging.getLogger(__name__)


# ====================================================================== the request, as OpenAI's API defines it
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # accepted and ignored: the processor decides the resolution


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that pmod serves; others are ignored, except those that would
    change the answer and are refused (``n`` > 1, tools, logprobs)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return [s for s in stops if s]


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ====================================================================== settings
class ServeSettings(BaseModel):
    """What `pmod serve` was started with (besides the model)."""

    model_name: str
    max_batch_size: int = Field(8, ge=1)
    batch_wait_ms: float = Field(10.0, ge=0)
    max_queue: int = Field(256, ge=1)
    max_images: int = Field(4, ge=0)
    default_max_tokens: int = Field(256, ge=1)
    max_context: int | None = Field(None, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    image_root: Path | None = None  # local image files the server may read: under this folder only


def model_context(model: Any) -> int | None:
    """The text model's ``max_position_embeddings``: prompt plus answer tokens a request may take."""
    value = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


# ====================================================================== request -> pmod
def _placeholder_strings(processor: Any) -> set[str]:
    strings = set(PLACEHOLDERS)
    for name in ("image_token", "video_token", "boi_token", "start_image_token"):
        value = getattr(processor, name, None)
        if isinstance(value, str) and value:
            strings.add(value)
    return strings


def _decode_image(url: str, root: Path | None) -> Any:
    """A PIL image from a ``data:image/...;base64,`` URL or a local file under ``root`` (``file://`` URL or path)."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.startswith("data:image/") or ";base64" not in header:
            raise APIError(400, "an image data URL must be data:image/<type>;base64,<data>", "invalid_image_url",
                           "messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise APIError(400, f"the image data URL is not valid base64: {one_line(exc)}", "invalid_image_url",
                           "messages") from exc
        try:
            return load_image(io.BytesIO(data))
        except PModInputError as exc:
            raise APIError(400, f"the image data URL holds no readable image: {one_line(exc, 200)}",
                           "invalid_image", "messages") from exc
    if url.startswith(("http://", "https://")):
        raise APIError(400, "the server does not fetch images from the network: send the image as a data URL "
                       "(data:image/png;base64,...)", "image_not_allowed", "messages")
    if root is None:
        raise APIError(400, "the server reads no local image files (start it with --image-root DIR to allow a folder): "
                       "send the image as a data URL", "image_not_allowed", "messages")
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    path = (root / path if not path.is_absolute() else path).resolve()
    if not path.is_relative_to(root):
        raise APIError(400, f"{url}: the server reads image files under its --image-root only", "image_not_allowed",
                       "messages")
    try:
        return load_image(path)
    except PModInputError as exc:
        raise APIError(400, one_line(exc, 300), "invalid_image", "messages") from exc


def to_pmod_messages(request: ChatRequest, settings: ServeSettings, placeholders: set[str]
                     ) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI messages as pmod's (``{"type": "image"}`` where each image goes) and the images, decoded, in order."""
    messages, images = [], []
    for m in request.messages:
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else list(m.content or [])
        content = []
        for part in parts:
            if isinstance(part, TextPart):
                typed = sorted(p for p in placeholders if p in part.text)
                if typed:
                    raise APIError(400, f"the message text contains {', '.join(typed)}: the server places images "
                                   "itself; send them as image_url parts", "placeholder_in_text", "messages")
                content.append({"type": "text", "text": part.text})
            else:
                if m.role != "user":
                    raise APIError(400, f"images go in user messages, not {m.role} ones", "invalid_image", "messages")
                content.append({"type": "image"})
                images.append(part.image_url.url)
        messages.append({"role": m.role, "content": content})
    if len(images) > settings.max_images:
        raise APIError(400, f"{len(images)} images in one request; this server takes at most {settings.max_images} "
                       "(--max-images)", "too_many_images", "messages")
    return messages, [_decode_image(url, settings.image_root) for url in images]


def usage(completion: Completion) -> dict[str, Any]:
    """OpenAI's token counts, and p-MoD's costs against the dense model (None for a dense model)."""
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        "pmod": {
            "prefill_flops_ratio": completion.flops_ratio,
            "kv_ratio": completion.kv_ratio,
            "kv_cache_ratio": completion.kv_cache_ratio,
            "batch_size": completion.batch_size,
            "queued_ms": round(completion.queued_seconds * 1e3, 3),
        },
    }


# ====================================================================== the app
def create_app(model: Any, processor: Any, settings: ServeSettings, **generate_kwargs: Any):
    """The FastAPI app serving ``model``; its batcher starts and stops with the app (its lifespan)."""
    if settings.image_root is not None:
        settings.image_root = settings.image_root.expanduser().resolve()
    context = settings.max_context or model_context(model)
    batcher = Batcher(model, processor, max_batch_size=settings.max_batch_size, batch_wait_ms=settings.batch_wait_ms,
                      max_queue=settings.max_queue, max_context=context, **generate_kwargs)
    placeholders = _placeholder_strings(processor)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        logger.info("serving %s (batches of up to %d, waiting %g ms)", settings.model_name, settings.max_batch_size,
                    settings.batch_wait_ms)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, batcher.stop)

    app = FastAPI(title="pmod serve", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected(_: HTTPRequest, exc: Exception) -> JSONResponse:  # a bug: said in OpenAI's shape, logged here
        logger.exception("unexpected error while handling a request")
        return JSONResponse(_as_api_error(exc).body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg", exc))
        return JSONResponse(APIError(400, message, "invalid_request", where).body(), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "waiting": batcher.waiting,
                "batches": len(batcher.batches), "max_batch_seen": max(batcher.batches, default=0)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "pmod"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        if body.model != settings.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist here; this server serves "
                           f"{settings.model_name!r} (GET /v1/models)", "model_not_found", "model")
        if body.n != 1:
            raise APIError(400, "n > 1 is not supported: send the request n times (with seeds for distinct samples)",
                           "unsupported_parameter", "n")
        for name in ("tools", "functions", "logprobs", "top_logprobs", "response_format"):
            if (body.model_extra or {}).get(name) not in (None, False):
                raise APIError(400, f"{name} is not supported by pmod serve", "unsupported_parameter", name)
        messages, images = await asyncio.to_thread(to_pmod_messages, body, settings, placeholders)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        req = Request(messages=messages, images=images,
                      max_tokens=body.max_completion_tokens or body.max_tokens or settings.default_max_tokens,
                      emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                      temperature=body.temperature, top_p=body.top_p, stop=tuple(body.stop or ()), seed=body.seed,
                      stream=body.stream)
        try:
            batcher.submit(req)
        except queue.Full:
            raise APIError(503, f"the server is busy ({settings.max_queue} requests waiting); retry shortly",
                           "server_busy", kind="server_error") from None
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(events, req, rid, now, settings, include_usage),
                                     media_type="text/event-stream")
        deadline = loop.time() + settings.request_timeout_s
        try:
            while True:
                try:  # wake now and then to notice a client that went away
                    kind, value = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        req.cancelled.set()
                        return JSONResponse(APIError(499, "the client closed the request").body(), status_code=499)
                    if loop.time() > deadline:
                        req.cancelled.set()
                        raise _timed_out(settings) from None
                    continue
                if kind == "done":
                    break
                if kind == "error":
                    raise _as_api_error(value)
        except BaseException:
            req.cancelled.set()
            raise
        return {"id": rid, "object": "chat.completion", "created": now, "model": settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": value.text},
                             "finish_reason": value.finish_reason, "logprobs": None}],
                "usage": usage(value)}

    return app


def _timed_out(settings: ServeSettings) -> APIError:
    return APIError(504, f"no answer within {settings.request_timeout_s:g} s (--request-timeout)", "timeout",
                    kind="server_error")


def _as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(400, one_line(exc, 1000), "context_length_exceeded", "messages")
    if isinstance(exc, PModError):
        return APIError(400, one_line(exc, 1000), "invalid_request")
    return APIError(500, f"the server failed: {type(exc).__name__}: {one_line(exc, 300)} (see the server log)",
                    "internal_error", kind="server_error")


async def _stream(events: asyncio.Queue, req: Request, rid: str, created: int, settings: ServeSettings,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; the request is cancelled if the client goes away."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": settings.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.request_timeout_s
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), timeout=max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                req.cancelled.set()
                yield f"data: {json.dumps(_timed_out(settings).body())}\n\n"
                break
            if kind == "delta":
                yield chunk({"content": value})
            elif kind == "error":
                yield f"data: {json.dumps(_as_api_error(value).body())}\n\n"
                break
            else:
                yield chunk({}, value.finish_reason)
                if include_usage:
                    body = {"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": settings.model_name, "choices": [], "usage": usage(value)}
                    yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        req.cancelled.set()  # a client that went away frees its row; a finished request is past caring


@contextmanager
def serving_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a background thread (tests, benchmarks, a notebook) until the block ends; yields
    the API's base URL (``port=0``: a free port)."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def image_data_url(image: Any) -> str:
    """A PIL image as the ``data:image/png;base64,...`` URL a chat request carries."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def serve(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
          dtype: str | None = None, settings: dict[str, Any] | None = None) -> None:
    """Load ``model_dir`` (`load_for_inference`: a dense checkpoint is served dense) and serve it until interrupted."""
    import uvicorn

    from .generation import is_pmod, load_for_inference

    model, processor = load_for_inference(model_dir, dtype=dtype, device=device)
    values = {"model_name": Path(model_dir).name, **(settings or {})}
    if not is_pmod(model):
        logger.warning("%s is a dense checkpoint: serving the dense model (pmod convert dense makes a p-MoD one)",
                       model_dir)
    app = create_app(model, processor, ServeSettings(**values))
    uvicorn.run(app, host=host, port=port, log_level="info")
