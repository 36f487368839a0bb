"""The chat demo's logic, free of any UI: sessions, upload checks, streaming replies and saved outputs.

``app.py`` wires a Gradio page to a :class:`ChatEngine`; everything here is plain Python and can be driven (and
tested) without a browser.

Example:
    >>> engine = ChatEngine.from_pretrained("tiny", output_dir="/tmp/anygpt-demo")
    >>> session = engine.new_session(owner="browser-key")
    >>> for exchange in engine.respond(session, "draw a cat", [], GenerationRequest(modalities=["image"], seed=0)):
    ...     print(exchange.reply.text, exchange.reply.status)
    >>> session.exchanges[-1].reply.images  # [Path(".../turn-0001_image0.png")]

The pipeline is not thread-safe: :class:`ChatEngine` runs one pipeline call at a time (a lock), whatever the UI's
queue does.

Files are bound to their owner (the client that made them, named by an unguessable key the UI gives, a cookie in
``app.py``): a session's generated files, under ``output_dir/sessions/<random id>/``, and the uploads the UI
``grant``-s. ``ChatEngine.may_read`` says whether an owner may fetch a path (the UI refuses the others), and a
message may name only files of the output folder that its session's owner may read.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import math
import os
import queue
import re
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anygpt.apps.outputs import save_outputs
from anygpt.base.errors import GenerationStopped, MediaError, UsageError  # GenerationStopped: decoders, the streamer
from anygpt.base.media import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Video, guess_modality
from anygpt.base.modality import MEDIA_MODALITIES, Modality
from anygpt.core.conversation import Conversation, Turn, get_template
from anygpt.core.pipeline import AnyGPTPipeline
from anygpt.core.request import GenerationRequest
from anygpt.core.runtime import RuntimeOptions

logger = logging.getLogger(__name__)

__all__ = [
    "ChatEngine",
    "ChatSession",
    "Exchange",
    "GenerationRequest",
    "GenerationStopped",
    "Reply",
    "check_upload",
    "default_output_dir",
    "display_scale",
    "request_fields",
    "upscaled",
]

DEFAULT_MAX_UPLOAD_BYTES = 100 * 2**20
DEFAULT_MAX_MESSAGE_CHARS = 2000
"""The longest message (characters, after trimming spaces) the engine runs; longer ones are answered with an error."""
DEFAULT_DISPLAY_SIZE = 256
"""Generated images and video frames smaller than this (pixels, the longer side) are saved enlarged by a whole
factor, nearest-neighbour (a 64 px image as 256 px, every pixel a 4 x 4 block), so that a page shows them large and
sharp."""
_EXTENSIONS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS, "video": VIDEO_EXTENSIONS}


# ---------------------------------------------------------------------------------------------------- settings
def request_fields(
    outputs: Sequence[str] | str | None,
    temperature: float,
    top_p: float,
    max_new_tokens: float,
    steps: Mapping[str, float | None],
    guidance: Mapping[str, float | None],
    num_frames: float | None = None,
    audio_seconds: float | None = None,
    seed: float | None = 0,
) -> dict[str, Any]:
    """``GenerationRequest`` fields from the demo's controls, whose numbers may come as floats (sliders).

    ``outputs`` holding ``"auto"`` (or being the string ``"auto"``) means auto; otherwise the named modalities are
    forced (none: text only). ``steps`` and ``guidance`` are per output modality (``{"image": 25}``; a missing or
    None entry takes the decoder's default) and become ``decoder_overrides``. A negative or missing seed means a
    fresh random seed for every request (``seed`` None). Nothing is validated here: the engine builds the request
    when it starts, and a bad value is answered in the chat.
    """
    if outputs is None or isinstance(outputs, str):
        outputs = [m for m in (outputs or "auto").split(",") if m.strip()]
    names = [str(m).strip().lower() for m in outputs]
    overrides: dict[str, dict[str, Any]] = {}
    for modality, value in steps.items():
        if value is not None:
            overrides.setdefault(modality, {})["num_inference_steps"] = _whole(value)
    for modality, value in guidance.items():
        if value is not None:
            overrides.setdefault(modality, {})["guidance_scale"] = value
    random_seed = seed is None or (isinstance(seed, int | float) and (math.isnan(seed) or seed < 0))
    return dict(
        modalities="auto" if "auto" in names else names,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=_whole(max_new_tokens),
        num_frames=_whole(num_frames),
        audio_seconds=audio_seconds,
        seed=None if random_seed else _whole(seed),
        decoder_overrides=overrides,
    )


def _whole(value: Any) -> Any:
    """A float that holds a whole number (UI sliders send floats) as an int; anything else unchanged."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return value


# ---------------------------------------------------------------------------------------------------- state
@dataclass
class Reply:
    """One assistant answer as the UI shows it; it grows while the answer is produced.

    Attributes:
        text: the reply text so far (the final text once ``done``).
        status: what is happening now (``"writing"``, ``"loading the video decoder"``, ``"rendering video (2/3)"``),
            or a summary when done.
        progress: while a decoder renders, its denoising steps ``(done, total)``; None otherwise.
        images, videos, audios: the saved output files (PNG, MP4, WAV) in the session's folder; a stopped answer
            has those rendered before it was stopped.
        error: a message for the user when the request failed (bad upload, bad setting, internal error).
        stopped: the user stopped it.
        done: nothing more will change.
    """

    text: str = ""
    status: str = ""
    progress: tuple[int, int] | None = None
    images: list[Path] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)
    audios: list[Path] = field(default_factory=list)
    error: str | None = None
    stopped: bool = False
    done: bool = False

    @property
    def files(self) -> list[Path]:
        return [*self.images, *self.videos, *self.audios]


@dataclass(eq=False)
class Exchange:
    """A user turn (text and uploaded files) and its reply.

    Attributes:
        kept: whether the session's ``Conversation`` holds this exchange. Only a finished answer is kept; a
            stopped or failed one is shown but the model does not see it in later turns. Set by the request's
            worker when the answer ends, whatever the UI does meanwhile.
        turns: the conversation's (user, assistant) ``Turn`` objects of a kept exchange, so that retry removes
            exactly these.
    """

    text: str
    files: list[Path]
    reply: Reply = field(default_factory=Reply)
    kept: bool = False
    turns: tuple[Turn, ...] = field(default=(), repr=False)


@dataclass(eq=False)
class ChatSession:
    """One user's chat: the pipeline ``Conversation`` (turns and cached media features) and what the UI shows.

    The conversation holds exactly the exchanges shown with ``kept`` set, in order.

    Attributes:
        output_dir: this session's folder for generated files (removed by ``clear`` and ``close``); its name, the
            session's ``id``, is random (128 bits).
        owner: the key of the client that made the session (``ChatEngine.may_read``), or None.
        conversation: the model-side history; media are encoded once per conversation.
        exchanges: what the chat shows, oldest first.
        epoch: increases on every clear; a reply started before a clear stops updating the chat.
        closed: the session ended (``close``).
        lock: guards ``exchanges``, ``conversation`` and the replies against the request's worker thread.
    """

    output_dir: Path
    owner: str | None = None
    conversation: Conversation = field(default_factory=Conversation)
    exchanges: list[Exchange] = field(default_factory=list)
    epoch: int = 0
    closed: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _turn: int = 0
    _stopped_at: float = -math.inf  # time.monotonic() of the last stop (or clear)
    _cleared_at: float = -math.inf
    _requests: set[threading.Event] = field(default_factory=set, repr=False)
    _on_close: Callable[[ChatSession], None] | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        """The session's name: its folder's."""
        return self.output_dir.name

    def stop(self) -> None:
        """Stop every request of this session sent until now: running, waiting for the model, or still queued.

        The LLM stops at its next token, a decoder after its current denoising step. A request sent before this
        call but started after it (see ``ChatEngine.respond``'s ``submitted_at``) ends as stopped at once.
        """
        with self.lock:
            self._stopped_at = time.monotonic()
            for request in self._requests:
                request.set()

    def clear(self) -> None:
        """Forget everything: a fresh conversation, no exchanges, the session's files removed.

        Requests sent before the clear are stopped and no longer shown (one still queued is dropped).
        """
        with self.lock:
            self.stop()
            self._cleared_at = self._stopped_at
            self.epoch += 1
            self.conversation = Conversation()
            self.exchanges = []
        shutil.rmtree(self.output_dir, ignore_errors=True)

    def close(self) -> None:
        """End the session (the browser tab went away or it expired): stop, forget and remove its files."""
        self.closed = True
        self.clear()
        if self._on_close is not None:
            self._on_close(self)

    @property
    def busy(self) -> bool:
        """Whether a request of this session is waiting for the model or running."""
        return bool(self._requests)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no request of this session runs; True when none does."""
        deadline = time.monotonic() + timeout
        while self._requests and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._requests

    def next_stem(self) -> str:
        self._turn += 1
        return f"turn-{self._turn:04d}"

    def _begin(self, submitted_at: float) -> threading.Event:
        """Register a request sent at ``submitted_at``; its stop signal is already set if a stop came after that."""
        with self.lock:
            stop = threading.Event()
            if submitted_at <= self._stopped_at:
                stop.set()
            self._requests.add(stop)
            return stop

    def _end(self, stop: threading.Event) -> None:
        with self.lock:
            self._requests.discard(stop)

    def _shows(self, exchange: Exchange) -> bool:
        return any(e is exchange for e in self.exchanges)

    def _forget(self, exchange: Exchange) -> None:
        """Remove a kept exchange's turns from the conversation (``pop_last_exchange`` when they are the last)."""
        turns, conversation = exchange.turns, self.conversation
        if not turns:
            return
        last = conversation.turns[-len(turns) :]
        if len(last) == len(turns) and all(a is b for a, b in zip(last, turns, strict=True)):
            conversation.pop_last_exchange()
        else:
            conversation.turns[:] = [t for t in conversation.turns if not any(t is u for u in turns)]
        exchange.turns, exchange.kept = (), False


# ---------------------------------------------------------------------------------------------------- uploads
def check_upload(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> Modality:
    """The modality of an uploaded file, from its extension, after checking that it exists and is not too large.

    Its content is checked when the pipeline reads it (``anygpt.base.media`` loaders raise ``MediaError``).

    Raises:
        MediaError: an unknown extension, a missing file or one larger than ``max_bytes``; the message names the
            file by its base name only.
    """
    path = Path(path)
    try:
        modality = guess_modality(path.name)
    except MediaError:
        known = "; ".join(f"{kind}: {' '.join(sorted(ext))}" for kind, ext in _EXTENSIONS.items())
        raise MediaError(f"{path.name}: not an image, audio or video file by its name (expected {known})") from None
    try:
        size = path.stat().st_size
    except OSError:
        raise MediaError(f"{path.name}: the upload did not arrive (no such file on the server)") from None
    if not path.is_file():
        raise MediaError(f"{path.name}: expected a file, found a folder")
    if size > max_bytes:
        raise MediaError(f"{path.name}: {_size(size)} is larger than the upload limit of {_size(max_bytes)}")
    return modality


def _size(size: int) -> str:
    if size < 2**10:
        return f"{size} bytes"
    if size < 2**20:
        return f"{size / 2**10:.1f} KB"
    return f"{size / 2**20:.1f} MB"


def _user_message(error: BaseException, files: Sequence[Path], output_dir: Path | None = None) -> str:
    """A one-line message for the chat, without server paths.

    Upload paths become their base names, the output folder becomes ``<output>``, and any other absolute path its
    base name (the full error is logged).
    """
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    for path in sorted(files, key=lambda p: len(str(p)), reverse=True):
        text = text.replace(str(path), path.name)
    if output_dir is not None:
        text = text.replace(str(output_dir), "<output>")
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1), text)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~<>-])/(?:[\w.@+-]+/)+([\w.@+-]*)")  # /a/b/c -> c (not URLs, not "1/2")


# ---------------------------------------------------------------------------------------------------- engine
class _QueueStreamer:
    """A transformers streamer that sends decoded text increments to a queue and raises when stop is set.

    Unlike ``TextStreamer`` it does not wait for a word boundary: every token's text appears at once (except an
    incomplete multi-byte character, and a tail that may begin one of ``end_of_turn``, which wait for the next
    token). Nothing from an ``end_of_turn`` marker (the chat template's stop strings and role markers) on is sent.
    """

    def __init__(self, tokenizer, events: queue.Queue, stop: threading.Event, end_of_turn: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.events = events
        self.stop = stop
        self.markers = [m for m in end_of_turn if m]
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_skipped = False
        self.ended = False  # a marker was seen: the reply's text is complete

    def put(self, value) -> None:
        if self.stop.is_set():
            raise GenerationStopped("stopped by the user")
        if not self.prompt_skipped:  # generate() first passes the prompt ids (empty with inputs_embeds)
            self.prompt_skipped = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self._send(text, final=False)

    def end(self) -> None:
        self._send(self.tokenizer.decode(self.ids, skip_special_tokens=True), final=True)

    def _send(self, text: str, *, final: bool) -> None:
        if self.ended:
            return
        for marker in self.markers:
            at = text.find(marker)
            if at >= 0:
                text, self.ended = text[:at], True
        if not self.ended and not final:  # a tail that may begin a marker waits
            for marker in self.markers:
                size = next((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:n])), 0)
                text = text[: len(text) - size]
        if len(text) > self.sent:
            self.events.put(("text", text[self.sent :]))
            self.sent = len(text)


class ChatEngine:
    """Runs chat requests on one pipeline, one at a time, and saves their media in per-session folders.

    Args:
        pipe: an ``AnyGPTPipeline``.
        output_dir: the folder under whose ``sessions/`` every session gets its own subfolder (created).
        max_upload_bytes: the largest accepted upload; larger files are answered with an error in the chat.
        max_message_chars: the longest message text; a longer one is answered with an error, not run.
        display_size: generated images and video frames smaller than this (px, longer side) are saved enlarged,
            nearest-neighbour, by a whole factor (``upscaled``); None or 0 saves them as the decoders made them.

    Attributes:
        stop_grace_s: after a stop, how long a reply waits for the model to end before it reports "stopping" and
            returns (the worker still ends the request and records its end state).
        poll_s: how often a waiting reply checks for stop when the model sends nothing.
        heartbeat_s: a reply yields at least this often, changed or not, so that a consumer that went away (a
            cancelled Gradio event closes the generator at its next yield) stops the request soon.
    """

    stop_grace_s: float = 5.0
    poll_s: float = 0.1
    heartbeat_s: float = 1.0

    def __init__(
        self,
        pipe,
        output_dir: str | os.PathLike,
        *,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS,
        display_size: int | None = DEFAULT_DISPLAY_SIZE,
    ):
        self.pipe = pipe
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_message_chars = int(max_message_chars)
        self.display_size = int(display_size or 0)
        self._lock = threading.Lock()
        self._owners_lock = threading.Lock()
        # the live sessions by id (weak: the UI's state keeps a session alive; one it dropped is nobody's)
        self._sessions: weakref.WeakValueDictionary[str, ChatSession] = weakref.WeakValueDictionary()
        self._uploads: dict[Path, set[str]] = {}  # an upload's path -> the owners who uploaded it

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | os.PathLike,
        output_dir: str | os.PathLike,
        *,
        runtime: RuntimeOptions | None = None,
        **kwargs: Any,
    ) -> ChatEngine:
        """Load ``AnyGPTPipeline.from_pretrained(name_or_dir, runtime=runtime)`` and wrap it."""
        return cls(AnyGPTPipeline.from_pretrained(name_or_dir, runtime=runtime), output_dir, **kwargs)

    @property
    def sessions_dir(self) -> Path:
        return self.output_dir / "sessions"

    def new_session(self, owner: str | None = None) -> ChatSession:
        """A fresh session whose files go to ``output_dir/sessions/<random id>/`` (created when first needed).

        Args:
            owner: the key of the client that asks (see ``may_read``): only it may fetch the session's files. None:
                nobody may (a client that sent no key).
        """
        session = ChatSession(
            output_dir=self.sessions_dir / secrets.token_hex(16), owner=owner or None, conversation=Conversation()
        )
        session._on_close = self._forget_session
        with self._owners_lock:
            self._sessions[session.id] = session
        return session

    def _forget_session(self, session: ChatSession) -> None:
        with self._owners_lock:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]

    # ------------------------------------------------------------------------------------------ file ownership
    def grant(self, paths: Sequence[str | os.PathLike], owner: str | None) -> None:
        """Record uploaded files (in the output folder) as ``owner``'s: ``may_read`` lets it fetch them.

        The same content uploaded by two clients may land at one path (Gradio names upload folders by a hash of the
        content): each of them may read it.
        """
        if not owner:
            return
        with self._owners_lock:
            if len(self._uploads) > 4096:  # forget the uploads that Gradio's sweep or a clear has removed
                self._uploads = {p: o for p, o in self._uploads.items() if p.exists()}
            for path in paths:
                self._uploads.setdefault(_resolved(path), set()).add(owner)

    def may_read(self, path: str | os.PathLike, owner: str | None) -> bool:
        """Whether the client ``owner`` may fetch (or send as input) the file at ``path``.

        Inside the output folder a session's files are its owner's only, an upload is its uploaders' only
        (``grant``), and anything else there (files of an ended session or an earlier run, the folders themselves)
        is nobody's. A path outside the output folder is not the engine's to refuse (True): the server's own rules
        apply (Gradio serves nothing outside its allowed folders).
        """
        spellings = {Path(os.path.abspath(str(path))), _resolved(path)}  # as written and with symlinks resolved
        inside = [p for p in spellings if p.is_relative_to(self.output_dir)]
        if not inside:
            return True
        return bool(owner) and all(self._owns(p, owner) for p in inside)

    def _owns(self, path: Path, owner: str) -> bool:
        parts = path.relative_to(self.output_dir).parts
        with self._owners_lock:
            if parts[:1] == (self.sessions_dir.name,):
                session = self._sessions.get(parts[1]) if len(parts) >= 3 else None
                return session is not None and session.owner == owner
            return owner in self._uploads.get(_resolved(path), ())

    def decoder_defaults(self) -> dict[str, dict[str, Any]]:
        """Each output modality's decoder defaults (steps, guidance, frames, seconds), for the UI's controls."""
        result = {}
        for modality, decoder in self.pipe.decoders.items():
            config = decoder.config
            result[modality.value] = dict(
                num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale,
                num_frames=config.num_frames,
                audio_seconds=config.audio_seconds,
            )
        return result

    @property
    def output_modalities(self) -> list[str]:
        return [m.value for m in self.pipe.decoders]

    # ------------------------------------------------------------------------------------------ requests
    def respond(
        self,
        session: ChatSession,
        text: str,
        files: Sequence[str | os.PathLike],
        settings: GenerationRequest | Mapping[str, Any],
        *,
        submitted_at: float | None = None,
    ) -> Iterator[Exchange]:
        """Ask one question; yield the (growing) exchange after every change until its reply is done.

        Bad uploads and bad settings end the reply with ``error`` set; the session stays usable. Nothing is yielded
        for an empty message, or for a request sent before the session's last clear. The new exchange is appended
        to ``session.exchanges`` at once.

        Args:
            settings: how to answer: a ``GenerationRequest`` whose prompt and media the message replaces, or its
                other fields as a mapping (``request_fields``); checked when the request starts. A seed of None
                draws a fresh one for this request.
            submitted_at: when the user sent it (``time.monotonic()``; default: now). A ``session.stop()`` after
                that time stops it even if it had not started yet (it waited in a queue).
        """
        text = (text or "").strip()
        paths = [Path(f) for f in files or []]
        if not text and not paths:
            return
        submitted = time.monotonic() if submitted_at is None else submitted_at
        with session.lock:
            if submitted <= session._cleared_at:
                return
            exchange = Exchange(text=text, files=paths)
            session.exchanges.append(exchange)
        yield from self._run(session, exchange, settings, submitted)

    def retry(
        self,
        session: ChatSession,
        settings: GenerationRequest | Mapping[str, Any],
        *,
        submitted_at: float | None = None,
    ) -> Iterator[Exchange]:
        """Ask the last question shown again: its exchange leaves the chat, and the conversation if it was kept.

        The conversation loses its last exchange (``Conversation.pop_last_exchange``) only when that is this
        exchange's turns; a stopped or failed answer was never kept, so the conversation stays as it is.
        """
        submitted = time.monotonic() if submitted_at is None else submitted_at
        with session.lock:
            if not session.exchanges or submitted <= session._cleared_at:
                return
            last = session.exchanges.pop()
            session._forget(last)
            exchange = Exchange(text=last.text, files=last.files)
            session.exchanges.append(exchange)
        yield from self._run(session, exchange, settings, submitted)

    def stop(self, session: ChatSession, wait: float = 0.0) -> bool:
        """``session.stop()``, then wait up to ``wait`` seconds for its requests to end; True when none runs."""
        session.stop()
        return session.wait(wait)

    def _run(
        self,
        session: ChatSession,
        exchange: Exchange,
        settings: GenerationRequest | Mapping[str, Any],
        submitted: float,
    ) -> Iterator[Exchange]:
        reply, epoch = exchange.reply, session.epoch
        start = time.perf_counter()
        stop = session._begin(submitted)
        worker_started = False
        try:
            try:
                request = self.build_request(settings, exchange, owner=session.owner)
            except (UsageError, MediaError, ValueError, TypeError) as error:
                logger.warning("demo request refused: %s", error)
                with session.lock:
                    reply.error, reply.status = _user_message(error, exchange.files, self.output_dir), "error"
                    reply.done = True
                yield exchange
                return

            events: queue.Queue = queue.Queue()
            worker = threading.Thread(
                target=contextvars.copy_context().run,
                args=(self._work, events, stop, session, epoch, exchange, request, start),
                name="anygpt-demo-request",
                daemon=True,
            )
            reply.status = "waiting for the model (another request is running)" if self._lock.locked() else "writing"
            worker.start()
            worker_started = True  # from here on the worker ends the request and records how it ended
            yield exchange
            stop_seen: float | None = None
            last_yield = time.monotonic()
            while True:
                changed = time.monotonic() - last_yield >= self.heartbeat_s
                for kind, payload in _drain(events, self.poll_s):
                    changed = self._apply(session, kind, payload, exchange) or changed
                if session.epoch != epoch:  # the chat was cleared meanwhile: this reply is no longer shown
                    return
                if reply.done:
                    yield exchange
                    return
                if stop.is_set():
                    now = time.monotonic()
                    stop_seen = stop_seen or now
                    with session.lock:
                        if not reply.done and not reply.status.startswith("stopping"):
                            reply.status, changed = "stopping", True
                    if now - stop_seen > self.stop_grace_s:  # a long step: report, and let the worker end it
                        with session.lock:
                            if not reply.done:
                                reply.status = "stopping (the model ends its current step)"
                        yield exchange
                        return
                if changed:
                    yield exchange
                    last_yield = time.monotonic()
        finally:
            if not reply.done:  # cleared, or the UI went away (a cancelled event): let the worker end
                stop.set()
            if not worker_started:
                session._end(stop)

    def build_request(
        self, settings: GenerationRequest | Mapping[str, Any], exchange: Exchange, owner: str | None = None
    ) -> GenerationRequest:
        """The request of one exchange: its text (checked: length) and uploads (checked: whose, kind by name, size)
        with ``settings`` (checked by ``GenerationRequest``, the one place that knows each field's range).

        Args:
            owner: the asking session's owner: a file of the output folder must be one it may read (``may_read``).

        Raises:
            MediaError: a bad upload (``check_upload``), or another client's file.
            UsageError: a message over ``max_message_chars``, or a bad setting, naming it and its range.
        """
        if len(exchange.text) > self.max_message_chars:
            raise UsageError(
                f"message too long: {len(exchange.text):,} characters, the limit is {self.max_message_chars:,}; "
                "shorten it and send it again"
            )
        media: dict[str, list[Path]] = {m.plural: [] for m in MEDIA_MODALITIES}
        for path in exchange.files:
            if not self.may_read(path, owner):
                raise MediaError(f"{path.name}: not a file of this session (upload it again)")
            media[check_upload(path, self.max_upload_bytes).plural].append(path)
        if isinstance(settings, GenerationRequest):
            request = dataclasses.replace(settings, prompt=exchange.text, **media)
        else:
            request = GenerationRequest.from_dict({**settings, "prompt": exchange.text, **media})
        if request.seed is None:  # a fresh seed for each request
            request.seed = int.from_bytes(os.urandom(4), "little")
        return request

    @staticmethod
    def _apply(session: ChatSession, kind: str, payload: Any, exchange: Exchange) -> bool:
        """Show one progress event from the worker; True when the reply changed."""
        reply = exchange.reply
        with session.lock:
            if reply.done or kind == "end":
                return False
            if kind == "start":
                reply.status = "writing"
            elif kind == "text":
                reply.text += payload
            elif kind == "load":
                reply.status, reply.progress = f"loading the {payload.value} decoder", None
            elif kind == "decode":
                modality, index, total, steps = payload
                reply.status, reply.progress = f"rendering {modality.value} ({index + 1}/{total})", (0, steps)
            elif kind == "step":
                step, total = payload
                if reply.progress is None or reply.progress[0] == step:
                    return False
                reply.progress = (step, max(step, total or reply.progress[1]))
            return True

    def _work(
        self,
        events: queue.Queue,
        stop: threading.Event,
        session: ChatSession,
        epoch: int,
        exchange: Exchange,
        request: GenerationRequest,
        start: float,
    ) -> None:
        """The worker thread: one pipeline call under the lock, then the outputs are saved.

        It alone decides how the request ended and records it: a finished answer is kept in the conversation; a
        stopped or failed one, or one no longer shown (cleared, or replaced by a retry), is removed from it. A
        stopped answer keeps the media rendered before the stop (saved and shown).
        """

        def on_decode(modality: Modality, index: int, total: int) -> None:
            decoder = self.pipe.decoders[modality]
            if not getattr(decoder, "is_loaded", True):  # its first use: loading is not rendering
                events.put(("load", modality))
                decoder.load()
            steps = request.decoder_settings(modality).get("num_inference_steps")
            steps = steps or getattr(getattr(decoder, "config", None), "num_inference_steps", None) or 0
            events.put(("decode", (modality, index, total, int(steps))))

        def on_step(pipe: Any, step: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            total = getattr(pipe, "_num_timesteps", None)  # a scheduler may run more steps than asked for
            events.put(("step", (step + 1, total if isinstance(total, int) else None)))
            return callback_kwargs

        output, error = None, None
        stem = ""
        try:
            with self._lock:
                conversation = session.conversation
                before = len(conversation.turns)
                try:
                    if stop.is_set():
                        raise GenerationStopped("stopped before it started")
                    stem = session.next_stem()
                    events.put(("start", None))
                    output = self.pipe.run(
                        request,
                        conversation=conversation,
                        streamer=_QueueStreamer(
                            self.pipe.tokenizer,
                            events,
                            stop,
                            get_template(self.pipe.config.llm.template).end_of_turn,
                        ),
                        on_decode=on_decode,
                        should_stop=stop.is_set,
                        callback_on_step_end=on_step,
                        show_progress=False,  # no progress bars in the server's log: the reply reports the steps
                    )
                except GenerationStopped as stopped:
                    logger.info("demo request %s", stopped)
                except (UsageError, MediaError, ValueError, TypeError) as failure:
                    logger.warning("demo request failed: %s", failure)
                    error = failure
                except Exception as failure:  # keep serving: report it in the chat, log the traceback
                    logger.exception("demo request failed")
                    error = RuntimeError(f"internal error: {type(failure).__name__}: {failure}")
                finally:
                    # decided under the model lock: no other request has touched the conversation since
                    with session.lock:
                        added = conversation.turns[before:]
                        keep = output is not None and not output.stopped and not error
                        keep = keep and session.epoch == epoch and session._shows(exchange)
                        if keep:
                            exchange.turns, exchange.kept = tuple(added), True
                        else:
                            del conversation.turns[before:]
                            exchange.turns, exchange.kept = (), False

            saved: dict[str, list[Path]] = {"image": [], "video": [], "audio": []}
            if output is not None and session.epoch == epoch:
                try:
                    saved = self.save_outputs(output, session.output_dir, stem)
                except Exception as failure:
                    if session.epoch == epoch:  # (a clear meanwhile removes the folder: nobody shows this reply)
                        logger.exception("demo request: saving the outputs failed")
                        error = RuntimeError(f"could not save the outputs: {type(failure).__name__}: {failure}")
            self._finish(session, epoch, exchange, output, saved, error, start)
        finally:
            session._end(stop)
            events.put(("end", None))

    def _finish(
        self,
        session: ChatSession,
        epoch: int,
        exchange: Exchange,
        output: Any,
        saved: dict[str, list[Path]],
        error: BaseException | None,
        start: float,
    ) -> None:
        """Record the reply's end state (under the session lock)."""
        reply = exchange.reply
        with session.lock:
            if session.epoch != epoch or not session._shows(exchange):  # cleared or retried: nobody shows it
                for path in (p for paths in saved.values() for p in paths):
                    path.unlink(missing_ok=True)
                saved = {"image": [], "video": [], "audio": []}
            if error is not None:
                if exchange.kept:  # the outputs could not be saved: not a finished answer after all
                    session._forget(exchange)
                reply.error, reply.status = _user_message(error, exchange.files, self.output_dir), "error"
            elif output is None or output.stopped:
                reply.stopped, reply.status = True, "stopped"
            else:
                reply.status = f"done in {time.perf_counter() - start:.1f} s"
            reply.progress = None
            if output is not None:
                reply.text = output.text
                reply.images, reply.videos, reply.audios = saved["image"], saved["video"], saved["audio"]
            reply.done = True

    def save_outputs(self, output, folder: Path, stem: str) -> dict[str, list[Path]]:
        """Write an ``AnyGPTOutput``'s media as ``{stem}_image0.png``, ``_video0.mp4``, ``_audio0.wav`` (all or
        nothing), images and video frames enlarged to ``display_size`` (``upscaled``); returns the absolute paths
        per modality name."""
        if self.display_size:
            output = dataclasses.replace(
                output,
                images=[upscaled(image, self.display_size) for image in output.images],
                videos=[upscaled(video, self.display_size) for video in output.videos],
            )
        written = save_outputs(output, folder, stem)
        return {modality.value: [path.resolve() for path in paths] for modality, paths in written.items()}


def _drain(events: queue.Queue, timeout: float) -> list[tuple[str, Any]]:
    """Wait up to ``timeout`` seconds for the next event, then take every event already queued behind it."""
    try:
        items = [events.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            items.append(events.get_nowait())
        except queue.Empty:
            return items


def display_scale(width: int, height: int, size: int) -> int:
    """The whole factor that brings a ``width`` x ``height`` picture's longer side closest to ``size`` without going
    over it (1 for a picture as large as ``size`` or larger)."""
    return max(1, int(size) // max(int(width), int(height), 1))


def upscaled(item: Image.Image | Video, size: int = DEFAULT_DISPLAY_SIZE) -> Image.Image | Video:
    """An image or a video enlarged by ``display_scale``, nearest-neighbour: every pixel becomes a square block, so
    a 64 px picture shows sharp at 256 px. Returned unchanged when it is already ``size`` or larger.

    Raises:
        TypeError: ``item`` is neither a ``PIL.Image.Image`` nor a ``Video``.
    """
    if isinstance(item, Image.Image):
        factor = display_scale(item.width, item.height, size)
        if factor == 1:
            return item
        return item.resize((item.width * factor, item.height * factor), Image.Resampling.NEAREST)
    if isinstance(item, Video):
        frames = np.asarray(item.frames)
        factor = display_scale(frames.shape[2], frames.shape[1], size)
        if factor == 1:
            return item
        return Video(frames.repeat(factor, axis=1).repeat(factor, axis=2), item.fps)
    raise TypeError(f"expected an image or a Video, got {type(item).__name__}")


def _resolved(path: str | os.PathLike) -> Path:
    """``path`` made absolute and resolved (symlinks, ``..``), as Gradio resolves the paths it serves."""
    return Path(os.path.abspath(str(path))).resolve()


def default_output_dir() -> Path:
    """A fresh temporary folder for a demo run's files (``anygpt-demo-XXXX`` in the system's temp folder)."""
    return Path(tempfile.mkdtemp(prefix="anygpt-demo-"))
