"""The anygpt chat demo: a Gradio page over ``anygpt.apps.chat.ChatEngine`` (no model logic here).

    python app.py [--model NAME|DIR] [--host 127.0.0.1] [--port 7860] [--share] [--output-dir DIR]
                  [--max-upload-mb 100] [--max-message-chars 2000] [--display-size 256] [--queue-size 16]
                  [--device cuda --dtype bfloat16 --offload model ...]

Each browser session has its own ``ChatSession`` (a gr.State, ended and its files removed when the tab closes or it
expires); generated files go to ``OUTPUT_DIR/sessions/<random id>/``. The output folder is Gradio's own cache folder,
so the files are served where they are written, never copied, and nothing outside it is served; inside it, a file is
served only to the client that made or uploaded it (``SessionFiles``, a cookie). Model calls run one at a time: the
queue's concurrency limit is 1 for every event that calls the model, and the engine holds a lock. Stop and Clear
never wait behind the model and are never refused by a full queue. SIGTERM and Ctrl-C stop the server and remove the
temporary output folder.

API (``gradio_client``): ``/chat`` (send a message), ``/retry``, ``/stop``, ``/clear``; see docs/demo.md.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import re
import secrets
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
from anygpt.base.logs import quiet_import_notices  # noqa: E402

if __name__ == "__main__":
    quiet_import_notices()  # before diffusers and transformers are imported

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from anygpt.apps.chat import (  # noqa: E402
    DEFAULT_DISPLAY_SIZE,
    DEFAULT_MAX_MESSAGE_CHARS,
    DEFAULT_MAX_UPLOAD_BYTES,
    ChatEngine,
    ChatSession,
    Exchange,
    default_output_dir,
    request_fields,
)
from anygpt.apps.runtime_args import add_runtime_arguments, runtime_options  # noqa: E402
from anygpt.base.errors import UsageError  # noqa: E402
from anygpt.core.config import DEFAULT_MODEL  # noqa: E402

logger = logging.getLogger("anygpt.app")

MODEL_EVENTS = "model"  # the concurrency group of every event that calls the model
SESSION_TTL_S = 24 * 3600  # a session unused this long ends (its files are removed)
CACHE_SWEEP = (3600, 24 * 3600)  # every hour, Gradio deletes the files it served that are older than a day
STOP_WAIT_S = 3.0  # Stop waits this long for the running answer to end before it shows the chat
CHOICES = ["auto", "image", "video", "audio"]
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
STOPPED_NOTE = "_(stopped: not part of the conversation)_"
OWNER_COOKIE = "anygpt_demo_key"  # the client's key: the files it made or uploaded are served to it only
OWNER_KEY = re.compile(r"[A-Za-z0-9_-]{32,64}")
MEDIA_PX = 256  # generated images and videos are shown this large (CSS; the files are saved this large too)

EXAMPLES = [
    "draw a red circle",
    "play a high beep",
    "show a green square moving left",
    "draw a blue triangle and play a low beep",
    "draw a red circle and play a high beep and show a green square moving left",
]
"""Prompts a click away under the message box; the default model (``toyworld``) answers each with its media."""

MODEL_KNOWS = {
    "toyworld": """**What this model knows**: a toy world, nothing else.

- **images** (64 px): one **red**, **green**, **blue** or **yellow** **circle**, **square** or
  **triangle** on white
- **sounds** (1 s): a **low**, **mid** or **high** tone, **steady** or **pulsed** (a "beep")
- **clips** (8 frames): a coloured square moving **left**, **right**, **up** or **down**

Ask for one or several at once, attach one and ask what it is, or change the last one ("now make it blue",
"now make it move up"). Anything else ("draw a cat") is declined.""",
    "tiny": """**What this model knows**: nothing. `tiny` is the random test model: its text is gibberish and its
media are noise; use it to try the page, not the answers.""",
}
"""The "what this model knows" box per model name; the vocabulary is the model card's (``toyworld``'s README)."""

CSS = f"""
#chat video, #chat [data-testid=bot] img {{ image-rendering: pixelated; }}
#chat [data-testid=bot] video {{ width: {MEDIA_PX}px; height: {MEDIA_PX}px; max-width: 100%; object-fit: contain; }}
#chat [data-testid=bot] img {{ width: {MEDIA_PX}px; max-width: 100%; height: auto; max-height: none; }}
"""
"""Generated media shown large (nearest-neighbour: the 64 px pixels stay sharp squares) with room for the player."""


# ---------------------------------------------------------------------------------------------------- rendering
def to_messages(exchanges: list[Exchange]) -> list[dict[str, Any]]:
    """The exchanges as Chatbot messages: user text and uploads; reply text, status or error, then generated media."""
    messages: list[dict[str, Any]] = []
    for exchange in exchanges:
        user: list[Any] = [_printable(exchange.text)] if exchange.text else []
        user += [{"path": str(path)} for path in exchange.files]
        messages.append({"role": "user", "content": user})
        reply = exchange.reply
        if reply.error:
            text = f"⚠️ {reply.error}"
        elif reply.stopped:
            text = f"{_printable(reply.text)} {STOPPED_NOTE}".strip()
        else:
            text = _printable(reply.text) or ("" if reply.done else f"_{reply.status}…_")
        content: list[Any] = [text] if text else []
        if reply.text and not reply.done and reply.status.startswith(("rendering", "loading")):
            content.append(f"_{reply.status}…_")
        content += [{"path": str(path)} for path in reply.files]
        messages.append({"role": "assistant", "content": content or ["(no text)"]})
    return messages


def _printable(text: str) -> str:
    """Text without control characters (an untrained model's bytes), line breaks and tabs kept."""
    return CONTROL_CHARACTERS.sub("", text)


# ---------------------------------------------------------------------------------------------------- the page
def build_app(
    engine: ChatEngine,
    *,
    model: str | None = None,
    title: str = "anygpt chat",
    note: str = "",
    session_ttl: float = SESSION_TTL_S,
    delete_cache: tuple[int, int] | None = CACHE_SWEEP,
) -> gr.Blocks:
    """The chat page, wired to ``engine``. Call ``.queue(...)`` and ``.launch(...)`` on it (see ``serve``).

    Args:
        model: the model's name (a preset, a packaged model or a folder): picks the "what this model knows" box
            (none for a model without one, or None).
        session_ttl: seconds after its last update that a session ends (``ChatSession.close``: files removed).
        delete_cache: Gradio's ``(every, older than)`` seconds sweep of the files it served (uploads, outputs).
    """
    with gr.Blocks(title=title, analytics_enabled=False, fill_height=True, delete_cache=delete_cache) as demo:
        # one session per browser session, created by its first event; closed when the tab goes or it expires
        session = gr.State(None, time_to_live=session_ttl, delete_callback=_end_session)
        page = _layout(title, note, model_knows(model), engine)
        _wire_events(ChatHandlers(engine), page, session)
    return demo


def model_knows(model: str | os.PathLike | None) -> str:
    """The "what this model knows" box of a model: its text by name (``MODEL_KNOWS``), or by a folder's name; ""
    for another model."""
    if not model:
        return ""
    name = str(model)
    return MODEL_KNOWS.get(name) or MODEL_KNOWS.get(Path(name).name, "")


class Page(NamedTuple):
    """The page's components that events read or write; ``controls`` in the order of ``ChatHandlers.chat``'s
    parameters after ``message``."""

    chatbot: gr.Chatbot
    status: gr.Textbox
    message: gr.MultimodalTextbox
    examples: gr.Examples
    send: gr.Button
    stop: gr.Button
    retry: gr.Button
    clear: gr.Button
    controls: list[gr.components.Component]


def _layout(title: str, note: str, knows: str, engine: ChatEngine) -> Page:
    """The components, laid out: the chat, status, message box, buttons and examples on the left; what the model
    knows and the settings on the right."""
    gr.Markdown(f"## {title}\nText, images, audio and video in; text, images, video and audio out. {note}")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(
                elem_id="chat",
                label="Chat",
                height="68vh",
                min_height=420,
                placeholder="Ask something, or click an example below; attach images, audio or video with the "
                "paper clip.",
                feedback_options=None,
                buttons=["copy_all"],
                group_consecutive_messages=False,
            )
            status = gr.Textbox(
                "", label="Status", elem_id="status", interactive=False, lines=1, max_lines=1, min_width=160
            )
            message = gr.MultimodalTextbox(
                label="Message",
                show_label=False,
                elem_id="msg",
                placeholder=f"Type a message (up to {engine.max_message_chars:,} characters); attach images, audio "
                "or video…",
                file_count="multiple",  # any file: the engine checks kind and size, and answers in the chat
                sources=["upload"],
                submit_btn=False,
                autofocus=True,
                # longer pasted text stays text (not a .txt attachment), for the engine to answer "too long"
                max_plain_text_length=10 * engine.max_message_chars,
            )
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="send")
                stop = gr.Button("Stop", variant="stop", elem_id="stop")
                retry = gr.Button("Retry last turn", elem_id="retry")
                clear = gr.Button("Clear", elem_id="clear")
            examples = gr.Examples(
                [[{"text": prompt, "files": []}] for prompt in EXAMPLES],
                inputs=[message],
                label="Examples: click one to send it",
                elem_id="examples",
                api_visibility="private",
            )
        with gr.Column(scale=1, min_width=280):
            if knows:
                gr.Markdown(knows, elem_id="knows", container=True, padding=True)
            controls = _controls(engine.output_modalities, engine.decoder_defaults())
    return Page(chatbot, status, message, examples, send, stop, retry, clear, controls)


def _wire_events(handlers: ChatHandlers, page: Page, session: gr.State) -> None:
    """Connect the buttons, the message box and the examples to the handlers (the API routes ``/chat``,
    ``/retry``, ``/stop``, ``/clear``)."""
    inputs = [*page.controls, session]
    progress = dict(concurrency_id=MODEL_EVENTS, show_progress="full", show_progress_on=[page.status])
    chat_outputs = [page.chatbot, page.message, page.status, session]
    chat_args = dict(fn=handlers.chat, inputs=[page.message, *inputs], outputs=chat_outputs, **progress)
    retry_args = dict(fn=handlers.retry, inputs=inputs, outputs=[page.chatbot, page.status, session], **progress)
    model_events = [
        page.message.submit(**chat_args, api_name="chat"),
        page.send.click(**chat_args, api_visibility="private"),
        page.retry.click(**retry_args, api_name="retry"),
        # an example goes into the message box (Gradio's own event), then is sent
        page.examples.load_input_event.then(**chat_args, api_visibility="private"),
    ]
    # Stop and Clear are instant and do not call the model: no concurrency limit (they never wait behind the
    # model nor behind each other), exempt from the queue's size limit (limit_model_events), and open to the REST
    # route too (queue=False). In the browser they also cancel this session's model events, queued or running
    # (cancels=); over the API, job.cancel() does that for a job.
    instant = dict(queue=False, concurrency_limit=None, outputs=[page.chatbot, page.status, session])
    stop_args = dict(fn=handlers.stop, inputs=[session], **instant)
    page.stop.click(**stop_args, api_name="stop", cancels=model_events)
    clear_args = dict(fn=handlers.clear, inputs=[session], **instant)
    page.clear.click(**clear_args, api_name="clear", cancels=model_events)
    page.chatbot.clear(**clear_args, api_visibility="private", cancels=model_events)  # the chat's own trash can


def range_free_slider(*args: Any, **kwargs: Any) -> gr.Slider:
    """A ``gr.Slider`` whose range is the page's only: a value sent over the API outside it is passed on unchecked, so
    that the engine's one validation (``GenerationRequest``) answers it in the chat, naming the field and its range
    (Gradio's own check would answer "Value 5 is greater than maximum value 2.0." as an error event).

    The slider's ``preprocess`` is replaced on the instance: a subclass of a Gradio component would make Gradio
    write an ``app.pyi`` stub next to this file whenever it is imported.
    """
    slider = gr.Slider(*args, **kwargs)

    def preprocess(payload: Any) -> Any:
        if isinstance(payload, int | float) and not isinstance(payload, bool):
            return gr.Number.round_to_precision(payload, slider.precision)
        return payload

    slider.preprocess = preprocess
    return slider


class ChatHandlers:
    """The page's event handlers over one engine. Their parameter names are the API's argument names."""

    def __init__(self, engine: ChatEngine):
        self.engine = engine
        self.available = engine.output_modalities

    def _session(self, session: ChatSession | None, request: gr.Request | None) -> ChatSession:
        return session if session is not None else self.engine.new_session(owner=request_owner(request))

    def settings(
        self,
        outputs: list[str],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        image_steps: int,
        image_guidance: float,
        video_steps: int,
        video_guidance: float,
        video_frames: int,
        audio_steps: int,
        audio_guidance: float,
        audio_seconds: float,
        seed: int,
    ) -> dict[str, Any]:
        """The request's fields from the controls (those of decoders the model lacks are left out)."""
        steps = {"image": image_steps, "video": video_steps, "audio": audio_steps}
        guidance = {"image": image_guidance, "video": video_guidance, "audio": audio_guidance}
        return request_fields(
            outputs,
            temperature,
            top_p,
            max_new_tokens,
            steps={k: v for k, v in steps.items() if k in self.available},
            guidance={k: v for k, v in guidance.items() if k in self.available},
            num_frames=video_frames if "video" in self.available else None,
            audio_seconds=audio_seconds if "audio" in self.available else None,
            seed=seed,
        )

    def chat(
        self,
        message: dict | str | None,
        outputs: list[str],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        image_steps: int,
        image_guidance: float,
        video_steps: int,
        video_guidance: float,
        video_frames: int,
        audio_steps: int,
        audio_guidance: float,
        audio_seconds: float,
        seed: int,
        session: ChatSession | None,
        request: gr.Request = None,
    ):
        """Send a message (text and uploaded files) and stream the reply."""
        submitted = _enqueued_at()
        session = self._session(session, request)
        if isinstance(message, str):
            message = {"text": message, "files": []}
        text = (message or {}).get("text") or ""
        files = [_file_path(f) for f in (message or {}).get("files") or []]
        settings = self.settings(
            outputs,
            temperature,
            top_p,
            max_new_tokens,
            image_steps,
            image_guidance,
            video_steps,
            video_guidance,
            video_frames,
            audio_steps,
            audio_guidance,
            audio_seconds,
            seed,
        )
        yield to_messages(session.exchanges), gr.MultimodalTextbox(value=None), "", session
        updates = self.engine.respond(session, text, files, settings, submitted_at=submitted)
        for chat, status in _shown(session, updates):
            yield chat, gr.skip(), status, session

    def retry(
        self,
        outputs: list[str],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        image_steps: int,
        image_guidance: float,
        video_steps: int,
        video_guidance: float,
        video_frames: int,
        audio_steps: int,
        audio_guidance: float,
        audio_seconds: float,
        seed: int,
        session: ChatSession | None,
        request: gr.Request = None,
    ):
        """Ask the last message again; its previous answer is removed from the conversation first."""
        submitted = _enqueued_at()
        session = self._session(session, request)
        settings = self.settings(
            outputs,
            temperature,
            top_p,
            max_new_tokens,
            image_steps,
            image_guidance,
            video_steps,
            video_guidance,
            video_frames,
            audio_steps,
            audio_guidance,
            audio_seconds,
            seed,
        )
        yield to_messages(session.exchanges), "", session
        for chat, status in _shown(session, self.engine.retry(session, settings, submitted_at=submitted)):
            yield chat, status, session

    def stop(self, session: ChatSession | None, request: gr.Request = None):
        """Stop this session's answers, running or queued: the text at its next token, a decoder after its step.

        A session that has none yet (its first message still queued) is created here, stopped: the queued message
        reads it when it starts, and ends as stopped.
        """
        session = self._session(session, request)
        ended = self.engine.stop(session, wait=STOP_WAIT_S)
        last = session.exchanges[-1].reply if session.exchanges else None
        status = "stopping" if not ended else (last.status if last is not None else "")
        return to_messages(session.exchanges), status, session

    def clear(self, session: ChatSession | None, request: gr.Request = None):
        """Forget the conversation and remove the session's files."""
        session = self._session(session, request)
        session.clear()
        return [], "", session


def _shown(session: ChatSession, updates):
    """``(chat, status)`` for each update of a reply: the chat when what it shows changed and at the end
    (``gr.skip()`` otherwise: a denoising step changes the status, not the chat)."""
    shown = None
    for exchange in updates:
        reply = exchange.reply
        key = (len(reply.text), reply.status, reply.done, reply.error, len(reply.files), len(session.exchanges))
        changed = key != shown or reply.done  # (the last update always carries the chat: the API's result)
        yield (to_messages(session.exchanges) if changed else gr.skip()), status_text(reply)
        shown = key


def status_text(reply) -> str:
    """The status box's text: the reply's status, with the denoising step while a decoder renders
    (``rendering video (2/3): step 5 of 20``)."""
    if reply.progress is not None and not reply.done and reply.progress[1]:
        return f"{reply.status}: step {reply.progress[0]} of {reply.progress[1]}"
    return reply.status


def request_owner(request: gr.Request | None) -> str | None:
    """The client's key (the ``OWNER_COOKIE`` that ``SessionFiles`` gives every client), or None."""
    try:
        value = request.cookies.get(OWNER_COOKIE) if request is not None else None
    except Exception:  # a Request without an HTTP request behind it
        return None
    return value if isinstance(value, str) and OWNER_KEY.fullmatch(value) else None


def _controls(available: list[str], defaults: dict[str, dict[str, Any]]) -> list[gr.components.Component]:
    """The settings column; returns the controls in the order of ``chat``'s parameters after ``message``.

    The sliders' ranges are the page's; the API may send any value, which the engine checks (``range_free_slider``).
    """
    outputs = gr.CheckboxGroup(
        CHOICES[:1] + [m for m in CHOICES[1:] if m in available],
        value=["auto"],
        label="Output media",
        info="auto: the model decides; tick media (without auto) to force them; none: text only",
        elem_id="outputs",
    )
    slider = range_free_slider
    with gr.Accordion("Text", open=True):
        temperature = slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature")
        top_p = slider(0.05, 1.0, value=1.0, step=0.05, label="Top p", elem_id="top_p")
        max_new_tokens = slider(1, 1024, value=128, step=1, label="Max new tokens", elem_id="max_new_tokens")
        seed = gr.Number(0, precision=0, label="Seed (-1: random)", elem_id="seed")
    decoder_controls = []
    for modality in ("image", "video", "audio"):
        d = defaults.get(modality, {})
        with gr.Accordion(f"{modality.capitalize()} decoder", open=False, visible=modality in available):
            steps = d.get("num_inference_steps", 25)
            guidance = d.get("guidance_scale", 7.5)
            decoder_controls += [
                slider(1, 150, value=steps, step=1, label="Inference steps", elem_id=f"{modality}_steps"),
                slider(0.0, 20.0, value=guidance, step=0.1, label="Guidance scale", elem_id=f"{modality}_guidance"),
            ]
            if modality == "video":
                frames = d.get("num_frames", 16)
                decoder_controls.append(slider(1, 64, value=frames, step=1, label="Frames", elem_id="video_frames"))
            if modality == "audio":
                seconds = d.get("audio_seconds", 5.0)
                decoder_controls.append(
                    slider(0.5, 30.0, value=seconds, step=0.5, label="Seconds", elem_id="audio_seconds")
                )
    return [outputs, temperature, top_p, max_new_tokens, *decoder_controls, seed]


def _file_path(item: Any) -> str:
    """An uploaded file as a path: Gradio gives a path string or a dict with a ``path``."""
    if isinstance(item, dict):
        return str(item.get("path") or item.get("name") or "")
    return str(getattr(item, "path", item))


def _end_session(session: ChatSession | None) -> None:  # the browser tab closed, or the session expired
    if session is not None:
        session.close()


def _enqueued_at() -> float | None:
    """When the running event joined Gradio's queue (``time.monotonic()``), so that a Stop pressed while it waited
    still stops it; None (the engine then takes "now") where Gradio does not tell."""
    try:
        from gradio.context import LocalContext

        blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
        event = blocks._queue.event_ids_to_events.get(event_id)  # Gradio internals: best effort
        enqueued = float(event.enqueue_time)
    except Exception:
        return None
    return enqueued if enqueued <= time.monotonic() else None


# ---------------------------------------------------------------------------------------------------- serving files
class SessionFiles:
    """ASGI middleware that serves the output folder's files to their owners only.

    Every client gets a random key in a cookie (``OWNER_COOKIE``, set on the first response to a request without
    one, and added to that request as if it had been sent). The files a client uploads (``/gradio_api/upload``) are
    recorded as its own (``ChatEngine.grant``), its sessions are bound to its key (``ChatHandlers``), and a file
    request (``/gradio_api/file=PATH``, ``/gradio_api/file/PATH``) for a path in the output folder that the key may
    not read (``ChatEngine.may_read``) is answered 403, whoever knows the path. Other requests pass unchanged.
    """

    FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")
    UPLOAD_ROUTE = "/gradio_api/upload"

    def __init__(self, app, engine: ChatEngine):
        self.app = app
        self.engine = engine

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key = _cookie(scope.get("headers") or [], OWNER_COOKIE)
        new_key = None
        if key is None or not OWNER_KEY.fullmatch(key):
            key = new_key = secrets.token_urlsafe(32)
            cookie = (b"cookie", f"{OWNER_COOKIE}={key}".encode())
            scope = {**scope, "headers": [*(h for h in scope.get("headers") or [] if h[0] != b"cookie"), cookie]}
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if scope.get("method") in ("GET", "HEAD"):
            target = next((path[len(r) :] for r in self.FILE_ROUTES if path.startswith(r)), None)
            if target is not None and not self.engine.may_read(target, key):
                logger.info("refused a file of another client: %s", target)
                return await _respond(send, 403, b"File not allowed.", new_key)
        upload = scope.get("method") == "POST" and path.rstrip("/") == self.UPLOAD_ROUTE
        body: list[bytes] | None = [] if upload else None
        status = 0

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if new_key is not None:
                    message = {**message, "headers": [*message.get("headers", []), _set_cookie(new_key)]}
            elif message["type"] == "http.response.body" and body is not None:
                body.append(message.get("body", b""))
                if not message.get("more_body") and status == 200:
                    self._grant_uploads(b"".join(body), key)
            await send(message)

        await self.app(scope, receive, send_wrapper)

    def _grant_uploads(self, body: bytes, key: str) -> None:
        try:
            paths = json.loads(body)
        except ValueError:
            return
        if isinstance(paths, list):
            self.engine.grant([p for p in paths if isinstance(p, str)], key)


def _cookie(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    for header, value in headers:
        if header == b"cookie":
            for part in value.decode("latin-1").split(";"):
                cookie, _, content = part.strip().partition("=")
                if cookie == name:
                    return content
    return None


def _set_cookie(key: str) -> tuple[bytes, bytes]:
    return b"set-cookie", f"{OWNER_COOKIE}={key}; Path=/; HttpOnly; SameSite=Lax".encode()


async def _respond(send, status: int, text: bytes, new_key: str | None) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(text)).encode())]
    if new_key is not None:
        headers.append(_set_cookie(new_key))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text})


# ---------------------------------------------------------------------------------------------------- launching
def model_note(model: str) -> str:
    """The line under the title naming the model."""
    note = f"Model: `{model}`."
    if model == "tiny":
        note += " Its weights are random: its text is gibberish and its media are noise."
    return note


def gradio_environment(output_dir: str | os.PathLike) -> dict[str, str]:
    """Environment that makes ``output_dir`` Gradio's cache folder (set before building the page).

    Uploads land in ``output_dir/<hash>/``, and the generated files, written to ``output_dir/sessions/``, are
    already in the cache: Gradio serves them where they are, without copying (or hashing) them on every update.
    """
    root = Path(output_dir).expanduser().resolve()
    return {
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(root),
        "GRADIO_EXAMPLES_CACHE": str(root / "examples"),
    }


def launch_options(engine: ChatEngine, *, host: str, port: int, share: bool) -> dict[str, Any]:
    """``Blocks.launch`` keywords: bind ``host``, no share link unless asked, serve the sessions' files only, each
    to its owner (``SessionFiles``).

    Gradio serves its cache folder (the output folder, see ``gradio_environment``) in any case; ``allowed_paths``
    adds only the sessions' folder, for an engine whose output folder is not the cache.
    """
    return dict(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=[str(engine.sessions_dir)],
        # Gradio refuses uploads over twice the limit outright (an error toast); the engine answers files between
        # the limit and that with an error message in the chat.
        max_file_size=2 * engine.max_upload_bytes,
        ssr_mode=False,
        show_error=True,
        css=CSS,
        app_kwargs={"middleware": [Middleware(SessionFiles, engine=engine)]},
    )


def serve(
    engine: ChatEngine,
    *,
    model: str | None = None,
    note: str = "",
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    queue_size: int = 16,
    prevent_thread_lock: bool = False,
    **page: Any,
) -> gr.Blocks:
    """Build the page for ``engine`` and ``model`` (``page``: more ``build_app`` keywords) and launch it with a queue
    that runs one model call at a time. ``api_open=False``: the REST routes (``/gradio_api/run/*``) refuse queued
    events, so no request skips the queue or its size limit."""
    demo = build_app(engine, model=model, note=note, **page)
    demo.queue(default_concurrency_limit=1, max_size=queue_size, api_open=False)
    limit_model_events(demo, queue_size)
    demo.launch(**launch_options(engine, host=host, port=port, share=share), prevent_thread_lock=prevent_thread_lock)
    return demo


def output_folder(path: str | os.PathLike | None) -> Path:
    """``path``, or else a new temporary folder (``default_output_dir``) that is removed when the program exits.

    Gradio serves everything in the output folder (its cache folder), so a given folder must be new, empty, or one
    this demo used before (it holds ``sessions/``).

    Raises:
        ValueError: ``path`` is a file, or a folder with other content.
    """
    if path:
        folder = Path(path).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--output-dir {folder} is a file")
        if folder.is_dir() and any(folder.iterdir()) and not (folder / "sessions").is_dir():
            raise ValueError(
                f"--output-dir {folder} holds other files, and the page serves everything in its output folder: "
                "choose a new or empty folder, or one this demo used before"
            )
        return folder
    folder = default_output_dir()
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def limit_model_events(demo: gr.Blocks, max_size: int) -> bool:
    """Make the queue's size limit apply to waiting model events (chat, retry) only; True when it does.

    Gradio 6 sends every event through its queue, ``queue=False`` ones included, and its ``max_size`` refuses them
    all once that many events wait, so Stop and Clear would be refused exactly when the queue is full. Here the
    queue's ``push`` refuses a model event when ``max_size`` model events wait, and lets every other event in. This
    uses Gradio internals (``Blocks._queue``); where they differ, Gradio's own limit stays in force (False).
    """
    queue = getattr(demo, "_queue", None)
    groups = getattr(queue, "event_queue_per_concurrency_id", None)
    push = getattr(queue, "push", None)
    if not isinstance(groups, dict) or push is None or not isinstance(getattr(demo, "fns", None), dict):
        logger.warning("unknown Gradio queue: its size limit applies to Stop and Clear too")
        return False

    async def push_unless_full(body, request, username):
        fn = demo.fns.get(getattr(body, "fn_index", None))
        if getattr(fn, "concurrency_id", None) == MODEL_EVENTS:
            waiting = len(getattr(groups.get(MODEL_EVENTS), "queue", ()))
            if waiting >= max_size:
                return False, f"Queue is full. Max size is {max_size} and size is {waiting}.", "queue_full"
        return await push(body=body, request=request, username=username)

    queue.max_size = None
    queue.push = push_unless_full
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The anygpt chat demo (Gradio).")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"preset name or saved folder (default {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="a dedicated folder for uploads and generated files, all served by the page (default: a new temporary "
        "folder, removed at exit)",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
        help="largest accepted upload in MB (default %(default).0f)",
    )
    parser.add_argument(
        "--max-message-chars",
        type=int,
        default=DEFAULT_MAX_MESSAGE_CHARS,
        help="longest message text; longer ones are answered with an error, not run (default %(default)d)",
    )
    parser.add_argument(
        "--display-size",
        type=int,
        default=DEFAULT_DISPLAY_SIZE,
        help="generated images and video frames smaller than this (px) are saved enlarged by a whole factor, "
        "nearest-neighbour, to show large and sharp; 0 keeps the decoders' size (default %(default)d)",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=16,
        help="model requests (chat, retry) that may wait; Stop and Clear are never refused",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at INFO level, with the libraries' notices and bars"
    )
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    if args.max_upload_mb <= 0:
        parser.error("--max-upload-mb must be positive")
    if args.max_message_chars < 1:
        parser.error("--max-message-chars must be at least 1")
    if args.display_size < 0:
        parser.error("--display-size must be 0 (off) or a size in pixels")
    return args


def quiet_libraries(verbose: bool) -> None:
    """Keep the server's log to what matters: no deprecation notices nor loading bars from diffusers and
    transformers (the page shows the progress), unless ``verbose``."""
    if verbose:
        return
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


class Terminated(SystemExit):
    """SIGTERM arrived: unwinds ``main`` like Ctrl-C does, so that its clean-ups run (exit status 0)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated(0)


def main(argv: list[str] | None = None) -> None:
    """Serve the demo until Ctrl-C or SIGTERM; then stop the server and remove the temporary output folder."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    in_main_thread = threading.current_thread() is threading.main_thread()  # (signals are the main thread's)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        try:
            runtime = runtime_options(args)
            output_dir = output_folder(args.output_dir)
        except (UsageError, ValueError) as error:
            raise SystemExit(f"app.py: error: {error}") from None
        _serve_until_stopped(args, runtime, output_dir, in_main_thread)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _serve_until_stopped(args: argparse.Namespace, runtime, output_dir: Path, in_main_thread: bool) -> None:
    """Load the model, serve it, and wait for Ctrl-C or SIGTERM (``Terminated``); then clean up."""
    demo = None
    try:
        quiet_libraries(args.verbose)
        os.environ.update(gradio_environment(output_dir))
        engine = ChatEngine.from_pretrained(
            args.model,
            output_dir,
            runtime=runtime,
            max_upload_bytes=int(args.max_upload_mb * 2**20),
            max_message_chars=args.max_message_chars,
            display_size=args.display_size,
        )
        logger.warning("writing generated files to %s", engine.output_dir)
        demo = serve(
            engine,
            model=args.model,
            note=model_note(args.model),
            host=args.host,
            port=args.port,
            share=args.share,
            queue_size=args.queue_size,
            prevent_thread_lock=True,
        )
        while demo.is_running:
            time.sleep(0.2)
    except Terminated:
        logger.warning("SIGTERM: stopping")
    except KeyboardInterrupt:
        logger.warning("interrupted: stopping")
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the clean-up short
        if demo is not None:
            demo.close(verbose=False)
        if not args.output_dir:  # the temporary folder (atexit would remove it too, but not after a signal)
            shutil.rmtree(output_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
