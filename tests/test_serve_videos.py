"""``anygpt serve``'s ``/v1/videos`` (OpenAI's Videos API, the subset SGLang serves): jobs through the batch worker,
their MP4s in the server's own folder, through the ``openai`` package and plain HTTP on loopback.

The ``tiny`` preset has random weights: videos are noise, so the tests check status, shapes, files and errors.
"""

from __future__ import annotations

import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from serving import serving  # tests/serving.py

from anygpt.apps.server import ServerOptions, build_app
from anygpt.apps.server.protocol import VideoCreateRequest, video_request
from anygpt.apps.server.videos import VIDEO_ID, VideoRecord, VideoStore
from anygpt.apps.server.worker import JobResult
from anygpt.base.errors import UsageError
from anygpt.base.media import Video, load_video
from anygpt.base.modality import Modality
from anygpt.core.output import AnyGPTOutput

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # openai marks videos deprecated

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = {"num_inference_steps": 2}  # decoder steps: the videos are checked for shape, not quality
ERROR_KEYS = {"message", "type", "param", "code"}


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(tiny_pipe, tmp_path_factory):
    """The tiny pipeline served with a key; its video folder made under a test folder."""
    parent = tmp_path_factory.mktemp("videos")
    options = ServerOptions(model_name="tiny", api_key=KEY, batch_wait_s=0.01, video_dir=str(parent))
    app = build_app(tiny_pipe, options)
    with serving(app) as url:
        yield url, app


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


def _wait_until_done(client: openai.OpenAI, video_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        video = client.videos.retrieve(video_id)
        if video.status in ("completed", "failed"):
            return video
        assert video.status in ("queued", "in_progress") and time.monotonic() < deadline, video
        time.sleep(0.05)


def _decode(data: bytes) -> Video:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "video.mp4"
        path.write_bytes(data)
        return load_video(path)


def _error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS
    return error


# ---------------------------------------------------------------------------------------------------- the job's life
def test_create_poll_download_list_delete_with_the_openai_client(server, client):
    url, app = server
    created = client.videos.create(
        prompt="a red ball rolls", size="64x64", seconds="0.5", extra_body={"seed": 1, **FAST}
    )
    assert VIDEO_ID.fullmatch(created.id) and created.object == "video" and created.model == "tiny"
    assert (created.size, created.seconds, created.prompt) == ("64x64", "0.5", "a red ball rolls")
    assert created.status in ("queued", "in_progress") and created.progress == 0 and created.completed_at is None

    done = _wait_until_done(client, created.id)
    assert done.status == "completed" and done.progress == 100 and done.error is None
    assert done.completed_at >= done.created_at == created.created_at

    data = client.videos.download_content(video_id=created.id).read()
    video = _decode(data)
    assert video.frames.shape == (4, 64, 64, 3) and video.fps == 8.0  # 0.5 s at the tiny decoder's 8 fps
    path = app.state.videos.folder / f"{created.id}.mp4"
    assert path.read_bytes() == data and path.parent.parent == Path(app.state.videos.parent)
    raw = httpx.get(f"{url}/v1/videos/{created.id}/content", headers=AUTH)
    assert raw.headers["content-type"] == "video/mp4" and raw.content == data

    listed = {video.id: video for video in client.videos.list()}
    assert listed[created.id].status == "completed" and listed[created.id].size == "64x64"
    assert client.videos.retrieve(created.id).model_dump() == done.model_dump()

    deleted = client.videos.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "video.deleted", True)
    assert not path.exists()
    assert created.id not in [video.id for video in client.videos.list()]
    with pytest.raises(openai.NotFoundError) as raised:
        client.videos.retrieve(created.id)
    assert raised.value.body["code"] == "video_not_found" and raised.value.body["param"] == "video_id"
    for method, route in [("GET", ""), ("GET", "/content"), ("DELETE", "")]:
        response = httpx.request(method, f"{url}/v1/videos/{created.id}{route}", headers=AUTH)
        assert _error_of(response, 404)["code"] == "video_not_found"


def test_json_body_num_frames_and_default_size(server, client):
    url, _ = server
    body = {"prompt": "a blue square", "size": "48x32", "num_frames": 3, "seed": 2, **FAST}
    created = httpx.post(f"{url}/v1/videos", json=body, headers=AUTH)
    assert created.status_code == 200, created.text
    assert (created.json()["size"], created.json()["seconds"]) == ("48x32", "0.375")  # 3 frames at 8 fps
    video_id = created.json()["id"]
    assert _wait_until_done(client, video_id).status == "completed"
    video = _decode(client.videos.download_content(video_id=video_id).read())
    assert video.frames.shape == (3, 32, 48, 3)

    default = client.videos.create(prompt="anything", extra_body=FAST)  # the decoder's 64x64, 8 frames
    assert (default.size, default.seconds) == ("64x64", "1")
    assert _wait_until_done(client, default.id).status == "completed"
    assert _decode(client.videos.download_content(video_id=default.id).read()).frames.shape == (8, 64, 64, 3)


def test_list_pages_and_orders(server, client):
    url, _ = server
    ids = [client.videos.create(prompt=f"clip {i}", extra_body={"num_frames": 1, **FAST}).id for i in range(3)]
    newest_first = client.videos.list(limit=100).data
    order = [video.id for video in newest_first if video.id in ids]
    assert order == ids[::-1]
    page = httpx.get(f"{url}/v1/videos", params={"limit": 1, "order": "asc", "after": ids[0]}, headers=AUTH).json()
    assert page["object"] == "list" and [v["id"] for v in page["data"]] == [ids[1]]
    assert page["first_id"] == page["last_id"] == ids[1] and page["has_more"] is True
    walked = [video.id for video in client.videos.list(limit=1, order="asc") if video.id in ids]  # follows pages
    assert walked == ids
    for video_id in ids:
        _wait_until_done(client, video_id)
        client.videos.delete(video_id)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"size": "60x60"}, "size", "multiple of 8"),
        ({"seconds": "0"}, "seconds", "positive number"),
        ({"seconds": "soon"}, "seconds", "positive number"),
        ({"seconds": "100"}, "seconds", "at most 256 frames"),
        ({"seconds": "1", "num_frames": 4}, "seconds", "not both"),
        ({"num_inference_step": 2}, "num_inference_step", "unknown field"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"input_reference": "x"}, "input_reference", "not supported"),
        ({"prompt": None}, "prompt", "string"),
    ],
)
def test_bad_fields_are_400_naming_them(server, body, param, words):
    url, app = server
    before = len(app.state.videos)
    response = httpx.post(f"{url}/v1/videos", json={"prompt": "x", **body}, headers=AUTH)
    error = _error_of(response, 400)
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"
    assert len(app.state.videos) == before  # nothing was queued


def test_bad_forms_queries_ids_and_models(server, client):
    url, _ = server
    with pytest.raises(openai.BadRequestError) as raised:
        client.videos.create(prompt="x", size="64x60")
    assert raised.value.body["param"] == "size"
    upload = httpx.post(
        f"{url}/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", b"png")}, headers=AUTH
    )
    assert _error_of(upload, 400)["param"] == "input_reference"
    not_json = httpx.post(f"{url}/v1/videos", content=b"{nope", headers=AUTH)
    assert _error_of(not_json, 400)["message"].startswith("body:")
    other_model = httpx.post(f"{url}/v1/videos", json={"prompt": "x", "model": "sora-2"}, headers=AUTH)
    assert _error_of(other_model, 404)["code"] == "model_not_found"
    for query, param in [
        ({"limit": 0}, "limit"),
        ({"order": "up"}, "order"),
        ({"after": "video_" + "0" * 32}, "after"),
    ]:
        assert _error_of(httpx.get(f"{url}/v1/videos", params=query, headers=AUTH), 400)["param"] == param
    for video_id in ["video_" + "0" * 32, "video_XYZ", "..", "%2e%2e%2fetc", "video_" + "a" * 33]:
        response = httpx.get(f"{url}/v1/videos/{video_id}/content", headers=AUTH)
        assert response.status_code == 404 and set(response.json()["error"]) == ERROR_KEYS
    created = client.videos.create(prompt="x", extra_body={"num_frames": 1, **FAST})
    thumbnail = httpx.get(f"{url}/v1/videos/{created.id}/content", params={"variant": "thumbnail"}, headers=AUTH)
    assert _error_of(thumbnail, 400)["param"] == "variant"
    _wait_until_done(client, created.id)
    client.videos.delete(created.id)


def test_api_key_is_required(server):
    url, _ = server
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.videos.create(prompt="x")
    assert raised.value.status_code == 401 and raised.value.body["code"] == "invalid_api_key"
    for method, route in [("POST", ""), ("GET", ""), ("GET", "/video_" + "0" * 32 + "/content")]:
        response = httpx.request(method, f"{url}/v1/videos{route}", json={"prompt": "x"})
        assert _error_of(response, 401)["code"] == "invalid_api_key"


def test_a_form_over_the_size_limit_is_413(tiny_pipe):
    app = build_app(tiny_pipe, ServerOptions(model_name="tiny", max_request_bytes=2**16))

    def chunked():  # no Content-Length: the limit is found while the form is read
        yield b"--b\r\nContent-Disposition: form-data; name=prompt\r\n\r\n"
        for _ in range(4):
            yield b"x" * 2**15

    with serving(app) as url:
        headers = {"content-type": "multipart/form-data; boundary=b"}
        response = httpx.post(f"{url}/v1/videos", content=chunked(), headers=headers)
        assert _error_of(response, 413)["code"] == "request_too_large"


# ---------------------------------------------------------------------------------------------------- the worker
class _GatedPipe:
    """The tiny pipeline, whose ``run_batch`` waits for ``gate``, records prompts, and fails the prompt ``boom``."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.gate = threading.Event()
        self.gate.set()
        self.prompts: list[str] = []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def run_batch(self, requests, **kwargs):
        self.gate.wait(60)
        self.prompts.extend(r.prompt for r in requests)
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("boom")
        return self.pipe.run_batch(requests, **kwargs)


def _wait_for(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_queue_limits_not_ready_failure_and_cancel(tiny_pipe):
    gated = _GatedPipe(tiny_pipe)
    options = ServerOptions(model_name="tiny", max_batch_size=1, queue_size=1, batch_wait_s=0)
    app = build_app(gated, options)
    worker = app.state.worker
    body = {"num_frames": 1, **FAST}
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        gated.gate.clear()
        running = client.videos.create(prompt="hold", extra_body=body)
        _wait_for(lambda: worker.stats()["running"] == 1)
        failing = client.videos.create(prompt="boom", extra_body=body)
        with pytest.raises(openai.RateLimitError) as raised:  # the worker's queue (1) is full
            client.videos.create(prompt="one too many", extra_body=body)
        assert raised.value.body["code"] == "queue_full" and len(app.state.videos) == 2
        assert client.videos.retrieve(running.id).status == "in_progress"
        assert client.videos.retrieve(failing.id).status == "queued"
        not_ready = httpx.get(f"{url}/v1/videos/{running.id}/content")
        assert _error_of(not_ready, 404)["code"] == "video_not_ready"

        gated.gate.set()
        assert _wait_until_done(client, running.id).status == "completed"
        failed = _wait_until_done(client, failing.id)
        assert failed.status == "failed" and failed.progress == 0 and failed.completed_at is not None
        assert failed.error.code == "internal_error" and "boom" in failed.error.message
        no_content = httpx.get(f"{url}/v1/videos/{failing.id}/content")
        assert _error_of(no_content, 404)["code"] == "video_failed"
        assert httpx.get(f"{url}/health").json()["status"] == "ok"  # the server goes on serving

        gated.gate.clear()
        holding = client.videos.create(prompt="hold again", extra_body=body)
        _wait_for(lambda: worker.stats()["running"] == 1)
        dropped = client.videos.create(prompt="never run", extra_body=body)
        assert client.videos.delete(dropped.id).deleted  # a queued job is cancelled
        gated.gate.set()
        assert _wait_until_done(client, holding.id).status == "completed"
        after = client.videos.create(prompt="after", extra_body=body)
        assert _wait_until_done(client, after.id).status == "completed"
        assert gated.prompts == ["hold", "boom", "hold again", "after"]
        assert {v.id for v in client.videos.list()} == {running.id, failing.id, holding.id, after.id}
        folder = app.state.videos.folder
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{i}.mp4" for i in (running.id, holding.id, after.id)
        )
    assert not folder.exists()  # the server's folder goes with it


def test_a_model_without_a_video_decoder_is_400(tiny_pipe):
    class NoVideo(_GatedPipe):
        decoders = {m: d for m, d in tiny_pipe.decoders.items() if m is not Modality.VIDEO}

    app = build_app(NoVideo(tiny_pipe), ServerOptions(model_name="tiny"))
    with serving(app) as url:
        response = httpx.post(f"{url}/v1/videos", json={"prompt": "x"})
        error = _error_of(response, 400)
        assert error["code"] == "video_not_supported" and "no video decoder" in error["message"]
        assert "image, audio" in error["message"]


# ---------------------------------------------------------------------------------------------------- the store
def _finished(frames: int = 2) -> Future:
    future: Future = Future()
    video = Video(np.zeros((frames, 16, 16, 3), dtype=np.uint8), 8.0)
    future.set_result(JobResult(AnyGPTOutput(text="", videos=[video]), 1, 1, "stop"))
    return future


def _record(store: VideoStore, future: Future) -> VideoRecord:
    return VideoRecord(store.new_id(), "p", "m", "16x16", "0.25", int(time.time()), future)


def _settled(store: VideoStore, video_id: str) -> dict:
    _wait_for(lambda: store.describe(video_id)["status"] in ("completed", "failed"))
    return store.describe(video_id)


def test_store_evicts_the_oldest_finished_jobs_past_its_limit(tmp_path):
    store = VideoStore(max_videos=2, parent=str(tmp_path)).start()
    try:
        waiting = _record(store, Future())  # never finishes: never evicted
        store.add(waiting)
        first = _record(store, _finished())
        store.add(first)
        assert _settled(store, first.id)["status"] == "completed" and first.path.exists()
        second = _record(store, _finished())
        store.add(second)  # three jobs: the oldest finished one goes, with its file
        assert store.describe(first.id) is None and not first.path.exists()
        assert _settled(store, second.id)["status"] == "completed"
        assert [v["id"] for v in store.page(order="asc")[0]] == [waiting.id, second.id]
        third = _record(store, Future())
        store.add(third)  # only unfinished jobs left beside second: second goes
        assert store.describe(second.id) is None and not second.path.exists() and len(store) == 2
        assert store.describe(waiting.id)["status"] == "queued" and store.describe("../" + waiting.id) is None
    finally:
        store.close()
    assert not store.folder.exists()


def test_store_discards_a_job_deleted_while_it_runs(tmp_path):
    store = VideoStore(max_videos=5, parent=str(tmp_path)).start()
    try:
        future: Future = Future()
        assert future.set_running_or_notify_cancel()
        record = _record(store, future)
        store.add(record)
        assert store.describe(record.id)["status"] == "in_progress"
        assert store.delete(record.id) and not store.delete(record.id)
        future.set_result(_finished().result())
        store._writer.submit(lambda: None).result()  # the writer is done with it
        assert list(store.folder.iterdir()) == [] and len(store) == 0
        broken = _record(store, Future())
        store.add(broken)
        broken.future.set_result(JobResult(AnyGPTOutput(text="no video"), 1, 1, "stop"))
        assert _settled(store, broken.id)["error"] == {"code": "no_video", "message": "the model rendered no video"}
    finally:
        store.close()


def test_seconds_become_frames_at_the_decoder_fps():
    def frames(**fields):
        return video_request(VideoCreateRequest(prompt="p", **fields), fps=8.0).num_frames

    assert frames(seconds="4") == 32 and frames(seconds=0.3) == 2 and frames(seconds="0.01") == 1
    assert frames() is None and frames(num_frames=5) == 5
    request = video_request(VideoCreateRequest(prompt="p", size="32x16", seed=3), fps=8.0)
    assert (request.width, request.height, request.seed, request.modalities) == (32, 16, 3, ["video"])
    with pytest.raises(UsageError, match="^seconds: .*'inf'"):
        frames(seconds="inf")
    with pytest.raises(UsageError, match=r"^seconds: 33 s is 264 frames"):
        frames(seconds=33)
    with pytest.raises(UsageError, match="max_videos"):
        VideoStore(max_videos=0)
    with pytest.raises(UsageError, match="max_videos"):
        ServerOptions(model_name="m", max_videos=0)
