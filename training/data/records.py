"""The records every dataset reader produces, whatever the on-disk format.

Two kinds:

- ``Pair``: one media file and its caption (``cc3m.json``, ``webvid.json``, ``audiocap.json``). A stage's objective
  decides how to use it: as captioning (media in, caption out; stage 1) or as generation (caption in, caption and
  signal tokens out; stage 2).
- ``Dialogue``: a conversation of user and assistant turns (T2M, the newer NExT-GPT formats, MosIT, Alpaca,
  LLaVA-Instruct).

Conventions of ``Turn.text``: a user turn's text holds the placeholder ``<image>`` / ``<video>`` / ``<audio>`` once per
input media item, in the order of ``Turn.inputs``; an assistant turn's text holds it once per output media item, in
the order of ``Turn.outputs``, where the answer produces that item (the example builder replaces it with signal
tokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from anygpt.base.modality import Modality
from anygpt.core.tokens import PLACEHOLDER

MODALITY_OF_PLACEHOLDER = {tag: modality for modality, tag in PLACEHOLDER.items()}
PLACEHOLDER_PATTERN = re.compile("|".join(re.escape(tag) for tag in PLACEHOLDER.values()))


def split_placeholders(text: str) -> list[str | Modality]:
    """``"a <image> b"`` -> ``["a ", Modality.IMAGE, " b"]`` (empty text between placeholders left out)."""
    parts: list[str | Modality] = []
    pos = 0
    for match in PLACEHOLDER_PATTERN.finditer(text):
        if match.start() > pos:
            parts.append(text[pos : match.start()])
        parts.append(MODALITY_OF_PLACEHOLDER[match.group(0)])
        pos = match.end()
    if pos < len(text):
        parts.append(text[pos:])
    return parts


@dataclass(frozen=True)
class MediaFile:
    """A media file of a dataset.

    Attributes:
        modality: image, video or audio.
        path: absolute path of the file.
        media_id: a stable id independent of where the dataset lives: ``"{dataset}/{path relative to its media
            root}"``. The feature cache keys entries by it.
    """

    modality: Modality
    path: Path
    media_id: str


@dataclass(frozen=True)
class OutputMedia:
    """A media item the assistant produces.

    Attributes:
        modality: image, video or audio.
        caption: the text the decoder's own text encoder embeds as the stage-2 / stage-3 target.
        caption_embedding: a precomputed caption embedding (NExT-GPT's ``*.npy``), if the dataset ships one.
        media: the target media file, if the dataset has it (needed only by the diffusion loss).
    """

    modality: Modality
    caption: str
    caption_embedding: Path | None = None
    media: MediaFile | None = None


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str
    inputs: list[MediaFile] = field(default_factory=list)  # user turns
    outputs: list[OutputMedia] = field(default_factory=list)  # assistant turns


@dataclass
class Pair:
    """A media file and its caption."""

    dataset: str
    index: int  # position in the dataset file
    media: MediaFile
    caption: str
    caption_embedding: Path | None = None


@dataclass
class Dialogue:
    """A conversation (one or more user / assistant exchanges)."""

    dataset: str
    index: int
    turns: list[Turn]


Record = Pair | Dialogue


@dataclass
class DatasetSpec:
    """One dataset of a training stage, as a config names it (paths already absolute).

    Attributes:
        path: the JSON file.
        format: a reader name (``training.data.list_formats()``) or ``"auto"`` (detected from the first record).
        name: short name used in media ids, logs and metrics; default: the file's stem.
        media_root: the folder the file's media names are relative to; default: the JSON file's folder.
        embedding_root: the folder of precomputed caption embeddings (``*.npy``); default: none.
        weight: relative sampling weight among the stage's datasets.
        max_samples: read at most this many records (None: all).
        missing_media: ``"error"`` (default: a clear error naming the first missing file and the count) or
            ``"skip"`` (drop records whose media are missing and log how many).
        modality: for pair files whose format does not say (``pairs``): ``image``, ``video`` or ``audio``.
    """

    path: Path
    format: str = "auto"
    name: str | None = None
    media_root: Path | None = None
    embedding_root: Path | None = None
    weight: float = 1.0
    max_samples: int | None = None
    missing_media: str = "error"
    modality: str | None = None

    def __post_init__(self):
        self.path = Path(self.path)
        if self.name is None:
            self.name = self.path.stem
        self.media_root = Path(self.media_root) if self.media_root is not None else self.path.parent
        if self.embedding_root is not None:
            self.embedding_root = Path(self.embedding_root)
        if not (self.weight > 0):
            raise ValueError(f"dataset {self.name}: weight must be > 0, got {self.weight}")
        if self.missing_media not in ("error", "skip"):
            raise ValueError(
                f"dataset {self.name}: missing_media must be 'error' or 'skip', got {self.missing_media!r}"
            )
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"dataset {self.name}: max_samples must be >= 1, got {self.max_samples}")
