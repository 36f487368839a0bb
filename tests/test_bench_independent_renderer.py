"""The independent clip renderer of ``benchmarks/bench_independent_renderer.py`` draws what it says: a 16 px square
crossing the frame in the asked direction, at sizes, frame counts and rates the world never uses, and its MP4 files
read back with the project's video reader."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from anygpt.base.media import load_video
from toyworld.world import RENDERINGS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_independent_renderer.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_independent_renderer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _centres(frames: np.ndarray) -> np.ndarray:
    """(x, y) of the non-white pixels' centre per frame."""
    out = []
    for frame in frames:
        ys, xs = np.nonzero((frame < 200).any(axis=-1))
        out.append((xs.mean(), ys.mean()))
    return np.asarray(out)


@pytest.mark.parametrize("direction", ["right", "left", "up", "down"])
def test_the_square_moves_the_asked_way(bench, direction):
    rng = np.random.default_rng(3)
    for _ in range(5):
        frames, fps, settings = bench.draw_clip(rng, "blue", direction)
        assert frames.shape == (settings["frames"], settings["size"], settings["size"], 3)
        assert ((frames != 255).any(axis=-1).sum(axis=(1, 2)) == bench.SIDE**2).all()  # a whole 16 px square
        step = np.diff(_centres(frames), axis=0)
        along, across = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}[direction]
        assert (np.sign(step[:, along]) * across >= 0).all() and (step[:, along] * across).sum() > 0
        assert np.abs(step[:, 1 - along]).max() == 0  # straight across


def test_its_settings_are_outside_the_worlds_renderings(bench):
    for split in RENDERINGS.values():
        assert not set(bench.SIZES) & set(split["size"])
        assert not set(bench.FRAMES) & set(split["frames"])
        assert not set(bench.FPS) & set(split["fps"])


def test_the_mp4_reads_back_with_its_frames_and_colour(bench, tmp_path):
    frames, fps, _ = bench.draw_clip(np.random.default_rng(0), "red", "left")
    path = tmp_path / "clip.mp4"
    bench.write_mp4(path, frames, fps)
    video = load_video(path)
    assert len(video.frames) == len(frames)
    assert video.fps == pytest.approx(fps, rel=0.01)
    first = np.asarray(video.frames[0], dtype=np.int64)
    inside = (frames[0] != 255).any(axis=-1)
    assert np.abs(first[inside].mean(axis=0) - np.array(bench.CSS["red"])).max() < 40  # lossy, still red
