"""A small synthetic dataset in every format :mod:`training.data.readers` reads, made by the project itself.

:func:`write_sample_dataset` renders simple media with :mod:`toyworld.render` (a coloured shape on white, a sine tone,
a square moving across the frame), writes them with :mod:`anygpt.base.media`'s writers (PNG, WAV, H.264 MP4), and
writes JSON files laid out like NExT-GPT's ``data/`` folder:

.. code-block:: text

    root/
    ├── anygpt_sample_dataset.json          # marker, written last: what made the folder, seed, size, stage entries
    ├── T_X_pair_data/
    │   ├── cc3m/      cc3m.json, cc3m_comprehension.json, cc3m_generation.json, images/00000.png ...
    │   ├── webvid/    webvid.json, webvid_comprehension.json, webvid_generation.json, videos/00000.mp4 ...
    │   └── audiocap/  audiocap.json, audiocap_comprehension.json, audiocap_generation.json, audios/00000.wav ...
    └── IT_data/
        ├── T-T+X_data/  image_t2x.json, video_t2x.json, audio_t2x.json   (T2M, outputs are the pair media)
        ├── MosIT_data/  mosit.json                                       (media named relative to T_X_pair_data/)
        └── T+X-T_data/  alpaca/alpaca.json, llava/llava.json             (LLaVA images are the CC3M-style ones)

No caption-embedding files are written (their size depends on the decoder; training computes them), and no JSON file
names any. Everything is a function of ``seed`` and ``size``: the same arguments give byte-identical JSON and PNG
files.

Example:
    >>> from toyworld.sample import write_sample_dataset
    >>> stages = write_sample_dataset("/tmp/anygpt-sample")  # doctest: +SKIP
    >>> stages[1][0]["path"], stages[1][0]["media_root"]  # doctest: +SKIP
    ('T_X_pair_data/cc3m/cc3m.json', 'T_X_pair_data/cc3m/images')
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from anygpt.base.media import Audio, Video, save_audio, save_image, save_video
from anygpt.base.utils import atomic_directory, write_text_atomic
from toyworld.render import COLOURS, DIRECTIONS, SAMPLE_RATE, SHAPES, render_motion, render_shape, render_tone

logger = logging.getLogger(__name__)

__all__ = ["MARKER_FILE", "PITCHES", "write_sample_dataset"]

MARKER_FILE = "anygpt_sample_dataset.json"
_MARKER_KIND = "anygpt-sample-dataset"
_VERSION = 1

PITCHES: dict[str, float] = {"low": 262.0, "middle": 523.0, "high": 1047.0}  # the sample dataset's own words
VIDEO_FPS = 8.0

_PAIRS = "T_X_pair_data"
_IT = "IT_data"
_OWNED = (_PAIRS, _IT)  # the top-level folders the dataset consists of (besides its marker)


# ------------------------------------------------------------------------------------------------------------
# Media
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One media item of the sample dataset."""

    name: str  # file name in its folder
    caption: str
    attributes: dict[str, Any]


def _plan(seed: int, size: int) -> dict[str, list[_Item]]:
    """Pick the ``size`` images, audio clips and videos (cycling through every combination in a seeded order)."""
    rng = np.random.default_rng(seed)
    images, audios, videos = [], [], []
    image_combos = list(product(SHAPES, COLOURS))
    audio_combos = list(product(PITCHES, (False, True)))
    video_combos = list(product(COLOURS, DIRECTIONS))
    image_order, audio_order, video_order = (
        rng.permutation(len(combos)) for combos in (image_combos, audio_combos, video_combos)
    )
    for i in range(size):
        shape, colour = image_combos[image_order[i % len(image_combos)]]
        radius = float(rng.integers(14, 23))
        centre = (float(32 + rng.integers(-6, 7)), float(32 + rng.integers(-6, 7)))
        attributes = {"shape": shape, "colour": colour, "radius": radius, "centre": centre}
        images.append(_Item(f"{i:05d}.png", f"a {colour} {shape}", attributes))

        pitch, pulsed = audio_combos[audio_order[i % len(audio_combos)]]
        caption = f"a pulsing {pitch} beep" if pulsed else f"a {pitch} beep"
        audios.append(_Item(f"{i:05d}.wav", caption, {"pitch": pitch, "pulsed": pulsed}))

        colour, direction = video_combos[video_order[i % len(video_combos)]]
        offset = int(rng.integers(-12, 13))
        attributes = {"colour": colour, "direction": direction, "offset": offset}
        videos.append(_Item(f"{i:05d}.mp4", f"a {colour} square moving {direction}", attributes))
    return {"image": images, "audio": audios, "video": videos}


def _write_media(root: Path, plan: dict[str, list[_Item]]) -> None:
    pairs = root / _PAIRS
    for item in plan["image"]:
        a = item.attributes
        pixels = render_shape(a["shape"], COLOURS[a["colour"]], radius=a["radius"], centre=a["centre"])
        save_image(pixels, pairs / "cc3m" / "images" / item.name)
    for item in plan["audio"]:
        a = item.attributes
        waveform = render_tone(PITCHES[a["pitch"]], pulsed=a["pulsed"])
        save_audio(Audio(waveform, SAMPLE_RATE), pairs / "audiocap" / "audios" / item.name)

    def video(item: _Item) -> None:
        a = item.attributes
        frames = render_motion(COLOURS[a["colour"]], a["direction"], offset=a["offset"])
        save_video(Video(frames, VIDEO_FPS), pairs / "webvid" / "videos" / item.name)

    # Each video is one ffmpeg process: run a few at once.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(video, plan["video"]))


# ------------------------------------------------------------------------------------------------------------
# JSON files
# ------------------------------------------------------------------------------------------------------------

_NOUN = {"image": "image", "video": "video", "audio": "audio clip"}
_ARTICLE_NOUN = {"image": "an image", "video": "a video", "audio": "an audio clip"}
_ASK_COMPREHENSION = (
    "Describe the {}.",
    "What is in this {}?",
    "Give a short caption for the {}.",
    "Summarise the {}.",
)
_ASK_GENERATION = {
    "image": ("Draw {}.", "Show me a picture of {}.", "Make an image of {}."),
    "video": ("Make a short video of {}.", "Show me a clip of {}.", "Animate {}."),
    "audio": ("Play {}.", "Let me hear {}.", "Make a sound: {}."),
}
_ANSWER_GENERATION = ("Here it is.", "Sure.", "Here you go:", "Of course.")
_PAIR_KEYS = {  # modality: (folder, media folder, name key)
    "image": ("cc3m", "images", "image_name"),
    "video": ("webvid", "videos", "video_name"),
    "audio": ("audiocap", "audios", "audio_name"),
}


def _pair_files(plan: dict[str, list[_Item]]) -> dict[str, list[dict]]:
    """``{relative path: records}`` for the pair, comprehension and generation files."""
    files: dict[str, list[dict]] = {}
    for modality, (folder, _, _) in _PAIR_KEYS.items():
        items = plan[modality]
        placeholder = f"<{modality}>"
        if modality == "image":
            pairs = [{"caption": it.caption, "id": f"{i:09d}", "image_name": it.name} for i, it in enumerate(items)]
        elif modality == "video":
            pairs = [{"caption": it.caption, "id": 1000 + i, "video_name": it.name} for i, it in enumerate(items)]
        else:
            pairs = [{"audio_id": 1000 + i, "audio_name": it.name, "caption": it.caption} for i, it in enumerate(items)]
        asks = _ASK_GENERATION[modality]
        files[f"{_PAIRS}/{folder}/{folder}.json"] = pairs
        files[f"{_PAIRS}/{folder}/{folder}_comprehension.json"] = [
            {
                f"input_{modality}": it.name,
                "conversations": [
                    {"from": "human", "value": f"{placeholder}\n" + _ASK_COMPREHENSION[i % 4].format(_NOUN[modality])},
                    {"from": "gpt", "value": it.caption},
                ],
            }
            for i, it in enumerate(items)
        ]
        files[f"{_PAIRS}/{folder}/{folder}_generation.json"] = [
            {
                f"output_{modality}": it.name,
                f"{modality}_captions": it.caption,
                "conversations": [
                    {"from": "human", "value": asks[i % len(asks)].format(it.caption)},
                    {"from": "gpt", "value": f"{_ANSWER_GENERATION[i % 4]} {placeholder}"},
                ],
            }
            for i, it in enumerate(items)
        ]
    return files


def _t2m_files(plan: dict[str, list[_Item]]) -> dict[str, list[dict]]:
    """T2M files as NExT-GPT's ``*_t2x.json``: no placeholder in the answer (readers append it)."""
    files = {}
    for modality in ("image", "video", "audio"):
        asks = _ASK_GENERATION[modality]
        files[f"{_IT}/T-T+X_data/{modality}_t2x.json"] = [
            {
                "mm_name": it.name,
                "output_modality": modality,
                "conversation": [
                    {"from": "human", "value": asks[(i + 1) % len(asks)].format(it.caption), "input_modality": "text"},
                    {
                        "from": "gpt",
                        "value": f"Here is {_ARTICLE_NOUN[modality]} of {it.caption}.",
                        "caption": it.caption,
                        "output_modality": modality,
                    },
                ],
            }
            for i, it in enumerate(plan[modality])
        ]
    return files


def _mosit_records(plan: dict[str, list[_Item]]) -> list[dict]:
    """MosIT raw records: media tags ``<Image>name</Image>`` in the text, names relative to ``T_X_pair_data``."""
    records = []
    n = len(plan["image"])
    for i in range(n):
        image, other_image = plan["image"][i], plan["image"][(i + 1) % n]
        audio, video = plan["audio"][i], plan["video"][i]
        img, img2 = f"cc3m/images/{image.name}", f"cc3m/images/{other_image.name}"
        aud, vid = f"audiocap/audios/{audio.name}", f"webvid/videos/{video.name}"
        kind = i % 3
        if kind == 0:  # image in, video out
            conversation = [
                ("human", f"I drew this. <Image>{img}</Image> What do you see?"),
                ("gpt", f"I see {image.caption}."),
                ("human", f"Now make a video of {video.caption}."),
                ("gpt", f"Here is the video. <Video>{vid}</Video>"),
            ]
            used = {"image": [(img, image)], "video": [(vid, video)], "audio": []}
        elif kind == 1:  # audio in, image out
            conversation = [
                ("human", f"Listen to this. <Audio>{aud}</Audio> What is it?"),
                ("gpt", f"It is {audio.caption}. Here is a picture to go with it: <Image>{img2}</Image>"),
            ]
            used = {"image": [(img2, other_image)], "video": [], "audio": [(aud, audio)]}
        else:  # text in, image and audio out, then a text-only exchange
            conversation = [
                ("human", f"Show me {image.caption} and play {audio.caption}."),
                ("gpt", f"Here they are. <Image>{img}</Image> <Audio>{aud}</Audio>"),
                ("human", "Thanks! What colour was the shape?"),
                ("gpt", f"It was {image.attributes['colour']}."),
            ]
            used = {"image": [(img, image)], "video": [], "audio": [(aud, audio)]}
        records.append(
            {
                **{
                    f"{m}_list": [
                        {f"{m}_name": name, "data_source": "anygpt-sample", "caption": item.caption}
                        for name, item in used[m]
                    ]
                    for m in ("image", "video", "audio")
                },
                "conversation": [{"from": who, "value": value} for who, value in conversation],
            }
        )
    return records


def _alpaca_records(size: int) -> list[dict]:
    corners = {"circle": "no corners", "square": "four corners", "triangle": "three corners"}
    records = []
    for i in range(size):
        kind = i % 3
        if kind == 0:
            shape = SHAPES[i // 3 % len(SHAPES)]
            records.append(
                {
                    "instruction": f"How many corners does a {shape} have?",
                    "input": "",
                    "output": f"A {shape} has {corners[shape]}.",
                }
            )
        elif kind == 1:
            name = list(COLOURS)[i // 3 % len(COLOURS)]
            rgb = COLOURS[name]
            records.append(
                {
                    "instruction": "Name the colour these RGB values describe.",
                    "input": f"{rgb[0]}, {rgb[1]}, {rgb[2]}",
                    "output": name.capitalize() + ".",
                }
            )
        else:
            low, high = sorted(list(PITCHES.values())[j] for j in ((i // 3) % 3, (i // 3 + 1) % 3))
            records.append(
                {
                    "instruction": "Which of these two tones is higher?",
                    "input": f"{low:g} Hz or {high:g} Hz",
                    "output": f"{high:g} Hz.",
                }
            )
    return records


def _llava_records(plan: dict[str, list[_Item]]) -> list[dict]:
    records = []
    for i, it in enumerate(plan["image"]):
        question = "What colour is the shape?"
        first = f"<image>\n{question}" if i % 2 == 0 else f"{question}\n<image>"
        records.append(
            {
                "id": f"{i:09d}",
                "image": it.name,
                "conversations": [
                    {"from": "human", "value": first},
                    {"from": "gpt", "value": f"It is {it.attributes['colour']}."},
                    {"from": "human", "value": "And what shape is it?"},
                    {"from": "gpt", "value": f"It is a {it.attributes['shape']}."},
                ],
            }
        )
    return records


def _stages() -> dict[int, list[dict]]:
    """The dataset entries of each stage, paths relative to the dataset root."""

    def pairs() -> list[dict]:
        return [
            {
                "name": folder,
                "path": f"{_PAIRS}/{folder}/{folder}.json",
                "format": folder,
                "media_root": f"{_PAIRS}/{folder}/{media}",
            }
            for folder, media, _ in _PAIR_KEYS.values()
        ]

    stage3: list[dict] = []
    for modality, (folder, media, _) in _PAIR_KEYS.items():
        stage3.append(
            {
                "name": f"{modality}_t2x",
                "path": f"{_IT}/T-T+X_data/{modality}_t2x.json",
                "format": "t2m",
                "media_root": f"{_PAIRS}/{folder}/{media}",
            }
        )
    for kind in ("comprehension", "generation"):
        for folder, media, _ in _PAIR_KEYS.values():
            stage3.append(
                {
                    "name": f"{folder}_{kind}",
                    "path": f"{_PAIRS}/{folder}/{folder}_{kind}.json",
                    "format": f"nextgpt_{kind}",
                    "media_root": f"{_PAIRS}/{folder}/{media}",
                }
            )
    stage3 += [
        {"name": "mosit", "path": f"{_IT}/MosIT_data/mosit.json", "format": "mosit", "media_root": _PAIRS},
        {"name": "alpaca", "path": f"{_IT}/T+X-T_data/alpaca/alpaca.json", "format": "alpaca"},
        {
            "name": "llava",
            "path": f"{_IT}/T+X-T_data/llava/llava.json",
            "format": "llava",
            "media_root": f"{_PAIRS}/cc3m/images",
        },
    ]
    return {1: pairs(), 2: pairs(), 3: stage3}


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------------------


def _replace_owned(root: Path, tmp: Path, tag: str) -> None:
    """Move the new dataset's folders from ``tmp`` into an existing sample dataset, keeping anything else in it.

    A protocol rather than a plain atomic write (the folder keeps its other files): the marker is first rewritten as
    incomplete and replaced by the new (complete) one last, so an interruption in between leaves a folder that says
    it is incomplete (and that a new call may still rewrite).
    """
    old = root.parent / f".{root.name}.old-{tag}"
    old.mkdir()
    try:
        write_text_atomic(root / MARKER_FILE, _dump({"kind": _MARKER_KIND, "version": _VERSION, "complete": False}))
        for name in _OWNED:
            if (root / name).exists():
                os.replace(root / name, old / name)
            os.replace(tmp / name, root / name)
        os.replace(tmp / MARKER_FILE, root / MARKER_FILE)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _is_sample_dataset(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("kind") == _MARKER_KIND


def _write_dataset(folder: Path, seed: int, size: int, stages: dict[int, list[dict]]) -> None:
    """Every file of the dataset into ``folder``, its marker last."""
    plan = _plan(seed, size)
    _write_media(folder, plan)
    files = {**_pair_files(plan), **_t2m_files(plan)}
    files[f"{_IT}/MosIT_data/mosit.json"] = _mosit_records(plan)
    files[f"{_IT}/T+X-T_data/alpaca/alpaca.json"] = _alpaca_records(size)
    files[f"{_IT}/T+X-T_data/llava/llava.json"] = _llava_records(plan)
    for relative, records in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_dump(records), encoding="utf-8")
    marker = {"kind": _MARKER_KIND, "version": _VERSION, "complete": True, "seed": seed, "size": size}
    (folder / MARKER_FILE).write_text(_dump({**marker, "stages": stages}), encoding="utf-8")  # last


def write_sample_dataset(root: str | Path, *, seed: int = 0, size: int = 12) -> dict[int, list[dict]]:
    """Write the synthetic sample dataset into ``root``.

    The dataset is built in a temporary folder beside ``root`` and moved into place when complete (its marker file
    last), so an interrupted write never leaves a folder that looks like a finished dataset. In a ``root`` holding
    a previous sample dataset, its ``T_X_pair_data/``, ``IT_data/`` and marker are replaced and anything else (stage
    configs, training runs, caches) is kept.

    Args:
        root: the folder to write (created with missing parents). It may exist if it is empty or holds a previous
            sample dataset.
        seed: picks the shapes, colours, tones and motions; the same seed gives identical JSON and PNG files.
        size: number of images, of audio clips and of videos (each); records per file follow from it.

    Returns:
        ``{1: [...], 2: [...], 3: [...]}``: per training stage, the dataset entries a stage config needs, as plain
        dicts ``{"name", "path", "format"[, "media_root"]}`` with paths relative to ``root``. Stages 1 and 2: the
        CC3M-, WebVid- and AudioCaps-style pair files. Stage 3: the three T2M files, the three comprehension and
        three generation files, MosIT, Alpaca and LLaVA.

    Raises:
        FileExistsError: when ``root`` is a file, or a non-empty folder that is not a sample dataset.
        ValueError: when ``size`` is below 1.
    """
    if int(size) < 1:
        raise ValueError(f"size must be >= 1, got {size!r}")
    size, seed = int(size), int(seed)
    root = Path(root).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"cannot write the sample dataset to {root}: expected a folder, found a file")
    replacing = root.is_dir() and any(root.iterdir())
    if replacing and not _is_sample_dataset(root):
        raise FileExistsError(
            f"cannot write the sample dataset to {root}: expected an empty folder or a previous sample dataset "
            f"(with {MARKER_FILE}), found a non-empty folder; choose another folder or empty it"
        )
    stages = _stages()
    if replacing:
        tag = uuid.uuid4().hex[:12]
        tmp = root.parent / f".{root.name}.tmp-{tag}"
        try:
            tmp.mkdir()
            _write_dataset(tmp, seed, size, stages)
            _replace_owned(root, tmp, tag)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        with atomic_directory(root) as tmp:
            _write_dataset(tmp, seed, size, stages)
    logger.info("wrote the sample dataset (seed %d, size %d) to %s", seed, size, root)
    return {stage: [dict(entry) for entry in entries] for stage, entries in stages.items()}
