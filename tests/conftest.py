"""Shared fixtures: tiny components built locally, no network."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "nextgpt-samples"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"NExT-GPT sample data not found at {SAMPLES}")
    return SAMPLES


@pytest.fixture(scope="session")
def tiny_pipe():
    """One tiny pipeline for the whole session. Tests must not change its weights."""
    from anygpt import AnyGPTPipeline

    return AnyGPTPipeline.from_pretrained("tiny")


@pytest.fixture(scope="session")
def media_files(tmp_path_factory) -> dict[str, Path]:
    """A small real PNG, WAV and MP4 written by the project's own writers."""
    from anygpt.base.media import Audio, Video, save_audio, save_image, save_video

    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    t = np.arange(16000, dtype=np.float32) / 16000
    audio = Audio(0.5 * np.sin(2 * np.pi * 523 * t).astype(np.float32), 16000)
    frames = np.zeros((8, 64, 64, 3), dtype=np.uint8)
    for i in range(8):
        frames[i, 24:40, 4 + 6 * i : 20 + 6 * i] = (40, 80, 220)
    paths = {"image": folder / "in.png", "audio": folder / "in.wav", "video": folder / "in.mp4"}
    save_image(image, paths["image"])
    save_audio(audio, paths["audio"])
    save_video(Video(frames, 8.0), paths["video"])
    return paths


@pytest.fixture()
def use_tiny(monkeypatch, tiny_pipe):
    """Reuse the session's tiny pipeline instead of building one per CLI call."""
    from anygpt.apps import generate as generate_command

    real = generate_command.load_pipeline

    def load(model, runtime=None):
        return tiny_pipe if model == "tiny" and runtime is None else real(model, runtime)

    monkeypatch.setattr(generate_command, "load_pipeline", load)


@pytest.fixture(scope="module")
def toyworld():
    """The shipped default model (one per test module); a missing package fails the test, naming the folder."""
    from anygpt.core.index import packaged_model_dir
    from anygpt.core.pipeline import AnyGPTPipeline

    try:
        packaged_model_dir("toyworld")
    except FileNotFoundError as err:
        pytest.fail(str(err))
    return AnyGPTPipeline.from_pretrained("toyworld")


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """The toy sample dataset and its stage configs (8 items), for the small training runs of the hardening tests."""
    from toyworld.sample_configs import write_sample

    return write_sample(tmp_path_factory.mktemp("sample") / "data", size=8)


@pytest.fixture
def one_thread():
    """CPU reductions in one order, so that runs can be compared exactly (``pytest.mark.usefixtures``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
