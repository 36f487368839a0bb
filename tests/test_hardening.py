"""Hardening (issue 22): every number has a range checked before any model loads, the one validation of a request
never raises anything but a clear ``UsageError`` / ``MediaError`` (property-based), the training config's numbers are
bounded when it loads, and one pipeline called from several threads answers each call as if alone."""

from __future__ import annotations

import math
import re
import threading
from dataclasses import fields

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anygpt.base.errors import ConfigError, MediaError, UsageError
from anygpt.core.request import ALIASES, MAX_SEED, GenerationRequest
from training.config import load_config

FIELDS = [f.name for f in fields(GenerationRequest) if f.name != "origin"]
GEN = dict(max_new_tokens=4, num_inference_steps=2, show_progress=False)


# ---------------------------------------------------------------------------------------------- request ranges
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(seed=2**64), r"seed must be an integer <= 2\*\*63-1, got an integer of 65 bits"),
        (dict(seed=-1), "seed must be an integer >= 0, got -1"),
        (dict(seed=True), "seed must be an integer >= 0, got True"),
        (dict(seed=3.0), "seed must be an integer >= 0, got 3.0"),
        (dict(max_new_tokens=10**30), "max_new_tokens must be an integer <= 8192, got an integer of 100 bits"),
        (dict(max_new_tokens=8193), "max_new_tokens must be an integer <= 8192, got 8193"),
        (dict(max_new_tokens=False), "max_new_tokens must be a positive integer, got False"),
        (dict(temperature=1e-300), r"temperature must be a finite number >= 0.001 or 0 \(greedy"),
        (dict(temperature=1e300), "temperature must be a finite number <= 100, got 1e[+]300"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
        (dict(temperature=10**400), "temperature must be a finite number <= 100, got an integer of 1329 bits"),
        (dict(top_p=float("nan")), r"top_p must be a finite number in \(0, 1\], got nan"),
        (dict(top_p=1.5), r"top_p must be a finite number in \(0, 1\], got 1.5"),
        (dict(num_inference_steps=10**12), "num_inference_steps must be an integer <= 1000, got 1000000000000"),
        (dict(num_inference_steps=True), "num_inference_steps must be a positive integer, got True"),
        (dict(guidance_scale=101.0), "guidance_scale must be a finite number <= 100, got 101.0"),
        (dict(guidance_scale=-float("inf")), "guidance_scale must be a finite number >= 0, got -inf"),
        (dict(num_frames=10**9), "num_frames must be an integer <= 256, got 1000000000"),
        (dict(audio_seconds=1e7), r"audio_seconds must be a finite number <= 60 \(seconds\), got 10000000.0"),
        (dict(audio_seconds=float("nan")), "audio_seconds must be a finite number > 0, got nan"),
        (dict(height=4104), "height must be an integer <= 4096, got 4104"),
        (dict(width=4), r"width must be a multiple of 8 \(the VAE's downsampling\), got 4"),
        (dict(width=0), "width must be a positive integer, got 0"),
        (
            dict(decoder_overrides={"video": {"num_frames": 257}}),
            r"decoder_overrides\['video'\].num_frames must be an integer <= 256, got 257",
        ),
        (
            dict(decoder_overrides={"image": {"guidance_scale": float("nan")}}),
            r"decoder_overrides\['image'\].guidance_scale must be a finite number >= 0, got nan",
        ),
        (dict(adapters={"a": float("nan")}), "adapters must be a name"),
        (dict(prompt=b"bytes"), "prompt must be a string, got b'bytes'"),
        (dict(prompt="caf\udce9"), r"prompt must be UTF-8 text, .*'\\udce9' at position 3"),
    ],
)
def test_out_of_range_values_name_the_field(kwargs, message):
    with pytest.raises(UsageError, match=message):
        GenerationRequest(**{"prompt": "x", **kwargs})


def test_the_range_limits_are_accepted():
    top = GenerationRequest(
        "x",
        seed=MAX_SEED,
        max_new_tokens=8192,
        temperature=100,
        top_p=1.0,
        num_inference_steps=1000,
        guidance_scale=100.0,
        height=4096,
        width=8,
        num_frames=256,
        audio_seconds=60,
        decoder_overrides={"audio": {"audio_seconds": 60.0, "num_inference_steps": 1}},
    )
    bottom = GenerationRequest("x", seed=0, max_new_tokens=1, temperature=1e-3, guidance_scale=0, num_frames=1)
    assert (top.seed, top.height, top.width, bottom.temperature) == (MAX_SEED, 4096, 8, 1e-3)


def test_origin_prefixes_the_message_of_a_batch_line():
    with pytest.raises(UsageError, match=r"^prompts.jsonl:2: num_frames must be an integer <= 256, got 1000$"):
        GenerationRequest.from_dict({"prompt": "x", "frames": 1000}, origin="prompts.jsonl:2: ")


def test_max_new_tokens_beyond_the_llm_context_is_refused_before_generating(tiny_pipe, monkeypatch):
    context = tiny_pipe.model.language_model.config.max_position_embeddings
    monkeypatch.setattr(tiny_pipe, "_generate_reply", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(UsageError, match=f"max_new_tokens must be below the LLM's context of {context} tokens"):
        tiny_pipe("x", max_new_tokens=context, show_progress=False)


# ---------------------------------------------------------------------------------------------- property-based
_FIELD_NAMES = st.sampled_from([*FIELDS, *ALIASES])
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "image", "video", "audio", "image,audio", "text", "\udcff", "gen-1", "..", ""]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=8), _FIELD_NAMES), inner, max_size=3)
    ),
    max_leaves=6,
)
_REQUESTS = st.dictionaries(st.one_of(_FIELD_NAMES, st.text(max_size=6), st.integers()), _VALUES, max_size=8)
_NAMES = [*FIELDS, *ALIASES, "field", "fields"]


def _names_a_field(message: str) -> bool:
    return any(re.search(rf"\b{name}\b", message) for name in _NAMES)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_REQUESTS, prompt=st.one_of(st.text(max_size=20), _VALUES))
def test_any_dict_validates_or_raises_a_clear_error_naming_a_field(data, prompt):
    data = dict(data)
    if prompt is not None:
        data.setdefault("prompt", prompt)
    try:
        request = GenerationRequest.from_dict(data, origin="f.jsonl:1: ")
    except (UsageError, MediaError) as error:
        message = str(error)
        assert message.startswith("f.jsonl:1: ") or message.startswith(("images[", "audios[", "videos[")), message
        assert _names_a_field(message) or "prompt" in message, message
        assert "\n" not in message and len(message) < 2000, message
        return
    # what validated is normalised and round-trips through its JSON form
    assert isinstance(request.prompt, str)
    request.prompt.encode("utf-8")
    assert GenerationRequest.from_dict(request.to_dict()) == request


@settings(max_examples=300, deadline=None)
@given(
    seed=st.one_of(st.none(), st.integers(min_value=0, max_value=MAX_SEED)),
    max_new_tokens=st.integers(min_value=1, max_value=8192),
    temperature=st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=100)),
    top_p=st.floats(min_value=0, max_value=1, exclude_min=True),
    steps=st.one_of(st.none(), st.integers(min_value=1, max_value=1000)),
    guidance=st.one_of(st.none(), st.floats(min_value=0, max_value=100)),
    side=st.one_of(st.none(), st.integers(min_value=1, max_value=512).map(lambda n: 8 * n)),
    frames=st.one_of(st.none(), st.integers(min_value=1, max_value=256)),
    seconds=st.one_of(st.none(), st.floats(min_value=0, max_value=60, exclude_min=True)),
)
def test_every_value_in_the_documented_ranges_is_accepted(
    seed, max_new_tokens, temperature, top_p, steps, guidance, side, frames, seconds
):
    settings_ = dict(
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=side,
        width=side,
        num_frames=frames,
        audio_seconds=seconds,
    )
    request = GenerationRequest(
        "x",
        seed=seed,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        decoder_overrides={"image": settings_},
        **settings_,
    )
    assert GenerationRequest.from_dict(request.to_dict()) == request
    assert all(v is None or not isinstance(v, float) or math.isfinite(v) for v in settings_.values())


# ---------------------------------------------------------------------------------------------- training config
@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    from toyworld.sample_configs import write_sample

    return write_sample(tmp_path_factory.mktemp("sample") / "data", size=4) / "stage1.yaml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=.nan", r"optim.lr: must be a finite number, got nan"),
        ("optim.lr=nan", r"optim.lr: must be a finite number, got nan"),  # YAML text, read as a number
        ("optim.lr=0", r"optim.lr: must be > 0 \(range \(0, 1\]\), got 0.0"),
        ("optim.lr=.inf", r"optim.lr: must be a finite number, got inf"),
        ("optim.eps=-1.0", r"optim.eps: must be > 0 \(range \(0, 1\]\), got -1.0"),
        ("optim.max_grad_norm=.inf", r"optim.max_grad_norm: must be a finite number"),
        (
            "optim.warmup_steps=1000000000",
            r"optim.warmup_steps: must be <= 10\*\*8 \(range \[0, 10\*\*8\]\)",
        ),
        ("optim.betas=[0.9, .nan]", r"optim.betas\[1\]: must be a finite number"),
        ("train.batch_size=1e12", r"train.batch_size: expected an integer, got '1e12'"),
        (
            "train.batch_size=1000000000000",
            r"train.batch_size: must be <= 65536 \(range \[1, 65536\]\)",
        ),
        ("train.batch_size=0", r"train.batch_size: must be >= 1 \(range \[1, 65536\]\), got 0"),
        ("train.gradient_accumulation_steps=100000", r"train.gradient_accumulation_steps: must be <= 65536"),
        ("train.max_steps=1000000000000", r"train.max_steps: must be <= 10\*\*8"),
        ("train.epochs=1.0e+300", r"train.epochs: must be <= 10\*\*6 \(range \(0, 10\*\*6\]\)"),
        ("train.seed=18446744073709551616", r"train.seed: must be <= 2\*\*32-1 \(range \[0, 2\*\*32-1\]\)"),
        ("train.keep_checkpoints=0", r"train.keep_checkpoints: must be >= 1 \(range \[1, 10\*\*4\]\), got 0"),
        ("data.max_length=100000000", r"data.max_length: must be <= 131072 \(range \[8, 131072\]\)"),
        ("loss.diffusion.weight=.nan", r"loss.diffusion.weight: must be a finite number"),
        ("loss.modality_weights.video=1.0e+9", r"loss.modality_weights.video: must be <= 10\*\*6"),
        (
            "input_projector.options.num_layers=1000000000",
            r"projector.options.num_layers: must be an integer of at most 1048576",
        ),
        ("input_projector.options.num_layers=1e9", r"input_projector.options.num_layers: expected a number, got the"),
        ("lora.r=.nan", r"lora.r: must be a finite number, got nan"),
    ],
)
def test_training_config_numbers_are_bounded_naming_file_and_key(stage1, override, message):
    if override.startswith("input_projector."):
        override = [f"input_projector.name={_input_projector()}", override]
    else:
        override = [override]
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(stage1, overrides=override)
    assert str(raised.value).startswith(f"{stage1}: ") or str(raised.value).startswith(str(stage1))


def test_training_config_range_limits_load(stage1):
    config = load_config(
        stage1,
        overrides=["optim.lr=1", "train.batch_size=65536", "train.seed=4294967295", "data.max_length=131072"],
    )
    assert (config.optim.lr, config.train.batch_size, config.train.seed) == (1.0, 65536, 2**32 - 1)


def _input_projector() -> str:
    from projectors import list_input_projectors

    return sorted(list_input_projectors())[0]


# ---------------------------------------------------------------------------------------------- threads
def test_two_threads_on_one_pipeline_equal_sequential_calls(tiny_pipe):
    # different step counts: unserialized, the two calls reset one shared scheduler under each other
    calls = [
        lambda: tiny_pipe("draw", modalities="image", seed=1, temperature=1.0, **dict(GEN, num_inference_steps=3)),
        lambda: tiny_pipe(
            ["a", "bb"], modalities="image,audio", seed=2, temperature=0.7, batch_size=2, **dict(GEN, max_new_tokens=8)
        ),
    ]
    sequential = [call() for call in calls]
    results: list = [None, None]
    errors: list = []
    start = threading.Barrier(2)

    def worker(index: int) -> None:
        start.wait()
        try:
            for _ in range(3):
                results[index] = calls[index]()
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    image, batch = results
    assert image.token_ids == sequential[0].token_ids and image.text == sequential[0].text
    assert np.array_equal(np.asarray(image.images[0]), np.asarray(sequential[0].images[0]))
    for got, want in zip(batch, sequential[1], strict=True):
        assert got.token_ids == want.token_ids
        assert np.array_equal(np.asarray(got.images[0]), np.asarray(want.images[0]))
        assert np.array_equal(got.audios[0].waveform, want.audios[0].waveform)


def test_a_second_thread_waits_for_the_running_call(tiny_pipe):
    events: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def hold(modality, index, total):
        events.append("first decodes")
        inside.set()
        assert release.wait(60)

    first = threading.Thread(target=lambda: tiny_pipe("x", modalities="image", seed=0, on_decode=hold, **GEN))
    first.start()
    assert inside.wait(60)
    second = threading.Thread(
        target=lambda: events.append(tiny_pipe.run_batch([GenerationRequest("y", max_new_tokens=4)]) and "second")
    )
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive()  # blocked on the pipeline's lock while the first call runs
    events.append("released")
    release.set()
    first.join(timeout=60)
    second.join(timeout=60)
    assert events == ["first decodes", "released", "second"]
