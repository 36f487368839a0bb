"""Oracles for the toy world: read an item's attributes back from its pixels, samples or caption.

Each oracle names what it sees with the world's words (``"red"``, ``"triangle"``, ``"high"``, ``"left"``, ...) or
None when it cannot tell. They use ``numpy`` only, take milliseconds, and are meant to judge the imperfect output of
small diffusion models (blur, slight colour shifts, speckles, faint background noise): every decision is made on a
large, robust statistic (a median colour, a blob's shape, a spectral band's energy, a centroid track), not on single
pixels or samples.

=========================  ============================================================================
oracle                     how
=========================  ============================================================================
:func:`image_attributes`   foreground = pixels far from the near-white border colour; colour = the palette
                           colour nearest to the foreground's median; shape = the largest blob's fill
                           of its bounding box and its top / bottom width (a triangle is wide below)
:func:`audio_attributes`   pitch = the spectral peak's nearest world pitch (within 1/3 octave) when the
                           peak holds a good share of the energy; style = the frame-RMS envelope's
                           modulation (pulsed beeps switch off and on)
:func:`video_attributes`   colour = as for images, pooled over frames; direction = the dominant axis of
                           the largest blob's centroid track (a least-squares slope over frames)
:func:`caption_attributes` the single world word of each kind a caption names (None for none or two)
:func:`reply_modalities`   which media an ``AnyGPTOutput`` holds
=========================  ============================================================================

Example:
    >>> import numpy as np
    >>> from toyworld import world
    >>> item = world.draw_image(np.random.default_rng(0))
    >>> image_attributes(item.render()) == item.attributes()
    True
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from PIL import Image

from anygpt.base.media import Audio, Video
from anygpt.base.modality import MEDIA_MODALITIES, Modality
from toyworld.render import COLOURS, DIRECTIONS, SHAPES

__all__ = [
    "CAPTION_WORDS",
    "audio_attributes",
    "caption_attributes",
    "image_attributes",
    "reply_modalities",
    "video_attributes",
]

PITCHES: dict[str, float] = {"low": 262.0, "mid": 523.0, "high": 1047.0}

# ---- thresholds (RGB distances are in 0-255 units)
_BACKGROUND_DISTANCE = 90.0  # the background (median border colour) must be this close to white
_FOREGROUND_DISTANCE = 60.0  # a pixel this far from the background colour is foreground
_PALETTE_DISTANCE = 100.0  # the foreground's median colour must be this close to a palette colour
_PALETTE_PURITY = 0.5  # ... and this share of the foreground's core pixels nearest to (and close to) that colour
_MIN_AREA = 0.003  # smallest blob, as a fraction of the image (12 px at 64 x 64; the world's smallest is 144 px)
_DOMINANT = 0.5  # the largest blob holds at least this share of the foreground pixels
_WORK_SIDE = 96  # larger images are box-downscaled to about 64 px before analysis
_PITCH_OCTAVES = 1 / 3  # the peak may be this far from a world pitch
_TONAL_SHARE = 0.2  # energy within 1/6 octave of the peak, as a share of all energy above 40 Hz
_SUBHARMONIC = 0.3  # a peak is a second harmonic when the band an octave below holds this share of its energy
_SILENCE_RMS = 1e-3  # -60 dBFS
_PULSE_MODULATION = 0.35  # coefficient of variation of the frame-RMS envelope above which audio is pulsed
_MIN_TRAVEL = 0.12  # a video's blob must travel this fraction of the frame along its dominant axis


# ------------------------------------------------------------------------------------------------------------
# Pixels
# ------------------------------------------------------------------------------------------------------------


def _as_rgb(image: Any) -> np.ndarray:
    """float32 (H, W, 3) in 0-255 from a PIL image or an array (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if max(image.size) > _WORK_SIDE:
            image = _shrink(image)
        return np.asarray(image, dtype=np.float32)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an image (H, W, 3), found shape {array.shape}")
    array = _as_uint8(array[..., :3])
    if max(array.shape[:2]) > _WORK_SIDE:
        return np.asarray(_shrink(Image.fromarray(array)), dtype=np.float32)
    return array.astype(np.float32)


def _as_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 pixels from uint8, or from floats in [0, 1] (or in 0-255 when larger values occur)."""
    if array.dtype == np.uint8:
        return array
    array = np.nan_to_num(np.asarray(array, dtype=np.float32))
    if array.size and float(array.max()) <= 1.0:
        array = array * 255.0
    return np.clip(array, 0, 255).round().astype(np.uint8)


def _shrink(image: Any) -> Any:
    """Box-downscale a PIL image so that its longer side is 64 px (analysis cost stays small)."""
    scale = 64 / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return image.resize(size, Image.Resampling.BOX)


def _background(frames: np.ndarray) -> np.ndarray | None:
    """The background colour: the per-channel median of the border pixels of (T, H, W, 3) frames.

    None when it is not near-white: the world draws on white, so such an image shows no world item.
    """
    border = np.concatenate(
        [frames[:, 0].reshape(-1, 3), frames[:, -1].reshape(-1, 3), frames[:, :, 0].reshape(-1, 3)]
        + [frames[:, :, -1].reshape(-1, 3)]
    )
    background = np.median(border, axis=0)
    return background if np.linalg.norm(255.0 - background) <= _BACKGROUND_DISTANCE else None


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean (H, W) mask (all False when the mask is empty)."""
    if not mask.any():
        return mask
    h, w = mask.shape
    big = np.iinfo(np.int64).max
    index = np.arange(h * w, dtype=np.int64).reshape(h, w)
    labels = np.where(mask, index, big)
    while True:  # each pixel takes the smallest label among its neighbours, then follows that label's own label
        new = labels.copy()
        new[1:] = np.minimum(new[1:], labels[:-1])
        new[:-1] = np.minimum(new[:-1], labels[1:])
        new[:, 1:] = np.minimum(new[:, 1:], labels[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], labels[:, 1:])
        new = np.where(mask, new, big)
        flat = new[mask]
        new[mask] = new.reshape(-1)[flat]  # pointer jumping: a label is a pixel of the same component
        if np.array_equal(new, labels):
            break
        labels = new
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[np.argmax(counts)]


def _palette_colour(pixels: np.ndarray) -> str | None:
    """The world colour of (N, 3) foreground pixels: nearest to their median, if close and shared by most."""
    if len(pixels) == 0:
        return None
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float32)  # (4, 3)
    median = np.median(pixels, axis=0)
    distances = np.linalg.norm(palette - median, axis=1)
    best = int(np.argmin(distances))
    if distances[best] > _PALETTE_DISTANCE:
        return None
    per_pixel = np.linalg.norm(pixels[:, None, :] - palette[None], axis=2)  # (N, 4)
    agree = (per_pixel.argmin(axis=1) == best) & (per_pixel[:, best] <= 1.5 * _PALETTE_DISTANCE)
    return names[best] if agree.mean() >= _PALETTE_PURITY else None


def _core(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The foreground pixels that are most unlike the background (drops the blurred rim of a shape)."""
    distance = np.linalg.norm(pixels - background, axis=1)
    return pixels[distance >= 0.6 * np.percentile(distance, 90)]


def _foreground(frame: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Boolean (H, W): pixels far from the background colour."""
    return np.linalg.norm(frame - background, axis=-1) > _FOREGROUND_DISTANCE


def _blob(frame: np.ndarray, background: np.ndarray) -> np.ndarray | None:
    """The dominant blob of a frame as a boolean mask, or None when there is none (blank, or scattered noise).

    The blob's outline is then set where the pixels are halfway between the background and the blob's colour, so
    a blurred edge does not grow or shrink the shape.
    """
    mask = _foreground(frame, background)
    total = int(mask.sum())
    min_area = max(8, _MIN_AREA * mask.size)
    if total < min_area:
        return None
    blob = _largest_component(mask)
    area = int(blob.sum())
    if area < min_area or area < _DOMINANT * total:
        return None
    colour = np.median(_core(frame[blob], background), axis=0)
    axis = colour - background
    length2 = float(axis @ axis)
    if length2 > _FOREGROUND_DISTANCE**2:
        alpha = (frame - background) @ axis / length2  # 0 at the background, 1 at the blob's colour
        rows, cols = np.nonzero(blob)
        top, bottom = max(0, rows.min() - 2), rows.max() + 3
        left, right = max(0, cols.min() - 2), cols.max() + 3
        refined = np.zeros_like(blob)
        refined[top:bottom, left:right] = alpha[top:bottom, left:right] > 0.5
        refined = _largest_component(refined)
        if refined.sum() >= min_area:
            blob = refined
    return blob


def _shape_of(blob: np.ndarray) -> str | None:
    """circle, square or triangle from a blob's row spans: fill of the bounding box and top / bottom widths."""
    rows = np.flatnonzero(blob.any(axis=1))
    cols = np.flatnonzero(blob.any(axis=0))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    if height < 4 or width < 4 or not 0.5 <= height / width <= 2.0:
        return None
    box = blob[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    filled = box.any(axis=1)
    first = np.argmax(box, axis=1)
    last = box.shape[1] - 1 - np.argmax(box[:, ::-1], axis=1)
    spans = np.where(filled, last - first + 1, 0).astype(np.float64)  # row widths, holes filled
    fill = spans.sum() / (height * width)
    third = max(1, height // 3)
    top, bottom = spans[:third].mean(), spans[-third:].mean()
    taper = min(top, bottom) / max(top, bottom, 1.0)  # triangle ~0.2, circle and square ~1
    if taper < 0.6 and 0.3 <= fill <= 0.72:
        return "triangle"
    if taper >= 0.6 and fill >= 0.89:
        return "square"
    if taper >= 0.6 and 0.62 <= fill < 0.89:
        return "circle"
    return None


def image_attributes(image: Any) -> dict[str, str | None]:
    """The colour and shape an image shows.

    Args:
        image: a ``PIL.Image`` or an array (H, W, 3), uint8 or float in [0, 1]. Images larger than 96 px are
            analysed at about 64 px.

    Returns:
        ``{"colour": "red" | "green" | "blue" | "yellow" | None, "shape": "circle" | "square" | "triangle" | None}``:
        None for a blank image, a background that is not near-white, scattered noise (no dominant blob), a
        colour far from the palette or a blob that looks like no world shape.
    """
    pixels = _as_rgb(image)
    background = _background(pixels[None])
    if background is None:
        return {"colour": None, "shape": None}
    mask = _foreground(pixels, background)
    colour = None
    if mask.sum() >= max(8, _MIN_AREA * mask.size):
        colour = _palette_colour(_core(pixels[mask], background))
    blob = _blob(pixels, background)
    shape = None if blob is None else _shape_of(blob)
    return {"colour": colour, "shape": shape}


# ------------------------------------------------------------------------------------------------------------
# Audio
# ------------------------------------------------------------------------------------------------------------


def _as_mono(audio: Any, sample_rate: int | None) -> tuple[np.ndarray, int]:
    if isinstance(audio, Audio):
        samples, rate = audio.waveform, audio.sample_rate
    else:
        samples, rate = audio, sample_rate
    if rate is None or int(rate) <= 0:
        raise ValueError("audio_attributes: give an Audio object or samples and a positive sample_rate")
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim == 2:  # (C, T) as anygpt.base.media.Audio, or (T, C): the longer axis is time
        samples = samples.mean(axis=0 if samples.shape[0] < samples.shape[1] else 1)
    if samples.ndim != 1:
        raise ValueError(f"expected audio samples (T,) or (C, T), found shape {samples.shape}")
    return np.nan_to_num(samples), int(rate)


def audio_attributes(audio: Any, sample_rate: int | None = None) -> dict[str, str | None]:
    """The pitch and style of a tone.

    Args:
        audio: an ``anygpt.base.media.Audio`` (mono (T,) or multi-channel), or a 1-D array of samples.
        sample_rate: the samples' rate when ``audio`` is an array.

    Returns:
        ``{"pitch": "low" | "mid" | "high" | None, "style": "steady" | "pulsed" | None}``. Both None for silence or
        for sound without a clear tone (noise); pitch None when the tone is more than 1/3 octave from every world
        pitch. The tone is the spectral peak, or the peak an octave (two) below it when that one holds at least 30%
        of its energy (a strong second harmonic does not raise the pitch).
    """
    samples, rate = _as_mono(audio, sample_rate)
    samples = samples - samples.mean()
    if len(samples) < rate // 20 or np.sqrt(np.mean(samples**2)) < _SILENCE_RMS:
        return {"pitch": None, "style": None}
    power = np.abs(np.fft.rfft(samples * np.hanning(len(samples)))) ** 2
    freqs = np.fft.rfftfreq(len(samples), 1.0 / rate)
    audible = freqs >= 40.0
    if not audible.any() or power[audible].sum() <= 0:
        return {"pitch": None, "style": None}
    peak = float(freqs[audible][np.argmax(power[audible])])
    band = _band(freqs, peak) & audible
    if power[band].sum() / power[audible].sum() < _TONAL_SHARE:
        return {"pitch": None, "style": None}
    for _ in range(2):  # a strong second harmonic above a real fundamental: take the fundamental
        below = _band(freqs, peak / 2) & audible
        if peak / 2 < 40.0 or power[below].sum() < _SUBHARMONIC * power[band].sum():
            break
        peak, band = float(freqs[below][np.argmax(power[below])]), below
    octaves = {name: abs(np.log2(peak / f)) for name, f in PITCHES.items()}
    nearest = min(octaves, key=octaves.get)
    pitch = nearest if octaves[nearest] <= _PITCH_OCTAVES else None
    return {"pitch": pitch, "style": _style(samples, rate)}


def _band(freqs: np.ndarray, centre: float) -> np.ndarray:
    """The frequencies within 1/6 octave of ``centre``."""
    return np.abs(np.log2(np.maximum(freqs, 1e-9) / centre)) <= 1 / 6


def _style(samples: np.ndarray, rate: int) -> str | None:
    """steady or pulsed from the variation of the 10 ms frame RMS (the first and last 20 ms, fades, left out)."""
    frame = max(1, rate // 100)
    edge = 2 * frame
    body = samples[edge : len(samples) - edge] if len(samples) > 4 * edge + frame else samples
    count = len(body) // frame
    if count < 4:
        return None
    rms = np.sqrt(np.mean(body[: count * frame].reshape(count, frame) ** 2, axis=1))
    modulation = rms.std() / max(rms.mean(), 1e-12)
    return "pulsed" if modulation > _PULSE_MODULATION else "steady"


# ------------------------------------------------------------------------------------------------------------
# Video
# ------------------------------------------------------------------------------------------------------------


def _as_frames(video: Any) -> np.ndarray:
    """float32 (T, H, W, 3) in 0-255, each frame prepared as :func:`image_attributes` prepares images."""
    frames = video.frames if isinstance(video, Video) else video
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise ValueError(f"expected video frames (T, H, W, 3), found shape {frames.shape}")
    frames = _as_uint8(frames)  # one scale for the whole clip
    return np.stack([_as_rgb(frame) for frame in frames])


def video_attributes(video: Any) -> dict[str, str | None]:
    """The colour and direction of a video's moving square.

    Args:
        video: an ``anygpt.base.media.Video`` or frames (T, H, W, 3), uint8 or float in [0, 1].

    Returns:
        ``{"colour": ... | None, "direction": "left" | "right" | "up" | "down" | None}``: both None when the
        background is not near-white or no frame has a dominant blob; direction None when fewer than two frames
        have one or the blob does not travel 12% of the frame along its main axis.
    """
    frames = _as_frames(video)
    background = _background(frames)
    if background is None:
        return {"colour": None, "direction": None}
    centres, pixels = [], []
    for t, frame in enumerate(frames):
        blob = _blob(frame, background)
        if blob is None:
            continue
        rows, cols = np.nonzero(blob)
        centres.append((t, cols.mean(), rows.mean()))
        pixels.append(frame[blob])
    if not centres:
        return {"colour": None, "direction": None}
    colour = _palette_colour(_core(np.concatenate(pixels), background))
    direction = None
    if len(centres) >= 2:
        track = np.array(centres, dtype=np.float64)  # (N, 3): frame, x, y
        t = track[:, 0] - track[:, 0].mean()
        span = track[-1, 0] - track[0, 0]
        dx, dy = (float(t @ (track[:, k] - track[:, k].mean()) / (t @ t) * span) for k in (1, 2))
        height, width = frames.shape[1:3]
        if abs(dx) >= abs(dy):
            if abs(dx) >= _MIN_TRAVEL * width:
                direction = "right" if dx > 0 else "left"
        elif abs(dy) >= _MIN_TRAVEL * height:
            direction = "down" if dy > 0 else "up"
    return {"colour": colour, "direction": direction}


# ------------------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------------------

CAPTION_WORDS: dict[str, dict[str, str]] = {
    "colour": {name: name for name in COLOURS},
    "shape": {name: name for name in SHAPES},
    "pitch": {"low": "low", "mid": "mid", "middle": "mid", "high": "high"},
    "direction": {name: name for name in DIRECTIONS},
}
"""Per attribute kind, the caption words that name a value (``"middle"`` names the pitch ``"mid"``)."""

_PULSE_WORDS = frozenset({"beep", "beeps", "pulsed", "pulsing"})
_WORD = re.compile(r"[a-z]+")


def caption_attributes(text: str) -> dict[str, str | None]:
    """The world words a caption names, whole words and case-insensitive.

    Each kind (colour, shape, pitch, style, direction) is the one value its words name, or None when they name none
    or more than one (a reply listing every colour scores nothing). Style: ``beep(s)`` / ``pulsed`` / ``pulsing``
    name pulsed; ``steady`` / ``tone`` without those words name steady (``steady`` with them is None).

    Args:
        text: a caption or reply.

    Returns:
        ``{"colour", "shape", "pitch", "style", "direction"}`` -> a world word or None.
    """
    words = set(_WORD.findall(text.lower()))
    found: dict[str, str | None] = {}
    for kind, names in CAPTION_WORDS.items():
        values = {value for word, value in names.items() if word in words}
        found[kind] = values.pop() if len(values) == 1 else None
    pulsed = bool(words & _PULSE_WORDS)
    if pulsed:
        found["style"] = None if "steady" in words else "pulsed"
    else:
        found["style"] = "steady" if words & {"steady", "tone"} else None
    return {kind: found[kind] for kind in ("colour", "shape", "pitch", "style", "direction")}


def reply_modalities(output: Any) -> set[Modality]:
    """The media a reply produced.

    Args:
        output: an ``anygpt.core.pipeline.AnyGPTOutput`` (or anything with ``images``, ``videos`` and ``audios`` lists).

    Returns:
        The set of media modalities with at least one item.
    """
    return {modality for modality in MEDIA_MODALITIES if getattr(output, modality.plural, None)}
