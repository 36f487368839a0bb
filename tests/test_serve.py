"""``anygpt serve``: the OpenAI-compatible server through the ``openai`` package on loopback, its batching, its errors,
and the same app as a Ray Serve deployment with 2 CPU replicas.

The ``tiny`` preset has random weights: replies are noise, so the tests check shapes, decodability, keys and
equalities, never content.
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from serving import free_port, serving  # tests/serving.py
from transformers import LogitsProcessor, LogitsProcessorList

from anygpt.apps.server import BatchWorker, ServerOptions, build_app
from anygpt.apps.server.protocol import ChatCompletionRequest, chat_request, output_modalities
from anygpt.apps.server.worker import DeltaStreamer, finish_reason
from anygpt.base.errors import UsageError
from anygpt.base.media import load_audio, load_video
from anygpt.base.modality import Modality
from anygpt.core.request import GenerationRequest

KEY = "test-key"
FAST = {"num_inference_steps": 2}  # decoder steps: the media are checked for shape, not quality


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(tiny_pipe):
    """The tiny pipeline served with a key, batches of up to 8 (gathered for 50 ms), a 2 MB body limit."""
    options = ServerOptions(
        model_name="tiny", api_key=KEY, max_batch_size=8, batch_wait_s=0.05, max_request_bytes=2**21
    )
    app = build_app(tiny_pipe, options)
    with serving(app) as url:
        yield url, app


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


def _data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _media_parts(media_files) -> dict[str, dict]:
    return {
        "image": {"type": "image_url", "image_url": {"url": _data_url(media_files["image"], "image/png")}},
        "audio": {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(media_files["audio"].read_bytes()).decode(), "format": "wav"},
        },
        "audio_url": {"type": "audio_url", "audio_url": {"url": _data_url(media_files["audio"], "audio/wav")}},
        "video": {"type": "video_url", "video_url": {"url": _data_url(media_files["video"], "video/mp4")}},
    }


def _data_of(url: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert url.startswith(prefix), url[:40]
    return base64.b64decode(url[len(prefix) :])


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def _load(data: bytes, suffix: str, loader):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"file{suffix}"
        path.write_bytes(data)
        return loader(path)


# ---------------------------------------------------------------------------------------------------- routes
def test_models_and_health(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(f"{url}/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == "tiny" and health["max_batch_size"] == 8


def test_text_only_reply(client):
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], modalities=["text"], max_tokens=5, seed=0
    )
    message = reply.choices[0].message
    assert isinstance(message.content, str) and message.audio is None
    assert reply.object == "chat.completion" and reply.model == "tiny" and reply.id.startswith("chatcmpl-")
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens + 5


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_each_medium_forced(client, modality):
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": f"make a {modality}"}],
        modalities=["text", modality],
        max_tokens=4,
        seed=1,
        extra_body=FAST,
    )
    message = reply.choices[0].message
    if modality == "audio":
        assert isinstance(message.content, str)
        assert message.audio.transcript == message.content and message.audio.expires_at > reply.created
        audio = _load(base64.b64decode(message.audio.data), ".wav", load_audio)
        assert audio.sample_rate == 16000 and audio.waveform.ndim == 1 and audio.waveform.size > 0
        return
    text, part = message.content  # a list: the text part, then the medium's data-URI part
    assert text["type"] == "text" and message.audio is None
    if modality == "image":
        assert part["type"] == "image_url"
        assert _png(_data_of(part["image_url"]["url"], "image/png")).size == (64, 64)
    else:
        assert part["type"] == "video_url"
        video = _load(_data_of(part["video_url"]["url"], "video/mp4"), ".mp4", load_video)
        assert video.frames.shape[1:] == (64, 64, 3) and video.frames.shape[0] >= 1


def _steer(monkeypatch, pipe, step: int, token: int) -> None:
    """Make the LLM write ``token`` as the reply's token number ``step + 1`` (what follows a signal group's first
    token is forced by the pipeline), in single and batched calls alike."""
    llm = pipe.model.language_model
    real = llm.generate

    class Steer(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == step:  # with inputs_embeds, input_ids holds the reply so far
                scores = torch.full_like(scores, float("-inf"))
                scores[:, token] = 0.0
            return scores

    def generate(*args, logits_processor=None, **kwargs):
        return real(*args, logits_processor=LogitsProcessorList([*(logits_processor or []), Steer()]), **kwargs)

    monkeypatch.setattr(llm, "generate", generate)


def test_finish_reason_counts_a_forced_group_the_model_wrote_itself(client, tiny_pipe, monkeypatch):
    """The LLM writes 3 tokens and then the image group itself (4 tokens): with max_tokens 7 it ran into the limit
    ("length"), though the group is the forced one. The old count took every forced group off the reply's length
    and said "stop"."""
    group = tiny_pipe.model.tokens.signal[Modality.IMAGE]
    _steer(monkeypatch, tiny_pipe, 3, group[0])
    request = dict(
        model="tiny",
        messages=[{"role": "user", "content": "draw"}],
        modalities=["text", "image"],
        max_tokens=3 + len(group),
        seed=0,
        extra_body=FAST,
    )
    reply = client.chat.completions.create(**request)
    assert reply.usage.completion_tokens == 3 + len(group) and reply.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(**request, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    with ThreadPoolExecutor(2) as pool:  # two at once: the batched path counts the same way
        replies = list(pool.map(lambda _: client.chat.completions.create(**request), range(2)))
    assert [r.choices[0].finish_reason for r in replies] == ["length", "length"]


def test_finish_reason_does_not_count_an_appended_group(client, tiny_pipe, monkeypatch):
    """The LLM ends its reply (EOS) after 3 tokens; the pipeline appends the forced image group: "stop", though the
    reply (7 tokens) is longer than max_tokens 4; and without EOS, 4 tokens of text reach the limit: "length"."""
    group = tiny_pipe.model.tokens.signal[Modality.IMAGE]
    request = dict(
        model="tiny",
        messages=[{"role": "user", "content": "draw"}],
        modalities=["text", "image"],
        max_tokens=4,
        seed=0,
        extra_body=FAST,
    )
    with monkeypatch.context() as patch:
        _steer(patch, tiny_pipe, 3, tiny_pipe.tokenizer.eos_token_id)
        reply = client.chat.completions.create(**request)
    assert reply.usage.completion_tokens == 3 + len(group) and reply.choices[0].finish_reason == "stop"
    _steer(monkeypatch, tiny_pipe, 4, group[0])  # never reached: the reply is 4 tokens of text
    reply = client.chat.completions.create(**request)
    assert reply.usage.completion_tokens == 4 + len(group) and reply.choices[0].finish_reason == "length"


def test_finish_reason_rule(tiny_pipe):
    tokenizer = tiny_pipe.tokenizer
    text = tokenizer("abcd", add_special_tokens=False).input_ids
    assert finish_reason(text, 4, tokenizer, ["USER:"]) == "length"
    assert finish_reason(text, 5, tokenizer, ["USER:"]) == "stop"
    assert finish_reason([*text[:3], tokenizer.eos_token_id], 4, tokenizer, []) == "stop"
    assert finish_reason(tokenizer(" USER:", add_special_tokens=False).input_ids, 6, tokenizer, ["USER:"]) == "stop"


@pytest.mark.parametrize("part", ["image", "audio", "audio_url", "video"])
def test_media_in(client, media_files, part):
    content = [{"type": "text", "text": "what is this?"}, _media_parts(media_files)[part]]
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], modalities=["text"], max_tokens=3, seed=0
    )
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.prompt_tokens > 20  # the medium's placeholders are part of the prompt


def test_history_media_are_encoded_once(server, client, media_files, monkeypatch):
    app = server[1]
    encoder = app.state.pipe.model.encoder
    calls = []
    original = encoder.encode
    monkeypatch.setattr(
        encoder, "encode", lambda modality, items: calls.append(len(items)) or original(modality, items)
    )
    image = _media_parts(media_files)["image"]
    first = [{"role": "user", "content": [image, {"type": "text", "text": "a new picture, turn one"}]}]
    reply = client.chat.completions.create(model="tiny", messages=first, modalities=["text"], max_tokens=3)
    assert sum(calls) <= 1  # encoded now (or known from an earlier test: the cache is by content)
    seen = sum(calls)
    second = [*first, {"role": "assistant", "content": reply.choices[0].message.content}]
    second.append({"role": "user", "content": "and turn two"})
    again = client.chat.completions.create(model="tiny", messages=second, modalities=["text"], max_tokens=3)
    assert sum(calls) == seen  # the history's image came from the feature cache
    assert again.usage.prompt_tokens > reply.usage.prompt_tokens + 3


def test_images_route(client):
    result = client.images.generate(
        model="tiny",
        prompt="a red square",
        n=2,
        size="48x32",
        response_format="b64_json",
        extra_body={"seed": 3, **FAST},
    )
    images = [_png(base64.b64decode(item.b64_json)) for item in result.data]
    assert [image.size for image in images] == [(48, 32), (48, 32)]
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # seeds 3 and 4
    again = client.images.generate(
        model="tiny", prompt="a red square", n=2, size="48x32", extra_body={"seed": 3, **FAST}
    )
    assert [item.b64_json for item in again.data] == [item.b64_json for item in result.data]


def test_streaming_chunks_add_up_to_the_reply(client):
    request = dict(
        model="tiny",
        messages=[{"role": "user", "content": "draw and tell"}],
        modalities=["text", "image"],
        max_tokens=12,
        seed=5,
        extra_body=FAST,
    )
    whole = client.chat.completions.create(**request).choices[0].message.content
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    *text_chunks, last, usage = chunks[1:]
    streamed = "".join(c.choices[0].delta.content for c in text_chunks)
    assert all(c.choices[0].finish_reason is None for c in text_chunks)
    final = last.choices[0].delta.content  # the rest of the text, then the image
    assert last.choices[0].finish_reason in ("stop", "length")
    rest = "".join(p["text"] for p in final if p["type"] == "text")
    assert streamed + rest == whole[0]["text"]
    images = [p for p in final if p["type"] == "image_url"]
    assert len(images) == 1 and images[0]["image_url"]["url"] == whole[1]["image_url"]["url"]  # same seed, same PNG
    assert usage.choices == [] and usage.usage.completion_tokens > 0


def test_streaming_wire_format(server):
    url, _ = server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


# ---------------------------------------------------------------------------------------------------- key and errors
def test_api_key(server):
    url, _ = server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.chat.completions.create(**body)
    assert raised.value.status_code == 401 and raised.value.body["code"] == "invalid_api_key"
    missing = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert missing.status_code == 401 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200


GARBAGE_IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no").decode()}}


@pytest.mark.parametrize(
    "change, status, param, words",
    [
        ({"temperature": -1}, 400, "temperature", "greater than or equal to 0"),
        ({"top_p": 0}, 400, "top_p", "greater than 0"),
        ({"max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
        ({"num_inference_step": 2}, 400, "num_inference_step", "unknown field"),
        ({"n": 2}, 400, "n", "got 2"),
        ({"stop": ["###"]}, 400, "stop", "got ['###']"),
        ({"size": "big"}, 400, "size", "WIDTHxHEIGHT"),
        ({"size": "60x60"}, 400, "size", "multiple of 8"),
        ({"modalities": ["text", "smell"]}, 400, "modalities[1]", "unknown modality"),
        ({"messages": []}, 400, "messages", "at least 1"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "got 'tool'"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages", "the last message"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, GARBAGE_IMAGE]}]},
            400,
            "messages[0].content[1]",
            "cannot read the image",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,%%%"}}]}]},
            400,
            "messages[0].content[0].image_url.url",
            "base64",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}
                ]
            },
            400,
            "messages[0].content[0].image_url.url",
            "fetches no URLs",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "@@@"}}]}]},
            400,
            "messages[0].content[0].image_url.url",
            "base64",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "smell"}]}]}, 400, "messages[0].content[0]", "'smell'"),
        ({"adapters": "nope"}, 400, None, "nope"),
        ({"model": "gpt-4o"}, 404, "model", "does not exist"),
    ],
)
def test_bad_requests_are_400_naming_the_field(server, change, status, param, words):
    url, _ = server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **change}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error


def test_bad_bodies_and_routes(server):
    url, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    not_json = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers=headers)
    assert not_json.status_code == 400 and not_json.json()["error"]["message"].startswith("body:")
    too_large = httpx.post(f"{url}/v1/chat/completions", content=b"x" * (2**21 + 1), headers=headers)
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"

    def chunked():
        for _ in range(3):
            yield b"x" * 2**20

    streamed = httpx.post(f"{url}/v1/chat/completions", content=chunked(), headers=headers)  # no Content-Length
    assert streamed.status_code == 413
    url_format = httpx.post(
        f"{url}/v1/images/generations", json={"prompt": "a", "response_format": "url"}, headers=headers
    )
    assert url_format.status_code == 400 and url_format.json()["error"]["param"] == "response_format"
    unknown = httpx.get(f"{url}/v1/nothing", headers=headers)
    assert unknown.status_code == 404 and "error" in unknown.json()


class _GatedPipe:
    """The tiny pipeline, whose ``run_batch`` waits for ``gate`` and fails any batch holding the prompt ``boom``."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[int] = []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def run_batch(self, requests, **kwargs):
        self.gate.wait(60)
        self.batches.append(len(requests))
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("boom")
        return self.pipe.run_batch(requests, **kwargs)


def _wait_for(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_full_queue_is_429_and_a_stopped_worker_503(tiny_pipe):
    gated = _GatedPipe(tiny_pipe)
    options = ServerOptions(model_name="tiny", max_batch_size=1, queue_size=1, batch_wait_s=0)
    app = build_app(gated, options)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with serving(app) as url, ThreadPoolExecutor(2) as pool:
        gated.gate.clear()
        running = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=60)
        _wait_for(lambda: app.state.worker.stats()["running"] == 1)
        waiting = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=60)
        _wait_for(lambda: app.state.worker.stats()["queued"] == 1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.RateLimitError) as raised:
            client.chat.completions.create(**body)
        assert raised.value.response.headers["retry-after"] == "1" and raised.value.body["code"] == "queue_full"
        gated.gate.set()
        assert running.result().status_code == 200 and waiting.result().status_code == 200
        app.state.worker.close()
        stopped = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert stopped.status_code == 503 and stopped.json()["error"]["type"] == "server_error"
        assert httpx.get(f"{url}/health").status_code == 503


def test_a_request_that_breaks_the_model_fails_alone(tiny_pipe):
    gated = _GatedPipe(tiny_pipe)
    app = build_app(gated, ServerOptions(model_name="tiny", max_batch_size=4, batch_wait_s=0))
    bodies = [{"messages": [{"role": "user", "content": p}], "max_tokens": 2} for p in ("hold", "boom", "a", "b", "c")]
    with serving(app) as url, ThreadPoolExecutor(5) as pool:
        gated.gate.clear()
        post = lambda b: httpx.post(f"{url}/v1/chat/completions", json=b, timeout=60)  # noqa: E731
        holding = pool.submit(post, bodies[0])  # the worker waits in it while the other four queue up
        _wait_for(lambda: app.state.worker.stats()["running"] == 1)
        futures = [pool.submit(post, b) for b in bodies[1:]]
        _wait_for(lambda: app.state.worker.stats()["queued"] == 4)
        gated.gate.set()
        statuses = [f.result().status_code for f in [holding, *futures]]
    assert statuses == [200, 500, 200, 200, 200]
    assert gated.batches == [1, 4, 1, 1, 1, 1]  # the four together, then again one by one


# ---------------------------------------------------------------------------------------------------- batching
def test_eight_concurrent_clients_are_batched_and_answered_as_alone(server, client, tiny_pipe):
    app = server[1]
    before = app.state.worker.stats()["batches"]
    prompts = [f"picture {i}" for i in range(8)]

    def ask(i: int):
        return client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": prompts[i]}],
            modalities=["text", "image"],
            max_tokens=6,
            seed=i,
            extra_body=FAST,
        )

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    batches = app.state.worker.stats()["batches"] - before
    assert batches < 8 and app.state.worker.largest_batch > 1  # requests shared batches
    for i, reply in enumerate(replies):
        text, image = reply.choices[0].message.content
        assert _png(_data_of(image["image_url"]["url"], "image/png")).size == (64, 64)
        alone = tiny_pipe.run(
            GenerationRequest(prompts[i], modalities=["image"], seed=i, max_new_tokens=6, **FAST), show_progress=False
        )
        assert text["text"] == alone.text


# prompts of different lengths, sampled rows, near ties: tests/test_serve_batching.py
def test_run_batch_of_equal_length_prompts_agrees_with_single_calls_in_the_llm(tiny_pipe):
    """Unpadded rows: the same tokens, and the same conditioning up to the matrix kernels' summation order (with one
    thread it is bit-identical; with several, how a GEMM splits its work depends on the number of rows)."""
    prompts = ["draw a cat", "draw a dog", "draw a cow"]
    assert len({len(tiny_pipe.tokenizer(p).input_ids) for p in prompts}) == 1
    requests = [
        GenerationRequest(p, modalities=["image"], seed=i, max_new_tokens=6, **FAST) for i, p in enumerate(prompts)
    ]
    alone = [tiny_pipe.run(r, show_progress=False) for r in requests]
    together = tiny_pipe.run_batch(requests)
    for single, batched in zip(alone, together, strict=True):
        assert batched.token_ids == single.token_ids
        torch.testing.assert_close(batched.conditioning["image"], single.conditioning["image"], rtol=0, atol=1e-5)


def test_run_batch_streams_each_row_and_keeps_conversations(tiny_pipe):
    from anygpt.core.conversation import Conversation

    requests = [
        GenerationRequest("one", modalities=[], max_new_tokens=4),
        GenerationRequest("two two two", modalities=[], max_new_tokens=7),
    ]
    streamed = [[], []]

    class Collect:
        def __init__(self, row):
            self.row, self.calls = row, 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:
                streamed[self.row].extend(value.tolist())

        def end(self):
            pass

    conversations = [Conversation(), Conversation()]
    outputs = tiny_pipe.run_batch(requests, conversations=conversations, streamers=[Collect(0), Collect(1)])
    assert [len(s) for s in streamed] == [4, 7]
    assert [o.token_ids for o in outputs] == [s[: len(o.token_ids)] for s, o in zip(streamed, outputs, strict=True)]
    assert [[t.role for t in c.turns] for c in conversations] == [["user", "assistant"]] * 2
    with pytest.raises(UsageError, match="given twice"):
        tiny_pipe.run_batch(requests, conversations=[conversations[0], conversations[0]])


# ---------------------------------------------------------------------------------------------------- pieces
def test_delta_streamer_holds_back_blanks_and_stop_strings(tiny_pipe):
    tokenizer = tiny_pipe.tokenizer
    pieces: list[str] = []
    streamer = DeltaStreamer(tokenizer, pieces.append, stop=["###"])
    streamer.put(torch.tensor([[]]))  # the prompt's ids
    for token in tokenizer(" hello world ### never", add_special_tokens=False).input_ids:
        streamer.put(torch.tensor([token]))
    assert "".join(pieces) == "hello world" == streamer.sent


def test_output_modalities_and_options():
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    assert chat_request(body, max_video_frames=4)[0].modalities == "auto"
    assert chat_request(body, max_video_frames=4, default_modalities=("text",))[0].modalities == []
    assert ServerOptions(model_name="m", default_modalities=["auto"]).default_modalities is None
    with pytest.raises(UsageError, match="smell"):
        ServerOptions(model_name="m", default_modalities=("text", "smell"))
    assert output_modalities(None) == "auto"
    assert output_modalities(["text"]) == []
    assert output_modalities(["text", "image", "audio", "image"]) == ["image", "audio"]
    with pytest.raises(UsageError, match="max_batch_size"):
        ServerOptions(model_name="m", max_batch_size=0)
    with pytest.raises(UsageError, match="queue_size"):
        BatchWorker(None, queue_size=0)


def test_serve_command_options(monkeypatch):
    from anygpt.apps.serve import server_options
    from anygpt.cli import build_parser

    parser, module = build_parser(["serve"])
    argv = ["serve", "--model", "tiny", "--max-request-mb", "0.5", "--batch-wait-ms", "5"]
    argv += ["--default-modalities", "text"]
    args = parser.parse_args(argv)
    monkeypatch.setenv("ANYGPT_API_KEY", "from-env")
    options = server_options(args)
    assert (options.model_name, options.api_key, options.max_request_bytes, options.batch_wait_s) == (
        "tiny",
        "from-env",
        2**19,
        0.005,
    )
    assert options.default_modalities == ("text",)
    assert server_options(parser.parse_args(["serve"])).default_modalities is None
    assert (
        options.exact_batching
        and not server_options(parser.parse_args(["serve", "--no-exact-batching"])).exact_batching
    )
    assert args.host == "127.0.0.1" and args.port == 8000 and module.COMMANDS["serve"]


# ---------------------------------------------------------------------------------------------------- Ray Serve
def test_ray_serve_two_cpu_replicas_answer(monkeypatch):
    ray = pytest.importorskip("ray", reason="ray[serve] is not installed (the serve-ray extra)")
    from ray import serve

    # a busy machine (a test run beside a training run) starts Serve's HTTP proxy in more than its 5 s; the local
    # Ray instance's processes inherit these
    monkeypatch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "120")
    monkeypatch.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "120")

    from anygpt.apps.server.ray_serve import ReplicaPlan, deployment_app, start

    port = free_port()
    plan = ReplicaPlan(replicas=2, cpus_per_replica=0.5)
    app = deployment_app("tiny", ServerOptions(model_name="tiny", max_batch_size=4), None, plan)
    try:
        start(app, host="127.0.0.1", port=port, num_cpus=2)
        url = f"http://127.0.0.1:{port}"
        with ThreadPoolExecutor(8) as pool:
            replicas = set(pool.map(lambda _: httpx.get(f"{url}/health", timeout=60).json()["replica"], range(24)))
        assert len(replicas) == 2
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            modalities=["text", "image"],
            max_tokens=3,
            extra_body=FAST,
        )
        assert _png(_data_of(reply.choices[0].message.content[1]["image_url"]["url"], "image/png")).size == (64, 64)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_documented_serve_run_targets_build_the_app():
    """Each ``serve run IMPORT_PATH key=value ...`` line of docs/serving.md, resolved and called as Ray's ``serve
    run`` does (its own helpers), builds the deployment it says: the replicas, each replica's resources, the
    model and the options. (Running it for real takes minutes on a small machine, mostly Ray starting and each
    replica importing torch: see docs/serving.md for a run.)"""
    pytest.importorskip("ray", reason="ray[serve] is not installed (the serve-ray extra)")
    import shlex

    from ray._common.utils import import_attr
    from ray.serve._private import api as serve_api
    from ray.serve.deployment import Application
    from ray.serve.scripts import convert_args_to_dict

    docs = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
    lines = [line.strip() for line in docs.read_text().splitlines() if line.strip().startswith("serve run ")]
    assert lines, "docs/serving.md shows no serve run command"
    for line in lines:
        words = shlex.split(line.split("#")[0])
        arguments = convert_args_to_dict(tuple(words[3:]))
        app = serve_api.call_user_app_builder_with_args_if_necessary(import_attr(words[2]), arguments)
        assert isinstance(app, Application), line
        deployment = app._bound_deployment
        model, options, runtime = deployment.init_args
        assert model == arguments.get("model", "toyworld") and options["model_name"] == model
        assert deployment.num_replicas == int(arguments.get("replicas", 1))
        assert deployment.ray_actor_options["num_gpus"] == float(arguments.get("gpus_per_replica", 0))
        assert (runtime or {}).get("device") == arguments.get("device")
