"""The chat demo: its API through ``gradio_client`` on loopback, the engine behind it, the pipeline hooks it uses."""

from __future__ import annotations

import contextlib
import importlib.util
import queue
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from anygpt.demo import ChatEngine, GenerationSettings, _QueueStreamer, check_upload
from anygpt.media import MediaError, load_audio, load_image, load_video
from anygpt.modality import Modality

REPO = Path(__file__).resolve().parents[1]
FAST = dict(max_new_tokens=6, image_steps=2, video_steps=2, audio_steps=2)  # keyword arguments of /chat
UPLOAD_LIMIT = 256 * 1024

# Gradio's queue statistics use pandas APIs that pandas 3 deprecates: not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


def load_app_module():
    """``app.py`` at the repository root, imported as the module ``anygpt_app``."""
    if "anygpt_app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("anygpt_app", REPO / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["anygpt_app"] = module
        spec.loader.exec_module(module)
    return sys.modules["anygpt_app"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(pipe, output_dir: Path, **engine_kwargs) -> Iterator[tuple[str, ChatEngine]]:
    """The demo served on a free loopback port, as ``app.main`` serves it; yields its URL and engine."""
    app = load_app_module()
    with pytest.MonkeyPatch.context() as env:
        for key, value in app.gradio_environment(output_dir).items():
            env.setenv(key, value)
        engine = ChatEngine(pipe, output_dir, **engine_kwargs)
        port = free_port()
        demo = app.serve(engine, port=port, prevent_thread_lock=True, note=app.model_note("tiny"))
        try:
            yield f"http://127.0.0.1:{port}/", engine
        finally:
            demo.close()


@pytest.fixture(scope="module")
def served(tiny_pipe, tmp_path_factory):
    with running_app(tiny_pipe, tmp_path_factory.mktemp("demo-out"), max_upload_bytes=UPLOAD_LIMIT) as server:
        yield server


@pytest.fixture()
def client(served, tmp_path):
    """A new client: a new session of the demo. Files it receives are downloaded under the test's folder."""
    from gradio_client import Client

    return Client(served[0], verbose=False, download_files=str(tmp_path / "downloads"))


def last_reply(history: list[dict]) -> tuple[str, list[str]]:
    """The text and file paths of the last assistant message in a /chat result."""
    content = history[-1]["content"]
    assert history[-1]["role"] == "assistant"
    text = " ".join(item["text"] for item in content if item.get("type") == "text")
    files = [
        item["file"] if isinstance(item["file"], str) else item["file"]["path"] for item in content if "file" in item
    ]
    return text, files


# ---------------------------------------------------------------------------------------------------- over the API
def test_two_turns_with_an_image_then_forced_media(served, client, media_files, monkeypatch, tiny_pipe):
    from gradio_client import handle_file

    _, engine = served
    encoded = []
    real_encode = tiny_pipe.model.encoder.encode
    monkeypatch.setattr(
        tiny_pipe.model.encoder, "encode", lambda m, items: encoded.append((m, len(items))) or real_encode(m, items)
    )

    message = {"text": "what is in <this> picture?", "files": [handle_file(str(media_files["image"]))]}
    history, _, status = client.predict(message=message, **FAST, api_name="/chat")
    assert status.startswith("done")
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert any(item.get("type") == "file" for item in history[0]["content"])  # the upload is shown in the chat

    history, _, _ = client.predict(message={"text": "and now?", "files": []}, **FAST, api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant"] * 2  # the session kept the first turn

    history, _, status = client.predict(
        message={"text": "draw it, film it and play it", "files": []},
        outputs=["image", "video", "audio"],
        **FAST,
        api_name="/chat",
    )
    assert status.startswith("done") and len(history) == 6
    text, files = last_reply(history)
    assert isinstance(text, str)
    kinds = {Path(f).suffix: Path(f) for f in files}
    assert set(kinds) == {".png", ".mp4", ".wav"}
    assert load_image(kinds[".png"]).size == (64, 64)
    video = load_video(kinds[".mp4"])
    assert video.frames.shape[0] == 8 and video.frames.dtype == np.uint8
    assert 0.5 < load_audio(kinds[".wav"]).duration < 1.5
    # the image was encoded once for the whole conversation, not every turn
    assert encoded == [(Modality.IMAGE, 1)]
    # the files were written in a per-session folder of the output folder
    written = sorted(p.name for p in engine.sessions_dir.glob("*/turn-*"))
    assert {"turn-0003_image0.png", "turn-0003_video0.mp4", "turn-0003_audio0.wav"} <= set(written)


def test_bad_uploads_are_answered_in_the_chat_and_the_app_keeps_serving(client, tmp_path, media_files):
    from gradio_client import handle_file

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("just text")
    wrong_kind = tmp_path / "notes.txt"
    wrong_kind.write_text("just text")
    too_big = tmp_path / "big.wav"
    too_big.write_bytes(b"\0" * (UPLOAD_LIMIT + 1))
    expected = {
        not_an_image: "cannot read image notes.png: expected an image file, found text",
        wrong_kind: "notes.txt: not an image, audio or video file",
        too_big: "big.wav: 256.0 KB is larger than the upload limit of 256.0 KB",
    }
    for path, error in expected.items():
        history, _, status = client.predict(
            message={"text": "look", "files": [handle_file(str(path))]}, **FAST, api_name="/chat"
        )
        text, files = last_reply(history)
        assert status == "error" and text.startswith("⚠️") and error in text and not files
        assert str(tmp_path) not in text  # no server paths in messages

    history, _, status = client.predict(
        message={"text": "fine", "files": [handle_file(str(media_files["audio"]))]}, **FAST, api_name="/chat"
    )
    assert status.startswith("done") and len(history) == 8


def test_retry_replaces_the_last_answer_and_clear_forgets(client):
    client.predict(message={"text": "first", "files": []}, **FAST, api_name="/chat")
    history, _, _ = client.predict(message={"text": "second", "files": []}, **FAST, api_name="/chat")
    assert len(history) == 4
    history, status = client.predict(outputs=["image"], **FAST, api_name="/retry")
    assert len(history) == 4 and history[2]["content"][0]["text"] == "second" and status.startswith("done")
    assert [Path(f).suffix for f in last_reply(history)[1]] == [".png"]
    history, status = client.predict(api_name="/clear")
    assert history == [] and status == ""
    history, _, _ = client.predict(message={"text": "again", "files": []}, **FAST, api_name="/chat")
    assert len(history) == 2


def test_stop_ends_a_running_answer(client):
    job = client.submit(message={"text": "talk a lot", "files": []}, max_new_tokens=1024, api_name="/chat")
    deadline = time.monotonic() + 30
    while not any(len(out[0]) == 2 and last_reply(out[0])[0] for out in job.outputs()):  # wait for streamed text
        assert time.monotonic() < deadline and not job.done()
        time.sleep(0.05)
    assert client.predict(api_name="/stop") == "stopping"  # not held back by the running request
    history, _, status = job.result(timeout=30)
    assert status == "stopped" and last_reply(history)[0].endswith("_(stopped)_")


def test_serves_no_file_outside_its_output_folder(served, client):
    url, engine = served
    history, _, _ = client.predict(message={"text": "x", "files": []}, outputs=["image"], **FAST, api_name="/chat")
    generated = next(engine.sessions_dir.glob("*/*.png"))
    for path, code in [
        (generated, 200),
        (Path("/etc/passwd"), 403),
        (REPO / "app.py", 403),
        (REPO / "pyproject.toml", 403),
    ]:
        response = httpx.get(f"{url}gradio_api/file={path}", timeout=10)
        assert response.status_code == code, path
    # Gradio's own upload cache lies inside the output folder too
    uploads = engine.output_dir / "gradio" / "cache"
    assert uploads.is_dir() and any(uploads.rglob("*.png"))


def test_a_request_cannot_name_a_server_file(served, media_files):
    url, _ = served
    outside = {"path": str(media_files["image"]), "meta": {"_type": "gradio.FileData"}}  # not uploaded by a user
    data = [{"text": "x", "files": [outside]}, ["auto"], 0.0, 1.0, 2, 2, 7.5, 2, 7.5, 8, 2, 2.5, 1.0, 0]
    event = httpx.post(f"{url}gradio_api/call/chat", json={"data": data}, timeout=10).json()["event_id"]
    answer = httpx.get(f"{url}gradio_api/call/chat/{event}", timeout=30).text
    assert "event: error" in answer and "not uploaded by a user" in answer


def test_launch_options_bind_loopback_and_allow_only_the_output_folder(tmp_path, tiny_pipe):
    app = load_app_module()
    args = app.parse_args([])
    assert (args.host, args.port, args.share, args.output_dir, args.model) == ("127.0.0.1", 7860, False, None, "tiny")
    assert app.parse_args(["--share", "--host", "0.0.0.0"]).share
    engine = ChatEngine(tiny_pipe, tmp_path / "out")
    options = app.launch_options(engine, host=args.host, port=args.port, share=args.share)
    assert options["server_name"] == "127.0.0.1" and options["share"] is False
    assert options["allowed_paths"] == [str((tmp_path / "out").resolve())]
    env = app.gradio_environment(tmp_path / "out")
    assert env["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert Path(env["GRADIO_TEMP_DIR"]).is_relative_to((tmp_path / "out").resolve())


# ---------------------------------------------------------------------------------------------------- the engine
def test_stop_ends_the_text_at_once_and_keeps_the_session_usable(tiny_pipe, tmp_path):
    engine = ChatEngine(tiny_pipe, tmp_path)
    session = engine.new_session()
    updates = 0
    for exchange in engine.respond(session, "talk a lot", [], GenerationSettings(max_new_tokens=512)):
        updates += 1
        if exchange.reply.text:
            session.stop()
    reply = session.exchanges[-1].reply
    assert reply.stopped and reply.done and reply.status == "stopped" and updates >= 2
    assert len(reply.text) < 400  # far fewer than 512 tokens' worth: it stopped early
    assert session.conversation.turns == [] and not session.exchanges[-1].kept  # the model will not see it

    for _ in engine.retry(session, GenerationSettings(max_new_tokens=4)):
        pass
    assert session.exchanges[-1].reply.status.startswith("done") and len(session.conversation.turns) == 2
    session.clear()
    assert session.exchanges == [] and session.conversation.turns == []


def test_text_streams_in_pieces_without_signal_tokens(tiny_pipe):
    events, stop = queue.Queue(), threading.Event()
    out = tiny_pipe(
        "hi", modalities="auto", max_new_tokens=12, seed=0, streamer=_QueueStreamer(tiny_pipe.tokenizer, events, stop)
    )
    pieces = [payload for kind, payload in list(events.queue) if kind == "text"]
    assert len(pieces) > 1  # token by token, not all at the end
    assert "".join(pieces).strip() == out.text  # signal tokens are special: never shown


def test_a_reply_reports_each_decoder_and_saves_its_files(tiny_pipe, tmp_path):
    engine = ChatEngine(tiny_pipe, tmp_path)
    session = engine.new_session()
    statuses = []
    settings = GenerationSettings(modalities=["image", "audio"], max_new_tokens=12, steps={"image": 1, "audio": 1})
    for exchange in engine.respond(session, "hi", [], settings):
        statuses.append(exchange.reply.status)
    assert statuses[-1].startswith("done") and session.exchanges[-1].kept
    # updates may be merged when the UI is slower than the model, but never reordered
    expected = ["writing", "rendering image (1/2)", "rendering audio (2/2)", statuses[-1]]
    assert [expected.index(s) for s in statuses] == sorted(expected.index(s) for s in statuses)
    reply = session.exchanges[-1].reply
    assert [p.suffix for p in reply.files] == [".png", ".wav"]
    assert all(p.is_relative_to(engine.output_dir) for p in reply.files)


def test_settings_from_controls():
    auto = GenerationSettings.from_controls(["auto", "image"], 0.0, 1.0, 16.0, {"image": 5.0}, {"image": 3.5})
    assert auto.modalities == "auto" and auto.max_new_tokens == 16 and isinstance(auto.steps["image"], int)
    kwargs = auto.pipeline_kwargs()
    assert kwargs["decoder_overrides"] == {"image": {"num_inference_steps": 5, "guidance_scale": 3.5}}
    assert GenerationSettings.from_controls(["video", "audio"], 0, 1, 8, {}, {}).modalities == ["video", "audio"]
    assert GenerationSettings.from_controls([], 0, 1, 8, {}, {}).modalities == []  # text only
    assert GenerationSettings.from_controls("auto", 0, 1, 8, {}, {}, seed=-1).seed is None
    assert isinstance(GenerationSettings(seed=None).pipeline_kwargs()["seed"], int)  # a fresh random seed
    with pytest.raises(ValueError, match="max new tokens must be a whole number"):
        GenerationSettings(max_new_tokens=2.5).pipeline_kwargs()


def test_check_upload(tmp_path):
    image = tmp_path / "a.PNG"
    Image.new("RGB", (8, 8)).save(image, format="PNG")
    assert check_upload(image) is Modality.IMAGE
    with pytest.raises(MediaError, match=r"a.PNG: \d+ bytes is larger than the upload limit of 10 bytes"):
        check_upload(image, max_bytes=10)
    with pytest.raises(MediaError, match="no such file"):
        check_upload(tmp_path / "gone.wav")


# ---------------------------------------------------------------------------------------------------- pipeline hooks
def test_pipeline_per_decoder_overrides_and_decode_callback(tiny_pipe, monkeypatch):
    seen = {}
    for modality, decoder in tiny_pipe.decoders.items():
        real = decoder.generate

        def spy(cond, _real=real, _m=modality, **kwargs):
            seen[_m] = (kwargs["num_inference_steps"], kwargs["guidance_scale"])
            return _real(cond, **kwargs)

        monkeypatch.setattr(decoder, "generate", spy)
    calls = []
    tiny_pipe(
        "x",
        modalities="image,audio",
        max_new_tokens=2,
        num_inference_steps=2,
        guidance_scale=3.0,
        decoder_overrides={"image": {"num_inference_steps": 1, "guidance_scale": None}, "audio": {"guidance_scale": 1}},
        on_decode=lambda m, i, n: calls.append((m, i, n)),
        show_progress=False,
    )
    assert seen == {Modality.IMAGE: (1, 3.0), Modality.AUDIO: (2, 1)}
    assert calls == [(Modality.IMAGE, 0, 2), (Modality.AUDIO, 1, 2)]
    with pytest.raises(ValueError, match="decoder_overrides: unknown output modality 'text'"):
        tiny_pipe("x", decoder_overrides={"text": {}}, max_new_tokens=1)
    with pytest.raises(ValueError, match="unknown setting 'steps'"):
        tiny_pipe("x", decoder_overrides={"image": {"steps": 3}}, max_new_tokens=1)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        tiny_pipe("x", decoder_overrides={"image": {"num_inference_steps": 0}}, max_new_tokens=1)


def test_pipeline_streamer_receives_the_reply_tokens(tiny_pipe):
    received = []

    class Streamer:
        def put(self, ids: torch.Tensor) -> None:
            received.append(ids.reshape(-1).tolist())

        def end(self) -> None:
            received.append("end")

    out = tiny_pipe("x", modalities=[], max_new_tokens=5, seed=0, streamer=Streamer(), show_progress=False)
    assert received[-1] == "end"
    streamed = [i for ids in received[1:-1] for i in ids]  # the first put is the (empty) prompt
    assert streamed[: len(out.token_ids)] == out.token_ids
