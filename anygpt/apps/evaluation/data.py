"""Evaluation data: the usual benchmark files read into ``Sample`` records.

=====================  =========================================================================================
format                 file
=====================  =========================================================================================
``coco-karpathy``      Karpathy's split JSON (``dataset_coco.json``): ``{"images": [{"filepath", "filename",
                       "split", "sentences": [{"raw"}]}]}``; one sample per image of ``--split`` (default test)
``audiocaps``          AudioCaps CSV (``audiocap_id, youtube_id, start_time, caption``); rows of one clip merged
``msrvtt``             MSR-VTT JSON (``{"videos": [{"video_id", "split"}], "sentences": [{"video_id", "caption"}]}``)
``vqav2``              VQAv2 questions JSON (``{"questions": [...]}``) with its annotations JSON (``annotations``)
``nextgpt-cc3m`` ...   NExT-GPT's ``cc3m.json`` / ``webvid.json`` / ``audiocap.json`` (caption + media name), and
                       their ``*_comprehension.json`` (media in, caption out) and ``*_generation.json`` (instruction
                       and caption in, media out)
=====================  =========================================================================================

A format is recognised from the file (``detect_format``) or named. Media paths resolve against ``media_root``
(default: the conventional folder beside the file: NExT-GPT's ``images/``, ``audios/``, ``videos/``, else the
file's folder). A sample whose media file is missing is left out and named in ``DataSet.missing``, as NExT-GPT's own
WebVid sample points at three clips that are not there.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anygpt.base.errors import DatasetError
from anygpt.base.modality import Modality
from anygpt.base.utils import file_sha256

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "DataSet", "Sample", "detect_format", "read_data"]


@dataclass
class Sample:
    """One evaluation item.

    Attributes:
        id: a name unique in the data set (letters, digits, ``._-``: it names the output files).
        text: the caption to render (text -> media tasks) or the question (``vqa``).
        references: reference captions (captioning) or human answers (``vqa``); for text -> media the caption(s).
        media: the sample's media file: the reference output of a text -> media task, the input of captioning and
            ``vqa``; None when the data has none.
        modality: the modality of ``media``.
        prompt: the data's own instruction or question for the model (NExT-GPT's conversations), if it has one.
    """

    id: str
    text: str
    references: list[str] = field(default_factory=list)
    media: Path | None = None
    modality: Modality | None = None
    prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "references": list(self.references),
            "media": None if self.media is None else str(self.media),
            "modality": None if self.modality is None else self.modality.value,
            "prompt": self.prompt,
        }


@dataclass
class DataSet:
    """The samples read from one file, and what could not be used."""

    path: Path
    format: str
    samples: list[Sample]
    missing: list[str] = field(default_factory=list)  # ids of samples left out: their media file is not there

    def describe(self) -> dict[str, Any]:
        """The data's entry of a report: path, format, sha256 of the file, counts, the samples left out."""
        return {
            "path": str(self.path),
            "format": self.format,
            "sha256": file_sha256(self.path),
            "samples": len(self.samples),
            "missing_media": list(self.missing),
        }


Reader = Callable[..., DataSet]
FORMATS: dict[str, Reader] = {}
_MEDIA_FOLDERS = {Modality.IMAGE: "images", Modality.AUDIO: "audios", Modality.VIDEO: "videos"}
_SAFE = str.maketrans({c: "_" for c in "/\\ :"})


def _format(name: str) -> Callable[[Reader], Reader]:
    def register(reader: Reader) -> Reader:
        FORMATS[name] = reader
        return reader

    return register


def read_data(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    media_root: str | os.PathLike | None = None,
    split: str | None = None,
    annotations: str | os.PathLike | None = None,
    limit: int | None = None,
) -> DataSet:
    """Read an evaluation file into samples.

    Args:
        path: the data file.
        format: one of ``FORMATS``; None: recognised from the file (``detect_format``).
        media_root: the folder media paths are relative to (default: the format's convention beside the file).
        split: the split to keep where the file holds several (Karpathy JSON, MSR-VTT); default ``test`` when the
            file has one, else every sample.
        annotations: the VQAv2 annotations file (``vqav2``).
        limit: keep the first ``limit`` usable samples.

    Raises:
        DatasetError: an unreadable file, an unknown format, or a record without a required field (naming the file,
            the record and the field).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"evaluation data {path}: no such file")
    name = format or detect_format(path)
    if name not in FORMATS:
        raise DatasetError(f"evaluation data {path}: unknown format {name!r}; expected one of {', '.join(FORMATS)}")
    root = Path(media_root).expanduser() if media_root is not None else None
    data = FORMATS[name](path, root=root, split=split, annotations=annotations)
    if limit is not None:
        data.samples = data.samples[:limit]
    ids = [s.id for s in data.samples]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise DatasetError(f"evaluation data {path}: sample id {duplicate!r} appears more than once")
    if data.missing:
        logger.warning("%s: %d sample(s) left out, their media file is missing", path, len(data.missing))
    return data


def detect_format(path: str | os.PathLike) -> str:
    """The format of an evaluation file, recognised from its content.

    Raises:
        DatasetError: a file no reader recognises (naming what was found).
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
        header = rows[0] if rows else {}
        if {"youtube_id", "caption"} <= set(header):
            return "audiocaps"
        raise DatasetError(f"{path}: a CSV without youtube_id and caption columns (found {sorted(header)})")
    content = _json(path)
    if isinstance(content, dict):
        if "images" in content and isinstance(content["images"], list):
            return "coco-karpathy"
        if "questions" in content:
            return "vqav2"
        if "videos" in content and "sentences" in content:
            return "msrvtt"
        raise DatasetError(f"{path}: a JSON object with keys {sorted(content)[:8]}: not a known evaluation format")
    if isinstance(content, list) and content and isinstance(content[0], dict):
        keys = set(content[0])
        for key, name in (
            ("image_name", "nextgpt-cc3m"),
            ("video_name", "nextgpt-webvid"),
            ("audio_name", "nextgpt-audiocap"),
        ):
            if key in keys:
                return name
        if keys & {"input_image", "input_video", "input_audio"}:
            return "nextgpt-comprehension"
        if keys & {"output_image", "output_video", "output_audio"}:
            return "nextgpt-generation"
        raise DatasetError(f"{path}: records with keys {sorted(keys)}: not a known evaluation format")
    raise DatasetError(f"{path}: expected a JSON object or a non-empty list of records")


# ------------------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------------------


@_format("coco-karpathy")
def _coco_karpathy(path: Path, *, root: Path | None, split: str | None, **_: Any) -> DataSet:
    images = _json(path).get("images")
    if not isinstance(images, list):
        raise DatasetError(f"{path}: expected 'images': a list")
    splits = {r.get("split") for r in images if isinstance(r, dict)}
    wanted = split or ("test" if "test" in splits else None)
    root = root or path.parent
    samples, missing = [], []
    for index, record in enumerate(images):
        where = f"{path}: images[{index}]"
        if wanted is not None and record.get("split") != wanted:
            continue
        filename = _string(record, "filename", where)
        sentences = [_string(s, "raw", f"{where}.sentences") for s in _list(record, "sentences", where)]
        if not sentences:
            raise DatasetError(f"{where}.sentences: expected at least one sentence")
        sample_id = _safe_id(record.get("cocoid", record.get("imgid", Path(filename).stem)))
        media = root / record.get("filepath", "") / filename
        _keep(samples, missing, Sample(sample_id, sentences[0].strip(), [s.strip() for s in sentences], media,
                                       Modality.IMAGE))  # fmt: skip
    return DataSet(path, "coco-karpathy", samples, missing)


@_format("audiocaps")
def _audiocaps(path: Path, *, root: Path | None, **_: Any) -> DataSet:
    rows = _csv_rows(path)
    root = root or path.parent
    clips: dict[str, dict[str, Any]] = {}
    for index, row in enumerate(rows):
        where = f"{path}: row {index + 2}"
        youtube_id, caption = _string(row, "youtube_id", where), _string(row, "caption", where)
        clip = clips.setdefault(youtube_id, {"start": row.get("start_time", ""), "captions": []})
        clip["captions"].append(caption.strip())
    samples, missing = [], []
    for youtube_id, clip in clips.items():
        names = [f"{youtube_id}.wav", f"Y{youtube_id}.wav", f"{youtube_id}_{clip['start']}.wav"]
        media = next((root / n for n in names if (root / n).is_file()), root / names[0])
        sample = Sample(_safe_id(youtube_id), clip["captions"][0], clip["captions"], media, Modality.AUDIO)
        _keep(samples, missing, sample)
    return DataSet(path, "audiocaps", samples, missing)


@_format("msrvtt")
def _msrvtt(path: Path, *, root: Path | None, split: str | None, **_: Any) -> DataSet:
    content = _json(path)
    videos, sentences = _list(content, "videos", str(path)), _list(content, "sentences", str(path))
    splits = {v.get("split") for v in videos if isinstance(v, dict)}
    wanted = split or ("test" if "test" in splits else None)
    captions: dict[str, list[str]] = {}
    for index, sentence in enumerate(sentences):
        where = f"{path}: sentences[{index}]"
        captions.setdefault(_string(sentence, "video_id", where), []).append(_string(sentence, "caption", where))
    root = root or (path.parent / "videos" if (path.parent / "videos").is_dir() else path.parent)
    samples, missing = [], []
    for index, video in enumerate(videos):
        video_id = _string(video, "video_id", f"{path}: videos[{index}]")
        if (wanted is not None and video.get("split") != wanted) or video_id not in captions:
            continue
        refs = [c.strip() for c in captions[video_id]]
        _keep(samples, missing, Sample(_safe_id(video_id), refs[0], refs, root / f"{video_id}.mp4", Modality.VIDEO))
    return DataSet(path, "msrvtt", samples, missing)


@_format("vqav2")
def _vqav2(path: Path, *, root: Path | None, annotations: str | os.PathLike | None, **_: Any) -> DataSet:
    content = _json(path)
    questions = _list(content, "questions", str(path))
    if annotations is None:
        raise DatasetError(f"{path}: VQAv2 questions need their annotations file (--annotations) for the answers")
    annotation_path = Path(annotations).expanduser()
    if not annotation_path.is_file():
        raise DatasetError(f"VQAv2 annotations {annotation_path}: no such file")
    answers: dict[int, list[str]] = {}
    for index, record in enumerate(_list(_json(annotation_path), "annotations", str(annotation_path))):
        where = f"{annotation_path}: annotations[{index}]"
        given = [_string(a, "answer", f"{where}.answers") for a in _list(record, "answers", where)]
        answers[record.get("question_id")] = given
    subtype = content.get("data_subtype")
    root = root or path.parent
    samples, missing = [], []
    for index, record in enumerate(questions):
        where = f"{path}: questions[{index}]"
        question = _string(record, "question", where)
        question_id, image_id = record.get("question_id"), record.get("image_id")
        if question_id not in answers:
            raise DatasetError(f"{where}: question_id {question_id!r} has no entry in {annotation_path}")
        if not isinstance(image_id, int):
            raise DatasetError(f"{where}.image_id: expected an integer, got {image_id!r}")
        names = ([f"COCO_{subtype}_{image_id:012d}.jpg"] if subtype else []) + [
            f"{image_id:012d}.jpg",
            f"{image_id}.jpg",
        ]
        media = next((root / n for n in names if (root / n).is_file()), root / names[0])
        sample = Sample(_safe_id(question_id), question, answers[question_id], media, Modality.IMAGE, question)
        _keep(samples, missing, sample)
    return DataSet(path, "vqav2", samples, missing)


def _nextgpt_pairs(modality: Modality, name_key: str, format_name: str) -> Reader:
    def read(path: Path, *, root: Path | None, **_: Any) -> DataSet:
        root = root or _nextgpt_root(path, modality)
        samples, missing = [], []
        for index, record in enumerate(_records(path)):
            where = f"{path}: [{index}]"
            name, caption = _string(record, name_key, where), _string(record, "caption", where).strip()
            sample = Sample(_safe_id(Path(name).stem), caption, [caption], root / name, modality)
            _keep(samples, missing, sample)
        return DataSet(path, format_name, samples, missing)

    return read


FORMATS["nextgpt-cc3m"] = _nextgpt_pairs(Modality.IMAGE, "image_name", "nextgpt-cc3m")
FORMATS["nextgpt-webvid"] = _nextgpt_pairs(Modality.VIDEO, "video_name", "nextgpt-webvid")
FORMATS["nextgpt-audiocap"] = _nextgpt_pairs(Modality.AUDIO, "audio_name", "nextgpt-audiocap")


@_format("nextgpt-comprehension")
def _nextgpt_comprehension(path: Path, *, root: Path | None, **_: Any) -> DataSet:
    samples, missing = [], []
    for index, record in enumerate(_records(path)):
        where = f"{path}: [{index}]"
        modality = _one_modality(record, "input_", where)
        name = _string(record, f"input_{modality.value}", where)
        human, gpt = _exchange(record, where)
        question = human.replace(f"<{modality.value}>", "").strip()
        caption = gpt.strip()
        media = (root or _nextgpt_root(path, modality)) / name
        sample = Sample(_safe_id(Path(name).stem), caption, [caption], media, modality, question or None)
        _keep(samples, missing, sample)
    return DataSet(path, "nextgpt-comprehension", samples, missing)


@_format("nextgpt-generation")
def _nextgpt_generation(path: Path, *, root: Path | None, **_: Any) -> DataSet:
    samples, missing = [], []
    for index, record in enumerate(_records(path)):
        where = f"{path}: [{index}]"
        modality = _one_modality(record, "output_", where)
        name = _string(record, f"output_{modality.value}", where)
        caption = _string(record, f"{modality.value}_captions", where).strip()
        human, _ = _exchange(record, where)
        media = (root or _nextgpt_root(path, modality)) / name
        _keep(samples, missing, Sample(_safe_id(Path(name).stem), caption, [caption], media, modality, human.strip()))
    return DataSet(path, "nextgpt-generation", samples, missing)


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------


def _keep(samples: list[Sample], missing: list[str], sample: Sample) -> None:
    if sample.media is not None and not sample.media.is_file():
        missing.append(sample.id)
    else:
        samples.append(sample)


def _nextgpt_root(path: Path, modality: Modality) -> Path:
    folder = path.parent / _MEDIA_FOLDERS[modality]
    return folder if folder.is_dir() else path.parent


def _one_modality(record: dict[str, Any], prefix: str, where: str) -> Modality:
    found = [m for m in _MEDIA_FOLDERS if f"{prefix}{m.value}" in record]
    if len(found) != 1:
        raise DatasetError(f"{where}: expected one of {', '.join(prefix + m.value for m in _MEDIA_FOLDERS)}")
    return found[0]


def _exchange(record: dict[str, Any], where: str) -> tuple[str, str]:
    """The first human turn and the first gpt turn of a NExT-GPT conversation."""
    turns = _list(record, "conversations", where)
    human = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
    gpt = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if not isinstance(human, str) or not isinstance(gpt, str):
        raise DatasetError(f"{where}.conversations: expected a human turn and a gpt turn with string values")
    return human, gpt


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: cannot read JSON: {err}") from None


def _records(path: Path) -> list[dict[str, Any]]:
    content = _json(path)
    if not isinstance(content, list) or not all(isinstance(r, dict) for r in content):
        raise DatasetError(f"{path}: expected a list of records (JSON objects)")
    return content


def _csv_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"{path}: cannot read CSV: {err}") from None


def _string(record: Any, key: str, where: str) -> str:
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, str) or not value.strip():
        found = "nothing" if value is None else repr(value)[:60]
        raise DatasetError(f"{where}.{key}: expected a non-empty string, got {found}")
    return value


def _list(record: Any, key: str, where: str) -> list[Any]:
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, list):
        raise DatasetError(f"{where}.{key}: expected a list, got {type(value).__name__}")
    return value


def _safe_id(value: Any) -> str:
    return str(value).translate(_SAFE)
