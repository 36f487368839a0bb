"""Write the toy world as a training dataset, in the formats :mod:`training.data.readers` reads.

.. code-block:: text

    root/
    ├── toyworld_dataset.json                 # marker, written last: seed, sizes, counts
    ├── T_X_pair_data/                        # caption pairs (stages 1 and 2)
    │   ├── cc3m/      cc3m.json      images/00000.png ...
    │   ├── webvid/    webvid.json    videos/00000.mp4 ...
    │   └── audiocap/  audiocap.json  audios/00000.wav ...
    ├── IT_data/                              # instruction data (stage 3)
    │   ├── MosIT_data/toyworld.json          # generation, captioning, mixed and multi-turn conversations (mosit)
    │   └── T+X-T_data/alpaca/toyworld_chat.json   # plain text chat about the world (alpaca)
    └── text/corpus.jsonl                     # every conversation as template text, media replaced by captions
                                              # (the language model's pretraining corpus)

Generation replies name what they show before showing it ("Here is a red circle." then the image), so the signal
tokens follow the words that describe them. Everything is a function of the seed and the sizes.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from anygpt.base.media import save_audio, save_image, save_video
from anygpt.base.modality import Modality
from anygpt.base.utils import atomic_directory, write_text_atomic
from anygpt.core.conversation import get_template
from toyworld import world

logger = logging.getLogger(__name__)

__all__ = ["MARKER_FILE", "WorldSizes", "read_corpus", "write_world"]

MARKER_FILE = "toyworld_dataset.json"
_PAIRS = "T_X_pair_data"
_FOLDERS = {Modality.IMAGE: ("cc3m", "images", "png"), Modality.VIDEO: ("webvid", "videos", "mp4"),
            Modality.AUDIO: ("audiocap", "audios", "wav")}  # fmt: skip
_TAG = {Modality.IMAGE: "Image", Modality.VIDEO: "Video", Modality.AUDIO: "Audio"}
# How many items a generation request asks for, drawn uniformly from this: a third ask for all three modalities.
# Trained on world.draw_request's own mix (one in six), the model's routing misses were three-item requests with
# one item dropped (and each dropped image or video also counts against that medium's figures).
_REQUEST_SIZES = (1, 2, 3)
_CASUAL_SIZES = (1, 2, 2, 3, 3)  # casual requests lean to several items: their colours are the ones mixed up


@dataclass
class WorldSizes:
    """How many media files and conversations to write."""

    images: int = 3072
    videos: int = 2048
    audios: int = 768
    generation: int = 3000
    captioning: int = 1500
    multi_turn: int = 600
    chat: int = 600
    follow_up: int = 900  # two turns: the second changes an attribute ("now make it blue") or asks for another medium
    media_to_media: int = 900  # an image or clip in, an image or clip out ("make this move left")
    out_of_world: int = 450  # requests for what the world lacks, answered honestly
    casual: float = 0.65  # the share of generation requests typed casually (world.casual)
    # the share of casual generation requests of 2-3 items also typed in capitals or Title Case: the hardest case for
    # a small vocabulary (an upper-case colour is spelt in pieces), where a later item took an earlier one's colour
    shout: float = 0.3
    varied: float = 0.67  # the share of media files rendered another way (world.vary, the training settings)

    @classmethod
    def quick(cls) -> WorldSizes:
        return cls(images=24, videos=16, audios=12, generation=40, captioning=24, multi_turn=12, chat=16,
                   follow_up=9, media_to_media=9, out_of_world=6)  # fmt: skip


def _chat_pairs() -> list[tuple[str, str]]:
    """Plain text questions and answers about the world (no media)."""
    colours, shapes = list(world.COLOURS), list(world.SHAPES)
    pitches, directions = list(world.PITCHES), list(world.DIRECTIONS)
    corners = {"circle": "no corners", "square": "four corners", "triangle": "three corners"}
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    order = {p: i for i, p in enumerate(pitches)}
    pairs = [
        ("hello", "Hello! I can draw shapes, play tones and make videos of moving squares."),
        ("hi", "Hi! Ask me to draw a shape, play a tone or make a video."),
        ("what can you do?", "I can draw shapes, play tones and make videos of moving squares."),
        ("what colours do you know?", "I know red, green, blue and yellow."),
        ("what shapes can you draw?", "I can draw a circle, a square and a triangle."),
        ("what tones can you play?", "I can play a low, a mid and a high tone, steady or as a beep."),
        ("which ways can a square move?", "A square can move left, right, up or down."),
        ("thank you", "You are welcome."),
        ("thanks!", "You are welcome."),
    ]
    for shape in shapes:
        pairs.append((f"how many corners does a {shape} have?", f"A {shape} has {corners[shape]}."))
        round_ = "Yes, a circle is round." if shape == "circle" else f"No, a {shape} is not round."
        pairs.append((f"is a {shape} round?", round_))
    for colour in colours:
        pairs.append((f"is {colour} a colour?", f"Yes, {colour} is a colour."))
        pairs.append((f"what colour is a {colour} circle?", f"It is {colour}."))
    for a in pitches:
        for b in pitches:
            if a != b:
                high = a if order[a] > order[b] else b
                pairs.append((f"which is higher, a {a} tone or a {b} tone?", f"A {high} tone is higher."))
    for d in directions:
        pairs.append((f"what is the opposite of {d}?", f"The opposite of {d} is {opposite[d]}."))
        pairs.append((f"where does a square moving {d} go?", f"It goes {d}."))
    return pairs


class _Library:
    """The written media, by caption: a conversation about "a red circle" uses one of the red-circle files."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.by_caption: dict[str, list[str]] = {}
        self.items: dict[Modality, list[tuple[str, Any]]] = {m: [] for m in _FOLDERS}

    def add(self, modality: Modality, name: str, item: Any) -> None:
        self.items[modality].append((name, item))
        self.by_caption.setdefault(item.caption, []).append(name)

    def name_for(self, item: Any) -> str:
        names = self.by_caption[item.caption]
        return names[int(self.rng.integers(len(names)))]

    def random(self, modality: Modality) -> tuple[str, Any]:
        items = self.items[modality]
        return items[int(self.rng.integers(len(items)))]


def _plan_media(rng: np.random.Generator, sizes: WorldSizes) -> dict[Modality, list[Any]]:
    """Media items, cycling through every caption so each appears about equally often; ``sizes.varied`` of them
    rendered another way (:func:`world.vary`)."""
    counts = {Modality.IMAGE: sizes.images, Modality.VIDEO: sizes.videos, Modality.AUDIO: sizes.audios}
    combos = {
        Modality.IMAGE: [{"colour": c, "shape": s} for c in world.COLOURS for s in world.SHAPES],
        Modality.VIDEO: [{"colour": c, "direction": d} for c in world.COLOURS for d in world.DIRECTIONS],
        Modality.AUDIO: [{"pitch": p, "style": s} for p in world.PITCHES for s in world.STYLES],
    }
    plan = {}
    for modality, n in counts.items():
        order = rng.permutation(len(combos[modality]))
        plan[modality] = [
            replace(world.draw_item(rng, modality), **combos[modality][order[i % len(order)]]) for i in range(n)
        ]
        plan[modality] = [world.vary(item, rng) if rng.random() < sizes.varied else item for item in plan[modality]]
    return plan


def _write_media(root: Path, plan: dict[Modality, list[Any]], library: _Library) -> dict[Modality, list[dict]]:
    records: dict[Modality, list[dict]] = {}
    jobs = []
    for modality, items in plan.items():
        folder, media, ext = _FOLDERS[modality]
        records[modality] = []
        for i, item in enumerate(items):
            name = f"{i:05d}.{ext}"
            path = root / _PAIRS / folder / media / name
            jobs.append((modality, item, path))
            library.add(modality, f"{folder}/{media}/{name}", item)
            key = {Modality.IMAGE: "image_name", Modality.VIDEO: "video_name", Modality.AUDIO: "audio_name"}[modality]
            records[modality].append({"caption": item.caption, key: name, "id": i})

    def write(job) -> None:
        modality, item, path = job
        rendered = item.render()
        if modality is Modality.IMAGE:
            save_image(rendered, path)
        elif modality is Modality.VIDEO:
            save_video(rendered, path)
        else:
            save_audio(rendered, path)

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        list(tqdm(pool.map(write, jobs), total=len(jobs), desc="toy world media", unit="file"))
    return records


def _mosit(turns: list[tuple[str, str]], used: dict[Modality, dict[str, Any]]) -> dict:
    record: dict[str, Any] = {}
    for modality, entries in used.items():
        if entries:
            record[f"{modality.value}_list"] = [
                {f"{modality.value}_name": name, "caption": item.caption} for name, item in entries.items()
            ]
    record["conversation"] = [{"from": who, "value": text} for who, text in turns]
    return record


def _generation_turns(
    rng, library: _Library, used, count: int | None = None, casual: float = 0.0, shout: float = 0.0
) -> list[tuple[str, str]]:
    """A request for 1-3 items answered. A casual one (share ``casual``) has 2-3 items four times in five, and such a
    request is typed in capitals or Title Case (share ``shout``) beyond what :func:`world.casual` draws."""
    if rng.random() >= casual:
        request = world.draw_request(rng, count or int(rng.choice(_REQUEST_SIZES)))
        return _answer(request.prompt, request.reply(), library, used)
    request = world.draw_casual_request(rng, count or int(rng.choice(_CASUAL_SIZES)))
    prompt = request.prompt
    if len(request.items) > 1 and rng.random() < shout:
        prompt = prompt.upper() if rng.random() < 0.5 else " ".join(w[:1].upper() + w[1:] for w in prompt.split(" "))
    return _answer(prompt, request.reply(), library, used)


def _answer(prompt: str, reply: list[tuple[str, Any]], library: _Library, used) -> list[tuple[str, str]]:
    """The turns of a request answered with ``reply``'s words, each followed by a library file of its item."""
    parts = []
    for text, item in reply:
        name = library.name_for(item)
        used[item.modality][name] = item
        parts.append(f"{text} <{_TAG[item.modality]}>{name}</{_TAG[item.modality]}>")
    return [("human", prompt), ("gpt", " ".join(parts))]


def _follow_up_turns(rng, library: _Library, used, casual: float) -> list[tuple[str, str]]:
    """A generation turn, then a second one: the last item changed ("now make it blue", two in three) or a request
    for another medium."""
    first = world.draw_casual_request(rng) if rng.random() < casual else world.draw_request(rng)
    turns = _answer(first.prompt, first.reply(), library, used)
    if rng.random() < 2 / 3:
        second = world.draw_follow_up(rng, first.items[-1])
    else:
        others = [m for m in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO) if m not in first.modalities]
        modality = others[int(rng.integers(len(others)))] if others else Modality.IMAGE
        item = world.draw_item(rng, modality)
        words = world.GENERATE[modality][int(rng.integers(len(world.GENERATE[modality])))].format(item.caption)
        second = world.Request(world.casual(rng, words) if rng.random() < casual else words, (item,))
    return turns + _answer(second.prompt, second.reply(), library, used)


def _media_turns(rng, library: _Library, used) -> list[tuple[str, str]]:
    """An image or a clip from the library in, another medium (or the same, changed) out."""
    modality = (Modality.IMAGE, Modality.VIDEO)[int(rng.integers(2))]
    name, source = library.random(modality)
    used[modality][name] = source
    request = world.draw_media_request(rng, source)
    tag = _TAG[modality]
    media = f"<{tag}>{name}</{tag}>"
    prompt = f"{media} {request.prompt}" if rng.random() < 0.8 else f"{request.prompt} {media}"
    return _answer(prompt, request.reply(), library, used)


def _captioning_turns(rng, library: _Library, used, modality: Modality | None = None) -> list[tuple[str, str]]:
    if modality is None:
        modality = [Modality.IMAGE, Modality.VIDEO, Modality.AUDIO][int(rng.integers(3))]
    name, item = library.random(modality)
    used[modality][name] = item
    questions = world.ASK_CAPTION[modality]
    question = questions[int(rng.integers(len(questions)))]
    tag = _TAG[modality]
    user = f"<{tag}>{name}</{tag}> {question}" if rng.random() < 0.8 else f"{question} <{tag}>{name}</{tag}>"
    return [("human", user), ("gpt", f"It is {item.caption}.")]


def _conversations(rng: np.random.Generator, library: _Library, sizes: WorldSizes) -> tuple[list[dict], list[dict]]:
    records = []
    for _ in range(sizes.generation):
        used = {m: {} for m in _FOLDERS}
        records.append(_mosit(_generation_turns(rng, library, used, casual=sizes.casual, shout=sizes.shout), used))
    for _ in range(sizes.follow_up):
        used = {m: {} for m in _FOLDERS}
        records.append(_mosit(_follow_up_turns(rng, library, used, sizes.casual), used))
    for _ in range(sizes.media_to_media):
        used = {m: {} for m in _FOLDERS}
        records.append(_mosit(_media_turns(rng, library, used), used))
    for _ in range(sizes.out_of_world):
        records.append(_mosit([("human", world.draw_out_of_world(rng)), ("gpt", world.OUT_OF_WORLD_REPLY)], {}))
    for i in range(sizes.captioning):
        used = {m: {} for m in _FOLDERS}
        modality = [Modality.IMAGE, Modality.VIDEO, Modality.AUDIO][i % 3]
        records.append(_mosit(_captioning_turns(rng, library, used, modality), used))
    chat = _chat_pairs()
    for i in range(sizes.multi_turn):
        used = {m: {} for m in _FOLDERS}
        kind = i % 3
        if kind == 0:  # caption, then generate
            turns = _captioning_turns(rng, library, used) + _generation_turns(rng, library, used)
        elif kind == 1:  # generate, then chat
            question, answer = chat[int(rng.integers(len(chat)))]
            turns = _generation_turns(rng, library, used) + [("human", question), ("gpt", answer)]
        else:  # chat, then generate, then caption
            question, answer = chat[int(rng.integers(len(chat)))]
            turns = [("human", question), ("gpt", answer)] + _generation_turns(rng, library, used, 1)
            turns += _captioning_turns(rng, library, used)
        records.append(_mosit(turns, used))
    alpaca = []
    for i in range(sizes.chat):
        question, answer = chat[i % len(chat)] if i < len(chat) else chat[int(rng.integers(len(chat)))]
        alpaca.append({"instruction": question, "input": "", "output": answer})
    order = rng.permutation(len(records))
    return [records[i] for i in order], alpaca


_MEDIA_TAG = __import__("re").compile(r"<(Image|Video|Audio)>(.*?)</\1>")


def _as_text(turns: list[dict], captions: dict[str, str], template: str) -> str:
    """A conversation in the chat template's layout, each medium replaced by its caption (a user's media first, then
    a newline, as the model lays them out), replies without their media."""
    tpl = get_template(template)
    out = tpl.system + tpl.sep if tpl.system else ""
    for turn in turns:
        text = turn["value"]
        if turn["from"] == "human":
            media = [captions[m.group(2)] for m in _MEDIA_TAG.finditer(text)]
            text = " ".join(_MEDIA_TAG.sub("", text).split())
            body = (". ".join(media) + "\n" + text) if media else text
            out += f"{tpl.user} {body}{tpl.sep}"
        else:
            reply = " ".join(_MEDIA_TAG.sub("", text).split())
            out += f"{tpl.assistant} {reply}{tpl.assistant_end}" + ("</s>" if tpl.end_with_eos else "")
    return out


def write_world(
    root: str | os.PathLike, *, seed: int = 0, sizes: WorldSizes | None = None, template: str = "vicuna_v1"
) -> dict[str, Any]:
    """Write the toy world's dataset to ``root`` (a new or empty folder; a finished one is kept as it is).

    Returns:
        the marker's content (seed, sizes, counts).
    """
    root = Path(root)
    sizes = sizes or WorldSizes()
    marker = root / MARKER_FILE
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("seed") != seed or info.get("sizes") != vars(sizes) or info.get("template") != template:
            raise ValueError(
                f"{root} holds a toy world dataset of seed {info.get('seed')} and sizes {info.get('sizes')}, not "
                f"seed {seed} and sizes {vars(sizes)}; choose a new or empty folder"
            )
        logger.info("toy world dataset already written in %s", root)
        return info
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root}: not empty and holds no {MARKER_FILE}; choose a new or empty folder")
    with atomic_directory(root) as tmp:  # all or nothing: an interrupted run leaves no half dataset
        return _write_world(tmp, seed, sizes, template)


def _write_world(root: Path, seed: int, sizes: WorldSizes, template: str) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 7])
    library = _Library(np.random.default_rng([seed, 8]))
    plan = _plan_media(rng, sizes)
    pairs = _write_media(root, plan, library)
    for modality, records in pairs.items():
        folder = _FOLDERS[modality][0]
        _dump(root / _PAIRS / folder / f"{folder}.json", records)
    mosit, alpaca = _conversations(rng, library, sizes)
    _dump(root / "IT_data" / "MosIT_data" / "toyworld.json", mosit)
    _dump(root / "IT_data" / "T+X-T_data" / "alpaca" / "toyworld_chat.json", alpaca)

    captions = {name: item.caption for items in library.items.values() for name, item in items}
    corpus = [_as_text(r["conversation"], captions, template) for r in mosit]
    corpus += [_as_text([{"from": "human", "value": a["instruction"]}, {"from": "gpt", "value": a["output"]}],
                        captions, template) for a in alpaca]  # fmt: skip
    for modality, items in library.items.items():  # the stage-1 task: media in, bare caption out
        questions = world.ASK_CAPTION[modality]
        for i, (name, item) in enumerate(items):
            tag = _TAG[modality]
            turns = [{"from": "human", "value": f"<{tag}>{name}</{tag}> {questions[i % len(questions)]}"},
                     {"from": "gpt", "value": item.caption}]  # fmt: skip
            corpus.append(_as_text(turns, captions, template))
    (root / "text").mkdir(parents=True, exist_ok=True)
    with open(root / "text" / "corpus.jsonl", "w") as f:
        for text in corpus:
            f.write(json.dumps({"text": text}) + "\n")
    info = {
        "kind": "anygpt-toyworld-dataset",
        "seed": seed,
        "sizes": vars(sizes),
        "counts": {"mosit": len(mosit), "chat": len(alpaca), "corpus": len(corpus)},
        "template": template,
    }
    _dump(root / MARKER_FILE, info)
    return info


def read_corpus(root: str | os.PathLike) -> list[str]:
    """The language-model corpus written by :func:`write_world`."""
    path = Path(root) / "text" / "corpus.jsonl"
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _dump(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=1) + "\n")  # makes the folder
