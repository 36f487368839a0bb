"""The anygpt chat demo: a Gradio page over ``anygpt.demo.ChatEngine`` (no model logic here).

    python app.py [--model NAME|DIR] [--host 127.0.0.1] [--port 7860] [--share] [--output-dir DIR]
                  [--max-upload-mb 100] [--queue-size 16]

Each browser session has its own ``Conversation`` (gr.State); generated files go to ``OUTPUT_DIR/sessions/<id>/``, and
the page serves files from the output folder only (Gradio's own upload cache is placed inside it too). Model calls run
one at a time: the queue's concurrency limit is 1 for every event that calls the model, and the engine holds a lock.

API (``gradio_client``): ``/chat`` (send a message), ``/retry``, ``/stop``, ``/clear``; see ``docs/demo.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr  # noqa: E402

from anygpt.config import DEFAULT_MODEL  # noqa: E402
from anygpt.demo import (  # noqa: E402
    DEFAULT_MAX_UPLOAD_BYTES,
    ChatEngine,
    ChatSession,
    Exchange,
    GenerationSettings,
    default_output_dir,
)

logger = logging.getLogger("anygpt.app")

MODEL_EVENTS = "model"  # the concurrency group of every event that calls the model
CHOICES = ["auto", "image", "video", "audio"]
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


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
            text = f"{_printable(reply.text)} _(stopped)_".strip()
        else:
            text = _printable(reply.text) or ("" if reply.done else f"_{reply.status}…_")
        content: list[Any] = [text] if text else []
        if reply.text and not reply.done and reply.status.startswith("rendering"):
            content.append(f"_{reply.status}…_")
        content += [{"path": str(path)} for path in reply.files]
        messages.append({"role": "assistant", "content": content or ["(no text)"]})
    return messages


def _printable(text: str) -> str:
    """Text without control characters (an untrained model's bytes), line breaks and tabs kept."""
    return CONTROL_CHARACTERS.sub("", text)


# ---------------------------------------------------------------------------------------------------- the page
def build_app(engine: ChatEngine, *, title: str = "anygpt chat", note: str = "") -> gr.Blocks:
    """The chat page, wired to ``engine``. Call ``.queue(...)`` and ``.launch(...)`` on it (see ``serve``)."""
    defaults = engine.decoder_defaults()
    available = engine.output_modalities

    def settings(
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
    ) -> GenerationSettings:
        steps = {"image": image_steps, "video": video_steps, "audio": audio_steps}
        guidance = {"image": image_guidance, "video": video_guidance, "audio": audio_guidance}
        return GenerationSettings.from_controls(
            outputs,
            temperature,
            top_p,
            max_new_tokens,
            steps={k: v for k, v in steps.items() if k in available},
            guidance={k: v for k, v in guidance.items() if k in available},
            num_frames=video_frames if "video" in available else None,
            audio_seconds=audio_seconds if "audio" in available else None,
            seed=seed,
        )

    def chat(
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
        progress=gr.Progress(track_tqdm=True),  # noqa: B008 (Gradio's way to ask for progress bars)
    ):
        """Send a message (text and uploaded files) and stream the reply."""
        session = session if session is not None else engine.new_session()
        if isinstance(message, str):
            message = {"text": message, "files": []}
        text = (message or {}).get("text") or ""
        files = [_file_path(f) for f in (message or {}).get("files") or []]
        request = settings(
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
        for exchange in engine.respond(session, text, files, request):
            yield to_messages(session.exchanges), gr.skip(), exchange.reply.status, session

    def retry(
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
        progress=gr.Progress(track_tqdm=True),  # noqa: B008
    ):
        """Ask the last message again; its previous answer is removed from the conversation first."""
        session = session if session is not None else engine.new_session()
        request = settings(
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
        for exchange in engine.retry(session, request):
            yield to_messages(session.exchanges), exchange.reply.status, session

    def stop(session: ChatSession | None) -> str:
        """Stop the running answer: the text at its next token, the media before the next decoder."""
        if session is not None:
            session.stop()
        return "stopping"

    def clear(session: ChatSession | None):
        """Forget the conversation."""
        session = session if session is not None else engine.new_session()
        session.clear()
        return [], "", session

    with gr.Blocks(title=title, analytics_enabled=False, fill_height=True) as demo:
        session = gr.State(None, delete_callback=_end_session)
        gr.Markdown(f"## {title}\nText, images, audio and video in; text, images, video and audio out. {note}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    elem_id="chat",
                    label="Chat",
                    height="68vh",
                    min_height=420,
                    placeholder="Ask something; attach images, audio or video with the paper clip.",
                    feedback_options=None,
                    buttons=["copy_all"],
                    group_consecutive_messages=False,
                )
                status = gr.Markdown("", label="Status", elem_id="status", container=True, min_height=56)
                message = gr.MultimodalTextbox(
                    label="Message",
                    show_label=False,
                    elem_id="msg",
                    placeholder="Type a message; attach images, audio or video…",
                    file_count="multiple",  # any file: the engine checks kind and size, and answers in the chat
                    sources=["upload"],
                    submit_btn=False,
                    autofocus=True,
                )
                with gr.Row():
                    send_btn = gr.Button("Send", variant="primary", elem_id="send")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                    retry_btn = gr.Button("Retry last turn", elem_id="retry")
                    clear_btn = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1, min_width=280):
                controls = _controls(available, defaults)

        inputs = [*controls, session]
        progress = dict(concurrency_id=MODEL_EVENTS, show_progress="full", show_progress_on=[status])
        chat_args = dict(fn=chat, inputs=[message, *inputs], outputs=[chatbot, message, status, session], **progress)
        message.submit(**chat_args, api_name="chat")
        send_btn.click(**chat_args, api_visibility="private")
        retry_btn.click(retry, inputs=inputs, outputs=[chatbot, status, session], api_name="retry", **progress)
        # Stop and clear must not wait behind the running request: no concurrency limit.
        stop_btn.click(stop, inputs=[session], outputs=[status], api_name="stop", concurrency_limit=None)
        clear_args = dict(fn=clear, inputs=[session], outputs=[chatbot, status, session], concurrency_limit=None)
        clear_btn.click(**clear_args, api_name="clear")
        chatbot.clear(**clear_args, api_visibility="private")  # the chat's own trash-can button
    return demo


def _controls(available: list[str], defaults: dict[str, dict[str, Any]]) -> list[gr.components.Component]:
    """The settings column; returns the controls in the order of ``chat``'s parameters after ``message``."""
    outputs = gr.CheckboxGroup(
        CHOICES[:1] + [m for m in CHOICES[1:] if m in available],
        value=["auto"],
        label="Output media",
        info="auto: the model decides; tick media (without auto) to force them; none: text only",
        elem_id="outputs",
    )
    with gr.Accordion("Text", open=True):
        temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature")
        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top p", elem_id="top_p")
        max_new_tokens = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens", elem_id="max_new_tokens")
        seed = gr.Number(0, precision=0, label="Seed (-1: random)", elem_id="seed")
    decoder_controls = []
    for modality in ("image", "video", "audio"):
        d = defaults.get(modality, {})
        with gr.Accordion(f"{modality.capitalize()} decoder", open=False, visible=modality in available):
            steps = d.get("num_inference_steps", 25)
            guidance = d.get("guidance_scale", 7.5)
            decoder_controls += [
                gr.Slider(1, 150, value=steps, step=1, label="Inference steps", elem_id=f"{modality}_steps"),
                gr.Slider(0.0, 20.0, value=guidance, step=0.1, label="Guidance scale", elem_id=f"{modality}_guidance"),
            ]
            if modality == "video":
                frames = d.get("num_frames", 16)
                decoder_controls.append(gr.Slider(1, 64, value=frames, step=1, label="Frames", elem_id="video_frames"))
            if modality == "audio":
                seconds = d.get("audio_seconds", 5.0)
                decoder_controls.append(
                    gr.Slider(0.5, 30.0, value=seconds, step=0.5, label="Seconds", elem_id="audio_seconds")
                )
    return [outputs, temperature, top_p, max_new_tokens, *decoder_controls, seed]


def _file_path(item: Any) -> str:
    """An uploaded file as a path: Gradio gives a path string or a dict with a ``path``."""
    if isinstance(item, dict):
        return str(item.get("path") or item.get("name") or "")
    return str(getattr(item, "path", item))


def _end_session(session: ChatSession | None) -> None:  # the browser tab closed
    if session is not None:
        session.stop()


# ---------------------------------------------------------------------------------------------------- launching
def model_note(model: str) -> str:
    """The line under the title naming the model."""
    note = f"Model: `{model}`."
    if model == "tiny":
        note += " Its weights are random: its text is gibberish and its media are noise."
    return note


def gradio_environment(output_dir: str | os.PathLike) -> dict[str, str]:
    """Environment that keeps every file Gradio stores or serves inside ``output_dir`` (set before building)."""
    root = Path(output_dir).expanduser().resolve() / "gradio"
    return {
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(root / "cache"),
        "GRADIO_EXAMPLES_CACHE": str(root / "examples"),
    }


def launch_options(engine: ChatEngine, *, host: str, port: int, share: bool) -> dict[str, Any]:
    """``Blocks.launch`` keywords: bind ``host``, no share link unless asked, serve the output folder only."""
    return dict(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=[str(engine.output_dir)],
        # Gradio refuses uploads over twice the limit outright (an error toast); the engine answers files between
        # the limit and that with an error message in the chat.
        max_file_size=2 * engine.max_upload_bytes,
        ssr_mode=False,
        show_error=True,
    )


def serve(
    engine: ChatEngine,
    *,
    note: str = "",
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    queue_size: int = 16,
    prevent_thread_lock: bool = False,
) -> gr.Blocks:
    """Build the page for ``engine`` and launch it with a queue that runs one model call at a time."""
    demo = build_app(engine, note=note)
    demo.queue(default_concurrency_limit=1, max_size=queue_size)
    demo.launch(**launch_options(engine, host=host, port=port, share=share), prevent_thread_lock=prevent_thread_lock)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The anygpt chat demo (Gradio).")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"preset name or saved folder (default {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    parser.add_argument(
        "--output-dir", default=None, help="folder for generated files (default: a new temporary folder)"
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
        help="largest accepted upload in MB (default %(default).0f)",
    )
    parser.add_argument("--queue-size", type=int, default=16, help="requests that may wait in the queue")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    args = parser.parse_args(argv)
    if args.max_upload_mb <= 0:
        parser.error("--max-upload-mb must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    output_dir = Path(args.output_dir).expanduser() if args.output_dir else default_output_dir()
    os.environ.update(gradio_environment(output_dir))
    engine = ChatEngine.from_pretrained(args.model, output_dir, max_upload_bytes=int(args.max_upload_mb * 2**20))
    logger.warning("writing generated files to %s", engine.output_dir)
    serve(
        engine,
        note=model_note(args.model),
        host=args.host,
        port=args.port,
        share=args.share,
        queue_size=args.queue_size,
    )


if __name__ == "__main__":
    main()
