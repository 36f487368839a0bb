"""The toy world: coloured shapes, tones and moving squares, their captions, and conversations about them.

Everything is a pure function of a seed: :func:`draw_image`, :func:`draw_audio` and :func:`draw_video` draw one
item from a ``numpy`` generator, ``item.render()`` renders its pixels or waveform, and ``item.caption`` names its
attributes with the world's words.

=======  =====================================================  ======================================
medium   attributes                                             caption
=======  =====================================================  ======================================
image    colour (red, green, blue, yellow), shape (circle,      "a red circle"
         square, triangle), size, position; 64 x 64, white
audio    pitch (low 262 Hz, mid 523 Hz, high 1047 Hz), style    "a high beep" (pulsed),
         (steady, pulsed); 16 kHz mono, 1 s                     "a steady low tone" (steady)
video    colour, direction (left, right, up, down), size,       "a blue square moving right"
         offset; 8 frames of 64 x 64 at 8 fps
=======  =====================================================  ======================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from anygpt.base.media import Audio, Video
from anygpt.base.modality import Modality
from toyworld.render import (
    COLOURS,
    DIRECTIONS,
    IMAGE_SIZE,
    SAMPLE_RATE,
    SHAPES,
    VIDEO_FRAMES,
    render_motion,
    render_shape,
    render_tone,
)

__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "PITCHES",
    "SHAPES",
    "STYLES",
    "AudioItem",
    "ImageItem",
    "VideoItem",
    "Request",
    "draw_audio",
    "draw_image",
    "draw_item",
    "draw_request",
    "draw_video",
]

PITCHES: dict[str, float] = {"low": 262.0, "mid": 523.0, "high": 1047.0}
STYLES: tuple[str, ...] = ("steady", "pulsed")

VIDEO_FPS = 8.0


@dataclass(frozen=True)
class ImageItem:
    colour: str
    shape: str
    radius: float = 18.0
    centre: tuple[float, float] = (32.0, 32.0)
    modality: Modality = field(default=Modality.IMAGE, init=False)

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"

    @property
    def label(self) -> str:
        return self.caption

    def render(self) -> np.ndarray:
        """uint8 (64, 64, 3)."""
        return render_shape(self.shape, COLOURS[self.colour], size=IMAGE_SIZE, radius=self.radius, centre=self.centre)

    def attributes(self) -> dict[str, Any]:
        return {"colour": self.colour, "shape": self.shape}


@dataclass(frozen=True)
class AudioItem:
    pitch: str
    style: str
    modality: Modality = field(default=Modality.AUDIO, init=False)

    @property
    def caption(self) -> str:
        return f"a {self.pitch} beep" if self.style == "pulsed" else f"a steady {self.pitch} tone"

    @property
    def label(self) -> str:
        return self.caption

    def render(self) -> Audio:
        """1 s of 16 kHz mono."""
        wave = render_tone(PITCHES[self.pitch], pulsed=self.style == "pulsed", sample_rate=SAMPLE_RATE)
        return Audio(wave, SAMPLE_RATE)

    def attributes(self) -> dict[str, Any]:
        return {"pitch": self.pitch, "style": self.style}


@dataclass(frozen=True)
class VideoItem:
    colour: str
    direction: str
    side: int = 16
    offset: int = 0
    modality: Modality = field(default=Modality.VIDEO, init=False)

    @property
    def caption(self) -> str:
        return f"a {self.colour} square moving {self.direction}"

    @property
    def label(self) -> str:
        return self.caption

    def render(self) -> Video:
        """8 frames of 64 x 64 at 8 fps."""
        frames = render_motion(
            COLOURS[self.colour],
            self.direction,
            frames=VIDEO_FRAMES,
            size=IMAGE_SIZE,
            side=self.side,
            offset=self.offset,
        )
        return Video(frames, VIDEO_FPS)

    def attributes(self) -> dict[str, Any]:
        return {"colour": self.colour, "direction": self.direction}


Item = ImageItem | AudioItem | VideoItem


def _pick(rng: np.random.Generator, options) -> Any:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def draw_image(rng: np.random.Generator) -> ImageItem:
    radius = float(rng.integers(11, 23))
    margin = radius + 2
    centre = (float(rng.uniform(margin, IMAGE_SIZE - margin)), float(rng.uniform(margin, IMAGE_SIZE - margin)))
    return ImageItem(_pick(rng, COLOURS), _pick(rng, SHAPES), radius, centre)


def draw_audio(rng: np.random.Generator) -> AudioItem:
    return AudioItem(_pick(rng, PITCHES), _pick(rng, STYLES))


def draw_video(rng: np.random.Generator) -> VideoItem:
    return VideoItem(_pick(rng, COLOURS), _pick(rng, DIRECTIONS), int(rng.integers(12, 21)), int(rng.integers(-14, 15)))


def media_input(item: Item) -> Any:
    """``item`` rendered as the pipeline and the encoder take it: a ``PIL.Image``, an ``Audio`` or a ``Video``."""
    rendered = item.render()
    if item.modality is Modality.IMAGE:
        return Image.fromarray(rendered)
    return rendered


def draw_item(rng: np.random.Generator, modality: Modality | str) -> Item:
    modality = Modality.parse(modality)
    return {Modality.IMAGE: draw_image, Modality.AUDIO: draw_audio, Modality.VIDEO: draw_video}[modality](rng)


# ------------------------------------------------------------------------------------------------------------
# Language
# ------------------------------------------------------------------------------------------------------------

GENERATE = {
    Modality.IMAGE: (
        "draw {}",
        "draw a picture of {}",
        "make an image of {}",
        "generate an image of {}",
        "show me a picture of {}",
        "show me {}",
        "create a photo of {}",
        "make a picture of {}",
        "generate a photo of {}",
        "create an image of {}",
        "make {}",
        "create {}",
        "show {}",
    ),
    Modality.AUDIO: (
        "play {}",
        "make a sound of {}",
        "generate a sound of {}",
        "let me hear {}",
        "create a tone like {}",
        "make {}",
        "generate {}",
        "play me a sound of {}",
        "create a beep like {}",
        "show me a sound of {}",
        "play me {}",
        "create {}",
    ),
    Modality.VIDEO: (
        "show me a video of {}",
        "make a video of {}",
        "generate a clip of {}",
        "create a video of {}",
        "make a clip of {}",
        "show me {}",
        "generate a video of {}",
        "draw a clip of {}",
        "create a clip of {}",
        "show me a clip of {}",
        "show {}",
        "make {}",
        "create {}",
        "generate {}",
    ),
}
JOIN = (" and ", " and then ", ", and ", " and also ")
ASK_CAPTION = {
    Modality.IMAGE: ("what is in this image?", "describe this picture.", "what do you see?", "what shape is this?"),
    Modality.AUDIO: ("what is this sound?", "describe this sound.", "what do you hear?", "what tone is this?"),
    Modality.VIDEO: ("what is in this video?", "describe this clip.", "what happens in this video?", "what moves?"),
}
NOUN = {Modality.IMAGE: "picture", Modality.AUDIO: "sound", Modality.VIDEO: "video"}


@dataclass(frozen=True)
class Request:
    """A generation request: what the user asks for, and what a right reply contains."""

    prompt: str
    items: tuple[Item, ...]

    @property
    def modalities(self) -> set[Modality]:
        return {item.modality for item in self.items}

    def reply(self) -> list[tuple[str, Item]]:
        """(text before the item's media, item) per requested item: ``Here is a red circle.`` then its media."""
        return [(f"Here is {item.caption}.", item) for item in self.items]


def draw_request(rng: np.random.Generator, count: int | None = None) -> Request:
    """A request for 1-3 items of distinct modalities, in a random order, each with a random phrasing."""
    if count is None:
        count = int(rng.choice([1, 1, 1, 2, 2, 3]))
    kinds = (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO)
    modalities = [kinds[i] for i in rng.permutation(len(kinds))][:count]
    items = tuple(draw_item(rng, m) for m in modalities)
    parts = [_pick(rng, GENERATE[item.modality]).format(item.caption) for item in items]
    prompt = parts[0]
    for part in parts[1:]:
        prompt += _pick(rng, JOIN) + part
    return Request(prompt, items)
