"""The modalities anygpt reads and writes."""

from __future__ import annotations

from enum import Enum


class Modality(str, Enum):
    """A kind of content. Projectors, signal tokens and decoders are keyed by it."""

    TEXT = "text"
    IMAGE = "image"
    VIDEO = "video"
    AUDIO = "audio"

    @classmethod
    def parse(cls, value: str | Modality) -> Modality:
        """Return the modality named by ``value`` (case-insensitive).

        Raises:
            ValueError: naming the unknown value and the valid names.
        """
        if isinstance(value, Modality):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown modality {value!r}: expected one of {valid}") from None

    @property
    def plural(self) -> str:
        """The name of a list of this modality's items, as in ``pipe(images=...)``, ``AnyGPTOutput.videos`` and the
        batch file's fields: ``"images"``, ``"videos"``, ``"audios"`` (``"text"`` for text)."""
        return _PLURALS[self]


_PLURALS = {Modality.TEXT: "text", Modality.IMAGE: "images", Modality.VIDEO: "videos", Modality.AUDIO: "audios"}

MEDIA_MODALITIES: tuple[Modality, ...] = (Modality.IMAGE, Modality.VIDEO, Modality.AUDIO)
