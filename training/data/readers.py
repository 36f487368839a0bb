"""Dataset readers: NExT-GPT's on-disk JSON formats, Alpaca and LLaVA-Instruct, read into :mod:`training.data.records`.

One entry point, :func:`read_dataset`, reads the file a :class:`~training.data.records.DatasetSpec` names (a JSON list,
or JSON Lines for ``*.jsonl``) with the reader its ``format`` names, or with the one :func:`detect_format` picks from
the first record when the format is ``"auto"``. :func:`list_formats` lists the reader names.

Formats (field names as NExT-GPT's ``data/`` folder, ``data/prepare_data.py`` and its dataset classes write and read
them):

- ``cc3m`` ``{"caption", "id", "image_name"}``, ``webvid`` ``{"caption", "id", "video_name"}``, ``audiocap``
  ``{"audio_id", "audio_name", "caption"}`` and the generic ``pairs`` ``{"media" | "path", "caption"}`` (the spec's
  ``modality`` says which kind of media) give :class:`~training.data.records.Pair` records. With an
  ``embedding_root``, a pair's caption embedding is ``{embedding_root}/{media file name}.npy`` (NExT-GPT's naming).
- ``t2m``: NExT-GPT's T-T+X ("T2M") instruction files (``*_t2x.json``), ``{"mm_name", "conversation": [{"from":
  "human", "value", "input_modality": "text"}, {"from": "gpt", "value", "caption", "output_modality": "image"}]}``.
  The legacy code appends the signal tokens after the answer (``turn['value'] + signal_tokens``) and the upstream
  conversion to the newer format appends ``" <image>"``; the reader does the same: an assistant turn whose
  ``output_modality`` is a media kind produces ``OutputMedia(modality, caption)`` and gets the placeholder appended
  at the end of its text unless the text already holds it once. The caption embedding is
  ``{embedding_root}/{basename(mm_name)}.npy`` (as the legacy ``T2XTInstructionDataset`` loads it); the output media
  file is ``{media_root}/{mm_name}`` when it exists. ``image_name`` is accepted for ``mm_name`` (upstream's
  ``processing_log.py`` writes that key). A human turn whose ``input_modality`` is a media kind takes ``mm_name``
  as its input (the legacy LLaVA conversion of the same layout). A record names one media file, so at most one
  turn may carry media.
- ``nextgpt_comprehension`` / ``nextgpt_generation``: the newer ``LazySupervisedDataset`` format. Inputs
  ``input_image`` / ``input_video`` / ``input_audio`` (a name or a list of names); outputs ``{m}_captions`` (a
  string or a list), optional ``output_{m}`` (the target media, used when the file exists) and optional
  ``{m}_caption_embeddings`` (``*.npy`` names under ``embedding_root``). Both names read the same layout (a record
  may have inputs and outputs), so the instruction-tuning files ``prepare_data.py`` writes (``image_captions`` lists,
  MosIT with several outputs over several turns) read too.
- ``mosit``: MosIT raw ``{"image_list": [{"image_name", "data_source", "caption"}], "video_list": [...],
  "audio_list": [...], "conversation": [{"from", "value"}]}``. Upstream marks media in the text with
  ``<Image>name</Image>``, ``<Video>name</Video>``, ``<Audio>name</Audio>`` (``prepare_data.py``,
  ``preprocess_it_mosit``). Mapping chosen here:

  * a tag whose content is a name in the matching list is replaced by the placeholder; in an assistant turn it
    becomes an output (``OutputMedia`` with the list entry's caption, embedding ``{embedding_root}/{name}.npy``,
    media ``{media_root}/{name}`` when it exists), in a user turn an input (``MediaFile`` under ``media_root``);
  * a tag whose content is not a listed name (a free-text description left from the ChatGPT construction step) is
    removed, as upstream removes it; list entries no tag refers to are ignored; ``data_source`` is not used (all
    media live under ``media_root``).

  Upstream's own conversion drops user-side tags (its construction kept only dialogues whose user turns have no
  media); this reader keeps them as inputs instead, since a user turn that shows a file is an input.
- ``alpaca`` ``{"instruction", "input", "output"}``: one user turn, ``instruction`` plus ``"\\n\\n" + input`` when the
  input is not empty, and one assistant turn.
- ``llava`` (LLaVA-Instruct) ``{"id"?, "image"?, "conversations": [{"from", "value"}]}``: ``<image>`` in a human
  turn marks where the image goes; with an ``image`` and no ``<image>``, ``<image>\\n`` is prepended to the first
  human turn.

Common rules: roles ``human``/``user`` become ``"user"``, ``gpt``/``assistant`` become ``"assistant"``; turns must
alternate, starting with the user and ending with the assistant. Text and captions are used as written (outer
whitespace stripped). Media names must be relative and stay inside the media root. After reading, every user turn
holds each modality's placeholder once per input, in order, and every assistant turn once per output; readers insert
placeholders the source lacks, and a count that cannot be fixed is an error.

Missing media: input media files (and pair media) that do not exist are an error naming the first one and the count
(``missing_media="error"``), or their records are dropped with a warning (``"skip"``); missing caption-embedding files
follow the same policy. ``max_samples`` truncates before these checks.

Example:
    >>> from training.data import DatasetSpec, read_dataset
    >>> records = read_dataset(DatasetSpec(path="/data/T_X_pair_data/cc3m/cc3m.json", media_root="/data/cc3m/images"))
    >>> records[0].caption, records[0].media.path  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from anygpt.base.errors import DatasetError
from anygpt.base.modality import MEDIA_MODALITIES, Modality
from anygpt.core.tokens import PLACEHOLDER
from training.data.records import (
    MODALITY_OF_PLACEHOLDER,
    PLACEHOLDER_PATTERN,
    DatasetSpec,
    Dialogue,
    MediaFile,
    OutputMedia,
    Pair,
    Record,
    Turn,
)

logger = logging.getLogger(__name__)

__all__ = ["DatasetError", "detect_format", "list_formats", "read_dataset"]

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# MosIT media tags, e.g. " <Image>mosit_i_0000000_00.jpg</Image>" (leading blanks kept in group 1).
_MOSIT_TAG_RE = re.compile(r"([ \t]*)<(image|video|audio)>(.*?)</\2>", re.IGNORECASE | re.DOTALL)


# ------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    """A short description of a JSON value for error messages, e.g. ``"an integer (5)"``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"a string ({shown!r})" if value else "an empty string"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        keys = ", ".join(sorted(map(str, value))[:12])
        return f"an object with keys [{keys}]" if value else "an empty object"
    return type(value).__name__


def _placeholder_sequence(text: str) -> list[Modality]:
    """The modalities of the placeholders in ``text``, in order of appearance."""
    return [MODALITY_OF_PLACEHOLDER[m.group(0)] for m in PLACEHOLDER_PATTERN.finditer(text)]


class _Source:
    """One dataset file being read: its paths, and helpers that check fields and raise :class:`DatasetError`."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.path = Path(spec.path).expanduser().absolute()
        self.name = str(spec.name)
        # Roots are resolved once; names below them are only normalised (no per-record syscalls, and a symlinked
        # media file keeps the name, and extension, the dataset gives it).
        self.media_root = Path(spec.media_root).expanduser().resolve()
        self.embedding_root = (
            Path(spec.embedding_root).expanduser().resolve() if spec.embedding_root is not None else None
        )
        self._exists: dict[Path, bool] = {}

    def error(self, index: int | None, message: str) -> DatasetError:
        where = f"{self.path}: record {index}" if index is not None else str(self.path)
        return DatasetError(f"{where}: {message}")

    def is_file(self, path: Path) -> bool:
        found = self._exists.get(path)
        if found is None:
            found = self._exists[path] = path.is_file()
        return found

    # -- fields ------------------------------------------------------------------------------------------------

    def get(self, obj: dict, index: int, key: str, where: str | None = None) -> Any:
        """``obj[key]``, or an error naming the key (``where``: the key path shown, default ``key``)."""
        if key not in obj:
            raise self.error(index, f"missing key {where or key!r}: expected it in {_describe(obj)}")
        return obj[key]

    def string(self, obj: dict, index: int, key: str, where: str | None = None, *, default: str | None = None) -> str:
        """A string field, outer whitespace stripped; ``default`` when given and the key is absent."""
        if default is not None and key not in obj:
            return default
        value = self.get(obj, index, key, where)
        if not isinstance(value, str):
            raise self.error(index, f"key {where or key!r}: expected a string, found {_describe(value)}")
        return value.strip()

    def caption(self, obj: dict, index: int, key: str, where: str | None = None) -> str:
        """A non-empty caption string."""
        caption = self.string(obj, index, key, where)
        if not caption:
            raise self.error(index, f"key {where or key!r}: expected a non-empty caption, found an empty string")
        return caption

    def strings(self, obj: dict, index: int, key: str) -> list[str]:
        """A field holding a string or a list of strings, as a list (each stripped)."""
        value = self.get(obj, index, key)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if not isinstance(item, str):
                where = f"{key}[{i}]" if isinstance(value, list) else key
                raise self.error(
                    index, f"key {where!r}: expected a string or a list of strings, found {_describe(item)}"
                )
        return [item.strip() for item in items]

    def objects(self, obj: dict, index: int, key: str) -> list[dict]:
        """A field holding a list of objects."""
        value = self.get(obj, index, key)
        if not isinstance(value, list):
            raise self.error(index, f"key {key!r}: expected a list of objects, found {_describe(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(index, f"key '{key}[{i}]': expected an object, found {_describe(item)}")
        return value

    # -- files -------------------------------------------------------------------------------------------------

    def relative(self, name: str, index: int, key: str, root: Path) -> PurePosixPath:
        """Check that ``name`` is a relative path that stays inside ``root``; return it normalised."""
        if not name:
            raise self.error(index, f"key {key!r}: expected a file name relative to {root}, found an empty string")
        rel = PurePosixPath(name)
        if rel.is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive or ".." in rel.parts:
            raise self.error(
                index,
                f"key {key!r}: expected a file name relative to {root} that stays inside it, found {name!r} "
                "(absolute paths and '..' are not allowed)",
            )
        if rel.parts in ((), (".",)):
            raise self.error(index, f"key {key!r}: expected a file name relative to {root}, found {name!r}")
        return rel

    def media(self, modality: Modality, name: str, index: int, key: str) -> MediaFile:
        """The :class:`MediaFile` for a media name under the media root (existence is checked later)."""
        rel = self.relative(name, index, key, self.media_root)
        return MediaFile(modality=modality, path=self.media_root / rel, media_id=f"{self.name}/{rel.as_posix()}")

    def output_media(self, modality: Modality, name: str | None, index: int, key: str) -> MediaFile | None:
        """The target media file of an output, or None when it is not named or does not exist."""
        if name is None:
            return None
        media = self.media(modality, name, index, key)
        return media if self.is_file(media.path) else None

    def embedding(self, name: str | None, index: int, key: str) -> Path | None:
        """A caption-embedding file under the embedding root; None without one (existence is checked later)."""
        if name is None or self.embedding_root is None:
            return None
        return self.embedding_root / self.relative(name, index, key, self.embedding_root)

    # -- conversations -----------------------------------------------------------------------------------------

    def conversation(self, obj: dict, index: int, key: str) -> tuple[list[Turn], list[dict]]:
        """Read a list of ``{"from", "value"}`` turns: the :class:`Turn` list (no media yet) and the raw turns."""
        raw = self.objects(obj, index, key)
        turns: list[Turn] = []
        for i, item in enumerate(raw):
            speaker = self.get(item, index, "from", f"{key}[{i}].from")
            role = _ROLES.get(speaker.strip().lower()) if isinstance(speaker, str) else None
            if role is None:
                valid = ", ".join(repr(r) for r in _ROLES)
                raise self.error(index, f"key '{key}[{i}].from': expected one of {valid}, found {_describe(speaker)}")
            turns.append(Turn(role=role, text=self.string(item, index, "value", f"{key}[{i}].value")))
        roles = [t.role for t in turns]
        expected = ["user", "assistant"] * ((len(turns) + 1) // 2)
        if not turns or len(turns) % 2 or roles != expected[: len(turns)]:
            found = ", ".join(str(item.get("from")) for item in raw) or "no turns"
            raise self.error(
                index,
                f"key {key!r}: expected turns alternating user, assistant, ..., starting with the user and ending "
                f"with the assistant, found [{found}]",
            )
        return turns, raw

    def attach(
        self,
        index: int,
        turns: list[Turn],
        role: str,
        items: dict[Modality, list[MediaFile] | list[OutputMedia]],
        keys: dict[Modality, str],
    ) -> None:
        """Attach media items to the ``role`` turns of a conversation, following the placeholders in their text.

        For each modality, the turns must hold exactly one placeholder per item; when they hold none, the reader
        inserts them (user: at the start of the first user turn, one per line; assistant: at the end of the last
        assistant turn). Items are then attached in the order their placeholders appear.
        """
        targets = [t for t in turns if t.role == role]
        missing: list[Modality] = []
        for modality, queue in items.items():
            marker = PLACEHOLDER[modality]
            found = sum(t.text.count(marker) for t in targets)
            if queue and found == 0:
                missing.extend([modality] * len(queue))
            elif found and not queue:
                raise self.error(
                    index,
                    f"key {keys[modality]!r}: expected no {marker} placeholder in the {role} turns (no "
                    f"{modality.value} is given), found {found}",
                )
            elif found != len(queue):
                raise self.error(
                    index,
                    f"key {keys[modality]!r}: expected {len(queue)} {marker} placeholder(s) in the {role} turns "
                    f"(one per item), found {found}",
                )
        if missing:
            markers = [PLACEHOLDER[m] for m in sorted(missing, key=MEDIA_MODALITIES.index)]
            if role == "user":
                turn = targets[0]
                turn.text = "\n".join([*markers, turn.text]) if turn.text else "\n".join(markers)
            else:
                turn = targets[-1]
                turn.text = " ".join([turn.text, *markers]) if turn.text else " ".join(markers)
        queues = {m: list(q) for m, q in items.items()}
        for turn in targets:
            attached = turn.inputs if role == "user" else turn.outputs
            for modality in _placeholder_sequence(turn.text):
                if queues.get(modality):
                    attached.append(queues[modality].pop(0))


# ------------------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------------------

_Reader = Callable[[_Source, dict, int], Record]
_READERS: dict[str, _Reader] = {}


def _register(name: str) -> Callable[[_Reader], _Reader]:
    def wrap(fn: _Reader) -> _Reader:
        _READERS[name] = fn
        return fn

    return wrap


def _pair(src: _Source, record: dict, index: int, modality: Modality, key: str) -> Pair:
    name = src.string(record, index, key)
    media = src.media(modality, name, index, key)
    return Pair(
        dataset=src.name,
        index=index,
        media=media,
        caption=src.caption(record, index, "caption"),
        caption_embedding=src.embedding(f"{PurePosixPath(name).name}.npy", index, key),
    )


@_register("cc3m")
def _read_cc3m(src: _Source, record: dict, index: int) -> Pair:
    return _pair(src, record, index, Modality.IMAGE, "image_name")


@_register("webvid")
def _read_webvid(src: _Source, record: dict, index: int) -> Pair:
    return _pair(src, record, index, Modality.VIDEO, "video_name")


@_register("audiocap")
def _read_audiocap(src: _Source, record: dict, index: int) -> Pair:
    return _pair(src, record, index, Modality.AUDIO, "audio_name")


@_register("pairs")
def _read_pairs(src: _Source, record: dict, index: int) -> Pair:
    modality = Modality.parse(src.spec.modality)  # checked by read_dataset
    return _pair(src, record, index, modality, "media" if "media" in record or "path" not in record else "path")


@_register("alpaca")
def _read_alpaca(src: _Source, record: dict, index: int) -> Dialogue:
    instruction = src.string(record, index, "instruction")
    extra = src.string(record, index, "input", default="")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    answer = src.string(record, index, "output")
    return Dialogue(src.name, index, [Turn("user", prompt), Turn("assistant", answer)])


@_register("llava")
def _read_llava(src: _Source, record: dict, index: int) -> Dialogue:
    turns, _ = src.conversation(record, index, "conversations")
    image = record.get("image")
    images: list[MediaFile] = []
    if image is not None:
        images = [src.media(Modality.IMAGE, src.string(record, index, "image"), index, "image")]
    src.attach(index, turns, "user", {Modality.IMAGE: images}, {Modality.IMAGE: "image"})
    return Dialogue(src.name, index, turns)


def _read_nextgpt(src: _Source, record: dict, index: int) -> Dialogue:
    turns, _ = src.conversation(record, index, "conversations")
    inputs: dict[Modality, list[MediaFile]] = {}
    outputs: dict[Modality, list[OutputMedia]] = {}
    input_keys: dict[Modality, str] = {}
    output_keys: dict[Modality, str] = {}
    for m in MEDIA_MODALITIES:
        key = f"input_{m.value}"
        if key in record:
            inputs[m] = [src.media(m, name, index, key) for name in src.strings(record, index, key)]
            input_keys[m] = key
        caption_key, media_key = f"{m.value}_captions", f"output_{m.value}"
        embedding_key = f"{m.value}_caption_embeddings"
        if not any(k in record for k in (caption_key, media_key, embedding_key)):
            continue
        captions = src.strings(record, index, caption_key)
        for i, caption in enumerate(captions):
            if not caption:
                raise src.error(index, f"key {caption_key!r}: expected non-empty captions, found an empty one (#{i})")
        media_names: list[str | None] = [None] * len(captions)
        embedding_names: list[str | None] = [None] * len(captions)
        for key, names in ((media_key, media_names), (embedding_key, embedding_names)):
            if key in record:
                given = src.strings(record, index, key)
                if len(given) != len(captions):
                    raise src.error(
                        index,
                        f"key {key!r}: expected one name per caption in {caption_key!r} ({len(captions)}), "
                        f"found {len(given)}",
                    )
                names[:] = given
        outputs[m] = [
            OutputMedia(
                modality=m,
                caption=caption,
                caption_embedding=src.embedding(embedding_name, index, embedding_key),
                media=src.output_media(m, media_name, index, media_key),
            )
            for caption, media_name, embedding_name in zip(captions, media_names, embedding_names, strict=True)
        ]
        output_keys[m] = caption_key
    src.attach(index, turns, "user", inputs, input_keys)
    src.attach(index, turns, "assistant", outputs, output_keys)
    return Dialogue(src.name, index, turns)


_register("nextgpt_comprehension")(_read_nextgpt)
_register("nextgpt_generation")(_read_nextgpt)


@_register("t2m")
def _read_t2m(src: _Source, record: dict, index: int) -> Dialogue:
    turns, raw = src.conversation(record, index, "conversation")
    name_key = "mm_name" if "mm_name" in record or "image_name" not in record else "image_name"
    uses: list[int] = []
    for i, (turn, item) in enumerate(zip(turns, raw, strict=True)):
        kind_key = "input_modality" if turn.role == "user" else "output_modality"
        where = f"conversation[{i}].{kind_key}"
        kind = src.string(item, index, kind_key, where, default="text")
        try:
            modality = Modality.parse(kind)
        except ValueError:
            raise src.error(index, f"key {where!r}: expected text, image, video or audio, found {kind!r}") from None
        if modality is Modality.TEXT:
            continue
        uses.append(i)
        name = src.string(record, index, name_key)
        if turn.role == "user":
            items: list = [src.media(modality, name, index, name_key)]
        else:
            items = [
                OutputMedia(
                    modality=modality,
                    caption=src.caption(item, index, "caption", f"conversation[{i}].caption"),
                    caption_embedding=src.embedding(f"{PurePosixPath(name).name}.npy", index, name_key),
                    media=src.output_media(modality, name, index, name_key),
                )
            ]
        src.attach(index, [turn], turn.role, {modality: items}, {modality: f"conversation[{i}].value"})
    if len(uses) > 1:
        raise src.error(
            index,
            f"key 'conversation': expected at most one turn with media (the record names one file in {name_key!r}), "
            f"found {len(uses)} (turns {uses})",
        )
    return Dialogue(src.name, index, turns)


@_register("mosit")
def _read_mosit(src: _Source, record: dict, index: int) -> Dialogue:
    turns, _ = src.conversation(record, index, "conversation")
    catalog: dict[Modality, dict[str, tuple[str, dict]]] = {}
    for m in MEDIA_MODALITIES:
        list_key, name_key = f"{m.value}_list", f"{m.value}_name"
        entries = src.objects(record, index, list_key) if list_key in record else []
        catalog[m] = {}
        for j, entry in enumerate(entries):
            name = src.string(entry, index, name_key, f"{list_key}[{j}].{name_key}")
            catalog[m][name] = (f"{list_key}[{j}]", entry)

    for i, turn in enumerate(turns):
        items: list[MediaFile | OutputMedia] = []

        def replace(match: re.Match, turn: Turn = turn, i: int = i, items: list = items) -> str:
            blanks, tag, content = match.group(1), match.group(2).lower(), match.group(3).strip()
            modality = Modality(tag)
            listed = catalog[modality].get(content)
            if listed is None:
                return ""  # a description, not a file: removed as upstream does
            where, entry = listed
            if turn.role == "user":
                items.append(src.media(modality, content, index, f"conversation[{i}].value"))
            else:
                items.append(
                    OutputMedia(
                        modality=modality,
                        caption=src.caption(entry, index, "caption", f"{where}.caption"),
                        caption_embedding=src.embedding(f"{PurePosixPath(content).name}.npy", index, where),
                        media=src.output_media(modality, content, index, where),
                    )
                )
            return blanks + PLACEHOLDER[modality]

        text = _MOSIT_TAG_RE.sub(replace, turn.text).strip()
        if _placeholder_sequence(text) != [item.modality for item in items]:
            raise src.error(
                index,
                f"key 'conversation[{i}].value': expected placeholders only where media tags were, found "
                f"{len(_placeholder_sequence(text))} placeholder(s) for {len(items)} tagged file(s)",
            )
        turn.text = text
        (turn.inputs if turn.role == "user" else turn.outputs).extend(items)
    return Dialogue(src.name, index, turns)


# ------------------------------------------------------------------------------------------------------------
# Format detection
# ------------------------------------------------------------------------------------------------------------

_DETECTION_HELP = (
    "cc3m (caption, image_name), webvid (caption, video_name), audiocap (caption, audio_name), pairs (caption, "
    "media|path), t2m (conversation, mm_name), mosit (image_list|video_list|audio_list, conversation), "
    "nextgpt_comprehension (conversations, input_*), nextgpt_generation (conversations, output_*|*_captions), "
    "llava (conversations, image?), alpaca (instruction, output)"
)


def detect_format(record: Any) -> str | None:
    """Guess the reader for a dataset from one of its records.

    Args:
        record: a decoded JSON record (normally the file's first).

    Returns:
        A reader name from :func:`list_formats`, or None when the keys match no known format.
    """
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if keys & {"image_list", "video_list", "audio_list"}:
        return "mosit"
    if "conversation" in keys:
        return "t2m"
    if "conversations" in keys:
        media = [m.value for m in MEDIA_MODALITIES]
        if any(f"output_{m}" in keys or f"{m}_captions" in keys for m in media):
            return "nextgpt_generation"
        if any(f"input_{m}" in keys for m in media):
            return "nextgpt_comprehension"
        return "llava"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "caption" in keys:
        for key, name in (("image_name", "cc3m"), ("video_name", "webvid"), ("audio_name", "audiocap")):
            if key in keys:
                return name
        if keys & {"media", "path"}:
            return "pairs"
    return None


def list_formats() -> list[str]:
    """The names :func:`read_dataset` accepts as a dataset's ``format`` (besides ``"auto"``), sorted."""
    return sorted(_READERS)


# ------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------


def _load_records(src: _Source, limit: int | None) -> list[Any]:
    """The records of a JSON list file, or of a JSON Lines file (``*.jsonl``, read up to ``limit`` records)."""
    path = src.path
    if not path.exists():
        raise DatasetError(f"dataset file {path} does not exist (dataset {src.name!r})")
    if not path.is_file():
        raise DatasetError(f"dataset file {path}: expected a JSON file, found a directory")
    try:
        if path.suffix.lower() == ".jsonl":
            records: list[Any] = []
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if limit is not None and len(records) >= limit:
                        break
                    if not line.strip():
                        continue
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DatasetError(
                            f"{path}: invalid JSON on line {number} (record {len(records)}): "
                            f"{e.msg} at column {e.colno}"
                        ) from None
            return records
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: expected UTF-8 JSON text, found undecodable bytes ({e.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, found {_describe(data)}")
    return data[:limit] if limit is not None else data


def _check_placeholders(src: _Source, dialogue: Dialogue) -> None:
    for t, turn in enumerate(dialogue.turns):
        items = turn.inputs if turn.role == "user" else turn.outputs
        other = turn.outputs if turn.role == "user" else turn.inputs
        expected = [item.modality for item in items]
        found = _placeholder_sequence(turn.text)
        if found != expected or other:
            show = ", ".join(m.value for m in expected) or "none"
            seen = ", ".join(PLACEHOLDER[m] for m in found) or "no placeholder"
            kind = "inputs" if turn.role == "user" else "outputs"
            raise src.error(
                dialogue.index,
                f"turn {t} ({turn.role}): expected one placeholder per {kind} in order [{show}], found [{seen}] "
                f"in its text {turn.text[:80]!r}",
            )


def _required_files(record: Record) -> tuple[list[Path], list[Path]]:
    """The media files and the caption-embedding files a record needs."""
    if isinstance(record, Pair):
        return [record.media.path], [record.caption_embedding] if record.caption_embedding else []
    media = [m.path for turn in record.turns for m in turn.inputs]
    embeddings = [o.caption_embedding for turn in record.turns for o in turn.outputs if o.caption_embedding]
    return media, embeddings


def _check_files(src: _Source, records: list[Record]) -> list[Record]:
    """Apply the missing-file policy to input media and caption embeddings."""
    missing: dict[str, dict[Path, int]] = {"media": {}, "caption-embedding": {}}  # path -> first record index
    bad: dict[str, set[int]] = {"media": set(), "caption-embedding": set()}
    for position, record in enumerate(records):
        for kind, paths in zip(("media", "caption-embedding"), _required_files(record), strict=True):
            for path in paths:
                if not src.is_file(path):
                    missing[kind].setdefault(path, record.index)
                    bad[kind].add(position)
    total = len(records)
    for kind, root in (("media", src.media_root), ("caption-embedding", src.embedding_root)):
        if not missing[kind]:
            continue
        first, first_index = next(iter(missing[kind].items()))
        count = len(missing[kind])
        summary = (
            f"{count} missing {kind} file{'s' if count != 1 else ''} under {root} "
            f"({len(bad[kind])} of {total} records; first: record {first_index}, {first})"
        )
        if src.spec.missing_media == "error":
            raise DatasetError(
                f"{src.path}: {summary}; set missing_media='skip' to drop those records (dataset {src.name!r})"
            )
        logger.warning("%s: skipping records whose files are missing: %s", src.path, summary)
    dropped = bad["media"] | bad["caption-embedding"]
    return [r for position, r in enumerate(records) if position not in dropped] if dropped else records


def read_dataset(spec: DatasetSpec) -> list[Record]:
    """Read one dataset file into records.

    Args:
        spec: the dataset: its JSON (or ``*.jsonl``) file, format (a name from :func:`list_formats` or
            ``"auto"``), media and embedding roots, ``max_samples`` and missing-file policy.

    Returns:
        :class:`~training.data.records.Pair` records (pair formats) or :class:`~training.data.records.Dialogue`
        records (conversation formats), in file order; each keeps its position in the file as ``index``. Paths are
        absolute.

    Raises:
        DatasetError: for a missing or invalid file, an unknown or undetectable format, a malformed record (the
            message names the file, the record index, the key, what was expected and found), placeholder counts
            that do not match the media, missing media or caption-embedding files (with ``missing_media="error"``),
            or a dataset left empty.
    """
    src = _Source(spec)
    fmt = str(spec.format).strip().lower()
    if fmt != "auto" and fmt not in _READERS:
        raise DatasetError(
            f"{src.path}: unknown dataset format {spec.format!r}: expected one of auto, {', '.join(list_formats())}"
        )
    records_raw = _load_records(src, spec.max_samples)
    if not records_raw:
        raise DatasetError(f"{src.path}: expected at least one record, found an empty list (dataset {src.name!r})")
    if fmt == "auto":
        detected = detect_format(records_raw[0])
        if detected is None:
            raise src.error(
                0,
                f"cannot detect the dataset format from {_describe(records_raw[0])}: expected the keys of one of "
                f"{_DETECTION_HELP}; set the dataset's format explicitly",
            )
        fmt = detected
    if fmt == "pairs":
        if src.spec.modality is None:
            raise DatasetError(
                f"{src.path}: format 'pairs' needs the dataset's modality (image, video or audio), found none"
            )
        try:
            modality = Modality.parse(src.spec.modality)
        except ValueError:
            modality = None
        if modality not in MEDIA_MODALITIES:
            raise DatasetError(
                f"{src.path}: format 'pairs': expected modality image, video or audio, found {src.spec.modality!r}"
            )
    reader = _READERS[fmt]
    records: list[Record] = []
    for index, raw in enumerate(records_raw):
        if not isinstance(raw, dict):
            raise src.error(index, f"expected a JSON object, found {_describe(raw)}")
        record = reader(src, raw, index)
        if isinstance(record, Dialogue):
            _check_placeholders(src, record)
        records.append(record)
    records = _check_files(src, records)
    if not records:
        raise DatasetError(
            f"{src.path}: no records left after skipping those with missing files (dataset {src.name!r}, "
            f"{len(records_raw)} read)"
        )
    logger.info("read %d %s records from %s (dataset %r)", len(records), fmt, src.path, src.name)
    return records
