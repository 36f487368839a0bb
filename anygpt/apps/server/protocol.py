"""The OpenAI-compatible wire format: request bodies, their conversion to ``GenerationRequest``, and responses.

Requests are checked by pydantic models (an unknown field or a bad value is a 400 naming it), then turned into one
``GenerationRequest`` (the request's last user message) and the earlier turns (``HistoryTurn``). Media parts arrive
as data URLs or bare base64; each is written to a private temporary folder, read back by the
``anygpt.base.media`` loaders, and the folder is deleted: nothing is kept on disk. Replies are written the same way
(PNG, 16-bit WAV, H.264 MP4 through ``anygpt.apps.outputs``) and sent as base64.

The shapes (``anygpt.apps.server`` documents them in full): text in ``message.content``; audio as OpenAI's
``message.audio = {id, data, expires_at, transcript}`` (base64 WAV); images and videos as vllm-omni's content parts
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` and
``{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`` after a ``{"type": "text"}`` part.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from anygpt.apps.outputs import save_outputs
from anygpt.base.errors import MediaError, UsageError
from anygpt.base.media import load_media
from anygpt.base.modality import MEDIA_MODALITIES, Modality
from anygpt.core.request import MAX_FRAMES, GenerationRequest

__all__ = [
    "ChatCompletionRequest",
    "HistoryTurn",
    "ImageGenerationRequest",
    "VideoCreateRequest",
    "chat_chunk",
    "chat_request",
    "chat_response",
    "error_body",
    "image_requests",
    "images_response",
    "parse_body",
    "validation_message",
    "video_request",
]

AUDIO_EXPIRES_S = 3600
"""``message.audio.expires_at`` is this many seconds after the reply (the server keeps nothing: the client holds the
only copy; OpenAI's field is kept for clients that read it)."""

_MIME_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/flac": ".flac",
    "audio/ogg": ".ogg",
    "audio/mpeg": ".mp3",
    "audio/mp3": ".mp3",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
    "video/x-matroska": ".mkv",
}
_AUDIO_FORMATS = {"wav": ".wav", "mp3": ".mp3", "flac": ".flac", "ogg": ".ogg"}
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,")
_SIZE = re.compile(r"(?P<width>\d+)x(?P<height>\d+)")
_PART_MODALITY = {
    "image_url": Modality.IMAGE,
    "input_audio": Modality.AUDIO,
    "audio_url": Modality.AUDIO,
    "video_url": Modality.VIDEO,
}
_OUTPUT_MODALITIES = ("text", *(m.value for m in MEDIA_MODALITIES))


# ---------------------------------------------------------------------------------------------------- request bodies
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _URL(_Strict):
    url: str
    detail: str | None = None  # OpenAI's image detail level: accepted, unused


class _InputAudio(_Strict):
    data: str
    format: str = "wav"


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURLPart(_Strict):
    type: Literal["image_url"]
    image_url: _URL


class InputAudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: _InputAudio


class AudioURLPart(_Strict):
    type: Literal["audio_url"]
    audio_url: _URL


class VideoURLPart(_Strict):
    type: Literal["video_url"]
    video_url: _URL


ContentPart = Annotated[
    TextPart | ImageURLPart | InputAudioPart | AudioURLPart | VideoURLPart, Field(discriminator="type")
]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, refusal, audio {id} of earlier replies: not used

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class AudioOutput(_Strict):
    voice: str | None = None  # one voice: accepted, unused
    format: Literal["wav"] = "wav"


class StreamOptions(_Strict):
    include_usage: bool = False


class _DecoderFields(BaseModel):
    """anygpt's settings sent as extra body fields (``extra_body`` of the ``openai`` client)."""

    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    size: str | None = None
    num_frames: int | None = Field(None, ge=1)
    audio_seconds: float | None = Field(None, gt=0)
    decoder_overrides: dict[str, dict[str, Any]] | None = None
    adapters: str | list[str] | dict[str, float] | None = None


class ChatCompletionRequest(_DecoderFields):
    """``POST /v1/chat/completions``. OpenAI fields anygpt cannot honour are refused when set to anything but
    their default (``n``, ``stop``, ``logprobs``, penalties, tools); bookkeeping fields are accepted and unused."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[str] | None = None
    audio: AudioOutput | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    stop: None = None
    logprobs: Literal[False] | None = None
    top_logprobs: None = None
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    tools: None = None
    tool_choice: Literal["none"] | None = None
    response_format: dict[str, Literal["text"]] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None  # sent by some clients for reasoning models: accepted, unused


class ImageGenerationRequest(_DecoderFields):
    """``POST /v1/images/generations`` (DALL-E's shape; ``b64_json`` only: the server serves no files)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    response_format: Literal["b64_json"] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    quality: str | None = None  # accepted, unused
    style: str | None = None  # accepted, unused
    user: str | None = None


class VideoCreateRequest(_DecoderFields):
    """``POST /v1/videos`` (OpenAI's Videos API, the subset SGLang serves): a JSON body, or the form fields the
    ``openai`` client sends (``client.videos.create``: multipart, every value a string). ``size`` is the frames'
    "WxH" (default: the video decoder's), ``seconds`` the clip's length (a number or a string such as ``"4"``;
    ``round(seconds * fps)`` frames at the decoder's fps) or ``num_frames`` the frames (not both; default: the
    decoder's). ``input_reference`` is refused (text to video only)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    seconds: str | float | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    input_reference: Any = None  # refused by ``video_request`` with a message naming it
    user: str | None = None


def parse_body(model: type[BaseModel], data: Any) -> Any:
    """``model`` validated from a decoded JSON body.

    Raises:
        UsageError: the first problem, as ``"<field path>: <what is wrong>"`` (``validation_message``).
    """
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise UsageError(validation_message(error)) from None


def validation_message(error: ValidationError) -> str:
    """``"messages[0].content[1].image_url.url: Field required"``: pydantic's most specific error with its field
    path (a union's deepest branch; the branch labels pydantic adds to the path are left out)."""
    errors = error.errors()
    depth = max(len(e["loc"]) for e in errors)
    deepest = [e for e in errors if len(e["loc"]) == depth]
    first = deepest[0]
    path = ""
    previous = None
    for part in first["loc"]:
        if isinstance(part, str) and (part == "str" or "[" in part or part == previous):
            previous = part
            continue  # a union branch's label, or a tagged part's tag before its field of the same name
        previous = part
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = first["msg"]
    if len(deepest) > 1 and path.endswith(".content"):
        message = "expected a string or a list of content parts (text, image_url, input_audio, audio_url, video_url)"
    elif first["type"] == "extra_forbidden":
        message = "unknown field (neither an OpenAI field this server reads nor one of anygpt's extra fields)"
    elif first["type"] == "union_tag_invalid":
        kind = first["input"].get("type") if isinstance(first["input"], dict) else None
        message = f"unknown content part type {kind!r}; expected text, image_url, input_audio, audio_url or video_url"
    elif first["type"] in ("literal_error", "none_required") and "input" in first:
        message = f"{message}, got {first['input']!r}"
    return f"{path or 'body'}: {message}"


# ---------------------------------------------------------------------------------------------------- conversion
@dataclass
class HistoryTurn:
    """An earlier turn of the conversation: a user's text and media (loaded objects), or an assistant's text."""

    role: str
    text: str
    media: dict[Modality, list[Any]] = field(default_factory=dict)


def chat_request(
    body: ChatCompletionRequest, *, max_video_frames: int, default_modalities: Sequence[str] | None = None
) -> tuple[GenerationRequest, list[HistoryTurn]]:
    """The ``GenerationRequest`` of the last user message and the turns before it.

    ``default_modalities`` stands for ``modalities`` when the body has none (None: the model decides).

    System and developer messages are put, in order, before the text of the first user message that follows them
    (the model's chat template has its own fixed system prompt). An assistant message's media parts are not read
    (only its text is history).

    Raises:
        UsageError: a bad field, naming it; ``MediaError`` for a media part that cannot be read, naming the part.
    """
    turns: list[HistoryTurn] = []
    pending_system: list[str] = []
    with tempfile.TemporaryDirectory(prefix="anygpt-serve-") as folder:
        for index, message in enumerate(body.messages):
            where = f"messages[{index}]"
            text, media = _read_content(message.content, where, Path(folder), max_video_frames)
            if message.role in ("system", "developer"):
                if any(media.values()):
                    raise UsageError(f"{where}.content: a {message.role} message holds text only")
                pending_system.append(text)
            elif message.role == "user":
                if pending_system:
                    text = "\n\n".join([*pending_system, text]) if text else "\n\n".join(pending_system)
                    pending_system = []
                turns.append(HistoryTurn("user", text, media))
            else:
                turns.append(HistoryTurn("assistant", text))
    if not turns or turns[-1].role != "user":
        raise UsageError("messages: the last message must be the user's (the one to answer)")
    last = turns.pop()
    fields = _common_fields(body)
    fields["max_new_tokens"] = body.max_completion_tokens or body.max_tokens or fields.pop("max_new_tokens", 128)
    request = _request(
        prompt=last.text,
        images=last.media.get(Modality.IMAGE, []),
        audios=last.media.get(Modality.AUDIO, []),
        videos=last.media.get(Modality.VIDEO, []),
        modalities=output_modalities(body.modalities if body.modalities is not None else default_modalities),
        temperature=0.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        **fields,
    )
    if body.audio is not None and request.modalities != "auto" and "audio" not in request.modalities:
        raise UsageError("audio: audio output settings were given but 'audio' is not in modalities")
    return request, turns


def image_requests(body: ImageGenerationRequest) -> list[GenerationRequest]:
    """One image request per image asked for (``n``); the ``i``-th is seeded ``seed + i`` (none without a seed)."""
    fields = _common_fields(body)
    return [
        _request(
            prompt=body.prompt,
            modalities=["image"],
            seed=None if body.seed is None else body.seed + i,
            **fields,
        )
        for i in range(body.n)
    ]


def video_request(body: VideoCreateRequest, *, fps: float) -> GenerationRequest:
    """The video-forced request of ``POST /v1/videos``: what a chat request with ``modalities: ["text", "video"]``
    renders. ``seconds`` becomes ``num_frames = max(1, round(seconds * fps))`` (``fps``: the video decoder's).

    Raises:
        UsageError: a bad field, naming it (``size``, ``seconds``, ``num_frames``, ``input_reference``, ...).
    """
    if body.input_reference is not None:
        raise UsageError("input_reference: reference images or videos are not supported (text to video only)")
    fields = _common_fields(body)
    if body.seconds is not None:
        if body.num_frames is not None:
            raise UsageError("seconds: give seconds or num_frames, not both")
        seconds = _seconds(body.seconds)
        frames = max(1, round(seconds * fps))
        if frames > MAX_FRAMES:
            raise UsageError(
                f"seconds: {seconds:g} s is {frames} frames at the model's {fps:g} fps; at most {MAX_FRAMES} frames "
                f"({MAX_FRAMES / fps:g} s)"
            )
        fields["num_frames"] = frames
    return _request(prompt=body.prompt, modalities=["video"], seed=body.seed, **fields)


def _seconds(value: str | float) -> float:
    """``seconds`` as a positive, finite number (OpenAI's clients send a string such as ``"4"``)."""
    try:
        seconds = float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"seconds: expected a positive number of seconds such as '4', got {value!r}")
    return seconds


def output_modalities(modalities: Sequence[str] | None) -> str | list[str]:
    """OpenAI's ``modalities`` as a request's: None -> ``"auto"``; ``["text"]`` -> ``[]`` (text only);
    ``["text", "image"]`` -> ``["image"]`` (forced). Text is always part of a reply."""
    if modalities is None:
        return "auto"
    result = []
    for index, name in enumerate(modalities):
        if name not in _OUTPUT_MODALITIES:
            raise UsageError(f"modalities[{index}]: unknown modality {name!r}; expected any of {_OUTPUT_MODALITIES}")
        if name != "text" and name not in result:
            result.append(name)
    return result


def _common_fields(body: _DecoderFields) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "num_inference_steps": body.num_inference_steps,
        "guidance_scale": body.guidance_scale,
        "num_frames": body.num_frames,
        "audio_seconds": body.audio_seconds,
        "decoder_overrides": body.decoder_overrides,
        "adapters": body.adapters,
    }
    if body.size is not None:
        match = _SIZE.fullmatch(body.size.strip())
        if match is None:
            raise UsageError(f"size: expected 'WIDTHxHEIGHT' such as '512x512', got {body.size!r}")
        fields["width"], fields["height"] = int(match["width"]), int(match["height"])
    return fields


_FIELD_NAMES = {"max_new_tokens": "max_tokens", "width": "size", "height": "size"}


def _request(**fields: Any) -> GenerationRequest:
    """A ``GenerationRequest``; its validation errors name the wire field (``max_tokens``, not ``max_new_tokens``)."""
    try:
        return GenerationRequest(**fields)
    except UsageError as error:
        message = str(error)
        for name, wire in _FIELD_NAMES.items():
            if message.startswith(name):
                message = wire + message[len(name) :]
        raise UsageError(message) from None


def _read_content(
    content: str | list | None, where: str, folder: Path, max_video_frames: int
) -> tuple[str, dict[Modality, list[Any]]]:
    """A message's text (its text parts joined by newlines) and its media, read from their parts."""
    media: dict[Modality, list[Any]] = {m: [] for m in MEDIA_MODALITIES}
    if content is None:
        return "", media
    if isinstance(content, str):
        return content, media
    texts = []
    for index, part in enumerate(content):
        part_where = f"{where}.content[{index}]"
        if isinstance(part, TextPart):
            texts.append(part.text)
            continue
        modality = _PART_MODALITY[part.type]
        if isinstance(part, InputAudioPart):
            fmt = part.input_audio.format.lower()
            if fmt not in _AUDIO_FORMATS:
                raise UsageError(
                    f"{part_where}.input_audio.format: expected one of {', '.join(_AUDIO_FORMATS)}, got {fmt!r}"
                )
            data, suffix = _base64(part.input_audio.data, f"{part_where}.input_audio.data"), _AUDIO_FORMATS[fmt]
        else:
            url = getattr(part, part.type).url
            data, suffix = _data_url(url, f"{part_where}.{part.type}.url", modality)
        path = folder / f"part-{uuid.uuid4().hex[:12]}{suffix}"  # deleted once read
        path.write_bytes(data)
        try:
            max_frames = max_video_frames if modality is Modality.VIDEO else None
            media[modality].append(load_media(modality, path, max_frames=max_frames))
        except MediaError as error:  # "cannot read image <path>: expected ..." without the temporary path
            reason = str(error).replace(f"{modality.value} {path}", f"the {modality.value}").replace(str(path), "it")
            raise MediaError(f"{part_where} ({part.type}): {reason}") from None
        finally:
            path.unlink(missing_ok=True)
    return "\n".join(texts), media


def _data_url(url: str, where: str, modality: Modality) -> tuple[bytes, str]:
    """The bytes of a ``data:`` URL (or of bare base64) and a file suffix for them."""
    match = _DATA_URL.match(url)
    if match is None:
        if url.startswith(("http://", "https://", "file:")):
            raise UsageError(f"{where}: the server fetches no URLs; send the {modality.value} as a data URL")
        return _base64(url, where), ".bin"
    if not match["b64"]:
        raise UsageError(f"{where}: expected a base64 data URL ('data:<type>;base64,...')")
    mime = (match["mime"] or "").lower()
    kind = mime.split("/")[0]
    if mime and kind != modality.value and mime != "application/octet-stream":
        raise UsageError(f"{where}: expected {modality.value} data, got a data URL of type {mime!r}")
    return _base64(url[match.end() :], where), _MIME_EXTENSIONS.get(mime, ".bin")


def _base64(text: str, where: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{where}: expected base64 data, found characters outside the base64 alphabet") from None
    if not data:
        raise UsageError(f"{where}: the data is empty")
    return data


# ---------------------------------------------------------------------------------------------------- responses
def encode_media(output: Any) -> dict[Modality, list[bytes]]:
    """The reply's media as file bytes (PNG, MP4, WAV), written by the project's writers in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="anygpt-serve-") as folder:
        written = save_outputs(output, folder, "reply")
        return {modality: [path.read_bytes() for path in paths] for modality, paths in written.items()}


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def media_parts(media: dict[Modality, list[bytes]]) -> list[dict[str, Any]]:
    """vllm-omni's content parts for images and videos, in that order."""
    parts: list[dict[str, Any]] = []
    for data in media.get(Modality.IMAGE, []):
        parts.append({"type": "image_url", "image_url": {"url": _data_uri("image/png", data)}})
    for data in media.get(Modality.VIDEO, []):
        parts.append({"type": "video_url", "video_url": {"url": _data_uri("video/mp4", data)}})
    return parts


def audio_message(media: dict[Modality, list[bytes]], transcript: str, created: int) -> dict[str, Any] | None:
    """OpenAI's ``message.audio`` for the reply's first audio; further audios come as ``audio_url`` parts."""
    audios = media.get(Modality.AUDIO, [])
    if not audios:
        return None
    return {
        "id": f"audio_{uuid.uuid4().hex}",
        "data": base64.b64encode(audios[0]).decode(),
        "expires_at": created + AUDIO_EXPIRES_S,
        "transcript": transcript,
    }


def extra_audio_parts(media: dict[Modality, list[bytes]]) -> list[dict[str, Any]]:
    return [{"type": "audio_url", "audio_url": {"url": _data_uri("audio/wav", d)}} for d in media[Modality.AUDIO][1:]]


def message_content(text: str, media: dict[Modality, list[bytes]]) -> str | list[dict[str, Any]]:
    """The text alone, or (with images, videos or a second audio) a text part followed by the media parts."""
    parts = media_parts(media) + (extra_audio_parts(media) if media.get(Modality.AUDIO) else [])
    if not parts:
        return text
    return [{"type": "text", "text": text}, *parts]


def chat_response(
    *,
    completion_id: str,
    model: str,
    created: int,
    text: str,
    media: dict[Modality, list[bytes]],
    finish_reason: str,
    usage: dict[str, int],
) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": message_content(text, media)}
    audio = audio_message(media, text, created)
    if audio is not None:
        message["audio"] = audio
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage,
    }


def chat_chunk(
    *,
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; a usage-only chunk (``stream_options.include_usage``) has no choices."""
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    chunk["choices"] = choices
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def final_delta(text: str, media: dict[Modality, list[bytes]], created: int) -> dict[str, Any]:
    """The last chunk's delta: the rest of the text, then the media (content parts and ``audio``)."""
    parts = media_parts(media) + (extra_audio_parts(media) if media.get(Modality.AUDIO) else [])
    delta: dict[str, Any] = {}
    if parts:
        delta["content"] = ([{"type": "text", "text": text}] if text else []) + parts
    elif text:
        delta["content"] = text
    audio = audio_message(media, "", created)
    if audio is not None:
        delta["audio"] = audio
    return delta


def images_response(images: list[bytes], created: int | None = None) -> dict[str, Any]:
    """DALL-E's response: ``{"created", "data": [{"b64_json"}]}``."""
    return {
        "created": int(time.time()) if created is None else created,
        "data": [{"b64_json": base64.b64encode(data).decode()} for data in images],
    }


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_PARAM = re.compile(r"^(?P<param>[A-Za-z_][\w]*(?:\[\d+\]|\.[A-Za-z_]\w*)*)(?::| must| \()")


def error_param(message: str) -> str | None:
    """The field a 400 message names first (``"messages[0].content[1]"``), or None."""
    match = _PARAM.match(message)
    return match["param"] if match and match["param"] != "body" else None
