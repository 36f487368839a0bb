"""Hardening of media input and output: valid files that would exhaust memory are refused by name from their header,
decoded content must be finite and in range (files and objects alike), and writers killed mid-write leave nothing
behind (SIGTERM: cleaned at once; SIGKILL: swept by the next ``anygpt generate`` into the same folder)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from anygpt import cli
from anygpt.base import media
from anygpt.base.errors import MediaError
from anygpt.base.media import Audio, Video, load_audio, load_image, load_video, save_video
from anygpt.base.modality import Modality
from anygpt.base.utils import (
    TEMPORARY_MARKER,
    atomic_directory,
    atomic_file,
    sweep_stale_temporaries,
    temporary_owner,
)
from anygpt.core.request import GenerationRequest
from encoders import transforms

REPO = Path(__file__).resolve().parents[1]


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _thin_png(path: Path, width: int = 60000, height: int = 1) -> Path:
    """The probe's file: a 1 x 60000 PNG of noise (180 KB)."""
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _thin_mp4(path: Path, frames: int = 8) -> Path:
    """A 2 x 6000 pixel H.264 MP4 (the probe's peaked at 8.4 GB in preprocessing)."""
    save_video(np.zeros((frames, 2, 6000, 3), np.uint8), path, fps=8.0)
    return path


def _sine(seconds: float = 1.0, rate: int = 16000, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# Valid inputs that would exhaust memory: refused from the header, by name
# ------------------------------------------------------------------------------------------------------------


def test_long_thin_png_is_refused_by_name_before_decoding(tmp_path):
    path = _thin_png(tmp_path / "thin.png")
    assert path.stat().st_size > 100_000  # noise: the file is not trivially small either
    start = time.perf_counter()
    with pytest.raises(MediaError) as excinfo:
        load_image(path)
    message = str(excinfo.value)
    assert str(path) in message and "60000x1" in message and "20:1" in message and "60,000:1" in message
    assert "\n" not in message and time.perf_counter() - start < 2.0
    portrait = _thin_png(tmp_path / "tall.png", width=1, height=600)
    with pytest.raises(MediaError, match=r"1x600 pixels \(600:1\)"):
        load_image(portrait)


def test_long_thin_image_object_is_refused_before_resizing():
    image = Image.new("RGB", (60000, 1))
    with pytest.raises(MediaError, match=r"^image: expected an image with an aspect ratio of at most 20:1"):
        transforms.image_transform(image)
    with pytest.raises(MediaError, match=r"^images\[0\]: .*60000x1"):
        GenerationRequest("look", images=[image])
    with pytest.raises(MediaError, match=r"^image: .*60000x1"):
        transforms.image_transform(np.zeros((1, 60000, 3), np.uint8))


def test_aspect_ratio_at_the_limit_is_accepted_and_unchanged(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 255, (12, 240, 3), dtype=np.uint8)  # exactly 20:1
    Image.fromarray(pixels).save(tmp_path / "strip.png")
    image = load_image(tmp_path / "strip.png")
    np.testing.assert_array_equal(np.asarray(image), pixels)
    out = transforms.image_transform(image)
    assert out.shape == (3, 224, 224) and torch.isfinite(out).all()
    too_long = Image.fromarray(np.zeros((12, 241, 3), np.uint8))  # 20.08:1
    with pytest.raises(MediaError, match=r"241x12 pixels \(20.1:1\)"):
        transforms.image_transform(too_long)


def test_image_pixel_count_is_bounded(tmp_path, monkeypatch):
    Image.new("RGB", (100, 80)).save(tmp_path / "big.png")
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 100 * 80 - 1)
    with pytest.raises(MediaError, match=r"big.png: expected an image of at most 7,999 pixels, found 100x80 = 8,000"):
        load_image(tmp_path / "big.png")
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 100 * 80)
    assert load_image(tmp_path / "big.png").size == (100, 80)


def test_two_by_n_video_is_refused_by_name_before_decoding(tmp_path):
    path = _thin_mp4(tmp_path / "thin.mp4")
    for max_frames in (None, 80):
        start = time.perf_counter()
        with pytest.raises(MediaError) as excinfo:
            load_video(path, max_frames=max_frames)
        message = str(excinfo.value)
        assert message.startswith(f"cannot read video {path}: expected video frames with an aspect ratio")
        assert "6000x2" in message and "3,000:1" in message and time.perf_counter() - start < 5.0


def test_two_by_n_video_object_is_refused_before_resizing():
    video = Video(np.zeros((8, 2, 6000, 3), np.uint8), 8.0)
    before = _max_rss_bytes()
    with pytest.raises(MediaError, match=r"^video: expected video frames .*6000x2"):
        transforms.video_transform(video)
    with pytest.raises(MediaError, match=r"^videos\[0\]: .*6000x2"):
        GenerationRequest("look", videos=[video])
    assert _max_rss_bytes() - before < 2**30  # the old path peaked at 8.4 GB


def test_thin_media_through_the_pipeline_fail_fast_naming_the_file(tmp_path, tiny_pipe):
    png = _thin_png(tmp_path / "thin.png")
    mp4 = _thin_mp4(tmp_path / "thin.mp4")
    before = _max_rss_bytes()
    for field, path in (("images", png), ("videos", mp4)):
        start = time.perf_counter()
        with pytest.raises(MediaError) as excinfo:
            tiny_pipe.run(GenerationRequest("describe", **{field: [str(path)]}, max_new_tokens=2))
        assert str(path) in str(excinfo.value) and "20:1" in str(excinfo.value)
        assert time.perf_counter() - start < 10.0
    assert _max_rss_bytes() - before < 2**30


def test_video_frame_size_and_decode_work_are_bounded(tmp_path, monkeypatch):
    path = tmp_path / "v.mp4"
    save_video(np.zeros((6, 16, 24, 3), np.uint8), path, fps=6.0)
    monkeypatch.setattr(media, "MAX_FRAME_PIXELS", 16 * 24 - 1)
    with pytest.raises(MediaError, match=r"v.mp4: expected video frames of at most 383 pixels, found 24x16 = 384"):
        load_video(path, max_frames=2)
    monkeypatch.setattr(media, "MAX_FRAME_PIXELS", 16 * 24)
    monkeypatch.setattr(media, "MAX_VIDEO_DECODE_PIXELS", 6 * 16 * 24 - 1)
    with pytest.raises(MediaError, match=r"v.mp4: expected at most 2,303 pixels to decode .* found 6 frames of 24x16"):
        load_video(path, max_frames=2)  # every frame is decoded to pick two: the work is bounded all the same
    monkeypatch.setattr(media, "MAX_VIDEO_DECODE_PIXELS", 6 * 16 * 24)
    assert load_video(path, max_frames=2).frames.shape == (2, 16, 24, 3)


def test_normal_media_are_accepted_unchanged(media_files, tiny_pipe):
    image = load_image(media_files["image"])
    audio = load_audio(media_files["audio"])
    video = load_video(media_files["video"])
    assert image.size == (64, 64) and audio.waveform.shape == (16000,) and video.frames.shape == (8, 64, 64, 3)
    request = GenerationRequest("hi", images=[image], audios=[audio], videos=[video], max_new_tokens=2, seed=0)
    from_files = GenerationRequest(
        "hi", images=[str(media_files[m]) for m in ("image",)], audios=[str(media_files["audio"])],
        videos=[str(media_files["video"])], max_new_tokens=2, seed=0,
    )  # fmt: skip
    assert tiny_pipe.run(request).text == tiny_pipe.run(from_files).text


# ------------------------------------------------------------------------------------------------------------
# Media whose content is invalid
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_wav_is_refused_by_name(tmp_path, value):
    samples = _sine()
    samples[100:150] = value
    path = tmp_path / "bad.wav"
    sf.write(str(path), samples, 16000, subtype="FLOAT")
    with pytest.raises(MediaError) as excinfo:
        load_audio(path)
    assert (
        str(excinfo.value) == f"cannot read audio {path}: expected finite samples, found 50 NaN or infinite of 16,000"
    )


def test_all_nan_wav_is_refused_and_would_have_made_nan_features(tmp_path):
    path = tmp_path / "nan.wav"
    sf.write(str(path), np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    assert np.isnan(sf.read(str(path), dtype="float32")[0]).all()  # the file really holds NaN
    with pytest.raises(MediaError, match=r"nan.wav: expected finite samples, found 16,000 NaN"):
        load_audio(path)


def test_float_wav_far_past_full_scale_is_refused_a_little_past_is_kept(tmp_path):
    sf.write(str(tmp_path / "loud.wav"), _sine(amplitude=32767.0), 16000, subtype="FLOAT")
    with pytest.raises(MediaError, match=r"loud.wav: expected samples within \+-16 .* found a peak of 3.277e\+04"):
        load_audio(tmp_path / "loud.wav")
    sf.write(str(tmp_path / "hot.wav"), _sine(amplitude=1.5), 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "hot.wav").waveform, _sine(amplitude=1.5))


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_truncated_wav_is_refused_by_name(tmp_path, subtype):
    whole = tmp_path / "whole.wav"
    sf.write(str(whole), _sine(2.0), 16000, subtype=subtype)
    data = whole.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2])
    assert sf.info(str(cut)).frames > 0  # libsndfile alone reads it short, without a word
    with pytest.raises(MediaError) as excinfo:
        load_audio(cut)
    declared = 32000 * (2 if subtype == "PCM_16" else 4)
    assert str(excinfo.value).startswith(f"cannot read audio {cut}: expected the {declared:,} bytes of samples")
    assert "truncated" in str(excinfo.value)
    assert load_audio(whole).waveform.shape == (32000,)


def test_streamed_wav_without_a_length_is_still_read(tmp_path):
    sf.write(str(tmp_path / "a.wav"), _sine(), 16000, subtype="PCM_16")
    data = bytearray((tmp_path / "a.wav").read_bytes())
    at = data.find(b"data")
    data[at + 4 : at + 8] = (0xFFFFFFFF).to_bytes(4, "little")  # what a writer to a pipe leaves
    (tmp_path / "stream.wav").write_bytes(bytes(data))
    assert load_audio(tmp_path / "stream.wav").waveform.shape == (16000,)


def test_audio_rate_and_length_are_bounded(tmp_path, monkeypatch):
    sf.write(str(tmp_path / "slow.wav"), np.zeros(100, np.float32), 500)
    with pytest.raises(MediaError, match=r"slow.wav: expected a sample rate of 1000 to 768000 Hz, found 500 Hz"):
        load_audio(tmp_path / "slow.wav")
    sf.write(str(tmp_path / "long.wav"), np.zeros((1000, 2), np.float32), 16000)
    monkeypatch.setattr(media, "MAX_AUDIO_SAMPLES", 1999)
    with pytest.raises(MediaError, match=r"long.wav: expected at most 1,999 samples .* found 1,000 x 2 channel"):
        load_audio(tmp_path / "long.wav")
    monkeypatch.setattr(media, "MAX_AUDIO_SAMPLES", 2000)
    assert load_audio(tmp_path / "long.wav").waveform.shape == (2, 1000)


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (Audio(np.full(16000, np.nan, np.float32), 16000), "expected finite samples, found 16,000 NaN"),
        (Audio(np.array([[0.0, np.inf], [0.0, 0.0]], np.float32), 16000), "found 1 NaN or infinite of 4"),
        (Audio(np.full(100, 40.0, np.float32), 16000), "found a peak of 40"),
        (Audio(np.zeros(100, np.float32), 0), "sample rate of 1000 to 768000 Hz, found 0 Hz"),
        (Audio(np.zeros(100, np.float32), 10**9), "found 1e\\+09 Hz"),
        (Audio(np.zeros(100, np.float32), float("nan")), "expected a sample rate in Hz, found nan"),
        (Audio(np.zeros(0, np.float32), 16000), "with samples, found shape \\(0,\\)"),
        (Audio(np.zeros((1, 2, 3), np.float32), 16000), "found shape \\(1, 2, 3\\)"),
        (Audio(np.array(["a"]), 16000), "real numbers, found dtype <U1"),
    ],
)
def test_bad_audio_objects_are_refused_through_the_request(audio, message):
    with pytest.raises(MediaError, match=rf"^batch.jsonl:3: audios\[1\]: .*{message}"):
        GenerationRequest("hear", audios=[Audio(_sine(), 16000), audio], origin="batch.jsonl:3: ")


def test_nan_audio_object_is_refused_by_the_pipeline_and_the_encoder(tiny_pipe):
    bad = Audio(np.full(16000, np.nan, np.float32), 16000)
    request = GenerationRequest("hear", max_new_tokens=2)
    request.audios = [bad]  # set after validation: the pipeline checks again
    with pytest.raises(MediaError, match=r"^audios\[0\]: expected finite samples"):
        tiny_pipe.run(request)
    with pytest.raises(MediaError, match=r"^audio input: expected finite samples"):
        tiny_pipe.load_inputs(Modality.AUDIO, [bad])
    with pytest.raises(MediaError, match=r"^audio: expected finite samples"):
        transforms.audio_transform(bad)


def test_bad_video_and_image_objects_are_refused():
    nan_frames = np.zeros((2, 8, 8, 3), np.float32)
    nan_frames[0, 0, 0, 0] = np.nan
    with pytest.raises(MediaError, match=r"^videos\[0\]: expected finite pixels, found 1 NaN or infinite of 384"):
        GenerationRequest("see", videos=[Video(nan_frames, 8.0)])
    with pytest.raises(MediaError, match=r"^videos\[0\]: expected a positive frame rate, found inf"):
        GenerationRequest("see", videos=[Video(np.zeros((2, 8, 8, 3), np.uint8), float("inf"))])
    with pytest.raises(MediaError, match=r"^videos\[0\]: expected frames \(T, H, W, 3\) with T >= 1, found shape"):
        GenerationRequest("see", videos=[Video(np.zeros((0, 8, 8, 3), np.uint8), 8.0)])
    nan_image = Image.fromarray(np.full((4, 4), np.nan, np.float32), mode="F")
    with pytest.raises(MediaError, match=r"^images\[0\]: expected finite pixels, found 16 NaN"):
        GenerationRequest("see", images=[nan_image])
    GenerationRequest("see", images=[Image.new("RGB", (8, 8))], videos=[Video(np.zeros((2, 8, 8, 3), np.uint8), 8.0)])


# ------------------------------------------------------------------------------------------------------------
# Temporaries: recognisable, and swept once their writer is gone
# ------------------------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_are_named_after_their_writer(tmp_path):
    with atomic_file(tmp_path / "a.png", suffix=".png") as tmp:
        assert tmp.name.startswith(f".a.png{TEMPORARY_MARKER}{os.getpid()}-") and tmp.suffix == ".png"
        assert temporary_owner(tmp.name) == os.getpid()
        tmp.write_bytes(b"x")
        assert sweep_stale_temporaries(tmp_path) == [] and tmp.exists()  # its writer (this process) is alive
    with atomic_directory(tmp_path / "final") as folder:
        assert temporary_owner(folder.name) == os.getpid() and folder.name.startswith(".final.anygpt-tmp-")
        (folder / "w.bin").write_bytes(b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "final"]
    long_name = "x" * 240 + ".png"  # the temporary's name still fits in 255 bytes
    with atomic_file(tmp_path / long_name, suffix=".png") as tmp:
        assert len(tmp.name.encode()) <= 255 and temporary_owner(tmp.name) == os.getpid()
        tmp.write_bytes(b"z")
    assert (tmp_path / long_name).read_bytes() == b"z"


def test_sweep_removes_stale_temporaries_of_dead_writers_only(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    stale_file = tmp_path / f".gen-0001_image0.png.anygpt-tmp-{dead}-abcd1234.png"
    stale_dir = tmp_path / f".final.anygpt-tmp-{dead}-k2_x9q0z"
    live_file = tmp_path / f".gen-0002_video0.mp4.anygpt-tmp-{alive}-abcd1234.mp4"
    stale_file.write_bytes(b"\x89PNG half")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    live_file.write_bytes(b"being written")
    others = {
        "gen-0001_image0.png": b"result",
        ".hidden": b"h",
        f".x.png.{dead}.tmp.png": b"old style",
        f"plain.anygpt-tmp-{dead}-abcd1234": b"no leading dot",
        f".short.anygpt-tmp-{dead}-abc": b"random part too short",
        ".name.anygpt-tmp-notapid-abcd1234": b"no pid",
    }
    for name, data in others.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "sub").mkdir()
    nested = tmp_path / "sub" / f".y.anygpt-tmp-{dead}-abcd1234"
    nested.write_bytes(b"only the folder itself is swept")
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"keep")
    link = tmp_path / f".link.anygpt-tmp-{dead}-abcd1234"
    link.symlink_to(target)

    removed = sweep_stale_temporaries(tmp_path)

    assert sorted(removed) == sorted([stale_file, stale_dir])
    assert not stale_file.exists() and not stale_dir.exists()
    assert live_file.read_bytes() == b"being written" and nested.exists() and link.is_symlink()
    assert target.read_bytes() == b"keep"
    assert all((tmp_path / name).read_bytes() == data for name, data in others.items())
    assert sweep_stale_temporaries(tmp_path) == []
    assert sweep_stale_temporaries(tmp_path / "missing") == []
    assert sweep_stale_temporaries(target) == []


# ------------------------------------------------------------------------------------------------------------
# Signals: SIGTERM cleans up at once, SIGKILL's leftovers are swept by the next run
# ------------------------------------------------------------------------------------------------------------

_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from PIL import Image

    def slow_save(self, fp, *args, **kwargs):  # a PNG writer that hangs half-way
        Path(fp).write_bytes(b"\\x89PNG half-written")
        time.sleep(600)

    Image.Image.save = slow_save
    from anygpt import cli

    sys.exit(cli.main(sys.argv[1:]))
    """
)


def _start_slow_generate(out: Path) -> subprocess.Popen:
    args = ["generate", "hi", "--model", "tiny", "--modalities", "image", "--out", str(out), "--steps", "1",
            "--max-new-tokens", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _wait_for_temporary(process: subprocess.Popen, out: Path, timeout: float = 240.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in out.glob(".*") if temporary_owner(p.name) == process.pid] if out.is_dir() else []
        if found and found[0].stat().st_size > 0:
            return found[0]
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    _, err = process.communicate()
    pytest.fail(f"the writer wrote no temporary file (exit {process.returncode}): {err.decode()[-2000:]}")


def test_sigterm_mid_write_leaves_nothing_in_out(tmp_path):
    out = tmp_path / "out"
    process = _start_slow_generate(out)
    tmp = _wait_for_temporary(process, out)
    assert tmp.name.startswith(".gen-0001_image0.png.anygpt-tmp-")
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, err.decode()[-2000:]
    assert err.decode().strip().splitlines()[-1] == "anygpt: terminated"
    assert list(out.iterdir()) == []


def test_sigkill_leftovers_are_swept_by_the_next_generate(tmp_path, use_tiny):
    out = tmp_path / "out"
    process = _start_slow_generate(out)
    tmp = _wait_for_temporary(process, out)
    process.kill()
    process.wait()
    assert tmp.exists()  # SIGKILL runs no clean-up: the temporary stays until the next run
    handler = signal.getsignal(signal.SIGTERM)
    args = ["generate", "hi", "--model", "tiny", "--modalities", "image", "--out", str(out), "--steps", "1",
            "--max-new-tokens", "2"]  # fmt: skip
    assert cli.main(args) == 0
    assert signal.getsignal(signal.SIGTERM) is handler  # the command's SIGTERM handler is gone after it
    assert sorted(p.name for p in out.iterdir()) == ["gen-0001_image0.png"]
    assert load_image(out / "gen-0001_image0.png").size == (64, 64)


def test_an_interrupted_video_write_leaves_nothing_even_if_the_encoder_writes_late(tmp_path, monkeypatch):
    """imageio-ffmpeg stops ffmpeg on an interrupt without waiting, and ffmpeg's +faststart pass may reopen its output
    by name after the clean-up: a late write into the encoder's own output path must not leave a file behind."""
    import threading
    import time

    import imageio_ffmpeg

    from anygpt.base.media import save_video

    late: list[threading.Thread] = []

    def write_frames(path, *args, **kwargs):
        def late_write():  # what a still-running ffmpeg does a moment later
            time.sleep(0.3)
            try:
                Path(path).write_bytes(b"\x00" * 261)
            except OSError:
                pass

        def gen():
            yield
            raise KeyboardInterrupt  # the interrupt arrives while frames are sent

        thread = threading.Thread(target=late_write)
        late.append(thread)
        thread.start()
        return gen()

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", write_frames)
    with pytest.raises(KeyboardInterrupt):
        save_video(np.zeros((4, 16, 16, 3), np.uint8), tmp_path / "clip.mp4")
    for thread in late:
        thread.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
