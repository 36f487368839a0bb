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

from dataclasses import dataclass, field, replace
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
    "vary",
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
    size: int = IMAGE_SIZE  # the image's side in pixels
    fill: tuple[int, int, int] | None = None  # a shade of the colour (None: the world's own RGB)
    modality: Modality = field(default=Modality.IMAGE, init=False)

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"

    @property
    def label(self) -> str:
        return self.caption

    def render(self) -> np.ndarray:
        """uint8 (size, size, 3): 64 x 64 unless the item was :func:`vary`-ed."""
        colour = self.fill or COLOURS[self.colour]
        return render_shape(self.shape, colour, size=self.size, radius=self.radius, centre=self.centre)

    def attributes(self) -> dict[str, Any]:
        return {"colour": self.colour, "shape": self.shape}


@dataclass(frozen=True)
class AudioItem:
    pitch: str
    style: str
    seconds: float = 1.0
    amplitude: float = 0.5
    modality: Modality = field(default=Modality.AUDIO, init=False)

    @property
    def caption(self) -> str:
        return f"a {self.pitch} beep" if self.style == "pulsed" else f"a steady {self.pitch} tone"

    @property
    def label(self) -> str:
        return self.caption

    def render(self) -> Audio:
        """16 kHz mono, 1 s unless the item was :func:`vary`-ed."""
        wave = render_tone(
            PITCHES[self.pitch],
            pulsed=self.style == "pulsed",
            sample_rate=SAMPLE_RATE,
            seconds=self.seconds,
            amplitude=self.amplitude,
        )
        return Audio(wave, SAMPLE_RATE)

    def attributes(self) -> dict[str, Any]:
        return {"pitch": self.pitch, "style": self.style}


@dataclass(frozen=True)
class VideoItem:
    colour: str
    direction: str
    side: int = 16
    offset: int = 0
    size: int = IMAGE_SIZE  # frame side in pixels
    frames: int = VIDEO_FRAMES
    fps: float = 8.0
    start: float = 0.0  # where the path begins and ends (fractions of the way across; see render_motion)
    end: float = 1.0
    fill: tuple[int, int, int] | None = None
    modality: Modality = field(default=Modality.VIDEO, init=False)

    @property
    def caption(self) -> str:
        return f"a {self.colour} square moving {self.direction}"

    @property
    def label(self) -> str:
        return self.caption

    def render(self) -> Video:
        """8 frames of 64 x 64 at 8 fps, crossing the whole frame, unless the item was :func:`vary`-ed."""
        frames = render_motion(
            self.fill or COLOURS[self.colour],
            self.direction,
            frames=self.frames,
            size=self.size,
            side=self.side,
            offset=self.offset,
            start=self.start,
            end=self.end,
        )
        return Video(frames, self.fps)

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
# Renderings: the same item drawn another way (what a person would still call "a red circle")
# ------------------------------------------------------------------------------------------------------------

# Rendering settings of the training set and of the held-out set: disjoint values, so the evaluator measures media
# -> text on renderings training never used (another frame size, frame count, frame rate and clip length).
RENDERINGS: dict[str, dict[str, tuple]] = {
    "train": {
        "size": (48, 64, 80, 96),
        "frames": (6, 8, 10, 12, 16),
        "fps": (4.0, 8.0, 12.0, 16.0),
        "seconds": (0.75, 1.0, 1.5),
    },
    "heldout": {
        "size": (56, 72, 112),
        "frames": (7, 9, 14),
        "fps": (6.0, 10.0),
        "seconds": (1.25, 2.0),
    },
}
SHADE = 35  # each RGB channel of a varied rendering's colour moves by up to this much


def _shade(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    base = np.asarray(COLOURS[colour], dtype=np.int64)
    return tuple(int(v) for v in np.clip(base + rng.integers(-SHADE, SHADE + 1, size=3), 0, 255))


def vary(item: Item, rng: np.random.Generator, split: str = "train") -> Item:
    """``item`` (same caption) rendered another way: another frame size and colour shade; for a clip, another frame
    count, frame rate, square size, path (where it starts and ends: speed and path length) and position; for a tone,
    another length and loudness.

    Args:
        item: a world item.
        rng: the generator the rendering settings are drawn from.
        split: ``"train"`` or ``"heldout"``: which of :data:`RENDERINGS`' disjoint value sets to draw from.
    """
    if split not in RENDERINGS:
        raise ValueError(f"split must be one of {', '.join(RENDERINGS)}, got {split!r}")
    values = RENDERINGS[split]
    if isinstance(item, ImageItem):
        size = int(_pick(rng, values["size"]))
        radius = float(rng.uniform(0.16, 0.36) * size)
        margin = radius + 2
        centre = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
        return replace(item, size=size, radius=radius, centre=centre, fill=_shade(rng, item.colour))
    if isinstance(item, VideoItem):
        size = int(_pick(rng, values["size"]))
        side = max(6, int(round(rng.uniform(0.17, 0.32) * size)))
        length = float(rng.uniform(0.45, 1.0))  # the share of the way across the clip covers
        start = float(rng.uniform(0.0, 1.0 - length))
        travel = size - side
        offset = int(rng.integers(-(travel // 2), travel // 2 + 1))
        return replace(
            item,
            size=size,
            side=side,
            offset=offset,
            frames=int(_pick(rng, values["frames"])),
            fps=float(_pick(rng, values["fps"])),
            start=start,
            end=min(1.0, start + length),
            fill=_shade(rng, item.colour),
        )
    if isinstance(item, AudioItem):
        return replace(item, seconds=float(_pick(rng, values["seconds"])), amplitude=float(rng.uniform(0.2, 0.8)))
    raise TypeError(f"not a world item: {item!r}")


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


# ------------------------------------------------------------------------------------------------------------
# How people ask: letter case, punctuation, polite and terse phrasings
# ------------------------------------------------------------------------------------------------------------

POLITE = ("please ", "could you ", "can you ", "would you ", "i'd like you to ", "i want you to ", "hey, ",
          "go ahead and ", "now ", "ok, ")  # fmt: skip
TRAILING = (" please", " for me", ", thanks", " thank you", " now", "")
ENDINGS = ("", "", ".", "!", "?", "!!", " :)")
TERSE = {
    Modality.IMAGE: ("{} pic", "{} image", "image: {}", "picture of {}", "{}, drawn", "pic of {}"),
    Modality.AUDIO: ("{} sound", "sound: {}", "audio of {}", "{}, played", "a sound: {}"),
    Modality.VIDEO: ("{} video", "video: {}", "clip of {}", "{}, animated", "a clip: {}"),
}


def bare(caption: str) -> str:
    """A caption without its article: ``"a red circle"`` -> ``"red circle"``."""
    return caption[2:] if caption.startswith("a ") else caption


def casual(rng: np.random.Generator, prompt: str, polite: bool = True) -> str:
    """``prompt`` as people type it: a polite opening or ending (or neither; none when not ``polite``), any letter
    case, any end mark."""
    roll = rng.random() if polite else 1.0
    if roll < 0.35:
        prompt = _pick(rng, POLITE) + prompt
    elif roll < 0.6:
        prompt = prompt + _pick(rng, TRAILING)
    case = rng.random()
    if case < 0.35:
        prompt = prompt[:1].upper() + prompt[1:]
    elif case < 0.45:
        prompt = prompt.upper()
    elif case < 0.55:
        prompt = " ".join(w[:1].upper() + w[1:] for w in prompt.split(" "))
    return prompt + _pick(rng, ENDINGS)


def draw_casual_request(rng: np.random.Generator, count: int | None = None) -> Request:
    """A request as in :func:`draw_request`, each item asked tersely a quarter of the time, the whole then typed
    casually (:func:`casual`)."""
    request = draw_request(rng, count)
    parts = []
    for item in request.items:
        if rng.random() < 0.25:
            parts.append(_pick(rng, TERSE[item.modality]).format(bare(item.caption)))
        else:
            parts.append(_pick(rng, GENERATE[item.modality]).format(item.caption))
    prompt = parts[0]
    for part in parts[1:]:
        prompt += _pick(rng, JOIN) + part
    return Request(casual(rng, prompt), request.items)


# ------------------------------------------------------------------------------------------------------------
# Second turns: change an attribute of the last item ("now make it blue"), or ask for another medium
# ------------------------------------------------------------------------------------------------------------

CHANGE = {
    "colour": ("now make it {}", "make it {} instead", "same but {}", "now in {}", "can you make it {}?",
               "change the colour to {}"),
    "shape": ("now make it a {}", "now a {}", "make it a {} instead", "same but as a {}", "turn it into a {}"),
    "pitch": ("now make it {}", "make it {} instead", "same but {}", "now a {} one"),
    "style": ("now make it {}", "make it {} instead", "same but {}"),
    "direction": ("now make it move {}", "make it go {}", "same but moving {}", "now make it move {} instead"),
}  # fmt: skip
_STYLE_WORD = {"steady": "steady", "pulsed": "a beep"}


def draw_follow_up(rng: np.random.Generator, item: Item) -> Request:
    """A second turn about ``item`` (the last item of the first turn's reply): one attribute changed, asked as in
    :data:`CHANGE`; the answer is the changed item (every other attribute kept)."""
    if isinstance(item, ImageItem):
        attribute = _pick(rng, ("colour", "shape"))
    elif isinstance(item, AudioItem):
        attribute = _pick(rng, ("pitch", "pitch", "style"))
    else:
        attribute = _pick(rng, ("colour", "direction"))
    options = {"colour": COLOURS, "shape": SHAPES, "pitch": PITCHES, "style": STYLES, "direction": DIRECTIONS}
    value = _pick(rng, [v for v in options[attribute] if v != getattr(item, attribute)])
    word = _STYLE_WORD[value] if attribute == "style" else value
    template = _pick(rng, CHANGE[attribute])
    if attribute == "style" and value == "pulsed":
        template = template.replace("a {}", "{}")
    changed = replace(item, **{attribute: value})
    words = template.format(word)
    return Request(casual(rng, words, polite=False) if rng.random() < 0.5 else words, (changed,))


# ------------------------------------------------------------------------------------------------------------
# Media -> media: an item in, another medium (or the same, changed) out
# ------------------------------------------------------------------------------------------------------------

TO_VIDEO = ("make this move {}", "animate this moving {}", "make a video of this moving {}", "make it move {}")
TO_IMAGE = ("draw the square from this clip", "make a picture of this square", "draw this as a picture",
            "draw a picture of this")  # fmt: skip
RECOLOUR = ("draw this in {}", "make this {}", "draw this again in {}")
RESHAPE = ("draw this as a {}", "make this a {}")


@dataclass(frozen=True)
class MediaRequest:
    """A request that comes with a media item: the user's item, the words, and what a right reply shows."""

    source: Item
    prompt: str
    items: tuple[Item, ...]

    def reply(self) -> list[tuple[str, Item]]:
        return [(f"Here is {item.caption}.", item) for item in self.items]


def draw_media_request(rng: np.random.Generator, source: Item | None = None) -> MediaRequest:
    """An image in and a clip out ("make this move left": the clip's square takes the image's colour), a clip in
    and an image out ("draw the square from this clip": a square of its colour), an image in and the image changed
    out ("draw this in blue", "draw this as a triangle"), or a clip in and the clip changed out ("make it move up")."""
    if source is None:
        source = draw_item(rng, _pick(rng, (Modality.IMAGE, Modality.VIDEO)))
    if isinstance(source, ImageItem):
        kind = _pick(rng, ("video", "video", "recolour", "reshape"))
        if kind == "video":
            direction = _pick(rng, DIRECTIONS)
            out: Item = replace(draw_video(rng), colour=source.colour, direction=direction)
            words = _pick(rng, TO_VIDEO).format(direction)
        elif kind == "recolour":
            colour = _pick(rng, [c for c in COLOURS if c != source.colour])
            out, words = ImageItem(colour, source.shape), _pick(rng, RECOLOUR).format(colour)
        else:
            shape = _pick(rng, [s for s in SHAPES if s != source.shape])
            out, words = ImageItem(source.colour, shape), _pick(rng, RESHAPE).format(shape)
    elif isinstance(source, VideoItem):
        if rng.random() < 0.6:
            out, words = ImageItem(source.colour, "square"), _pick(rng, TO_IMAGE)
        else:
            direction = _pick(rng, [d for d in DIRECTIONS if d != source.direction])
            out, words = replace(source, direction=direction), _pick(rng, TO_VIDEO).format(direction)
    else:
        raise ValueError(f"media -> media requests start from an image or a clip, got {source.modality.value}")
    return MediaRequest(source, casual(rng, words, polite=False) if rng.random() < 0.4 else words, (out,))


# ------------------------------------------------------------------------------------------------------------
# Out of the world: what the model cannot make, answered honestly
# ------------------------------------------------------------------------------------------------------------

OUT_OF_WORLD_REPLY = (
    "Sorry, I can't make that. I can only draw circles, squares and triangles in red, green, blue or yellow, "
    "play low, mid or high tones, and show a square moving left, right, up or down."
)
# Things outside the world, for training and (disjoint) for the evaluator's held-out prompts.
OUT_OF_WORLD: dict[str, tuple[str, ...]] = {
    "train": ("a cat", "a dog", "a house", "a car", "a tree", "a cat on a sofa", "a bird", "a flower", "a boat",
              "a horse", "a person", "a mountain", "an apple", "a chair", "a fish", "a star", "a heart", "a piano",
              "a song", "a guitar", "a dragon", "a robot", "a city at night", "a purple circle", "an orange square",
              "a pink triangle", "a black square", "a hexagon", "a red star", "a blue heart", "a dog running",
              "people dancing", "a sunset over the sea", "a drum solo", "a violin", "rain", "a cow", "a green car",
              "a bus", "the moon", "a birthday song", "a face", "a spider", "a mouse", "an elephant"),
    "heldout": ("a rabbit", "a train", "a castle", "a bicycle", "a lion", "a cloud", "a spaceship", "a frog",
                "a brown circle", "a white triangle", "a pentagon", "an oval", "a yellow car", "a flute",
                "thunder", "a waterfall", "a snake", "a tiger", "a cake", "a teddy bear"),
}  # fmt: skip


def draw_out_of_world(rng: np.random.Generator, split: str = "train") -> str:
    """A request for something the world does not have ("draw a cat on a sofa"), phrased as a request for one
    medium and typed casually half the time; the right answer is :data:`OUT_OF_WORLD_REPLY` and no media."""
    if split not in OUT_OF_WORLD:
        raise ValueError(f"split must be one of {', '.join(OUT_OF_WORLD)}, got {split!r}")
    thing = _pick(rng, OUT_OF_WORLD[split])
    modality = _pick(rng, (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO))
    prompt = _pick(rng, GENERATE[modality]).format(thing)
    return casual(rng, prompt) if rng.random() < 0.5 else prompt
