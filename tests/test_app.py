"""The chat demo: its API through ``gradio_client`` on loopback, the engine behind it, the pipeline hooks it uses."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from anygpt.apps.chat import (
    ChatEngine,
    GenerationRequest,
    GenerationStopped,
    Reply,
    _QueueStreamer,
    _user_message,
    check_upload,
    request_fields,
)
from anygpt.base.media import MediaError, load_audio, load_image, load_video
from anygpt.base.modality import Modality

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
def running_app(
    pipe, output_dir: Path, serve_kwargs=None, model: str = "tiny", **engine_kwargs
) -> Iterator[tuple[str, ChatEngine]]:
    """The demo served on a free loopback port, as ``app.main`` serves it; yields its URL and engine."""
    app = load_app_module()
    with pytest.MonkeyPatch.context() as env:
        for key, value in app.gradio_environment(output_dir).items():
            env.setenv(key, value)
        engine = ChatEngine(pipe, output_dir, **engine_kwargs)
        port = free_port()
        demo = app.serve(
            engine,
            port=port,
            prevent_thread_lock=True,
            model=model,
            note=app.model_note(model),
            **(serve_kwargs or {}),
        )
        try:
            yield f"http://127.0.0.1:{port}/", engine
        finally:
            demo.close()


@contextlib.contextmanager
def held_decoder(pipe, modality: Modality, *, honour_stop: bool = True) -> Iterator[threading.Event]:
    """The modality's decoder holds (a long render) until the yielded event is set; it checks ``should_stop``
    meanwhile, as the real decoders do between denoising steps, unless ``honour_stop`` is False (a stuck step)."""
    release = threading.Event()
    decoder = pipe.decoders[modality]
    real = decoder.generate

    def generate(conditioning, **kwargs):
        should_stop, deadline = kwargs.get("should_stop"), time.monotonic() + 60
        while not release.wait(0.02):
            if honour_stop and should_stop is not None and should_stop():
                raise GenerationStopped("stopped while held")
            if time.monotonic() > deadline:  # a test that never stops nor releases it fails instead of hanging
                raise RuntimeError("held decoder: neither stopped nor released within 60 s")
        return real(conditioning, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decoder, "generate", generate)
        try:
            yield release
        finally:
            release.set()


def wait_for(condition, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


@pytest.fixture(scope="module")
def served(tiny_pipe, tmp_path_factory):
    with running_app(tiny_pipe, tmp_path_factory.mktemp("demo-out"), max_upload_bytes=UPLOAD_LIMIT) as server:
        yield server


@pytest.fixture()
def sessions(served, monkeypatch) -> list:
    """The ``ChatSession`` objects the served engine creates during the test, in order."""
    engine = served[1]
    created = []
    real = engine.new_session
    monkeypatch.setattr(engine, "new_session", lambda **kw: created.append(real(**kw)) or created[-1])
    return created


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
def test_two_turns_with_an_image_then_forced_media(served, client, sessions, media_files, monkeypatch, tiny_pipe):
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
    (session,) = sessions
    assert [t.role for t in session.conversation.turns] == ["user", "assistant"] * 3
    assert text == load_app_module()._printable(session.conversation.turns[-1].text)  # shown = what the model said
    kinds = {Path(f).suffix: Path(f) for f in files}
    assert set(kinds) == {".png", ".mp4", ".wav"}
    assert load_image(kinds[".png"]).size == (256, 256)  # the 64 px image, shown enlarged 4 x
    video = load_video(kinds[".mp4"])
    assert video.frames.shape[:3] == (8, 256, 256) and video.frames.dtype == np.uint8
    assert 0.5 < load_audio(kinds[".wav"]).duration < 1.5
    # the image was encoded once for the whole conversation, not every turn
    assert encoded == [(Modality.IMAGE, 1)]
    # the files were written in a per-session folder of the output folder
    written = sorted(p.name for p in session.output_dir.glob("turn-*"))
    assert written == ["turn-0003_audio0.wav", "turn-0003_image0.png", "turn-0003_video0.mp4"]
    # served where they were written: Gradio made no copy of them in its cache (the output folder)
    copies = [p for p in engine.output_dir.rglob("turn-*") if not p.is_relative_to(engine.sessions_dir)]
    assert copies == []


def test_bad_uploads_are_answered_in_the_chat_and_the_app_keeps_serving(served, client, tmp_path, media_files):
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
        assert str(tmp_path) not in text and str(served[1].output_dir) not in text  # no paths in messages

    history, _, status = client.predict(
        message={"text": "fine", "files": [handle_file(str(media_files["audio"]))]}, **FAST, api_name="/chat"
    )
    assert status.startswith("done") and len(history) == 8


def test_retry_replaces_the_last_answer_and_clear_forgets(client, sessions):
    client.predict(message={"text": "first", "files": []}, **FAST, api_name="/chat")
    history, _, _ = client.predict(message={"text": "second", "files": []}, **FAST, api_name="/chat")
    (session,) = sessions
    turns = session.conversation.turns
    assert len(history) == 4 and [(t.role, t.text) for t in turns[::2]] == [("user", "first"), ("user", "second")]
    first_answer, second_answer = turns[1], turns[3]

    history, status = client.predict(outputs=["image"], **FAST, api_name="/retry")
    assert len(history) == 4 and history[2]["content"][0]["text"] == "second" and status.startswith("done")
    assert [Path(f).suffix for f in last_reply(history)[1]] == [".png"]
    turns = session.conversation.turns  # the second exchange replaced, not repeated
    assert [(t.role, t.text) for t in turns[::2]] == [("user", "first"), ("user", "second")] and len(turns) == 4
    assert turns[1] is first_answer and turns[3] is not second_answer and session.exchanges[-1].turns == (*turns[2:],)
    assert session.output_dir.is_dir()

    history, status = client.predict(api_name="/clear")
    assert history == [] and status == ""
    assert session.conversation.turns == [] and session.exchanges == []
    assert not session.output_dir.exists()  # Clear removes the session's files
    history, _, _ = client.predict(message={"text": "again", "files": []}, **FAST, api_name="/chat")
    assert len(history) == 2 and [t.text for t in session.conversation.turns[::2]] == ["again"]


def test_stop_ends_a_running_answer(client, sessions):
    job = client.submit(message={"text": "talk a lot", "files": []}, max_new_tokens=1024, api_name="/chat")
    deadline = time.monotonic() + 30
    while not any(len(out[0]) == 2 and last_reply(out[0])[0] for out in job.outputs()):  # wait for streamed text
        assert time.monotonic() < deadline and not job.done()
        time.sleep(0.05)
    history, status = client.predict(api_name="/stop")  # not held back by the running request
    note = load_app_module().STOPPED_NOTE
    assert status == "stopped" and last_reply(history)[0].endswith(note)
    history, _, status = job.result(timeout=30)
    assert status == "stopped" and last_reply(history)[0].endswith(note)
    assert sessions[0].conversation.turns == []  # a stopped answer is not in the model's context


def test_cancelling_while_media_render_then_retry_keeps_one_question(client, sessions, tiny_pipe):
    with held_decoder(tiny_pipe, Modality.AUDIO):
        job = client.submit(message={"text": "q", "files": []}, outputs=["image", "audio"], **FAST, api_name="/chat")
        wait_for(lambda: any(out[2].startswith("rendering audio") for out in job.outputs()), what="rendering audio")
        job.cancel()  # the event's generator goes away: the worker is stopped, and records the end itself
        (session,) = sessions
        wait_for(lambda: not session.busy, timeout=10, what="the request to end")
    reply = session.exchanges[-1].reply
    assert reply.done and reply.stopped and not session.exchanges[-1].kept and session.conversation.turns == []
    assert [p.suffix for p in reply.files] == [".png"]  # what was rendered before the stop is kept and shown
    for _ in range(2):
        history, status = client.predict(outputs=[], **FAST, api_name="/retry")
        assert status.startswith("done") and len(history) == 2
    assert [(t.role, t.text) for t in session.conversation.turns][::2] == [("user", "q")]
    assert len(session.conversation.turns) == 2 and len(session.exchanges) == 1


def test_serves_no_file_outside_its_output_folder(served, client, sessions):
    url, engine = served
    history, _, _ = client.predict(message={"text": "x", "files": []}, outputs=["image"], **FAST, api_name="/chat")
    (generated,) = sessions[0].output_dir.glob("*.png")
    for path, code in [
        (generated, 200),
        (Path("/etc/passwd"), 403),
        (REPO / "app.py", 403),
        (REPO / "pyproject.toml", 403),
    ]:
        response = httpx.get(f"{url}gradio_api/file={path}", cookies=client.cookies, timeout=10)
        assert response.status_code == code, path
    # ".." and percent-encoded traversal out of the output folder, sent exactly as written (no client normalising)
    out, up = engine.output_dir, "/..".join([""] * (len(engine.output_dir.parts) + 1))
    for target in [
        f"{generated.parent}/../../../{REPO.name}/app.py",
        f"{out}{up}/etc/passwd",
        f"{out}{up.replace('..', '%2e%2e')}/etc/passwd",
        f"{out}{up.replace('/', '%2f')}%2fetc%2fpasswd",
        f"{generated.parent}%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    ]:
        status = raw_get_status(url, f"/gradio_api/file={target}")
        assert status in (403, 404), target
    # (uploads land in the output folder, Gradio's cache: test_files_are_served_to_the_client_that_made_them)
    assert load_app_module().launch_options(engine, host="127.0.0.1", port=1, share=False)["allowed_paths"] == [
        str(engine.sessions_dir)
    ]


def raw_get_status(url: str, path: str, cookies: dict[str, str] | None = None) -> int:
    """The status of a GET of ``path`` sent byte for byte (http.client does not resolve ``..`` nor decode)."""
    import http.client

    address = httpx.URL(url)
    connection = http.client.HTTPConnection(address.host, address.port, timeout=10)
    headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}
    try:
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def test_rest_routes_do_not_skip_the_queue(served):
    url, _ = served
    data = [{"text": "x", "files": []}, ["auto"], 0.0, 1.0, 2, 2, 7.5, 2, 7.5, 8, 2, 2.5, 1.0, 0]
    response = httpx.post(f"{url}gradio_api/run/chat", json={"data": data}, timeout=10)
    assert response.status_code == 404 and "join the queue" in response.text


def test_a_request_cannot_name_a_server_file(served, media_files):
    url, _ = served
    outside = {"path": str(media_files["image"]), "meta": {"_type": "gradio.FileData"}}  # not uploaded by a user
    data = [{"text": "x", "files": [outside]}, ["auto"], 0.0, 1.0, 2, 2, 7.5, 2, 7.5, 8, 2, 2.5, 1.0, 0]
    event = httpx.post(f"{url}gradio_api/call/chat", json={"data": data}, timeout=10).json()["event_id"]
    answer = httpx.get(f"{url}gradio_api/call/chat/{event}", timeout=30).text
    assert "event: error" in answer and "not uploaded by a user" in answer


def call_chat(url: str, message: dict, cookies=None, **settings) -> str:
    """One /chat call over Gradio's plain HTTP API (no client library), its event stream as text."""
    values = dict(
        outputs=["auto"], temperature=0.0, top_p=1.0, max_new_tokens=2, image_steps=2, image_guidance=7.5,
        video_steps=2, video_guidance=7.5, video_frames=8, audio_steps=2, audio_guidance=2.5, audio_seconds=1.0, seed=0,
    )  # fmt: skip
    values.update(settings)
    data = [message, *values.values()]
    with httpx.Client(cookies=cookies, timeout=30) as http:
        event = http.post(f"{url}gradio_api/call/chat", json={"data": data}).json()["event_id"]
        return http.get(f"{url}gradio_api/call/chat/{event}").text


def test_files_are_served_to_the_client_that_made_them(served, sessions, media_files, tmp_path):
    from gradio_client import Client, handle_file

    app = load_app_module()
    url, engine = served
    a, b = (Client(url, verbose=False, download_files=str(tmp_path / name)) for name in "ab")
    assert a.cookies[app.OWNER_COOKIE] != b.cookies[app.OWNER_COOKIE]  # each client got its own key
    message = {"text": "draw it", "files": [handle_file(str(media_files["image"]))]}
    a.predict(message=message, outputs=["image"], **FAST, api_name="/chat")
    (session,) = sessions
    assert session.owner == a.cookies[app.OWNER_COOKIE]
    assert re.fullmatch(r"[0-9a-f]{32}", session.id)  # 128 random bits: the folder cannot be guessed
    (generated,) = session.output_dir.glob("*.png")
    (upload,) = session.exchanges[0].files
    assert upload.is_relative_to(engine.output_dir) and not upload.is_relative_to(engine.sessions_dir)
    forged = {app.OWNER_COOKIE: "A" * 43}
    for path in (generated, upload):
        for cookies, code in [(a.cookies, 200), (b.cookies, 403), (None, 403), (forged, 403)]:
            response = httpx.get(f"{url}gradio_api/file={path}", cookies=cookies, timeout=10)
            assert response.status_code == code, (path.name, cookies)
    # spelled through another session's folder: the same file, the same answer
    other = f"{engine.sessions_dir}/{'0' * 32}/../{generated.relative_to(engine.sessions_dir)}"
    assert raw_get_status(url, f"/gradio_api/file={other}", b.cookies) == 403
    assert raw_get_status(url, f"/gradio_api/file={other}", a.cookies) == 200
    # b knows the path of a's upload and names it in a message: refused in the chat, the model does not see it
    named = {"path": str(upload), "meta": {"_type": "gradio.FileData"}}
    answer = call_chat(url, {"text": "what is this?", "files": [named]}, cookies=b.cookies)
    assert f"{upload.name}: not a file of this session (upload it again)" in answer
    assert len(sessions) == 2 and sessions[1].conversation.turns == []
    a.predict(api_name="/clear")  # a's files are gone, and a's key reads nothing of a removed folder
    assert httpx.get(f"{url}gradio_api/file={generated}", cookies=a.cookies, timeout=10).status_code == 403


def test_may_read_binds_files_to_owners(tiny_pipe, tmp_path):
    engine = ChatEngine(tiny_pipe, tmp_path / "out")
    first, second = engine.new_session(owner="k1"), engine.new_session(owner="k2")
    assert first.id != second.id and len(first.id) == 32
    mine = first.output_dir / "turn-0001_image0.png"
    assert engine.may_read(mine, "k1") and not engine.may_read(mine, "k2") and not engine.may_read(mine, None)
    assert not engine.may_read(f"{second.output_dir}/../{first.id}/turn-0001_image0.png", "k2")  # ".." spelled
    assert not engine.may_read(first.output_dir, "k1") and not engine.may_read(engine.sessions_dir / "x", "k1")
    assert not engine.may_read(engine.sessions_dir / ("0" * 32) / "a.png", "k1")  # no such session
    assert engine.may_read(tmp_path / "elsewhere.png", None)  # outside the output folder: the server's rules
    link = tmp_path / "link"  # a link from outside into the session's folder is the folder
    link.symlink_to(first.output_dir, target_is_directory=True)
    assert not engine.may_read(link / "turn-0001_image0.png", "k2") and engine.may_read(link / "x.png", "k1")
    upload = engine.output_dir / ("ab" * 32) / "cat.png"
    assert not engine.may_read(upload, "k1")
    engine.grant([str(upload)], "k1")
    engine.grant([str(upload)], "k2")  # the same content uploaded by both lands at one path: both may read it
    assert engine.may_read(upload, "k1") and engine.may_read(upload, "k2") and not engine.may_read(upload, "k3")
    first.close()
    assert not engine.may_read(mine, "k1")  # an ended session's files are nobody's
    unowned = engine.new_session()
    assert unowned.owner is None and not engine.may_read(unowned.output_dir / "a.png", None)


def test_a_long_message_is_refused_in_the_chat_without_running(served, client, tiny_pipe, monkeypatch):
    url, engine = served
    assert engine.max_message_chars == 2000 and load_app_module().parse_args([]).max_message_chars == 2000
    ran = []
    monkeypatch.setattr(tiny_pipe, "run", lambda *a, **k: ran.append(1) or pytest.fail("a refused message ran"))
    history, _, status = client.predict(message={"text": "a" * 2001, "files": []}, **FAST, api_name="/chat")
    assert status == "error"
    assert (
        last_reply(history)[0]
        == "⚠️ message too long: 2,001 characters, the limit is 2,000; shorten it and send it again"
    )
    assert ran == []
    monkeypatch.undo()
    small = ChatEngine(tiny_pipe, engine.output_dir, max_message_chars=5)
    session = small.new_session()
    for text in ("  hello  ", "hello!"):  # 5 characters once trimmed: runs; 6: refused
        for _ in small.respond(session, text, [], GenerationRequest(max_new_tokens=2)):
            pass
    first, second = (exchange.reply for exchange in session.exchanges)
    assert first.status.startswith("done") and second.error.startswith("message too long: 6 characters, the limit is 5")


def test_out_of_range_settings_are_answered_naming_the_field_and_its_range(served, client):
    expected = {
        "temperature": (1e-300, "temperature must be a finite number >= 0.001 or 0 (greedy; a smaller one overflows "
                        "the logits), got 1e-300"),
        "top_p": (0, "top_p must be a finite number in (0, 1], got 0"),  # below the slider's 0.05
        "max_new_tokens": (9000, "max_new_tokens must be an integer <= 8192, got 9000"),  # above the slider's 1024
        "image_steps": (5000, "decoder_overrides['image'].num_inference_steps must be an integer <= 1000, got 5000"),
    }  # fmt: skip
    for field, (value, message) in {**expected, "temperature_high": (500, None)}.items():
        name = field.removesuffix("_high")
        history, _, status = client.predict(
            message={"text": "x", "files": []}, **{**FAST, name: value}, api_name="/chat"
        )
        text = last_reply(history)[0]
        assert status == "error", (field, text)
        assert text == f"⚠️ {message or 'temperature must be a finite number <= 100, got 500'}"


def test_launch_options_bind_loopback_and_allow_only_the_output_folder(tmp_path, tiny_pipe, monkeypatch):
    app = load_app_module()
    args = app.parse_args([])
    assert (args.host, args.port, args.share, args.output_dir, args.model) == (
        "127.0.0.1",
        7860,
        False,
        None,
        "toyworld",
    )
    assert app.parse_args(["--share", "--host", "0.0.0.0"]).share
    engine = ChatEngine(tiny_pipe, tmp_path / "out")
    options = app.launch_options(engine, host=args.host, port=args.port, share=args.share)
    assert options["server_name"] == "127.0.0.1" and options["share"] is False
    assert options["allowed_paths"] == [str((tmp_path / "out").resolve() / "sessions")]
    env = app.gradio_environment(tmp_path / "out")
    assert env["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert env["GRADIO_TEMP_DIR"] == str((tmp_path / "out").resolve())  # outputs are in Gradio's cache: no copies
    # the default output folder is temporary: removed at exit; a given one is kept
    at_exit = []
    monkeypatch.setattr(app.atexit, "register", lambda fn, *a, **k: at_exit.append(lambda: fn(*a, **k)))
    monkeypatch.setattr(app, "default_output_dir", lambda: Path(tempfile.mkdtemp(dir=tmp_path)))
    assert app.output_folder(str(tmp_path / "mine")) == tmp_path / "mine" and at_exit == []
    with pytest.raises(ValueError, match="holds other files"):  # the page would serve them
        app.output_folder(REPO)
    assert app.output_folder(engine.output_dir) == engine.output_dir  # one the demo used (sessions/) is fine
    temporary = app.output_folder(None)
    (temporary / "sessions").mkdir()
    assert temporary.is_dir() and len(at_exit) == 1
    at_exit[0]()
    assert not temporary.exists()
    assert app.build_app(engine).delete_cache == app.CACHE_SWEEP  # Gradio sweeps the files it served


def test_the_demo_takes_device_and_precision(tmp_path):
    from anygpt.apps.runtime_args import runtime_options
    from anygpt.core.runtime import RuntimeOptions

    app = load_app_module()
    assert runtime_options(app.parse_args([])) is None
    args = app.parse_args(["--device", "cpu", "--dtype", "bfloat16"])
    assert runtime_options(args) == RuntimeOptions(device="cpu", dtype="bfloat16")
    with pytest.raises(SystemExit, match="^app.py: error: dtype: expected one of float32, float16, bfloat16"):
        app.main(["--dtype", "float8", "--output-dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    engine = ChatEngine.from_pretrained("tiny", tmp_path / "out", runtime=runtime_options(args))
    assert {p.dtype for p in engine.pipe.model.language_model.parameters()} == {torch.bfloat16}


def test_sigterm_stops_the_demo_and_removes_its_temporary_folder(tmp_path):
    """``python app.py`` in a subprocess: up, one answer with every medium, then SIGTERM: a clean exit, no temporary
    folder left, and a log without tracebacks, deprecation notices or progress bars."""
    from gradio_client import Client

    temp = tmp_path / "tmp"
    temp.mkdir()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(temp), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--model", "tiny", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}/"

            def up() -> bool:
                assert server.poll() is None, log.read_text()
                try:
                    return httpx.get(f"{url}config", timeout=5).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(up, timeout=240, what="the demo to serve")
            (folder,) = temp.glob("anygpt-demo-*")  # the temporary output folder, logged at start
            assert f"writing generated files to {folder.resolve()}" in log.read_text()
            client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
            history, _, status = client.predict(
                message={"text": "x", "files": []}, outputs=["image", "video", "audio"], **FAST, api_name="/chat"
            )
            assert status.startswith("done") and len(last_reply(history)[1]) == 3
            assert any(folder.glob("sessions/*/*.mp4"))
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=60) == 0
        finally:
            if server.poll() is None:
                server.kill()
    assert not folder.exists() and not list(temp.glob("anygpt-demo-*"))
    assert [p for p in temp.rglob("*") if not p.is_dir()] == []  # (Gradio leaves an empty gradio/vibe_edit_history)
    text = log.read_text()
    assert "SIGTERM: stopping" in text
    for noise in ("Traceback", "deprecated", "Loading", "it/s]", "%|"):
        assert noise not in text, f"{noise!r} in the server's log:\n{text}"


# ---------------------------------------------------------------------------------------------------- a full queue
@pytest.fixture(scope="module")
def small(tiny_pipe, tmp_path_factory):
    """The demo with room for one waiting request, and sessions that end 2 s after their last update."""
    options = dict(queue_size=1, session_ttl=2)
    with running_app(tiny_pipe, tmp_path_factory.mktemp("demo-small"), serve_kwargs=options) as server:
        yield server


def test_stop_and_clear_work_with_a_full_queue_and_stop_a_queued_first_message(small, tiny_pipe, tmp_path):
    from gradio_client import Client

    url, engine = small
    a, b, c = (Client(url, verbose=False, download_files=str(tmp_path / n)) for n in "abc")
    with held_decoder(tiny_pipe, Modality.IMAGE) as release:
        running = a.submit(message={"text": "draw", "files": []}, outputs=["image"], **FAST, api_name="/chat")
        wait_for(lambda: any(out[2].startswith("rendering") for out in running.outputs()), what="a running request")
        queued = b.submit(message={"text": "first message", "files": []}, outputs=[], **FAST, api_name="/chat")
        wait_for(lambda: queued.status().code.name == "IN_QUEUE", what="a queued request")
        with pytest.raises(Exception, match="(?i)queue is full"):
            c.predict(message={"text": "no room", "files": []}, **FAST, api_name="/chat")
        # the queue is full, yet Stop and Clear answer at once (they bypass it)
        started = time.monotonic()
        assert b.predict(api_name="/stop") == ([], "")  # b's session starts here, stopped; its message still waits
        assert c.predict(api_name="/clear") == ([], "")
        assert time.monotonic() - started < 5 and not running.done()
        release.set()
        assert running.result(timeout=30)[2].startswith("done")
    history, _, status = queued.result(timeout=30)  # the stop pressed while it waited was not lost
    assert status == "stopped" and [m["role"] for m in history] == ["user", "assistant"]
    assert last_reply(history)[0] == load_app_module().STOPPED_NOTE  # stopped before the model saw it
    # and b's next message runs normally
    history, _, status = b.predict(message={"text": "now", "files": []}, outputs=[], **FAST, api_name="/chat")
    assert status.startswith("done") and len(history) == 4


def test_a_session_ends_after_its_time_to_live(small, tmp_path):
    from gradio_client import Client

    url, engine = small
    client = Client(url, verbose=False, download_files=str(tmp_path))
    before = set(engine.sessions_dir.glob("*"))
    client.predict(message={"text": "x", "files": []}, outputs=["image"], **FAST, api_name="/chat")
    (folder,) = set(engine.sessions_dir.glob("*")) - before
    assert any(folder.glob("*.png"))
    wait_for(lambda: not folder.exists(), timeout=15, what="the expired session's folder to be removed")


# ---------------------------------------------------------------------------------------------------- the engine
def test_stop_ends_the_text_at_once_and_keeps_the_session_usable(tiny_pipe, tmp_path):
    engine = ChatEngine(tiny_pipe, tmp_path)
    session = engine.new_session()
    updates = 0
    for exchange in engine.respond(session, "talk a lot", [], GenerationRequest(max_new_tokens=512)):
        updates += 1
        if exchange.reply.text:
            session.stop()
    reply = session.exchanges[-1].reply
    assert reply.stopped and reply.done and reply.status == "stopped" and updates >= 2
    assert len(reply.text) < 400  # far fewer than 512 tokens' worth: it stopped early
    assert session.conversation.turns == [] and not session.exchanges[-1].kept  # the model will not see it

    for _ in engine.retry(session, GenerationRequest(max_new_tokens=4)):
        pass
    assert session.exchanges[-1].reply.status.startswith("done") and len(session.conversation.turns) == 2
    session.clear()
    assert session.exchanges == [] and session.conversation.turns == []


def test_a_stop_sent_before_a_request_starts_is_not_lost(tiny_pipe, tmp_path):
    engine = ChatEngine(tiny_pipe, tmp_path)
    session = engine.new_session()
    sent = time.monotonic()  # the request is sent (and waits in a queue) ...
    session.stop()  # ... the user presses Stop ...
    for _ in engine.respond(session, "hi", [], GenerationRequest(max_new_tokens=4), submitted_at=sent):
        pass  # ... then it starts: it ends as stopped, without running the model
    assert session.exchanges[-1].reply.stopped and session.exchanges[-1].reply.text == ""
    assert session.conversation.turns == [] and not session.busy
    for _ in engine.respond(session, "again", [], GenerationRequest(max_new_tokens=4)):  # sent after the stop
        pass
    assert session.exchanges[-1].reply.status.startswith("done") and len(session.conversation.turns) == 2
    sent = time.monotonic()
    session.clear()  # a request sent before a clear is dropped
    assert list(engine.respond(session, "old", [], GenerationRequest(max_new_tokens=4), submitted_at=sent)) == []
    assert session.exchanges == []


def test_stop_between_decoders_keeps_the_media_rendered_before(tiny_pipe, tmp_path):
    app = load_app_module()
    engine = ChatEngine(tiny_pipe, tmp_path)
    session = engine.new_session()
    settings = GenerationRequest(modalities=["image", "audio"], max_new_tokens=4, num_inference_steps=1)
    with held_decoder(tiny_pipe, Modality.AUDIO):
        for exchange in engine.respond(session, "draw and sing", [], settings):
            if exchange.reply.status.startswith("rendering audio"):
                session.stop()
    exchange = session.exchanges[-1]
    reply = exchange.reply
    assert reply.done and reply.stopped and reply.status == "stopped"
    assert [p.suffix for p in reply.files] == [".png"] and reply.images[0].is_file()  # saved and shown
    # the conversation holds finished answers only: this one is shown as stopped, and the model will not see it
    assert not exchange.kept and session.conversation.turns == []
    content = app.to_messages(session.exchanges)[-1]["content"]
    assert content[0].endswith(app.STOPPED_NOTE) and content[1] == {"path": str(reply.images[0])}


def test_a_stuck_decoder_does_not_hold_the_reply(tiny_pipe, tmp_path):
    engine = ChatEngine(tiny_pipe, tmp_path)
    engine.stop_grace_s = 0.3
    session = engine.new_session()
    settings = GenerationRequest(modalities=["image"], max_new_tokens=4, num_inference_steps=1)
    with held_decoder(tiny_pipe, Modality.IMAGE, honour_stop=False) as release:
        started = None
        for exchange in engine.respond(session, "x", [], settings):
            if exchange.reply.status.startswith("rendering") and started is None:
                started = time.monotonic()
                session.stop()
        assert time.monotonic() - started < 3  # the reply returned, though the decoder ignores the stop
        reply = session.exchanges[-1].reply
        assert not reply.done and reply.status.startswith("stopping") and session.busy
        release.set()
        wait_for(lambda: not session.busy, timeout=10, what="the worker to end")
    # the worker recorded the end itself: the decoder stopped after its (long) step; nothing of it is kept
    assert reply.done and reply.stopped and reply.files == [] and session.conversation.turns == []


def test_error_messages_show_no_server_paths(tiny_pipe, tmp_path, monkeypatch):
    upload = tmp_path / "up" / "cat.png"
    message = _user_message(
        OSError(f"cannot read {upload} nor {tmp_path}/sessions/x/turn.png nor /etc/secret/key (1/2) http://a/b"),
        [upload],
        tmp_path,
    )
    assert message == "cannot read cat.png nor <output>/sessions/x/turn.png nor key (1/2) http://a/b"
    engine = ChatEngine(tiny_pipe, tmp_path / "out")
    session = engine.new_session()

    def fail(output, folder, stem):
        raise OSError(f"No space left on device: {folder / stem}.png")

    monkeypatch.setattr(engine, "save_outputs", fail)
    settings = GenerationRequest(modalities=["image"], max_new_tokens=4, num_inference_steps=1)
    for _ in engine.respond(session, "x", [], settings):
        pass
    reply = session.exchanges[-1].reply
    assert reply.status == "error" and "No space left on device" in reply.error
    assert str(tmp_path) not in reply.error and "<output>/sessions/" in reply.error
    assert session.conversation.turns == []  # not a finished answer: not kept


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
    settings = GenerationRequest(modalities=["image", "audio"], max_new_tokens=12, num_inference_steps=1)
    for exchange in engine.respond(session, "hi", [], settings):
        statuses.append(exchange.reply.status)
    assert statuses[-1].startswith("done") and session.exchanges[-1].kept
    # updates may be merged when the UI is slower than the model, but never reordered
    expected = ["writing", "rendering image (1/2)", "rendering audio (2/2)", statuses[-1]]
    assert [expected.index(s) for s in statuses] == sorted(expected.index(s) for s in statuses)
    reply = session.exchanges[-1].reply
    assert [p.suffix for p in reply.files] == [".png", ".wav"]
    assert all(p.is_relative_to(engine.output_dir) for p in reply.files)


def test_generated_media_are_saved_enlarged_nearest_neighbour(tiny_pipe, tmp_path):
    from anygpt.apps.chat import display_scale, upscaled
    from anygpt.base.media import Video
    from anygpt.core.output import AnyGPTOutput

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    big = np.asarray(upscaled(Image.fromarray(pixels), 256))
    assert big.shape == (256, 256, 3)
    for dy, dx in [(0, 0), (1, 3), (3, 2)]:  # every pixel became a 4 x 4 block: no blur, no shift
        assert np.array_equal(big[dy::4, dx::4], pixels)
    frames = rng.integers(0, 255, (8, 48, 64, 3), dtype=np.uint8)  # a 64 x 48 clip: its longer side counts
    clip = upscaled(Video(frames, 8.0), 256)
    assert (
        clip.frames.shape == (8, 192, 256, 3) and clip.fps == 8.0 and np.array_equal(clip.frames[:, 2::4, 1::4], frames)
    )
    large = Image.new("RGB", (300, 200))
    assert upscaled(large, 256) is large and display_scale(100, 90, 256) == 2 and display_scale(64, 64, 0) == 1
    with pytest.raises(TypeError, match="expected an image or a Video"):
        upscaled(pixels, 256)
    output = AnyGPTOutput(text="", images=[Image.fromarray(pixels)], videos=[Video(frames, 8.0)])
    shown = ChatEngine(tiny_pipe, tmp_path / "a").save_outputs(output, tmp_path / "a", "t")  # the default: 256
    assert load_image(shown["image"][0]).size == (256, 256) and load_video(shown["video"][0]).frames.shape[1:3] == (
        192,
        256,
    )
    native = ChatEngine(tiny_pipe, tmp_path / "b", display_size=0).save_outputs(output, tmp_path / "b", "t")
    assert load_image(native["image"][0]).size == (64, 64)


def test_a_decoder_first_load_is_reported_as_loading_then_its_steps(tmp_path):
    from anygpt import AnyGPTPipeline

    pipe = AnyGPTPipeline.from_pretrained("tiny")  # its own: the decoders are not loaded yet
    engine = ChatEngine(pipe, tmp_path)
    session = engine.new_session()
    settings = GenerationRequest(modalities=["image"], max_new_tokens=2, num_inference_steps=3)
    seen = []
    for exchange in engine.respond(session, "x", [], settings):
        seen.append((exchange.reply.status, exchange.reply.progress))
    statuses = [status for status, _ in seen]
    assert "loading the image decoder" in statuses and seen[-1][0].startswith("done") and seen[-1][1] is None
    rendering = [progress for status, progress in seen if status == "rendering image (1/1)"]
    assert statuses.index("loading the image decoder") < statuses.index("rendering image (1/1)")
    # the denoising steps, in order, up to all of them (a scheduler may add one to the 3 asked for)
    assert rendering == sorted(rendering) and rendering[-1][0] == rendering[-1][1] >= 3 and len(rendering) >= 2
    assert pipe.decoders[Modality.IMAGE].is_loaded
    seen.clear()
    for exchange in engine.respond(session, "again", [], settings):  # loaded: no loading step this time
        seen.append(exchange.reply.status)
    assert "loading the image decoder" not in seen and "rendering image (1/1)" in seen
    app = load_app_module()
    content = app.to_messages([session.exchanges[0]])[-1]["content"]
    assert content[-1] == {"path": str(session.exchanges[0].reply.images[0])}
    # the status box counts the steps while a decoder renders
    assert (
        app.status_text(Reply(status="rendering image (1/2)", progress=(3, 20)))
        == "rendering image (1/2): step 3 of 20"
    )
    assert app.status_text(Reply(status="loading the image decoder")) == "loading the image decoder"


def test_examples_and_what_the_model_knows(tiny_pipe, tmp_path):
    from toyworld.render import COLOURS, DIRECTIONS, SHAPES
    from toyworld.world import PITCHES, STYLES

    app = load_app_module()
    knows = app.model_knows("toyworld")
    for word in [*COLOURS, *SHAPES, *PITCHES, *STYLES, *DIRECTIONS]:  # the model card's whole vocabulary
        assert f"**{word}**" in knows, word
    assert app.model_knows("/some/folder/toyworld") == knows and app.model_knows("my-model") == ""
    demo = app.build_app(ChatEngine(tiny_pipe, tmp_path), model="toyworld")
    config = demo.get_config_file()
    components = {c["id"]: c for c in config["components"]}
    (dataset,) = [c for c in components.values() if c["type"] == "dataset"]
    assert [sample[0]["text"] for sample in dataset["props"]["samples"]] == app.EXAMPLES
    assert dataset["props"]["elem_id"] == "examples"
    assert any(c["type"] == "markdown" and c["props"].get("value") == knows for c in components.values())
    (status,) = [c for c in components.values() if c["props"].get("elem_id") == "status"]
    assert status["type"] == "textbox" and status["props"]["label"] == "Status" and status["props"]["show_label"]
    # clicking an example fills the message box, then sends it: the chat handler runs after the example's event
    chats = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "chat"]
    assert len(chats) == 3  # Enter, Send, an example
    example_click = [f for f in demo.fns.values() if any(t[0] == dataset["id"] for t in f.targets)]
    assert example_click and any(f.trigger_after is not None for f in chats)
    assert "anygpt_demo" not in str(config)  # nothing of the serving side is in the page's config
    assert not (REPO / "app.pyi").exists()  # (Gradio writes one next to a module that subclasses a component)
    tiny = app.build_app(ChatEngine(tiny_pipe, tmp_path), model="tiny").get_config_file()
    assert any("random test model" in str(c["props"].get("value")) for c in tiny["components"])


def test_the_examples_are_answered_by_the_default_model(toyworld, tmp_path):
    app = load_app_module()
    engine = ChatEngine(toyworld, tmp_path)
    expected = {  # the text and the media kinds of each example's answer
        "draw a red circle": ("Here is a red circle.", [".png"]),
        "play a high beep": ("Here is a high beep.", [".wav"]),
        "show a green square moving left": ("Here is a green square moving left.", [".mp4"]),
        "draw a blue triangle and play a low beep": ("Here is a blue triangle. Here is a low beep.", [".png", ".wav"]),
        "draw a red circle and play a high beep and show a green square moving left": (
            "Here is a red circle. Here is a high beep. Here is a green square moving left.",
            [".png", ".mp4", ".wav"],
        ),
    }
    assert list(expected) == app.EXAMPLES
    fields = request_fields("auto", 0.0, 1.0, 64, {"image": 2, "video": 2, "audio": 2}, {}, seed=0)
    for prompt, (text, kinds) in expected.items():
        session = engine.new_session()
        for _ in engine.respond(session, prompt, [], fields):
            pass
        reply = session.exchanges[-1].reply
        assert (reply.text, [p.suffix for p in reply.files]) == (text, kinds), prompt
        if reply.images:
            assert load_image(reply.images[0]).size == (256, 256)


def test_request_fields_from_controls():
    auto = request_fields(["auto", "image"], 0.0, 1.0, 16.0, {"image": 5.0, "audio": None}, {"image": 3.5})
    assert auto["modalities"] == "auto" and auto["max_new_tokens"] == 16 and isinstance(auto["seed"], int)
    assert auto["decoder_overrides"] == {"image": {"num_inference_steps": 5, "guidance_scale": 3.5}}
    request = GenerationRequest.from_dict({**auto, "prompt": "hi"})
    assert request.decoder_settings("image")["num_inference_steps"] == 5 and request.num_inference_steps is None
    assert request_fields(["video", "audio"], 0, 1, 8, {}, {})["modalities"] == ["video", "audio"]
    assert request_fields([], 0, 1, 8, {}, {})["modalities"] == []  # text only
    assert request_fields("auto", 0, 1, 8, {}, {}, seed=-1)["seed"] is None  # a fresh seed per request
    assert request_fields("auto", 0, 1, 8, {}, {}, num_frames=8.0)["num_frames"] == 8


def test_a_bad_setting_is_answered_in_the_chat(tiny_pipe, tmp_path):
    engine = ChatEngine(tiny_pipe, tmp_path)
    session = engine.new_session()
    fields = request_fields("auto", 0.0, 1.0, 2.5, {}, {})
    for _ in engine.respond(session, "hi", [], fields):
        pass
    reply = session.exchanges[-1].reply
    assert reply.status == "error" and reply.error == "max_new_tokens must be a positive integer, got 2.5"
    seeds = []
    real_run = tiny_pipe.run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_pipe, "run", lambda request, **kw: seeds.append(request.seed) or real_run(request, **kw))
        for settings in (GenerationRequest(max_new_tokens=2), GenerationRequest(max_new_tokens=2), {"seed": 5}):
            for _ in engine.respond(session, "again", [], settings):
                pass
    assert seeds[2] == 5 and seeds[0] != seeds[1]  # no seed: a fresh one for every request
    assert session.exchanges[-1].reply.status.startswith("done")


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


def test_decoders_stop_between_denoising_steps(tiny_pipe):
    for modality, decoder in tiny_pipe.decoders.items():
        asked = []

        def should_stop(asked=asked) -> bool:
            asked.append(1)
            return len(asked) > 2  # before the first step, after step 1: go on; after step 2: stop

        conditioning = torch.zeros(1, *decoder.spec.cond_shape)
        with pytest.raises(GenerationStopped, match="stopped after denoising step 2"):
            decoder.generate(conditioning, num_inference_steps=5, show_progress=False, should_stop=should_stop)
        assert len(asked) == 3, modality
        with pytest.raises(GenerationStopped, match="before its first step"):
            decoder.generate(conditioning, num_inference_steps=5, show_progress=False, should_stop=lambda: True)


def test_pipeline_returns_the_media_rendered_before_a_stop(tiny_pipe):
    from anygpt.core.conversation import Conversation

    common = dict(modalities="image,audio", max_new_tokens=2, num_inference_steps=1, show_progress=False, seed=0)
    conversation = Conversation()
    out = tiny_pipe("x", conversation=conversation, on_decode=lambda m, i, n: i == 0, **common)  # False: skip
    assert out.stopped and len(out.images) == 1 and out.audios == []
    assert len(conversation.turns) == 2  # the pipeline keeps the exchange; the demo removes a stopped one

    rendered = []
    out = tiny_pipe("x", on_decode=lambda m, i, n: rendered.append(m), should_stop=lambda: bool(rendered[1:]), **common)
    assert out.stopped and len(out.images) == 1 and out.audios == [] and rendered == [Modality.IMAGE, Modality.AUDIO]
    out = tiny_pipe("x", should_stop=lambda: False, **common)
    assert not out.stopped and len(out.images) == 1 and len(out.audios) == 1
