"""``GenerationRequest``: everything one generation call asks for, validated once.

The pipeline's keyword call (``pipe(prompt, images=..., seed=...)``), the command line, the batch reader and the chat
engine all build one of these and hand it to ``AnyGPTPipeline.run``; ``to_dict`` / ``from_dict`` are its JSON form
(one line of a batch file, the body of a server request).

Example:
    >>> request = GenerationRequest("draw a red circle", modalities=["image"], seed=0, num_inference_steps=25)
    >>> GenerationRequest.from_dict(request.to_dict()) == request
    True
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from PIL import Image

from anygpt.base.errors import MediaError, UsageError
from anygpt.base.media import Audio, Video
from anygpt.base.modality import MEDIA_MODALITIES, Modality

MediaInput = str | os.PathLike | Image.Image | Audio | Video

DECODER_SETTINGS: tuple[str, ...] = (
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "num_frames",
    "audio_seconds",
)
"""The decoder settings shared by every decoder of a call; ``decoder_overrides`` may set any of them per modality."""

ALIASES = {"steps": "num_inference_steps", "guidance": "guidance_scale", "frames": "num_frames"}
"""Short names ``from_dict`` also accepts (the command line's ``--steps`` etc.; batch files written for them)."""

_MEDIA_TYPES = {Modality.IMAGE: Image.Image, Modality.VIDEO: Video, Modality.AUDIO: Audio}
_ID = re.compile(r"[A-Za-z0-9._-]+")
MAX_SEED = 2**63 - 1


@dataclass
class GenerationRequest:
    """One generation call: the prompt, its media, what to produce and how.

    Building one validates every field (``validate``); a bad value raises ``UsageError`` (a ``ValueError``) naming
    the field, prefixed with ``origin`` (``"prompts.jsonl:3: "`` for a batch line), or ``MediaError`` for a media
    item that is neither a path nor the modality's object.

    Attributes:
        prompt: the user's text; any characters.
        images, audios, videos: file paths or ``PIL.Image`` / ``Audio`` / ``Video`` objects (one item or None is
            accepted and stored as a list).
        modalities: ``"auto"`` (the LLM decides by emitting signal tokens), or the output modalities to force, as a
            list or a comma-separated string (stored as a list of names; ``[]``: text only).
        adapters: LoRA adapter(s) to run the LLM with: a name, a list or comma-separated string of names (their
            mean), ``{name: weight}``, or None (the pipeline's default, ``AnyGPTPipeline.select_adapters``).
        seed: makes LLM sampling and every decoder deterministic; None: not reproducible.
        max_new_tokens, temperature (0 = greedy), top_p: LLM decoding.
        num_inference_steps, guidance_scale, height, width, num_frames, audio_seconds: decoder settings shared by
            every decoder (None: each decoder's default).
        decoder_overrides: per output modality, decoder settings that replace the shared ones for that decoder,
            e.g. ``{"image": {"num_inference_steps": 30}}`` (stored keyed by the modality's name, None values
            dropped).
        id: a name for the outputs (the file-name stem of the command line's files).
        origin: where the request came from, put before every error message (not part of the request).
    """

    prompt: str = ""
    images: list[MediaInput] = field(default_factory=list)
    audios: list[MediaInput] = field(default_factory=list)
    videos: list[MediaInput] = field(default_factory=list)
    modalities: str | list[str] = "auto"
    adapters: str | list[str] | dict[str, float] | None = None
    seed: int | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    audio_seconds: float | None = None
    decoder_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    id: str | None = None
    origin: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check (and normalise) every field; the one validation of a generation call's arguments.

        Raises:
            UsageError: a field of the wrong type or out of range, naming it, what was expected and what was found.
            MediaError: a media item that is neither a file path nor the modality's object.
        """
        if not isinstance(self.prompt, str):
            self._fail("prompt", self.prompt, "a string")
        for modality in MEDIA_MODALITIES:
            setattr(self, modality.plural, self._media_list(modality))
        self.modalities = self._modalities()
        self._check_adapters()
        self._check_int("seed", self.seed, minimum=0, maximum=MAX_SEED, optional=True)
        self._check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        self._check_number("temperature", self.temperature, ">= 0 (0 = greedy)", lambda v: v >= 0)
        self._check_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        self._check_decoder_settings({name: getattr(self, name) for name in DECODER_SETTINGS})
        self.decoder_overrides = self._overrides()
        if self.id is not None and not (isinstance(self.id, str) and _ID.fullmatch(self.id)):
            self._fail("id", self.id, "a name of letters, digits, '.', '_' and '-'")
        if self.id in (".", ".."):
            self._fail("id", self.id, "a file-name stem")
        if not isinstance(self.origin, str):
            raise TypeError(f"origin must be a string, got {type(self.origin).__name__}")

    def _fail(self, name: str, value: Any, expected: str) -> None:
        raise UsageError(f"{self.origin}{name} must be {expected}, got {value!r}")

    def _check_int(self, name: str, value: Any, *, minimum: int, maximum: int | None = None, optional=False) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
            expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            self._fail(name, value, expected + (f" and <= {maximum}" if maximum else ""))

    def _check_number(self, name: str, value: Any, expected: str, ok, optional: bool = False) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
            self._fail(name, value, f"a finite number {expected}")

    def _check_decoder_settings(self, settings: Mapping[str, Any], where: str = "") -> None:
        for name in ("num_inference_steps", "num_frames", "height", "width"):
            self._check_int(where + name, settings.get(name), minimum=1, optional=True)
        for name in ("height", "width"):
            if settings.get(name) is not None and settings[name] % 8:
                self._fail(where + name, settings[name], "a multiple of 8 (the VAE's downsampling)")
        self._check_number(where + "guidance_scale", settings.get("guidance_scale"), ">= 0", _nonnegative, True)
        self._check_number(where + "audio_seconds", settings.get("audio_seconds"), "> 0", _positive, True)

    def _media_list(self, modality: Modality) -> list[MediaInput]:
        name = modality.plural
        items = getattr(self, name)
        if items is None:
            items = []
        elif isinstance(items, tuple):
            items = list(items)
        elif not isinstance(items, list):
            items = [items]
        for index, item in enumerate(items):
            check_media_item(modality, item, f"{self.origin}{name}[{index}]")
        return items

    def _modalities(self) -> str | list[str]:
        value = self.modalities
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return "auto"
        names = [m for m in value.split(",") if m.strip()] if isinstance(value, str) else value
        if not isinstance(names, list | tuple):
            self._fail("modalities", value, "'auto', a comma-separated string or a list of output modalities")
        result = []
        for name in names:
            try:
                modality = Modality.parse(name) if isinstance(name, str) else None
            except ValueError:
                modality = None
            if modality not in MEDIA_MODALITIES:
                valid = ", ".join(m.value for m in MEDIA_MODALITIES)
                raise UsageError(
                    f"{self.origin}modalities: unknown output modality {name!r}; expected 'auto' or a list of {valid}"
                )
            if modality.value not in result:
                result.append(modality.value)
        return result

    def _check_adapters(self) -> None:
        adapters = self.adapters
        if adapters is None or isinstance(adapters, str):
            return
        if isinstance(adapters, Mapping):
            names_ok = all(isinstance(k, str) for k in adapters)
            weights_ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in adapters.values())
            if names_ok and weights_ok:
                return
        elif isinstance(adapters, list | tuple) and all(isinstance(a, str) for a in adapters):
            self.adapters = list(adapters)
            return
        self._fail("adapters", adapters, "a name, a comma-separated string or list of names, or {name: weight}")

    def _overrides(self) -> dict[str, dict[str, Any]]:
        overrides = self.decoder_overrides
        if overrides is None:
            return {}
        if not isinstance(overrides, Mapping):
            self._fail("decoder_overrides", overrides, "a mapping {modality: {setting: value}}")
        result: dict[str, dict[str, Any]] = {}
        valid = ", ".join(m.value for m in MEDIA_MODALITIES)
        for key, values in overrides.items():
            try:
                modality = Modality.parse(key) if isinstance(key, str) else None
            except ValueError:
                modality = None
            if modality not in MEDIA_MODALITIES:
                raise UsageError(
                    f"{self.origin}decoder_overrides: unknown output modality {key!r}; expected one of {valid}"
                )
            where = f"decoder_overrides[{modality.value!r}]"
            if not isinstance(values, Mapping):
                self._fail(where, values, "a mapping {setting: value}")
            unknown = sorted(set(values) - set(DECODER_SETTINGS))
            if unknown:
                valid = ", ".join(DECODER_SETTINGS)
                raise UsageError(f"{self.origin}{where}: unknown setting {unknown[0]!r}; expected any of {valid}")
            self._check_decoder_settings(values, where=f"{where}.")
            result[modality.value] = {name: value for name, value in values.items() if value is not None}
        return result

    # ------------------------------------------------------------------ what the pipeline reads
    def media(self, modality: Modality) -> list[MediaInput]:
        """The input items of one modality."""
        return getattr(self, Modality.parse(modality).plural)

    @property
    def forced_modalities(self) -> set[Modality] | None:
        """The output modalities to force, or None for ``"auto"``."""
        return None if self.modalities == "auto" else {Modality(m) for m in self.modalities}

    def decoder_settings(self, modality: Modality) -> dict[str, Any]:
        """The settings of one output modality's decoder: the shared ones, replaced by its ``decoder_overrides``."""
        shared = {name: getattr(self, name) for name in DECODER_SETTINGS}
        return {**shared, **self.decoder_overrides.get(Modality.parse(modality).value, {})}

    # ------------------------------------------------------------------ the JSON form
    def to_dict(self) -> dict[str, Any]:
        """The request as JSON-ready data: one line of a batch file, a server request's body (``origin`` left out).

        Raises:
            ValueError: a media item is an object (an image, audio or video in memory), not a file path.
        """
        data: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "origin":
                continue
            value = getattr(self, f.name)
            if f.name in {m.plural for m in MEDIA_MODALITIES}:
                objects = [type(v).__name__ for v in value if not isinstance(v, str | os.PathLike)]
                if objects:
                    raise ValueError(f"{f.name}: {objects[0]} objects have no JSON form; give file paths")
                value = [os.fspath(v) for v in value]
            elif isinstance(value, dict | list):
                value = _copy(value)
            data[f.name] = value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "") -> GenerationRequest:
        """A request from its JSON form (``to_dict``, a batch line). ``steps``, ``guidance`` and ``frames`` are
        accepted for ``num_inference_steps``, ``guidance_scale`` and ``num_frames``; a media field may hold one path.

        Raises:
            UsageError: not an object, no string ``prompt``, unknown fields (listing the allowed ones), a field given
                under both names, or any invalid field (see ``validate``).
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("prompt"), str):
            raise UsageError(f"{origin}expected an object with a string 'prompt'")
        allowed = [f.name for f in fields(cls) if f.name != "origin"]
        unknown = sorted(set(data) - set(allowed) - set(ALIASES))
        if unknown:
            raise UsageError(f"{origin}unknown fields {unknown}; allowed: {sorted(allowed)}")
        values = dict(data)
        for alias, name in ALIASES.items():
            if alias in values:
                if name in values:
                    raise UsageError(f"{origin}'{alias}' and '{name}' name the same field: give one")
                values[name] = values.pop(alias)
        return cls(**values, origin=origin)


def check_media_item(modality: Modality, item: Any, where: str) -> None:
    """Raise ``MediaError`` (``where`` first) unless ``item`` is a file path or the modality's media object."""
    expected = _MEDIA_TYPES[modality].__name__
    if not isinstance(item, str | os.PathLike | _MEDIA_TYPES[modality]):
        article = "an" if expected[0] in "AEIOU" else "a"
        raise MediaError(f"{where}: expected a file path or {article} {expected} object, got {type(item).__name__}")


def _nonnegative(value: float) -> bool:
    return value >= 0


def _positive(value: float) -> bool:
    return value > 0


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k.value if isinstance(k, Modality) else k): _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
