"""Media types and file I/O: reading images, audio and video, writing PNG, MP4 (H.264) and WAV.

Readers return plain values (``PIL.Image.Image``, :class:`Audio`, :class:`Video`) and raise
:class:`MediaError` with a one-line message naming the file, what was expected and what was found. Writers are
atomic: they write a temporary file in the destination folder and ``os.replace`` it into place, so a failed
write never leaves a half-written file (and one killed outright leaves a temporary that
``anygpt.base.utils.sweep_stale_temporaries`` removes later).

Limits. The readers refuse, from the file's header and before decoding it, media that are valid but would take
unbounded memory or time on the way to an encoder; the ``validate_*`` functions apply the same limits (and the
content checks) to media objects handed over directly (``validate_media(modality, value, "images[0]")``):

=======================  =====================================  =================================================
limit                    value                                  why
=======================  =====================================  =================================================
MAX_ASPECT_RATIO         20 (long side / short side)            vision encoders resize the short side to 224
                                                                keeping the aspect ratio: a 1 x 60000 image
                                                                would become 224 x 13 million pixels
MAX_IMAGE_PIXELS         2**27 (134 million; a 100-megapixel    about 400 MB decoded
                         camera's photo passes)
MAX_FRAME_PIXELS         4096 x 4096 per video frame            4K UHD and DCI 4K pass; 8K is refused
MAX_VIDEO_BYTES          4 GiB of frames kept                   without ``max_frames`` (with it, at most
                                                                ``max_frames`` frames of MAX_FRAME_PIXELS)
MAX_VIDEO_DECODE_PIXELS  2**38 (frames x width x height)        every frame is decoded to find those kept: about
                                                                an hour of 1080p at 30 fps (minutes of decoding)
MAX_AUDIO_SAMPLES        2**28 (all channels)                   1 GiB of float32: 46 min of 48 kHz stereo
MAX_AUDIO_SECONDS        4 hours                                the encoder resamples to 16 kHz first
sample rate              1000 .. 768000 Hz                      rates audio is recorded at
MAX_AUDIO_AMPLITUDE      16 (full scale is 1)                   a float file may go past full scale a little;
                                                                far past, it holds no normalised audio
=======================  =====================================  =================================================

Content: decoded samples and pixels must be finite (float audio and float frames; 8-bit pixels always are), and a
WAV file must hold the samples its header announces (a truncated file is refused, not read short).

Heavy libraries (soundfile, PyAV, imageio-ffmpeg, torchaudio) are imported on first use.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from anygpt.base.errors import MediaError
from anygpt.base.modality import Modality
from anygpt.base.utils import atomic_file

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "Audio",
    "IMAGE_EXTENSIONS",
    "AUDIO_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "MAX_ASPECT_RATIO",
    "MAX_AUDIO_AMPLITUDE",
    "MAX_AUDIO_SAMPLES",
    "MAX_AUDIO_SECONDS",
    "MAX_FRAME_PIXELS",
    "MAX_IMAGE_PIXELS",
    "MAX_SAMPLE_RATE",
    "MAX_VIDEO_BYTES",
    "MAX_VIDEO_DECODE_PIXELS",
    "MIN_SAMPLE_RATE",
    "MediaError",
    "Video",
    "check_frame_size",
    "guess_modality",
    "load_audio",
    "load_image",
    "load_media",
    "load_video",
    "resample",
    "save_audio",
    "save_image",
    "save_video",
    "to_mono",
    "validate_audio",
    "validate_image",
    "validate_media",
    "validate_video",
]


@dataclass
class Audio:
    """A waveform. ``waveform`` is float32, shape (T,) for mono or (C, T)."""

    waveform: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return self.waveform.shape[-1] / float(self.sample_rate)


@dataclass
class Video:
    """A clip. ``frames`` is uint8, shape (T, H, W, 3)."""

    frames: np.ndarray
    fps: float


IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
AUDIO_EXTENSIONS: frozenset[str] = frozenset({".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif"})
VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg"})

MAX_VIDEO_BYTES: int = 4 * 2**30
"""Largest decoded video (frames x height x width x 3 bytes) ``load_video`` returns without ``max_frames``."""

MAX_ASPECT_RATIO: float = 20.0
"""Largest long side / short side of an image or a video frame (encoders resize the short side keeping the ratio)."""

MAX_IMAGE_PIXELS: int = 2**27
"""Most pixels (width x height) of an image: 134 million, about 400 MB decoded."""

MAX_FRAME_PIXELS: int = 4096 * 4096
"""Most pixels (width x height) of one video frame: 4K passes, 8K does not."""

MAX_VIDEO_DECODE_PIXELS: int = 2**38
"""Most frames x width x height ``load_video`` decodes from one file (about an hour of 1080p at 30 fps)."""

MAX_AUDIO_SAMPLES: int = 2**28
"""Most decoded audio samples (all channels together): 1 GiB of float32."""

MAX_AUDIO_SECONDS: float = 4 * 3600.0
"""Longest audio recording, in seconds."""

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768000
"""The range of audio sample rates (Hz)."""

MAX_AUDIO_AMPLITUDE: float = 16.0
"""Largest absolute sample value after the loader's normalisation (full scale is 1; a float file may exceed it)."""

_EXTENSIONS = {
    Modality.IMAGE: IMAGE_EXTENSIONS,
    Modality.AUDIO: AUDIO_EXTENSIONS,
    Modality.VIDEO: VIDEO_EXTENSIONS,
}


# ------------------------------------------------------------------------------------------------------------
# Helpers for error messages
# ------------------------------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _sniff(path: Path) -> str:
    """Describe what a file holds from its first bytes (for error messages), e.g. ``'a WAV audio file'``."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return "a file that cannot be opened"
    if not head:
        return "an empty file (0 bytes)"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "a WAV audio file"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[:4] == b"RIFF" and head[8:11] == b"AVI":
        return "an AVI video file"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"GIF8"):
        return "a GIF image"
    if head[4:8] == b"ftyp":
        return "an MP4/MOV file"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "a Matroska/WebM file"
    if head.startswith(b"fLaC"):
        return "a FLAC audio file"
    if head.startswith(b"OggS"):
        return "an Ogg file"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "an MP3 audio file"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text"
    return "unrecognised data"


def _check_file(path: str | os.PathLike, kind: str) -> Path:
    """Return ``path`` as a ``Path`` after checking that it names an existing regular file."""
    p = Path(path).expanduser()
    expected = f"expected {'an' if kind[0] in 'aeiou' else 'a'} {kind} file"
    if not p.exists():
        raise MediaError(f"cannot read {kind} {p}: {expected}, found no such file")
    if p.is_dir():
        raise MediaError(f"cannot read {kind} {p}: {expected}, found a directory")
    if not p.is_file():
        raise MediaError(f"cannot read {kind} {p}: {expected}, found a special file")
    return p


# ------------------------------------------------------------------------------------------------------------
# Limits and content checks
# ------------------------------------------------------------------------------------------------------------


def _size_problem(width: int, height: int, *, max_pixels: int, what: str) -> str | None:
    """What is wrong with a picture of ``width`` x ``height`` pixels (``"expected ..., found ..."``), or None."""
    if width < 1 or height < 1:
        return f"expected {what} of at least 1x1 pixels, found {width}x{height}"
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        shown = f"{ratio:,.0f}" if ratio >= 100 else f"{ratio:.1f}"
        return (
            f"expected {what} with an aspect ratio of at most {MAX_ASPECT_RATIO:g}:1 (vision encoders resize the "
            f"short side to 224 pixels), found {width}x{height} pixels ({shown}:1); crop or pad it first"
        )
    if width * height > max_pixels:
        return (
            f"expected {what} of at most {max_pixels:,} pixels, found {width}x{height} = {width * height:,}; "
            "downscale it first"
        )
    return None


def check_frame_size(width: int, height: int, where: str, *, video: bool = False) -> None:
    """Refuse a picture whose size an encoder cannot take in bounded memory.

    Args:
        width: pixels across.
        height: pixels down.
        where: what the picture is, first in the message (a file's ``"cannot read image PATH"``, ``"images[0]"``).
        video: a video frame (at most ``MAX_FRAME_PIXELS``) rather than an image (at most ``MAX_IMAGE_PIXELS``).

    Raises:
        MediaError: an empty picture, a long side more than ``MAX_ASPECT_RATIO`` times the short side, or too many
            pixels; naming ``where``, the limit and the size found.
    """
    problem = _size_problem(
        int(width),
        int(height),
        max_pixels=MAX_FRAME_PIXELS if video else MAX_IMAGE_PIXELS,
        what="video frames" if video else "an image",
    )
    if problem:
        raise MediaError(f"{where}: {problem}")


def _finite_problem(values: np.ndarray, what: str) -> str | None:
    """``"expected finite ..., found N NaN or infinite ..."`` for float values that are not all finite, else None.

    The normal case allocates nothing (a NaN or an infinity shows in the minimum or the maximum).
    """
    if not np.issubdtype(values.dtype, np.floating) or values.size == 0:
        return None
    if np.isfinite(values.min()) and np.isfinite(values.max()):
        return None
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    return f"expected finite {what}, found {bad:,} NaN or infinite of {values.size:,}"


def _audio_problem(waveform: np.ndarray) -> str | None:
    """What is wrong with decoded samples (not finite, or beyond ``MAX_AUDIO_AMPLITUDE``), or None."""
    problem = _finite_problem(waveform, "samples")
    if problem:
        return problem
    if not np.issubdtype(waveform.dtype, np.floating) or waveform.size == 0:
        return None
    peak = float(max(waveform.max(), -waveform.min()))
    if peak > MAX_AUDIO_AMPLITUDE:
        return (
            f"expected samples within +-{MAX_AUDIO_AMPLITUDE:g} (full scale is 1), found a peak of {peak:.4g}; "
            "scale the samples to [-1, 1]"
        )
    return None


def _audio_size_problem(frames: int, channels: int, sample_rate: float) -> str | None:
    """What is wrong with an audio recording's rate or length, or None."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        return f"expected a sample rate of {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz, found {sample_rate:g} Hz"
    if frames * channels > MAX_AUDIO_SAMPLES:
        return (
            f"expected at most {MAX_AUDIO_SAMPLES:,} samples (all channels), found {frames:,} x {channels} "
            "channel(s); cut the recording first"
        )
    if frames / sample_rate > MAX_AUDIO_SECONDS:
        return (
            f"expected at most {MAX_AUDIO_SECONDS / 3600:g} hours of audio, found {frames / sample_rate / 3600:.3g} "
            "hours; cut the recording first"
        )
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def validate_image(image: Image.Image | np.ndarray, where: str) -> None:
    """Check an image handed over as an object (what :func:`load_image` checks of a file).

    Args:
        image: a ``PIL.Image.Image``, or pixels (H, W) / (H, W, C) as an array.
        where: what it is, first in the message (``"images[0]"``).

    Raises:
        MediaError: a size past the limits (see :func:`check_frame_size`), non-numeric or non-finite pixels.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        check_frame_size(*image.size, where)
        if image.mode in ("F", "I;16F"):  # float pixels may be NaN
            problem = _finite_problem(np.asarray(image), "pixels")
            if problem:
                raise MediaError(f"{where}: {problem}")
        return
    pixels = np.asarray(image)
    if pixels.ndim not in (2, 3) or not (np.issubdtype(pixels.dtype, np.number) and pixels.dtype.kind != "c"):
        raise MediaError(f"{where}: expected pixels (H, W[, C]) of numbers, found shape {pixels.shape} {pixels.dtype}")
    check_frame_size(pixels.shape[1], pixels.shape[0], where)
    problem = _finite_problem(pixels, "pixels")
    if problem:
        raise MediaError(f"{where}: {problem}")


def validate_audio(audio: Audio, where: str) -> None:
    """Check an :class:`Audio` handed over as an object (what :func:`load_audio` checks of a file).

    Args:
        audio: the waveform (T,) or (C, T) and its sample rate.
        where: what it is, first in the message (``"audios[0]"``).

    Raises:
        MediaError: a waveform that is not real numbers (T,) or (C, T) with at least one sample, a sample rate or
            length past the limits, samples that are NaN or infinite, or beyond ``MAX_AUDIO_AMPLITUDE``.
    """
    waveform = np.asarray(audio.waveform)
    if not (np.issubdtype(waveform.dtype, np.number) and waveform.dtype.kind != "c"):
        raise MediaError(f"{where}: expected a waveform of real numbers, found dtype {waveform.dtype}")
    if waveform.ndim not in (1, 2) or waveform.size == 0:
        raise MediaError(f"{where}: expected a waveform (T,) or (C, T) with samples, found shape {waveform.shape}")
    rate = audio.sample_rate
    if not _is_number(rate) or not np.isfinite(rate):
        raise MediaError(f"{where}: expected a sample rate in Hz, found {rate!r}")
    channels = 1 if waveform.ndim == 1 else waveform.shape[0]
    problem = _audio_size_problem(waveform.shape[-1], channels, float(rate)) or _audio_problem(waveform)
    if problem:
        raise MediaError(f"{where}: {problem}")


def validate_video(video: Video, where: str) -> None:
    """Check a :class:`Video` handed over as an object (what :func:`load_video` checks of a file).

    Args:
        video: frames (T, H, W, 3) and their rate.
        where: what it is, first in the message (``"videos[0]"``).

    Raises:
        MediaError: frames that are not numbers (T, H, W, 3) with T >= 1, a frame size past the limits (see
            :func:`check_frame_size`), non-finite pixels, or a frame rate that is not a positive finite number.
    """
    frames = np.asarray(video.frames)
    numeric = np.issubdtype(frames.dtype, np.number) and frames.dtype.kind != "c"
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0 or not numeric:
        raise MediaError(
            f"{where}: expected frames (T, H, W, 3) with T >= 1, found shape {frames.shape} {frames.dtype}"
        )
    check_frame_size(frames.shape[2], frames.shape[1], where, video=True)
    fps = video.fps
    if not _is_number(fps) or not (np.isfinite(fps) and fps > 0):
        raise MediaError(f"{where}: expected a positive frame rate, found {fps!r}")
    problem = _finite_problem(frames, "pixels")
    if problem:
        raise MediaError(f"{where}: {problem}")


def validate_media(modality: Modality | str, value: object, where: str) -> None:
    """:func:`validate_image`, :func:`validate_audio` or :func:`validate_video` by ``modality``; other modalities
    and values of another type pass (the caller checks types)."""
    modality = Modality.parse(modality)
    if modality is Modality.AUDIO and isinstance(value, Audio):
        validate_audio(value, where)
    elif modality is Modality.VIDEO and isinstance(value, Video):
        validate_video(value, where)
    elif modality is Modality.IMAGE and not isinstance(value, str | os.PathLike | Audio | Video):
        validate_image(value, where)


def _wav_truncation(path: Path) -> str | None:
    """For a RIFF/WAVE file whose ``data`` chunk announces more bytes than the file holds, what was found; else None.

    A size of 0 or 0xFFFFFFFF (a stream written without going back to the header) announces nothing.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            offset = 12
            for _ in range(1000):  # chunks before the samples: fmt, fact, LIST, ...
                f.seek(offset)
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                declared = int.from_bytes(chunk[4:8], "little")
                if chunk[:4] == b"data":
                    held = size - offset - 8
                    if declared not in (0, 0xFFFFFFFF) and declared > held:
                        return (
                            f"expected the {declared:,} bytes of samples its header announces, found {held:,} "
                            "(a truncated file)"
                        )
                    return None
                offset += 8 + declared + (declared & 1)
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------------------


def guess_modality(path: str | os.PathLike) -> Modality:
    """Guess a media file's modality from its extension (case-insensitive).

    Args:
        path: a file name or path; the file need not exist.

    Returns:
        ``Modality.IMAGE``, ``Modality.AUDIO`` or ``Modality.VIDEO``.

    Raises:
        MediaError: for an unknown or missing extension, listing the known ones.
    """
    suffix = Path(path).suffix.lower()
    for modality, extensions in _EXTENSIONS.items():
        if suffix in extensions:
            return modality
    known = "; ".join(f"{m.value}: {' '.join(sorted(e))}" for m, e in _EXTENSIONS.items())
    found = f"extension {suffix!r}" if suffix else "no extension"
    raise MediaError(f"cannot tell the modality of {path}: expected a known media extension ({known}), found {found}")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as RGB.

    EXIF orientation is applied; transparent pixels are composited onto white. The size is checked from the header
    before the pixels are decoded: an image whose long side is more than ``MAX_ASPECT_RATIO`` (20) times its short
    side, or of more than ``MAX_IMAGE_PIXELS``, is refused rather than cropped or letterboxed, since encoders resize
    the short side keeping the aspect ratio and a crop would silently show the model a sliver of the picture: crop or
    pad such an image to the part that matters first.

    Args:
        path: an image file PIL can read (JPEG, PNG, WebP, GIF (first frame), BMP, TIFF).

    Returns:
        A fully loaded ``PIL.Image.Image`` in mode ``"RGB"``.

    Raises:
        MediaError: when the file is missing, a directory, not a readable image, or past the size limits (naming the
            file, the limit and the size found).
    """
    from PIL import Image, ImageOps

    p = _check_file(path, "image")
    try:
        with Image.open(p) as opened:
            check_frame_size(*opened.size, f"cannot read image {p}")  # from the header: nothing decoded yet
            opened.load()
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            return image.convert("RGB")
    except MediaError:
        raise
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, DecompressionBombError, ...)
        raise MediaError(f"cannot read image {p}: expected an image file, found {_sniff(p)} ({_one_line(e)})") from e


def load_audio(path: str | os.PathLike) -> Audio:
    """Read an audio file with soundfile (WAV, FLAC, Ogg/Vorbis, MP3, AIFF).

    Args:
        path: the audio file.

    Returns:
        :class:`Audio` with float32 samples, in [-1, 1] for integer formats: shape (T,) for a mono file, (C, T)
        otherwise, and the file's sample rate.

    Raises:
        MediaError: when the file is missing, a directory, unreadable, not audio, holds no samples, is a WAV file
            shorter than its header says (truncated), has a sample rate or length past the limits (checked from the
            header, before decoding), or samples that are NaN, infinite or beyond ``MAX_AUDIO_AMPLITUDE``.
    """
    import soundfile as sf

    p = _check_file(path, "audio")
    try:
        info = sf.info(str(p))
        problem = _wav_truncation(p)
        if problem is None and 0 < info.frames < 2**62:  # libsndfile says 2**63-1 for "unknown"
            problem = _audio_size_problem(int(info.frames), int(info.channels), float(info.samplerate))
        if problem:
            raise MediaError(f"cannot read audio {p}: {problem}")
        data, sample_rate = sf.read(str(p), dtype="float32", always_2d=True)  # (T, C)
    except MediaError:
        raise
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError, ...
        raise MediaError(f"cannot read audio {p}: expected an audio file, found {_sniff(p)} ({_one_line(e)})") from e
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise MediaError(f"cannot read audio {p}: expected audio samples, found an empty recording (0 samples)")
    problem = _audio_size_problem(data.shape[0], data.shape[1], float(sample_rate)) or _audio_problem(data)
    if problem:
        raise MediaError(f"cannot read audio {p}: {problem}")
    waveform = np.ascontiguousarray(data.T)  # (C, T)
    if waveform.shape[0] == 1:
        waveform = waveform[0]
    return Audio(waveform=waveform, sample_rate=int(sample_rate))


def _stream_fps(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return None


def _count_packets(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def _decode_frames(path: Path, keep: set[int] | None, size: tuple[int, int]) -> tuple[list[np.ndarray], int]:
    """Decode the video stream: the RGB frames whose index is in ``keep`` (all if None), and the count."""
    import av

    width, height = size  # 0 when the header does not say: then the first frame's size
    frames: list[np.ndarray] = []
    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if width <= 0 or height <= 0:
                width, height = frame.width, frame.height
                check_frame_size(width, height, f"cannot read video {path}", video=True)
            if keep is None or count in keep:
                frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
            count += 1
    return frames, count


def load_video(path: str | os.PathLike, *, max_frames: int | None = None) -> Video:
    """Read a video file's frames with PyAV.

    Args:
        path: the video file (MP4, MOV, MKV, WebM, AVI, ...); its first video stream is read, audio is
            ignored.
        max_frames: if set, keep at most this many frames, evenly spaced over the whole clip (first and last
            included); only those frames are converted to RGB, so memory stays bounded for long videos (at most
            ``max_frames`` frames of ``MAX_FRAME_PIXELS``).

    Returns:
        :class:`Video` with uint8 frames (T, H, W, 3) and ``fps``: the file's frame rate, or, when frames were
        dropped for ``max_frames``, the effective rate of the frames kept (so ``T / fps`` is still the
        duration).

    The limits are checked from the header before any frame is decoded. Frames whose long side is more than
    ``MAX_ASPECT_RATIO`` (20) times their short side, or of more than ``MAX_FRAME_PIXELS``, are refused rather than
    cropped (encoders resize the short side keeping the aspect ratio; crop or pad such a video first); so is a
    video of more than ``MAX_VIDEO_DECODE_PIXELS`` (frames x width x height): every frame is decoded to keep the
    chosen ones, so that bounds the time spent (trim a longer video first).

    Raises:
        MediaError: when the file is missing, a directory, unreadable, a still image or audio-only, has no
            frames, has frames or a length past the limits above, or would decode to more than
            ``MAX_VIDEO_BYTES`` without ``max_frames``.
    """
    import av

    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be a positive integer or None, got {max_frames!r}")
    p = _check_file(path, "video")
    try:
        with av.open(str(p)) as container:
            format_name = container.format.name
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["no streams"]
                raise MediaError(
                    f"cannot read video {p}: expected a video stream, found {_sniff(p)} with {', '.join(kinds)}"
                )
            stream = container.streams.video[0]
            fps = _stream_fps(stream)
            total = int(stream.frames or 0)
            width, height = stream.codec_context.width, stream.codec_context.height
        if format_name.endswith("_pipe") or format_name == "image2":
            raise MediaError(f"cannot read video {p}: expected a video, found a still image ({format_name})")
        if fps is None:
            raise MediaError(f"cannot read video {p}: expected a frame rate in the file, found none")
        if width > 0 and height > 0:  # else checked on the first frame decoded
            check_frame_size(width, height, f"cannot read video {p}", video=True)
        if total <= 0:
            total = _count_packets(p)
        if total * max(width, 1) * max(height, 1) > MAX_VIDEO_DECODE_PIXELS:
            raise MediaError(
                f"cannot read video {p}: expected at most {MAX_VIDEO_DECODE_PIXELS:,} pixels to decode (frames x "
                f"width x height), found {total:,} frames of {width}x{height}; trim the video first"
            )
        if max_frames is None:
            if total * width * height * 3 > MAX_VIDEO_BYTES:
                raise MediaError(
                    f"cannot read video {p}: expected at most {MAX_VIDEO_BYTES / 2**30:.0f} GiB of frames, "
                    f"found {total} frames of {width}x{height}; pass max_frames to keep fewer"
                )
            keep = None
        else:
            keep = _even_indices(total, max_frames) if total > max_frames else None
        frames, count = _decode_frames(p, keep, (width, height))
        if keep is not None and len(frames) < len(keep) and count > 0:
            # The header over-counted the frames: pick again from the true count.
            keep = _even_indices(count, max_frames) if count > max_frames else None
            frames, count = _decode_frames(p, keep, (width, height))
    except MediaError:
        raise
    except Exception as e:  # av.error.* (InvalidDataError, ...), OSError
        raise MediaError(f"cannot read video {p}: expected a video file, found {_sniff(p)} ({_one_line(e)})") from e
    if not frames:
        raise MediaError(f"cannot read video {p}: expected at least one frame, found 0 decodable frames")
    if max_frames is not None and len(frames) > max_frames:  # the header under-counted the frames
        frames = [frames[i] for i in sorted(_even_indices(len(frames), max_frames))]
    if len(frames) < count:
        fps = fps * len(frames) / count  # keep T / fps equal to the duration
    return Video(frames=np.stack(frames), fps=fps)


def _even_indices(total: int, count: int) -> set[int]:
    """``count`` evenly spaced indices in ``range(total)``, first and last included."""
    return {int(i) for i in np.linspace(0, total - 1, count).round()}


def load_media(
    modality: Modality | str, path: str | os.PathLike, *, max_frames: int | None = None
) -> Image.Image | Audio | Video:
    """Read a media file of the given modality.

    Args:
        modality: ``image``, ``audio`` or ``video`` (a :class:`Modality` or its name).
        path: the file.
        max_frames: for video, passed to :func:`load_video`; ignored otherwise.

    Returns:
        ``PIL.Image.Image`` (RGB), :class:`Audio` or :class:`Video`.

    Raises:
        MediaError: for unreadable files (see the readers) or a non-media modality such as text.
    """
    modality = Modality.parse(modality)
    if modality is Modality.IMAGE:
        return load_image(path)
    if modality is Modality.AUDIO:
        return load_audio(path)
    if modality is Modality.VIDEO:
        return load_video(path, max_frames=max_frames)
    raise MediaError(f"cannot read {path} as {modality.value}: expected image, audio or video")


# ------------------------------------------------------------------------------------------------------------
# Audio helpers
# ------------------------------------------------------------------------------------------------------------


def to_mono(audio: Audio) -> Audio:
    """Average the channels of ``audio``.

    Args:
        audio: waveform (T,) or (C, T).

    Returns:
        :class:`Audio` with a float32 (T,) waveform at the same sample rate (the input itself if already
        mono).
    """
    waveform = np.asarray(audio.waveform)
    if waveform.ndim == 1:
        return audio
    if waveform.ndim != 2:
        raise MediaError(f"cannot make audio mono: expected a waveform (T,) or (C, T), found shape {waveform.shape}")
    return Audio(waveform=waveform.mean(axis=0, dtype=np.float32), sample_rate=audio.sample_rate)


def resample(audio: Audio, rate: int) -> Audio:
    """Resample ``audio`` to ``rate`` Hz with ``torchaudio.functional.resample`` (windowed sinc), channels
    kept.

    Args:
        audio: waveform (T,) or (C, T).
        rate: the new sample rate in Hz.

    Returns:
        :class:`Audio` at ``rate`` with a float32 waveform of the same layout (the input itself if already at
        ``rate``).
    """
    if int(rate) <= 0:
        raise ValueError(f"sample rate must be positive, got {rate!r}")
    if int(audio.sample_rate) == int(rate):
        return audio
    import torch
    import torchaudio

    waveform = torch.from_numpy(np.ascontiguousarray(audio.waveform, dtype=np.float32))
    out = torchaudio.functional.resample(waveform, orig_freq=int(audio.sample_rate), new_freq=int(rate))
    return Audio(waveform=out.numpy(), sample_rate=int(rate))


# ------------------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------------------


@contextmanager
def _atomic_output(path: str | os.PathLike, kind: str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` on success, delete it on any failure."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise MediaError(f"cannot write {kind} {target}: expected a file path, found a directory")
    with atomic_file(target, suffix=target.suffix) as tmp:  # the suffix tells the writers the format
        yield tmp


def _as_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 pixels from uint8 or float-in-[0, 1] data."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise MediaError(f"cannot write {what}: expected uint8 or float pixels, found dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.integer):
        return np.clip(array, 0, 255).astype(np.uint8)
    if not np.isfinite(array).all():
        raise MediaError(f"cannot write {what}: expected finite float pixels in [0, 1], found NaN or inf")
    return (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def save_image(image: Image.Image | np.ndarray, path: str | os.PathLike) -> Path:
    """Write an image as PNG, atomically.

    Args:
        image: a PIL image (any mode PNG holds) or an array (H, W), (H, W, 3) or (H, W, 4), uint8 or float in
            [0, 1].
        path: destination; written as PNG whatever its extension. Missing parent folders are created.

    Returns:
        The path written.
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
            raise MediaError(f"cannot write image {path}: expected (H, W[, 3|4]) pixels, found shape {array.shape}")
        image = Image.fromarray(_as_uint8(array, f"image {path}"))
    with _atomic_output(path, "image") as tmp:
        try:
            image.save(tmp, format="PNG")
        except Exception as e:
            raise MediaError(f"cannot write image {path}: PNG encoding failed ({_one_line(e)})") from e
    return Path(path).expanduser()


def save_audio(audio: Audio, path: str | os.PathLike, *, subtype: str = "PCM_16") -> Path:
    """Write audio as WAV, atomically.

    Args:
        audio: waveform (T,) or (C, T), float in [-1, 1] (values outside are clipped for PCM subtypes).
        path: destination; written as WAV whatever its extension. Missing parent folders are created.
        subtype: soundfile WAV subtype: ``"PCM_16"`` (default: 16-bit integer, plays everywhere, round-trip
            error below 1e-4) or ``"FLOAT"`` (32-bit float, exact).

    Returns:
        The path written.
    """
    import soundfile as sf

    waveform = np.asarray(audio.waveform, dtype=np.float32)
    if waveform.ndim not in (1, 2) or waveform.shape[-1] == 0 or (waveform.ndim == 2 and waveform.shape[0] == 0):
        raise MediaError(
            f"cannot write audio {path}: expected a non-empty waveform (T,) or (C, T), found shape {waveform.shape}"
        )
    if not np.isfinite(waveform).all():
        raise MediaError(f"cannot write audio {path}: expected finite samples, found NaN or inf")
    if int(audio.sample_rate) <= 0:
        raise MediaError(f"cannot write audio {path}: expected a positive sample rate, found {audio.sample_rate}")
    if subtype.upper().startswith("PCM"):
        waveform = np.clip(waveform, -1.0, 1.0)
    data = waveform.T if waveform.ndim == 2 else waveform  # soundfile wants (T, C)
    with _atomic_output(path, "audio") as tmp:
        try:
            sf.write(str(tmp), data, int(audio.sample_rate), subtype=subtype, format="WAV")
        except Exception as e:
            raise MediaError(f"cannot write audio {path}: WAV encoding failed ({_one_line(e)})") from e
    return Path(path).expanduser()


def _video_frames(video: Video | np.ndarray, path: str | os.PathLike) -> np.ndarray:
    frames = np.asarray(video.frames if isinstance(video, Video) else video)
    if frames.ndim == 3:  # (T, H, W) grey
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4) or 0 in frames.shape:
        raise MediaError(f"cannot write video {path}: expected frames (T, H, W, 3), found shape {frames.shape}")
    frames = _as_uint8(frames, f"video {path}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    elif frames.shape[-1] == 4:
        frames = frames[..., :3]
    # yuv420p needs even sizes: repeat the last row / column.
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(frames)


def save_video(video: Video | np.ndarray, path: str | os.PathLike, fps: float | None = None, *, crf: int = 18) -> Path:
    """Write a video as H.264 MP4 (yuv420p, ``+faststart``) with imageio-ffmpeg, atomically; browsers play it.

    Odd frame sizes are padded by one row/column (edge pixels repeated), since yuv420p needs even sizes.

    Args:
        video: a :class:`Video`, or frames (T, H, W, 3) / (T, H, W) uint8 or float in [0, 1].
        path: destination; an MP4 whatever its extension. Missing parent folders are created.
        fps: frames per second; default ``video.fps`` for a :class:`Video`, 8 for an array.
        crf: x264 constant rate factor (0 lossless-ish luma, 18 visually lossless, 51 worst).

    Returns:
        The path written.
    """
    import imageio_ffmpeg

    frames = _video_frames(video, path)
    if fps is None:
        fps = float(video.fps) if isinstance(video, Video) else 8.0
    if not fps > 0:
        raise MediaError(f"cannot write video {path}: expected a positive fps, found {fps}")
    _, height, width, _ = frames.shape
    with _atomic_output(path, "video") as tmp:
        # ffmpeg writes into a folder of its own beside the temporary (named like it, so a killed run's is swept):
        # on an interrupt imageio-ffmpeg stops ffmpeg without waiting, and ffmpeg's +faststart pass may still
        # reopen its output by name; inside a folder that is removed whole, it cannot leave a file behind.
        work = Path(tempfile.mkdtemp(prefix=f"{tmp.name}.", dir=tmp.parent))
        try:
            encoded = work / "video.mp4"
            writer = imageio_ffmpeg.write_frames(
                str(encoded),
                (width, height),
                fps=float(fps),
                codec="libx264",
                pix_fmt_in="rgb24",
                pix_fmt_out="yuv420p",
                quality=None,
                macro_block_size=1,
                ffmpeg_log_level="error",
                output_params=["-crf", str(int(crf)), "-movflags", "+faststart", "-f", "mp4"],
            )
            try:
                try:
                    writer.send(None)  # start ffmpeg
                    for frame in frames:
                        writer.send(frame)
                finally:
                    writer.close()  # waits for ffmpeg; raises if it failed
            except Exception as e:
                raise MediaError(f"cannot write video {path}: H.264 encoding failed ({_one_line(e)})") from e
            os.replace(encoded, tmp)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return Path(path).expanduser()
