"""The toy world's oracles (pixels, samples and captions back to world words) and the evaluator."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from anygpt.base.media import Audio, Video, load_video, save_video
from anygpt.base.modality import Modality
from anygpt.core.pipeline import AnyGPTOutput
from toyworld import world
from toyworld.evaluate import (
    METRICS,
    TARGETS,
    evaluate,
    failures,
    format_report,
    heldout_items,
    heldout_requests,
)
from toyworld.oracles import (
    audio_attributes,
    caption_attributes,
    image_attributes,
    reply_modalities,
    video_attributes,
)

N = 96  # items per kind drawn from a fixed seed


def _images(seed: int = 0, n: int = N) -> list[world.ImageItem]:
    rng = np.random.default_rng(seed)
    return [world.draw_image(rng) for _ in range(n)]


def _videos(seed: int = 0, n: int = N) -> list[world.VideoItem]:
    rng = np.random.default_rng(seed)
    return [world.draw_video(rng) for _ in range(n)]


def _every_image() -> list[world.ImageItem]:
    """Every colour x shape at the smallest and largest sizes, centred and in opposite corners."""
    items = []
    for colour, shape, radius in itertools.product(world.COLOURS, world.SHAPES, (11.0, 22.0)):
        low, high = radius + 2, world.IMAGE_SIZE - radius - 2
        for centre in ((32.0, 32.0), (low, low), (high, high), (low, high)):
            items.append(world.ImageItem(colour, shape, radius, centre))
    return items


def _every_video() -> list[world.VideoItem]:
    """Every colour x direction with the smallest and largest squares at the extreme offsets."""
    return [
        world.VideoItem(colour, direction, side, offset)
        for colour, direction, side, offset in itertools.product(world.COLOURS, world.DIRECTIONS, (12, 20), (-14, 14))
    ]


def _every_audio() -> list[world.AudioItem]:
    return [world.AudioItem(pitch, style) for pitch, style in itertools.product(world.PITCHES, world.STYLES)]


# ------------------------------------------------------------------------------------------------------------
# Ground truth: every clean item is read back exactly
# ------------------------------------------------------------------------------------------------------------


def test_images_read_back_exactly():
    items = _images() + _every_image()
    wrong = [(item, found) for item in items if (found := image_attributes(item.render())) != item.attributes()]
    assert not wrong, wrong[:5]


def test_image_accepts_pil_and_float_arrays():
    item = world.ImageItem("yellow", "triangle", 15.0, (30.0, 36.0))
    pixels = item.render()
    assert image_attributes(Image.fromarray(pixels)) == item.attributes()
    assert image_attributes(pixels.astype(np.float32) / 255) == item.attributes()
    big = Image.fromarray(pixels).resize((512, 512), Image.Resampling.BICUBIC)  # a real decoder's size
    assert image_attributes(big) == item.attributes()


def test_audio_reads_back_exactly():
    rng = np.random.default_rng(0)
    items = [world.draw_audio(rng) for _ in range(N)] + _every_audio()
    wrong = [(item, found) for item in items if (found := audio_attributes(item.render())) != item.attributes()]
    assert not wrong, wrong[:5]


def test_audio_accepts_arrays_and_channels():
    item = world.AudioItem("high", "pulsed")
    audio = item.render()
    assert audio_attributes(audio.waveform, world.SAMPLE_RATE) == item.attributes()
    stereo = np.stack([audio.waveform, audio.waveform])
    assert audio_attributes(Audio(stereo, audio.sample_rate)) == item.attributes()  # (C, T)
    assert audio_attributes(Audio(stereo.T.copy(), audio.sample_rate)) == item.attributes()  # (T, C)
    with pytest.raises(ValueError, match="sample_rate"):
        audio_attributes(audio.waveform)


def test_videos_read_back_exactly():
    items = _videos() + _every_video()
    wrong = [(item, found) for item in items if (found := video_attributes(item.render())) != item.attributes()]
    assert not wrong, wrong[:5]
    item = items[0]
    assert video_attributes(item.render().frames) == item.attributes()  # a bare (T, H, W, 3) array
    assert video_attributes(item.render().frames / 255.0) == item.attributes()  # floats in [0, 1]


def test_captions_of_ground_truth_parse():
    items = _images(n=24) + _videos(n=24) + _every_audio()
    for item in items:
        found = caption_attributes(item.caption)
        assert {k: found[k] for k in item.attributes()} == item.attributes(), item.caption
        request = world.Request(f"make {item.caption}", (item,))
        (text, _), *_ = request.reply()
        found = caption_attributes(text.upper())
        assert {k: found[k] for k in item.attributes()} == item.attributes(), text


# ------------------------------------------------------------------------------------------------------------
# Wrong media and wrong words are rejected
# ------------------------------------------------------------------------------------------------------------


def test_image_rejects_blank_and_noise():
    rng = np.random.default_rng(1)
    white = np.full((64, 64, 3), 255, np.uint8)
    assert image_attributes(white) == {"colour": None, "shape": None}
    faint = np.clip(255 - np.abs(rng.normal(0, 10, white.shape)), 0, 255).astype(np.uint8)
    assert image_attributes(faint) == {"colour": None, "shape": None}
    grey = np.repeat(rng.integers(0, 256, (64, 64, 1), dtype=np.uint8), 3, axis=-1)
    assert image_attributes(grey) == {"colour": None, "shape": None}
    colourful = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert image_attributes(colourful) == {"colour": None, "shape": None}
    # a red circle on a grey background is not a world image
    on_grey = world.ImageItem("red", "circle").render().copy()
    on_grey[(on_grey == 255).all(axis=-1)] = 128
    assert image_attributes(on_grey) == {"colour": None, "shape": None}
    # a shape of an off-palette colour (purple) has a shape but no world colour
    purple = world.ImageItem("red", "square").render().copy()
    purple[(purple != 255).any(axis=-1)] = (150, 40, 200)
    assert image_attributes(purple) == {"colour": None, "shape": "square"}


def test_image_tells_items_apart():
    """Each colour x shape reads as itself and as no other (the oracle is not constant)."""
    answers = {(c, s): image_attributes(world.ImageItem(c, s).render()) for c in world.COLOURS for s in world.SHAPES}
    assert len({tuple(a.values()) for a in answers.values()}) == len(answers)
    assert image_attributes(world.ImageItem("green", "square").render()) != {"colour": "red", "shape": "circle"}


def test_audio_rejects_silence_noise_and_other_pitches():
    rng = np.random.default_rng(2)
    assert audio_attributes(np.zeros(16_000, np.float32), 16_000) == {"pitch": None, "style": None}
    assert audio_attributes(rng.normal(0, 0.3, 16_000), 16_000) == {"pitch": None, "style": None}
    t = np.arange(16_000) / 16_000
    for frequency in (180.0, 400.0, 740.0, 1600.0):  # more than 1/3 octave from every world pitch
        assert audio_attributes(0.5 * np.sin(2 * np.pi * frequency * t), 16_000)["pitch"] is None, frequency
    assert audio_attributes(world.AudioItem("low", "steady").render())["pitch"] == "low"
    assert audio_attributes(world.AudioItem("mid", "pulsed").render())["pitch"] == "mid"


def test_audio_pitch_is_the_fundamental():
    """A strong second harmonic (as a vocoder may add) does not raise the pitch an octave."""
    t = np.arange(16_000) / 16_000
    for name, frequency in world.PITCHES.items():
        wave = 0.2 * np.sin(2 * np.pi * frequency * t) + 0.3 * np.sin(2 * np.pi * 2 * frequency * t)
        assert audio_attributes(wave, 16_000)["pitch"] == name


def test_video_rejects_static_and_blank():
    frame = world.VideoItem("blue", "right").render().frames[3]
    static = np.repeat(frame[None], 8, axis=0)
    assert video_attributes(static) == {"colour": "blue", "direction": None}
    assert video_attributes(np.full((8, 64, 64, 3), 255, np.uint8)) == {"colour": None, "direction": None}
    noise = np.random.default_rng(3).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    assert video_attributes(noise) == {"colour": None, "direction": None}
    assert video_attributes(static[:1])["direction"] is None  # one frame: no motion to read


def test_video_reads_reversed_motion():
    for direction, opposite in (("left", "right"), ("up", "down")):
        frames = world.VideoItem("green", direction).render().frames
        assert video_attributes(frames[::-1].copy())["direction"] == opposite


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A RED Circle.", {"colour": "red", "shape": "circle"}),
        ("a red and a blue circle", {"colour": None, "shape": "circle"}),
        ("red green blue yellow square triangle", {"colour": None, "shape": None}),
        ("a bluebird in redwoods; squares", {"colour": None, "shape": None}),  # whole words only
        ("a middle beep", {"pitch": "mid", "style": "pulsed"}),
        ("a steady HIGH tone", {"pitch": "high", "style": "steady"}),
        ("a low tone, pulsing", {"pitch": "low", "style": "pulsed"}),
        ("a steady beep", {"style": None}),
        ("a high and a low beep", {"pitch": None}),
        ("a yellow square moving up", {"colour": "yellow", "direction": "up"}),
        ("moving left, then right", {"direction": None}),
        ("", {"colour": None, "shape": None, "pitch": None, "style": None, "direction": None}),
    ],
)
def test_caption_attributes(text, expected):
    found = caption_attributes(text)
    assert set(found) == {"colour", "shape", "pitch", "style", "direction"}
    assert {k: found[k] for k in expected} == expected


def test_reply_modalities():
    assert reply_modalities(AnyGPTOutput(text="hi")) == set()
    image = Image.new("RGB", (8, 8))
    audio = Audio(np.zeros(10, np.float32), 16_000)
    output = AnyGPTOutput(text="here", images=[image], audios=[audio])
    assert reply_modalities(output) == {Modality.IMAGE, Modality.AUDIO}
    output.videos.append(Video(np.zeros((2, 8, 8, 3), np.uint8), 8.0))
    assert reply_modalities(output) == {Modality.IMAGE, Modality.AUDIO, Modality.VIDEO}


# ------------------------------------------------------------------------------------------------------------
# Robust to mild degradation
# ------------------------------------------------------------------------------------------------------------


def _jpeg(pixels: np.ndarray, quality: int = 40) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _blur(pixels: np.ndarray, radius: float = 1.5) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius)))


def _noise(pixels: np.ndarray, rng: np.random.Generator, sigma: float = 10.0) -> np.ndarray:
    return np.clip(pixels + rng.normal(0, sigma, pixels.shape), 0, 255).astype(np.uint8)


def _shift(pixels: np.ndarray, delta: tuple[int, int, int] = (20, -15, 10)) -> np.ndarray:
    return np.clip(pixels.astype(np.int16) + np.array(delta), 0, 255).astype(np.uint8)


def _speckle(pixels: np.ndarray, rng: np.random.Generator, count: int = 20) -> np.ndarray:
    pixels = pixels.copy()
    at = rng.integers(0, pixels.shape[0], (count, 2))
    pixels[at[:, 0], at[:, 1]] = rng.integers(0, 256, (count, 3))
    return pixels


@pytest.mark.parametrize("degradation", ["noise", "blur", "jpeg", "shift", "speckle", "all"])
def test_images_survive_mild_degradation(degradation):
    rng = np.random.default_rng(4)
    degrade = {
        "noise": lambda p: _noise(p, rng),
        "blur": _blur,
        "jpeg": _jpeg,
        "shift": _shift,
        "speckle": lambda p: _speckle(p, rng),
        "all": lambda p: _jpeg(_noise(_blur(_shift(p)), rng), quality=60),
    }[degradation]
    items = _images(seed=5, n=48)
    wrong = [(i, f) for i in items if (f := image_attributes(degrade(i.render()))) != i.attributes()]
    assert not wrong, wrong[:5]


def test_audio_survives_noise_at_20_db():
    rng = np.random.default_rng(6)
    for item in _every_audio():
        wave = item.render().waveform
        noise = rng.normal(0, np.sqrt(np.mean(wave**2)) / 10, wave.shape)  # 20 dB SNR
        assert audio_attributes(wave + noise, world.SAMPLE_RATE) == item.attributes(), item


def test_videos_survive_noise_and_h264(tmp_path):
    rng = np.random.default_rng(7)
    items = _videos(seed=8, n=16)
    for i, item in enumerate(items):
        video = item.render()
        assert video_attributes(_noise(video.frames, rng)) == item.attributes(), item
        path = save_video(video, tmp_path / f"{i}.mp4")
        assert video_attributes(load_video(path)) == item.attributes(), item


# ------------------------------------------------------------------------------------------------------------
# The held-out set and the evaluator
# ------------------------------------------------------------------------------------------------------------


def test_heldout_requests_cover_every_modality_and_size():
    requests = heldout_requests(10, seed=123)
    assert [r.prompt for r in requests] == [r.prompt for r in heldout_requests(10, seed=123)]
    assert [r.prompt for r in requests] != [r.prompt for r in heldout_requests(10, seed=124)]
    counts = {m: sum(m in r.modalities for r in requests) for m in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO)}
    assert min(counts.values()) >= 10
    assert {len(r.items) for r in requests} == {1, 2, 3}
    assert all(len(r.modalities) == len(r.items) for r in requests)
    cases = heldout_items(5, seed=123)
    assert [c.item.modality for c in cases] == [Modality.IMAGE] * 5 + [Modality.AUDIO] * 5 + [Modality.VIDEO] * 5
    assert all(c.question in world.ASK_CAPTION[c.item.modality] for c in cases)


def test_format_report_and_failures():
    report = {
        "metrics": {
            name: {"value": target, "correct": 1, "total": 1, "target": target} for name, target in TARGETS.items()
        },
        "meta": {"samples": 1, "seed": 0, "seconds": 0.0, "requests": 1},
    }
    assert failures(report) == []
    report["metrics"]["routing"]["value"] = 0.94
    report["metrics"]["text_to_image.shape"]["value"] = None
    assert failures(report) == ["text_to_image.shape", "routing"]
    table = format_report(report)
    assert "| routing | 94.0% | 95% | FAIL | 1 |" in table
    assert "| text_to_image.colour | 90.0% | 90% | pass | 1 |" in table


def _check_report(report: dict, samples: int) -> None:
    json.dumps(report)  # JSON-safe
    assert list(report["metrics"]) == list(METRICS)
    requests = heldout_requests(samples)
    assert report["meta"]["samples"] == samples and report["meta"]["requests"] == len(requests)
    assert report["metrics"]["routing"]["total"] == len(requests)
    for modality, names in (
        (Modality.IMAGE, ("text_to_image.colour", "text_to_image.shape")),
        (Modality.AUDIO, ("text_to_audio.pitch", "text_to_audio.style")),
        (Modality.VIDEO, ("text_to_video.direction", "text_to_video.colour")),
    ):
        requested = sum(modality in r.modalities for r in requests)
        assert requested >= samples
        assert all(report["metrics"][name]["total"] == requested for name in names)
    for name in ("image_to_text.colour", "image_to_text.shape", "audio_to_text.pitch", "video_to_text.direction"):
        assert report["metrics"][name]["total"] == samples
    for entry in report["metrics"].values():
        assert 0 <= entry["correct"] <= entry["total"]
        assert entry["value"] == pytest.approx(entry["correct"] / entry["total"])
    table = format_report(report)
    assert all(f"| {name} |" in table for name in METRICS)


@pytest.fixture
def one_thread():
    """Torch on one thread: the tiny models are too small to gain from more, and two threads on a busy machine
    spin against each other (20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_evaluate_tiny_pipeline(tiny_pipe):
    report = evaluate(tiny_pipe, samples=4, max_new_tokens=8, progress=False)
    _check_report(report, samples=4)
    assert set(failures(report, include_open=True)) == set(TARGETS)  # random weights: noise meets no target


class _ForceEveryOutput:
    """A pipeline whose replies always carry every output modality, so that the evaluator renders media."""

    def __init__(self, pipe):
        self.pipe, self.decoders, self.config = pipe, pipe.decoders, pipe.config

    def __call__(self, prompt, **kwargs):
        return self.pipe(prompt, **{**kwargs, "modalities": [m.value for m in self.decoders]})


@pytest.mark.usefixtures("one_thread")
def test_evaluate_renders_produced_items_in_batches(tiny_pipe):
    forced = _ForceEveryOutput(tiny_pipe)
    small = {"num_inference_steps": 1, "height": 32, "width": 32, "num_frames": 2, "audio_seconds": 0.5}
    report = evaluate(forced, samples=2, max_new_tokens=4, batch_size=2, progress=False, decoder_settings=small)
    _check_report(report, samples=2)
    assert report["meta"]["decoder_settings"] == small
    requests = heldout_requests(2)
    assert report["metrics"]["routing"]["correct"] == sum(len(r.items) == 3 for r in requests)
    assert not [e for e in report["examples"] if e.get("found") == "(not produced)"]
