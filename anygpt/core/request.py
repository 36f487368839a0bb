"""``GenerationRequest``: everything one generation call asks for, validated once.

The pipeline's keyword call (``pipe(prompt, images=..., seed=...)``), the command line, the batch reader and the chat
engine all build one of these and hand it to ``AnyGPTPipeline.run``; ``to_dict`` / ``from_dict`` are its JSON form
(one line of a batch file, the body of a server request).

Every number has a range, checked here before any model loads (a ``bool`` is never an integer; NaN and infinity
are never numbers; a value out of range is a ``UsageError`` naming the field, the range and the value):

=====================  ========================================  ==============================================
field                  range                                     why the bound
=====================  ========================================  ==============================================
seed                   integer 0 .. 2**63-1, or None             torch generators take a signed 64-bit seed
max_new_tokens         integer 1 .. 8192 (and within the LLM's   one reply; ``check_inputs`` also refuses more
                       context, ``check_inputs``)                than the LLM's ``max_position_embeddings``
temperature            0 (greedy) or 1e-3 .. 100                 below 1e-3 the logits overflow to inf / NaN
top_p                  (0, 1]                                    a probability mass
num_inference_steps    integer 1 .. 1000, or None                diffusers schedulers train on 1000 timesteps
guidance_scale         0 .. 100, or None                         classifier-free guidance weights in use: 1..20
height, width          multiples of 8 in 8 .. 4096, or None      the VAE downsamples by 8; 4096 bounds memory
num_frames             integer 1 .. 256, or None                 video decoders make 16..64 frames
audio_seconds          (0, 60], or None                          audio decoders make clips of seconds
image_resolution       ``"fixed"``, ``"anyres"``, or None        the two ways images are read (None: the
                                                                 model's ``image_input.resolution``)
adapters weights       0 .. 100 each (``{name: weight}``)        mixing weights of LoRA adapters (their mean:
                                                                 1/n each); a huge one makes the logits inf
=====================  ========================================  ==============================================

``decoder_overrides`` take the same ranges per decoder. ``prompt`` is a string that encodes as UTF-8 (a lone
surrogate, as a shell gives for bytes that are not UTF-8, is refused naming ``prompt``).

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
from anygpt.base.media import Audio, Video, validate_media
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
"""The largest ``seed`` (a signed 64-bit integer, what ``torch.Generator.manual_seed`` takes)."""
MAX_NEW_TOKENS = 8192
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MAX_INFERENCE_STEPS = 1000
MAX_GUIDANCE_SCALE = 100.0
MAX_SIDE = 4096
MAX_FRAMES = 256
MAX_AUDIO_SECONDS = 60.0
MAX_ADAPTER_WEIGHT = 100.0
IMAGE_RESOLUTIONS = ("fixed", "anyres")
"""``image_resolution``'s values (``anygpt.core.config.ImageInputConfig.resolution``)."""


@dataclass
class GenerationRequest:
    """One generation call: the prompt, its media, what to produce and how.

    Building one validates every field (``validate``); a bad value raises ``UsageError`` (a ``ValueError``) naming
    the field, prefixed with ``origin`` (``"prompts.jsonl:3: "`` for a batch line), or ``MediaError`` for a media
    item that is neither a path nor the modality's object.

    Attributes:
        prompt: the user's text; any characters that encode as UTF-8.
        images, audios, videos: file paths or ``PIL.Image`` / ``Audio`` / ``Video`` objects (one item or None is
            accepted and stored as a list).
        modalities: ``"auto"`` (the LLM decides by emitting signal tokens), or the output modalities to force, as a
            list or a comma-separated string (stored as a list of names; ``[]`` or ``["text"]``: text only; "text"
            beside media names is implied and dropped, as in OpenAI's ``modalities=["text", "audio"]``).
        adapters: LoRA adapter(s) to run the LLM with: a name, a list or comma-separated string of names (their
            mean), ``{name: weight}`` (weights in 0 .. 100), or None (the pipeline's default,
            ``AnyGPTPipeline.select_adapters``).
        seed: makes LLM sampling and every decoder deterministic (0 .. 2**63-1); None: not reproducible.
        max_new_tokens: the reply's length limit in tokens (1 .. 8192, and within the LLM's context).
        temperature: LLM sampling temperature: 0 (greedy) or 1e-3 .. 100.
        top_p: nucleus sampling mass, in (0, 1].
        num_inference_steps: denoising steps (1 .. 1000).
        guidance_scale: classifier-free guidance weight (0 .. 100).
        height, width: pixels of images and video frames (multiples of 8 in 8 .. 4096).
        num_frames: frames of a video (1 .. 256).
        audio_seconds: length of an audio clip (greater than 0, at most 60).
            The decoder settings (``num_inference_steps`` to ``audio_seconds``) are shared by every decoder; None:
            each decoder's default.
        decoder_overrides: per output modality, decoder settings that replace the shared ones for that decoder,
            e.g. ``{"image": {"num_inference_steps": 30}}`` (stored keyed by the modality's name, None values
            dropped).
        image_resolution: how this call's images are read: ``"fixed"`` (224 x 224), ``"anyres"`` (a global view
            plus tiles, ``encoders.anyres``), or None (the model's ``image_input.resolution``). AnyRes needs a model
            whose connector reads token sequences (the pipeline refuses it otherwise, naming this field).
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
    image_resolution: str | None = None
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
        self._check_prompt()
        for modality in MEDIA_MODALITIES:
            setattr(self, modality.plural, self._media_list(modality))
        self.modalities = self._modalities()
        self._check_adapters()
        self._check_int("seed", self.seed, minimum=0, maximum=MAX_SEED, optional=True)
        self._check_int("max_new_tokens", self.max_new_tokens, minimum=1, maximum=MAX_NEW_TOKENS)
        self._check_number(
            "temperature",
            self.temperature,
            [
                (_nonnegative, ">= 0 (0 = greedy)"),
                (
                    lambda v: v == 0 or v >= MIN_TEMPERATURE,
                    f">= {MIN_TEMPERATURE:g} or 0 (greedy; a smaller one overflows the logits)",
                ),
                (lambda v: v <= MAX_TEMPERATURE, f"<= {MAX_TEMPERATURE:g}"),
            ],
        )
        self._check_number("top_p", self.top_p, [(lambda v: 0 < v <= 1, "in (0, 1]")])
        self._check_decoder_settings({name: getattr(self, name) for name in DECODER_SETTINGS})
        self.decoder_overrides = self._overrides()
        if self.image_resolution is not None and not (
            isinstance(self.image_resolution, str) and self.image_resolution in IMAGE_RESOLUTIONS
        ):
            self._fail("image_resolution", self.image_resolution, "'fixed', 'anyres' or None (the model's own)")
        if self.id is not None and not (isinstance(self.id, str) and _ID.fullmatch(self.id)):
            self._fail("id", self.id, "a name of letters, digits, '.', '_' and '-'")
        if self.id in (".", ".."):
            self._fail("id", self.id, "a file-name stem")
        if not isinstance(self.origin, str):
            raise TypeError(f"origin must be a string, got {type(self.origin).__name__}")

    def _fail(self, name: str, value: Any, expected: str) -> None:
        raise UsageError(f"{self.origin}{name} must be {expected}, got {_short(value)}")

    def _check_prompt(self) -> None:
        if not isinstance(self.prompt, str):
            self._fail("prompt", self.prompt, "a string")
        try:
            self.prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise UsageError(
                f"{self.origin}prompt must be UTF-8 text, got a character that is not "
                f"({self.prompt[error.start]!r} at position {error.start}: bytes that are not UTF-8, "
                "as a shell passes them; re-encode the text as UTF-8)"
            ) from None

    def _check_int(self, name: str, value: Any, *, minimum: int, maximum: int, optional: bool = False) -> None:
        """An integer in [minimum, maximum]; the message says the bound that failed."""
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self._fail(name, value, "a positive integer" if minimum == 1 else f"an integer >= {minimum}")
        if value > maximum:
            self._fail(name, value, f"an integer <= {'2**63-1' if maximum == MAX_SEED else maximum}")

    def _check_number(self, name: str, value: Any, rules: list[tuple[Any, str]], optional: bool = False) -> None:
        """A finite number passing every ``(ok, expected)`` rule; the message says the first rule that failed (a
        value of another type, NaN or infinity: the first rule's)."""
        if value is None and optional:
            return
        # an int is compared exactly (math.isfinite would overflow converting a huge one to float)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (isinstance(value, float) and not math.isfinite(value)):
            self._fail(name, value, f"a finite number {rules[0][1]}")
        for ok, expected in rules:
            if not ok(value):
                self._fail(name, value, f"a finite number {expected}")

    def _check_decoder_settings(self, settings: Mapping[str, Any], where: str = "") -> None:
        for name, maximum in (("num_inference_steps", MAX_INFERENCE_STEPS), ("num_frames", MAX_FRAMES)):
            self._check_int(where + name, settings.get(name), minimum=1, maximum=maximum, optional=True)
        for name in ("height", "width"):  # 1..7 fail as not multiples of 8: the range is 8..4096
            self._check_int(where + name, settings.get(name), minimum=1, maximum=MAX_SIDE, optional=True)
            if settings.get(name) is not None and settings[name] % 8:
                self._fail(where + name, settings[name], "a multiple of 8 (the VAE's downsampling)")
        self._check_number(
            where + "guidance_scale",
            settings.get("guidance_scale"),
            [(_nonnegative, ">= 0"), (lambda v: v <= MAX_GUIDANCE_SCALE, f"<= {MAX_GUIDANCE_SCALE:g}")],
            True,
        )
        self._check_number(
            where + "audio_seconds",
            settings.get("audio_seconds"),
            [(_positive, "> 0"), (lambda v: v <= MAX_AUDIO_SECONDS, f"<= {MAX_AUDIO_SECONDS:g} (seconds)")],
            True,
        )

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
            if modality is Modality.TEXT:
                continue  # every reply has text: "text" names no medium to force
            if modality not in MEDIA_MODALITIES:
                valid = ", ".join(m.value for m in MEDIA_MODALITIES)
                raise UsageError(
                    f"{self.origin}modalities: unknown output modality {_short(name)}; expected 'auto' or a list of "
                    f"{valid}"
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
            # an int is compared exactly (10**400 would overflow converting it to a float)
            weights_ok = all(
                (isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and math.isfinite(v))
                and 0 <= v <= MAX_ADAPTER_WEIGHT
                for v in adapters.values()
            )
            if names_ok and weights_ok:
                return
        elif isinstance(adapters, list | tuple) and all(isinstance(a, str) for a in adapters):
            self.adapters = list(adapters)
            return
        self._fail(
            "adapters",
            adapters,
            f"a name, a comma-separated string or list of names, or {{name: weight}} (weights: finite numbers in "
            f"[0, {MAX_ADAPTER_WEIGHT:g}])",
        )

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
                    f"{self.origin}decoder_overrides: unknown output modality {_short(key)}; expected one of {valid}"
                )
            where = f"decoder_overrides[{modality.value!r}]"
            if not isinstance(values, Mapping):
                self._fail(where, values, "a mapping {setting: value}")
            unknown = sorted(set(values) - set(DECODER_SETTINGS), key=_short)
            if unknown:
                valid = ", ".join(DECODER_SETTINGS)
                raise UsageError(f"{self.origin}{where}: unknown setting {_short(unknown[0])}; expected any of {valid}")
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
        unknown = sorted(set(data) - set(allowed) - set(ALIASES), key=_short)
        if unknown:
            raise UsageError(f"{origin}unknown fields [{', '.join(map(_short, unknown))}]; allowed: {sorted(allowed)}")
        values = dict(data)
        for alias, name in ALIASES.items():
            if alias in values:
                if name in values:
                    raise UsageError(f"{origin}'{alias}' and '{name}' name the same field: give one")
                values[name] = values.pop(alias)
        return cls(**values, origin=origin)


def check_media_item(modality: Modality, item: Any, where: str) -> None:
    """Raise ``MediaError`` (``where`` first) unless ``item`` is a file path or the modality's media object whose
    content passes ``anygpt.base.media.validate_media`` (finite samples and pixels, sizes within the limits a file
    is held to; a file is checked when it is read)."""
    expected = _MEDIA_TYPES[modality].__name__
    if not isinstance(item, str | os.PathLike | _MEDIA_TYPES[modality]):
        article = "an" if expected[0] in "AEIOU" else "a"
        raise MediaError(f"{where}: expected a file path or {article} {expected} object, got {type(item).__name__}")
    if not isinstance(item, str | os.PathLike):
        validate_media(modality, item, where)


def _nonnegative(value: float) -> bool:
    return value >= 0


def _positive(value: float) -> bool:
    return value > 0


def _short(value: Any) -> str:
    """``value`` for a message: a long string or a huge integer cut to a readable length."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits ({'-' if value < 0 else ''}~2**{value.bit_length() - 1})"
    try:
        text = repr(value)
    except ValueError:  # it holds an integer of more than sys.get_int_max_str_digits() digits
        return f"a {type(value).__name__} holding an integer too long to print"
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k.value if isinstance(k, Modality) else k): _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
