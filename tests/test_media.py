"""Media I/O: NExT-GPT's real samples load, writers round-trip and are atomic, bad inputs raise MediaError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anygpt.base import media
from anygpt.base.media import (
    Audio,
    MediaError,
    Video,
    guess_modality,
    load_audio,
    load_image,
    load_media,
    load_video,
    resample,
    save_audio,
    save_image,
    save_video,
    to_mono,
)
from anygpt.base.modality import Modality

SAMPLES = Path(__file__).resolve().parents[1] / ".." / "shared" / "nextgpt-samples" / "T_X_pair_data"
needs_samples = pytest.mark.skipif(
    not SAMPLES.is_dir(),
    reason=f"NExT-GPT sample folder {SAMPLES} is absent (see ../shared/nextgpt-samples/README)",
)


def _files(sub: str, pattern: str) -> list[Path]:
    return sorted((SAMPLES / sub).glob(pattern)) if SAMPLES.is_dir() else []


JPEGS = _files("cc3m/images", "*.jpg")
WAVS = _files("audiocap/audios", "*.wav")
MP4S = _files("webvid/videos", "*.mp4")


def _video_codec(path: Path) -> tuple[str, str, int]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.codec_context.name, stream.codec_context.pix_fmt, stream.frames


def _stereo_wav() -> Path:
    import soundfile as sf

    for path in WAVS:
        if sf.info(str(path)).channels == 2:
            return path
    pytest.skip("no stereo WAV among the samples")


# ------------------------------------------------------------------------------------------------------------
# Real NExT-GPT samples
# ------------------------------------------------------------------------------------------------------------


@needs_samples
def test_real_images_load_as_rgb():
    assert len(JPEGS) == 20
    for path in JPEGS:
        image = load_image(path)
        assert image.mode == "RGB" and image.size == (256, 256)


@needs_samples
def test_real_audio_loads_mono_and_stereo():
    import soundfile as sf

    channels = set()
    for path in WAVS:
        audio = load_audio(path)
        info = sf.info(str(path))
        assert audio.sample_rate == info.samplerate and audio.sample_rate in (44100, 48000)
        assert audio.waveform.dtype == np.float32
        assert audio.waveform.ndim in (1, 2)
        channels.add(1 if audio.waveform.ndim == 1 else audio.waveform.shape[0])
        assert audio.duration == pytest.approx(info.duration) and 1.0 < audio.duration <= 10.0
        assert np.abs(audio.waveform).max() <= 1.0
    assert channels == {1, 2}


@needs_samples
def test_real_video_loads_full_and_subsampled():
    path = MP4S[0]
    full = load_video(path)
    assert full.frames.dtype == np.uint8 and full.frames.shape == (300, 336, 596, 3)
    assert full.fps == pytest.approx(29.97, abs=1e-3)

    part = load_video(path, max_frames=7)
    assert part.frames.shape == (7, 336, 596, 3)
    expected = np.linspace(0, 299, 7).round().astype(int)
    np.testing.assert_array_equal(part.frames, full.frames[expected])
    # fps is the effective rate of the frames kept, so the duration is unchanged
    assert part.frames.shape[0] / part.fps == pytest.approx(full.frames.shape[0] / full.fps)

    assert load_video(path, max_frames=1000).frames.shape[0] == 300


@needs_samples
@pytest.mark.parametrize("index", [1, 2])
def test_more_real_videos_load(index):
    video = load_video(MP4S[index], max_frames=4)
    assert video.frames.shape[0] == 4 and video.frames.shape[-1] == 3
    assert video.fps > 0


@needs_samples
def test_load_media_dispatches():
    assert isinstance(load_media(Modality.IMAGE, JPEGS[0]), Image.Image)
    assert isinstance(load_media("audio", WAVS[0]), Audio)
    assert load_media("VIDEO", MP4S[0], max_frames=3).frames.shape[0] == 3
    with pytest.raises(MediaError, match="text"):
        load_media("text", JPEGS[0])


# ------------------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------------------


@needs_samples
def test_image_round_trip_is_exact(tmp_path):
    image = load_image(JPEGS[0])
    out = save_image(image, tmp_path / "out.png")
    assert out == tmp_path / "out.png"
    with Image.open(out) as written:
        assert written.format == "PNG"
    np.testing.assert_array_equal(np.asarray(load_image(out)), np.asarray(image))


def test_image_from_float_array(tmp_path):
    pixels = np.random.default_rng(0).random((9, 7, 3))
    save_image(pixels, tmp_path / "a.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "a.png")), (pixels * 255).round().astype(np.uint8))


@needs_samples
def test_audio_round_trip_pcm16_within_1e4_and_float_exact(tmp_path):
    audio = load_audio(_stereo_wav())
    save_audio(audio, tmp_path / "pcm.wav")  # PCM_16, the default
    back = load_audio(tmp_path / "pcm.wav")
    assert back.sample_rate == audio.sample_rate and back.waveform.shape == audio.waveform.shape
    assert np.abs(back.waveform - audio.waveform).max() < 1e-4

    mono = Audio(np.sin(np.linspace(0, 200, 16000, dtype=np.float32)) * 0.7, 16000)
    save_audio(mono, tmp_path / "float.wav", subtype="FLOAT")
    back = load_audio(tmp_path / "float.wav")
    assert back.waveform.shape == (16000,)
    np.testing.assert_array_equal(back.waveform, mono.waveform)


@needs_samples
def test_video_round_trip_is_h264_with_same_shape(tmp_path):
    video = load_video(MP4S[0], max_frames=12)
    out = save_video(video, tmp_path / "clip.mp4")
    codec, pix_fmt, frames = _video_codec(out)
    assert (codec, pix_fmt, frames) == ("h264", "yuv420p", 12)
    back = load_video(out)
    assert back.frames.shape == video.frames.shape
    assert back.fps == pytest.approx(video.fps, rel=1e-3)
    assert np.abs(back.frames.astype(np.int16) - video.frames).mean() < 4.0


def test_video_odd_sizes_float_frames_and_default_fps(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.random((5, 33, 47, 3)).astype(np.float32)
    save_video(frames, tmp_path / "odd.mp4")
    back = load_video(tmp_path / "odd.mp4")
    assert back.frames.shape == (5, 34, 48, 3)  # padded to even sizes for yuv420p
    assert back.fps == pytest.approx(8.0)
    assert _video_codec(tmp_path / "odd.mp4")[:2] == ("h264", "yuv420p")


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


def _assert_media_error(excinfo, path: Path, *words: str) -> None:
    message = str(excinfo.value)
    assert path.name in message, message
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("loader", [load_image, load_audio, load_video])
def test_missing_file_and_directory(tmp_path, loader):
    with pytest.raises(MediaError) as excinfo:
        loader(tmp_path / "nothing.bin")
    _assert_media_error(excinfo, tmp_path / "nothing.bin", "no such file")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(MediaError) as excinfo:
        loader(tmp_path / "folder.png")
    _assert_media_error(excinfo, tmp_path / "folder.png", "directory")


@needs_samples
def test_wrong_kind_of_file():
    with pytest.raises(MediaError) as excinfo:
        load_image(WAVS[0])
    _assert_media_error(excinfo, WAVS[0], "expected an image", "WAV audio")
    assert excinfo.value.__cause__ is not None
    with pytest.raises(MediaError) as excinfo:
        load_audio(JPEGS[0])
    _assert_media_error(excinfo, JPEGS[0], "expected an audio", "JPEG image")
    with pytest.raises(MediaError) as excinfo:
        load_video(JPEGS[0])
    _assert_media_error(excinfo, JPEGS[0], "still image")
    with pytest.raises(MediaError) as excinfo:
        load_video(WAVS[0])
    _assert_media_error(excinfo, WAVS[0], "video stream", "WAV audio")


@needs_samples
def test_corrupt_and_truncated_files(tmp_path):
    jpeg = JPEGS[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    mp4 = MP4S[0].read_bytes()
    (tmp_path / "cut.mp4").write_bytes(mp4[: len(mp4) // 2])
    (tmp_path / "noise.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "empty.png").write_bytes(b"")
    cases = [
        (load_image, "cut.jpg", "truncated"),
        (load_video, "cut.mp4", "expected a video"),
        (load_audio, "noise.wav", "expected an audio"),
        (load_image, "empty.png", "empty file"),
    ]
    for loader, name, word in cases:
        with pytest.raises(MediaError) as excinfo:
            loader(tmp_path / name)
        _assert_media_error(excinfo, tmp_path / name, word)
        assert excinfo.value.__cause__ is not None


def test_empty_audio(tmp_path):
    import soundfile as sf

    sf.write(str(tmp_path / "silence.wav"), np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(MediaError) as excinfo:
        load_audio(tmp_path / "silence.wav")
    _assert_media_error(excinfo, tmp_path / "silence.wav", "0 samples")


def test_zero_frame_video(tmp_path, monkeypatch):
    import av

    # A real file whose video track holds no frame.
    path = tmp_path / "empty.mkv"
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    with pytest.raises(MediaError) as excinfo:
        load_video(path)
    _assert_media_error(excinfo, path)

    # A stream that decodes to nothing.
    save_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "ok.mp4")
    monkeypatch.setattr(media, "_decode_frames", lambda *args: ([], 0))
    with pytest.raises(MediaError) as excinfo:
        load_video(tmp_path / "ok.mp4")
    _assert_media_error(excinfo, tmp_path / "ok.mp4", "0 decodable frames")


def test_huge_video_needs_max_frames(tmp_path, monkeypatch):
    save_video(np.zeros((4, 16, 16, 3), np.uint8), tmp_path / "v.mp4")
    monkeypatch.setattr(media, "MAX_VIDEO_BYTES", 1000)
    with pytest.raises(MediaError, match="max_frames") as excinfo:
        load_video(tmp_path / "v.mp4")
    _assert_media_error(excinfo, tmp_path / "v.mp4")
    assert load_video(tmp_path / "v.mp4", max_frames=2).frames.shape == (2, 16, 16, 3)


@pytest.mark.parametrize(
    ("name", "modality"),
    [
        ("a.JPG", Modality.IMAGE),
        ("b.png", Modality.IMAGE),
        ("c.wav", Modality.AUDIO),
        ("d.flac", Modality.AUDIO),
        ("e.mp4", Modality.VIDEO),
        ("f.webm", Modality.VIDEO),
        ("/x/y.tar/g.Mov", Modality.VIDEO),
    ],
)
def test_guess_modality(name, modality):
    assert guess_modality(name) is modality


@pytest.mark.parametrize("name", ["notes.txt", "archive", "model.safetensors"])
def test_guess_modality_unknown(name):
    with pytest.raises(MediaError) as excinfo:
        guess_modality(name)
    assert name in str(excinfo.value) and ".png" in str(excinfo.value)


# ------------------------------------------------------------------------------------------------------------
# Atomic writers
# ------------------------------------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failing_image_writer_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(MediaError, match="disk full"):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "out.png")
    assert _leftovers(tmp_path) == []


def test_failing_audio_writer_keeps_old_file(tmp_path, monkeypatch):
    import soundfile as sf

    target = tmp_path / "out.wav"
    target.write_bytes(b"previous")

    def broken_write(file, *args, **kwargs):
        Path(file).write_bytes(b"RIFF half")
        raise RuntimeError("boom")

    monkeypatch.setattr(sf, "write", broken_write)
    with pytest.raises(MediaError, match="boom"):
        save_audio(Audio(np.zeros(100, np.float32), 16000), target)
    assert _leftovers(tmp_path) == ["out.wav"] and target.read_bytes() == b"previous"


def test_failing_video_writer_leaves_nothing(tmp_path, monkeypatch):
    import imageio_ffmpeg

    real = imageio_ffmpeg.write_frames

    def broken_write_frames(path, *args, **kwargs):
        gen = real(path, *args, **kwargs)

        def wrapper():  # feeds ffmpeg three frames (so the temporary file exists), then fails
            try:
                gen.send(None)
                frame = yield
                for _ in range(3):
                    gen.send(frame)
                    frame = yield
                raise RuntimeError("encoder crashed")
            finally:
                gen.close()

        return wrapper()

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", broken_write_frames)
    with pytest.raises(MediaError, match="encoder crashed"):
        save_video(np.zeros((10, 16, 16, 3), np.uint8), tmp_path / "out.mp4")
    assert _leftovers(tmp_path) == []


def test_writers_reject_bad_values(tmp_path):
    with pytest.raises(MediaError, match="shape"):
        save_video(np.zeros((0, 8, 8, 3), np.uint8), tmp_path / "v.mp4")
    with pytest.raises(MediaError, match="non-empty"):
        save_audio(Audio(np.zeros(0, np.float32), 16000), tmp_path / "a.wav")
    with pytest.raises(MediaError, match="finite"):
        save_audio(Audio(np.full(4, np.nan, np.float32), 16000), tmp_path / "a.wav")
    with pytest.raises(MediaError, match="shape"):
        save_image(np.zeros((4, 4, 2)), tmp_path / "i.png")
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------------------
# Audio helpers
# ------------------------------------------------------------------------------------------------------------


def test_to_mono_and_resample():
    t = np.arange(48000, dtype=np.float32) / 48000
    left, right = np.sin(2 * np.pi * 440 * t), np.zeros_like(t)
    stereo = Audio(np.stack([left, right]).astype(np.float32), 48000)

    mono = to_mono(stereo)
    assert mono.waveform.shape == (48000,) and mono.waveform.dtype == np.float32
    np.testing.assert_allclose(mono.waveform, left / 2, atol=1e-7)
    assert to_mono(mono) is mono

    down = resample(mono, 16000)
    assert down.sample_rate == 16000 and down.waveform.shape == (16000,) and down.waveform.dtype == np.float32
    t16 = np.arange(16000) / 16000
    assert np.abs(down.waveform[200:-200] - 0.5 * np.sin(2 * np.pi * 440 * t16[200:-200])).max() < 1e-2
    assert resample(stereo, 16000).waveform.shape == (2, 16000)
    assert resample(down, 16000) is down


def test_video_dataclass_duration_helpers():
    video = Video(np.zeros((8, 4, 4, 3), np.uint8), 8.0)
    assert video.frames.shape[0] / video.fps == 1.0
    assert Audio(np.zeros(8000, np.float32), 16000).duration == 0.5
