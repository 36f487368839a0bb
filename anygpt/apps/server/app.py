"""The FastAPI application: routes, the API key, the body-size limit, errors in OpenAI's shape.

``build_app(pipe, options)`` returns an ASGI app that uvicorn serves (``anygpt serve``) and that Ray Serve wraps as a
deployment (``anygpt.apps.server.ray_serve``). Its lifespan starts and stops the ``BatchWorker`` that owns the
pipeline, and the ``VideoStore`` of ``/v1/videos``; request handlers only validate, read media (in a thread pool)
and wait for the worker.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import queue
import socket
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from anygpt.apps.server import protocol
from anygpt.apps.server.protocol import ChatCompletionRequest, ImageGenerationRequest, VideoCreateRequest
from anygpt.apps.server.videos import VideoRecord, VideoStore
from anygpt.apps.server.worker import BatchWorker, DeltaStreamer, Job, JobResult, stop_strings
from anygpt.base.errors import AnyGPTError, UsageError
from anygpt.base.modality import MEDIA_MODALITIES, Modality
from anygpt.core.pipeline import AnyGPTPipeline

logger = logging.getLogger(__name__)

__all__ = ["ServerOptions", "build_app"]


@dataclass(frozen=True)
class ServerOptions:
    """How the server answers.

    Args:
        model_name: the id ``GET /v1/models`` lists; a request naming another model gets 404 (none: accepted).
        api_key: when set, every ``/v1/`` route needs ``Authorization: Bearer <api_key>`` (401 otherwise).
        max_batch_size: the most requests answered together.
        queue_size: the most requests waiting for the model; more get 429.
        batch_wait_s: how long the first request of a batch waits for others.
        max_request_bytes: the largest request body; larger ones get 413 (before they are read).
        feature_cache_size: media items whose encoder features are kept (by content).
        default_modalities: what a chat request without ``modalities`` gets: None, the model decides; else the
            wire form, e.g. ``("text",)`` for text-only replies (evaluation harnesses that read ``content`` as a
            string).
        max_videos: the most ``/v1/videos`` jobs kept; past it the oldest finished ones are dropped with their
            MP4 files (``anygpt.apps.server.videos``).
        video_dir: where the server makes its private folder of MP4 files (removed when it stops); None: the
            system's temporary folder.
        exact_batching: a batched request whose token choice came within rounding of another is answered again
            alone, so every reply has the tokens of the same request sent alone (``run_batch``'s ``exact``);
            False keeps the batch's choice (faster where near ties are common, as in float16).
    """

    model_name: str
    api_key: str | None = None
    max_batch_size: int = 8
    queue_size: int = 64
    batch_wait_s: float = 0.01
    max_request_bytes: int = 64 * 2**20
    feature_cache_size: int = 64
    default_modalities: tuple[str, ...] | None = None
    max_videos: int = 100
    video_dir: str | None = None
    exact_batching: bool = True

    def __post_init__(self) -> None:
        if self.default_modalities is not None:
            names = tuple(self.default_modalities)
            object.__setattr__(self, "default_modalities", None if names == ("auto",) else names)
            protocol.output_modalities(list(names) if names != ("auto",) else None)  # UsageError naming a bad one
        if not isinstance(self.model_name, str) or not self.model_name:
            raise UsageError(f"model_name must be a non-empty string, got {self.model_name!r}")
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key):
            raise UsageError("api_key must be a non-empty string or None")
        if self.video_dir is not None and not (isinstance(self.video_dir, str) and self.video_dir):
            raise UsageError(f"video_dir must be a non-empty string or None, got {self.video_dir!r}")
        for name in ("max_batch_size", "queue_size", "max_request_bytes", "max_videos"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.exact_batching, bool):
            raise UsageError(f"exact_batching must be True or False, got {self.exact_batching!r}")
        for name in ("batch_wait_s", "feature_cache_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise UsageError(f"{name} must be a number >= 0, got {value!r}")


def build_app(pipe: AnyGPTPipeline, options: ServerOptions, *, worker: BatchWorker | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``pipe`` (see ``anygpt.apps.server`` for the routes and shapes).

    Args:
        worker: the worker that owns ``pipe`` (default: one built from ``options``); the app starts it when it
            starts and closes it when it stops.
    """
    worker = worker or BatchWorker(
        pipe,
        max_batch_size=options.max_batch_size,
        queue_size=options.queue_size,
        batch_wait_s=options.batch_wait_s,
        feature_cache_size=options.feature_cache_size,
        exact=options.exact_batching,
    )
    replica = f"{socket.gethostname()}:{os.getpid()}"
    stops = stop_strings(pipe)
    videos = VideoStore(options.max_videos, options.video_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        videos.start()
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.close)
            await run_in_threadpool(videos.close)

    app = FastAPI(title="anygpt", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker
    app.state.pipe = pipe
    app.state.videos = videos
    app.add_middleware(_Gate, api_key=options.api_key, max_bytes=options.max_request_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), "invalid_request_error")

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> JSONResponse:
        status = 200 if worker.running else 503
        body = {"status": "ok" if worker.running else "unavailable", "model": options.model_name, "replica": replica}
        return JSONResponse({**body, **worker.stats()}, status_code=status)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": options.model_name, "object": "model", "created": 0, "owned_by": "anygpt"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        with worker.incoming():  # a batch being formed waits for this request while it is read
            body, problem = await _read(request, ChatCompletionRequest, options)
            if problem is not None:
                return problem
            try:
                generation, history = await run_in_threadpool(
                    protocol.chat_request,
                    body,
                    max_video_frames=pipe.model.encoder.max_video_frames,
                    default_modalities=options.default_modalities,
                )
                _check_model_inputs(pipe, generation, history)
            except (AnyGPTError, ValueError) as error:
                return _bad_request(error)
            created, completion_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
            model = body.model or options.model_name
            if body.stream:
                return _stream(worker, pipe, stops, generation, history, body, completion_id, model, created)
            future = _submit(worker, Job(generation, history))
        if isinstance(future, JSONResponse):
            return future
        result = await _outcome(future, worker)
        if isinstance(result, JSONResponse):
            return result
        media = await run_in_threadpool(protocol.encode_media, result.output)
        return protocol.chat_response(
            completion_id=completion_id,
            model=model,
            created=created,
            text=result.output.text,
            media=media,
            finish_reason=result.finish_reason,
            usage=_usage(result),
        )

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        with worker.incoming():
            body, problem = await _read(request, ImageGenerationRequest, options)
            if problem is not None:
                return problem
            try:
                generations = protocol.image_requests(body)
                for generation in generations:
                    pipe.check_inputs(generation)
            except (AnyGPTError, ValueError) as error:
                return _bad_request(error)
            futures = []
            for generation in generations:
                future = _submit(worker, Job(generation))
                if isinstance(future, JSONResponse):
                    for submitted in futures:
                        submitted.cancel()
                    return future
                futures.append(future)
        images = []
        for future in futures:
            result = await _outcome(future, worker)
            if isinstance(result, JSONResponse):
                return result
            media = await run_in_threadpool(protocol.encode_media, result.output)
            images.extend(media[Modality.IMAGE])
        return protocol.images_response(images)

    # ------------------------------------------------------------------ /v1/videos (OpenAI's Videos API)
    @app.post("/v1/videos")
    async def create_video(request: Request):
        decoder = pipe.decoders.get(Modality.VIDEO)
        if decoder is None:
            makes = ", ".join(m.value for m in pipe.decoders) or "text only"
            message = f"this model has no video decoder (it generates {makes}): /v1/videos needs one"
            return _error(400, message, "invalid_request_error", code="video_not_supported")
        with worker.incoming():
            body, problem = await _read_video_body(request, options)
            if problem is not None:
                return problem
            fps = float(decoder.config.fps)
            try:
                generation = protocol.video_request(body, fps=fps)
                pipe.check_inputs(generation)
            except (AnyGPTError, ValueError) as error:
                return _bad_request(error)
            future = _submit(worker, Job(generation))
        if isinstance(future, JSONResponse):
            return future
        settings = generation.decoder_settings(Modality.VIDEO)
        width = settings.get("width") or decoder.config.width
        height = settings.get("height") or decoder.config.height
        frames = settings.get("num_frames") or decoder.config.num_frames
        record = VideoRecord(
            id=videos.new_id(),
            prompt=body.prompt,
            model=body.model or options.model_name,
            size=f"{width}x{height}",
            seconds=f"{frames / fps:g}",
            created_at=int(time.time()),
            future=future,
        )
        return videos.add(record)

    @app.get("/v1/videos")
    async def list_videos(request: Request):
        query = request.query_params
        limit, order, after = query.get("limit", "20"), query.get("order", "desc"), query.get("after")
        if not (limit.isdigit() and 1 <= int(limit) <= 100):
            return _invalid("limit", f"expected an integer from 1 to 100, got {limit!r}")
        if order not in ("asc", "desc"):
            return _invalid("order", f"expected 'asc' or 'desc', got {order!r}")
        try:
            data, has_more = videos.page(after=after, limit=int(limit), order=order)
        except KeyError:
            return _invalid("after", f"no video {after!r} on this server")
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more}

    @app.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str):
        described = videos.describe(video_id)
        return _video_not_found(video_id) if described is None else described

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, request: Request):
        variant = request.query_params.get("variant", "video")
        if variant != "video":
            return _invalid("variant", f"only the MP4 video is served (variant 'video'), got {variant!r}")
        found = videos.content(video_id)
        if found is None:
            return _video_not_found(video_id)
        state, path, error = found
        if state == "failed":
            message = f"Video {video_id} failed ({error['message']}): it has no content"
            return _error(404, message, "invalid_request_error", param="video_id", code="video_failed")
        if path is None:
            message = f"Video {video_id} is not ready yet (status {state}); poll GET /v1/videos/{video_id}"
            return _error(404, message, "invalid_request_error", param="video_id", code="video_not_ready")
        try:
            data = await run_in_threadpool(path.read_bytes)
        except FileNotFoundError:  # deleted (or dropped) while it was asked for
            return _video_not_found(video_id)
        return Response(data, media_type="video/mp4")

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str):
        if not await run_in_threadpool(videos.delete, video_id):
            return _video_not_found(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    return app


# ---------------------------------------------------------------------------------------------------- helpers
async def _read(request: Request, model: type, options: ServerOptions) -> tuple[Any, JSONResponse | None]:
    """The body validated as ``model``, or the 400/404 response that answers it."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, _error(400, f"body: expected a JSON object ({error})", "invalid_request_error")
    return _validate(data, model, options)


_UPLOADED = object()
"""What a form's uploaded file stands for in a ``/v1/videos`` body (refused, naming its field)."""


async def _read_video_body(request: Request, options: ServerOptions) -> tuple[Any, JSONResponse | None]:
    """``POST /v1/videos``: a JSON body, or a form (what the ``openai`` client sends: multipart, string values)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _read(request, VideoCreateRequest, options)
    try:
        async with request.form() as form:
            data = {key: value if isinstance(value, str) else _UPLOADED for key, value in form.multi_items()}
    except StarletteHTTPException as error:  # a malformed form (a body over the limit still gets 413)
        return None, _error(400, f"body: cannot read the form ({error.detail})", "invalid_request_error")
    if data.get("input_reference") is _UPLOADED:
        data["input_reference"] = "<file>"
    files = [key for key, value in data.items() if value is _UPLOADED]
    if files:
        return None, _invalid(files[0], "expected a text field, got a file")
    return _validate(data, VideoCreateRequest, options)


def _validate(data: Any, model: type, options: ServerOptions) -> tuple[Any, JSONResponse | None]:
    """``data`` validated as ``model`` and naming the served model (or none), or the 400/404 response."""
    try:
        body = protocol.parse_body(model, data)
    except UsageError as error:
        return None, _bad_request(error)
    if body.model is not None and body.model != options.model_name:
        message = f"The model {body.model!r} does not exist: this server serves {options.model_name!r}"
        return None, _error(404, message, "invalid_request_error", param="model", code="model_not_found")
    return body, None


def _check_model_inputs(pipe: AnyGPTPipeline, generation, history) -> None:
    """What depends on the model: the last message's request (``check_inputs``) and the earlier turns' media."""
    pipe.check_inputs(generation)
    for index, turn in enumerate(history):
        for modality in MEDIA_MODALITIES:
            if turn.media.get(modality) and modality.value not in pipe.config.input_modalities:
                raise UsageError(
                    f"messages: turn {index} holds {modality.value} input, which this model does not read "
                    f"(it reads {', '.join(pipe.config.input_modalities)})"
                )


def _submit(worker: BatchWorker, job: Job) -> Future | JSONResponse:
    """The job queued (its future), or the 429 / 503 response that answers it."""
    try:
        return worker.submit(job)
    except queue.Full:
        return _busy()
    except RuntimeError:
        return _unavailable()


async def _outcome(future, worker: BatchWorker) -> JobResult | JSONResponse:
    """The job's result, or the response for its failure: 400 for a bad request, 503 when the worker stopped
    (shutting down), 500 otherwise (logged with its traceback)."""
    try:
        return await asyncio.wrap_future(future)
    except (AnyGPTError, ValueError) as error:
        return _bad_request(error)
    except Exception as error:
        if not worker.running:
            return _unavailable()
        logger.error("request failed", exc_info=error)
        return _error(500, f"internal error: {type(error).__name__}: {error}", "server_error", code="internal_error")


def _stream(
    worker: BatchWorker,
    pipe: AnyGPTPipeline,
    stops: tuple[str, ...],
    generation,
    history,
    body: ChatCompletionRequest,
    completion_id: str,
    model: str,
    created: int,
):
    """``stream=true``: SSE chunks of the text as it is generated, the media in the last chunk, then ``[DONE]``."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(text: str) -> None:
        loop.call_soon_threadsafe(events.put_nowait, text)

    streamer = DeltaStreamer(pipe.tokenizer, emit, stops)
    future = _submit(worker, Job(generation, history, streamer=streamer))
    if isinstance(future, JSONResponse):
        return future
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))

    def chunk(**fields: Any) -> str:
        data = protocol.chat_chunk(completion_id=completion_id, model=model, created=created, **fields)
        return f"data: {json.dumps(data)}\n\n"

    async def events_of_reply() -> AsyncIterator[str]:
        try:
            yield chunk(delta={"role": "assistant", "content": ""})
            while True:
                text = await events.get()
                if text is None:
                    break
                yield chunk(delta={"content": text})
            result = await _outcome(future, worker)
            if isinstance(result, JSONResponse):
                yield f"data: {result.body.decode()}\n\n"
            else:
                final = result.output.text
                if not final.startswith(streamer.sent):
                    logger.warning("streamed text is not a prefix of the reply; sending the reply's rest as is")
                rest = final[len(streamer.sent) :] if final.startswith(streamer.sent) else ""
                media = await run_in_threadpool(protocol.encode_media, result.output)
                delta = protocol.final_delta(rest, media, created)
                yield chunk(delta=delta, finish_reason=result.finish_reason)
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield chunk(delta={}, usage=_usage(result))
            yield "data: [DONE]\n\n"
        finally:
            future.cancel()  # the client left before the job started: drop it

    return StreamingResponse(events_of_reply(), media_type="text/event-stream")


def _usage(result: JobResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _error(status: int, message: str, type: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, type=type, param=param, code=code), status_code=status)


def _invalid(param: str, message: str) -> JSONResponse:
    """400 for the field ``param``: ``"<param>: <message>"``."""
    return _error(400, f"{param}: {message}", "invalid_request_error", param=param, code="invalid_value")


def _video_not_found(video_id: str) -> JSONResponse:
    message = f"No video found with id {video_id!r}"
    return _error(404, message, "invalid_request_error", param="video_id", code="video_not_found")


def _bad_request(error: BaseException) -> JSONResponse:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _error(400, message, "invalid_request_error", param=protocol.error_param(message), code="invalid_value")


def _busy() -> JSONResponse:
    response = _error(
        429, "the server's queue is full: retry later", "rate_limit_error", code="queue_full"
    )  # OpenAI clients retry a 429 after Retry-After
    response.headers["Retry-After"] = "1"
    return response


def _unavailable() -> JSONResponse:
    message = "the server is not taking requests (starting or shutting down)"
    return _error(503, message, "server_error", code="unavailable")


class _BodyTooLarge(Exception):
    """Internal signal of ``_Gate``: the body went over the limit while it was read."""


class _Gate:
    """ASGI middleware in front of the routes: the API key (401) and the body-size limit (413), both decided before
    the body is read (``Content-Length``), the size again while it is read (a chunked body)."""

    def __init__(self, app, *, api_key: str | None, max_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                what = "no API key was given" if not token else "the API key is not valid"
                message = f"Incorrect API key provided: {what} (send 'Authorization: Bearer <key>')"
                response = _error(401, message, "invalid_request_error", code="invalid_api_key")
                return await response(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send)

    async def _too_large(self, scope, receive, send):
        limit = self.max_bytes / 2**20
        message = f"the request body is larger than the server's limit of {limit:g} MB (--max-request-mb)"
        response = _error(413, message, "invalid_request_error", code="request_too_large")
        await response(scope, receive, send)
