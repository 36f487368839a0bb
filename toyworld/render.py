"""The toy world's renderers: a coloured shape on white, a sine tone, a square moving across the frame.

Pure functions of their arguments (no randomness), shared by the toy world (:mod:`toyworld.world`), its oracles and
the sample dataset (:mod:`toyworld.sample`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "AUDIO_SECONDS",
    "COLOURS",
    "DIRECTIONS",
    "IMAGE_SIZE",
    "SAMPLE_RATE",
    "SHAPES",
    "VIDEO_FRAMES",
    "render_motion",
    "render_shape",
    "render_tone",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
}
DIRECTIONS: dict[str, tuple[int, int]] = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}

IMAGE_SIZE = 64
SAMPLE_RATE = 16_000
AUDIO_SECONDS = 1.0
VIDEO_FRAMES = 8


def render_shape(
    shape: str,
    colour: tuple[int, int, int],
    *,
    size: int = IMAGE_SIZE,
    radius: float | None = None,
    centre: tuple[float, float] | None = None,
) -> np.ndarray:
    """Draw one filled shape on a white square.

    Args:
        shape: ``"circle"``, ``"square"`` or ``"triangle"``.
        colour: RGB fill.
        size: image side in pixels.
        radius: half the shape's extent (default ``size / 3``).
        centre: (x, y) of the shape (default the image centre).

    Returns:
        uint8 pixels, shape (size, size, 3).
    """
    radius = size / 3 if radius is None else radius
    cx, cy = (size / 2, size / 2) if centre is None else centre
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=tuple(colour))
    elif shape == "square":
        draw.rectangle(box, fill=tuple(colour))
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=tuple(colour))
    else:
        raise ValueError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")
    return np.asarray(image, dtype=np.uint8)


def render_tone(
    frequency: float,
    *,
    pulsed: bool = False,
    sample_rate: int = SAMPLE_RATE,
    seconds: float = AUDIO_SECONDS,
    amplitude: float = 0.5,
) -> np.ndarray:
    """A sine tone, steady or pulsed (four 125 ms beeps a second), with 5 ms fades so that it does not click.

    Returns:
        float32 waveform, shape (round(seconds * sample_rate),).
    """
    n = int(round(seconds * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    wave = amplitude * np.sin(2 * np.pi * frequency * t)
    fade = max(1, int(0.005 * sample_rate))
    ramp = np.minimum(1.0, np.minimum(np.arange(n) + 1, n - np.arange(n)) / fade)
    if pulsed:
        period = sample_rate // 4  # 250 ms: 125 ms on, 125 ms off
        phase = np.arange(n) % period
        on = phase < period // 2
        edge = np.minimum(1.0, np.minimum(phase + 1, period // 2 - phase) / fade)
        ramp = ramp * np.where(on, edge, 0.0)
    return (wave * ramp).astype(np.float32)


def render_motion(
    colour: tuple[int, int, int],
    direction: str,
    *,
    frames: int = VIDEO_FRAMES,
    size: int = IMAGE_SIZE,
    side: int = 16,
    offset: int = 0,
    start: float = 0.0,
    end: float = 1.0,
) -> np.ndarray:
    """A filled square moving across a white frame in one direction, at constant speed.

    Args:
        colour: RGB fill.
        direction: ``"right"``, ``"left"``, ``"up"`` or ``"down"``.
        frames: number of frames.
        size: frame side in pixels.
        side: the square's side in pixels.
        offset: shift of the square across its path (pixels from the middle).
        start, end: where the path begins and ends, as fractions of the way from one edge to the other
            (the defaults cross the whole frame; ``0.2, 0.7`` covers half of it, more slowly).

    Returns:
        uint8 frames, shape (frames, size, size, 3).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}: expected one of {', '.join(DIRECTIONS)}")
    dx, dy = DIRECTIONS[direction]
    video = np.full((frames, size, size, 3), 255, dtype=np.uint8)
    travel = size - side
    across = int(np.clip((size - side) // 2 + offset, 0, travel))
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"start and end must satisfy 0 <= start < end <= 1, got {start}, {end}")
    for i in range(frames):
        along = round((start + (end - start) * i / max(1, frames - 1)) * travel)
        x = along if dx > 0 else travel - along if dx < 0 else across
        y = along if dy > 0 else travel - along if dy < 0 else across
        video[i, y : y + side, x : x + side] = colour
    return video
