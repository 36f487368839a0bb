"""Evaluate a pipeline on the toy world: generation, routing and captioning, judged by the oracles.

:func:`evaluate` asks a pipeline for held-out requests (``"draw a red circle and play a high beep"``) and held-out
media captions, the way a user would (``modalities="auto"``, greedy decoding), and scores the answers with
:mod:`toyworld.oracles`:

=========================  ==============================================================================
metric                     right when
=========================  ==============================================================================
``text_to_image.colour``   the image rendered for a requested picture shows the requested colour
``text_to_image.shape``    ... and shape (an item whose media was not produced counts as wrong)
``text_to_audio.pitch``    the rendered sound has the requested pitch
``text_to_video.*``        the rendered clip's square moves in the requested direction, in the requested colour
``routing``                the reply's complete signal groups name exactly the requested modalities
``image_to_text.*``        the caption of a held-out image names its colour / shape (and no other)
``audio_to_text.pitch``    the caption of a held-out sound names its pitch
``video_to_text.direction`` the caption of a held-out clip names its direction
=========================  ==============================================================================

The LLM runs once per request through ``AnyGPTPipeline.__call__`` (its decoders skipped with ``on_decode``); the
conditioning of every produced item is then rendered by the decoders in batches, each sample with its own seeded
generator, so a report is reproducible and does not depend on ``batch_size`` beyond floating-point noise.

Example:
    >>> from anygpt import AnyGPTPipeline
    >>> report = evaluate(AnyGPTPipeline.from_pretrained("runs/toyworld"), samples=96)  # doctest: +SKIP
    >>> print(format_report(report))  # doctest: +SKIP
    >>> failures(report)  # doctest: +SKIP
    []
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from anygpt.base.modality import MEDIA_MODALITIES, Modality
from anygpt.base.utils import write_text_atomic
from anygpt.core.conversation import Conversation
from anygpt.core.pipeline import AnyGPTPipeline
from anygpt.core.runtime import RuntimeOptions
from toyworld import world
from toyworld.oracles import audio_attributes, caption_attributes, image_attributes, video_attributes

logger = logging.getLogger(__name__)

__all__ = [
    "DECODER_METRICS",
    "HELDOUT_SEED",
    "METRICS",
    "OPEN_TARGETS",
    "TARGETS",
    "TASKS",
    "CaptionCase",
    "evaluate",
    "evaluate_decoders",
    "failures",
    "format_decoder_report",
    "format_report",
    "merge_reports",
    "split_tasks",
    "heldout_items",
    "heldout_requests",
]

HELDOUT_SEED = 10_000
"""Default seed of the held-out set (training draws from other seeds)."""

TARGETS: dict[str, float] = {
    "text_to_image.colour": 0.90,
    "text_to_image.shape": 0.75,
    "text_to_audio.pitch": 0.90,
    "text_to_video.direction": 0.80,
    "text_to_video.colour": 0.85,
    "routing": 0.95,
    "image_to_text.colour": 0.90,
    "image_to_text.shape": 0.80,
    "audio_to_text.pitch": 0.90,
    "video_to_text.direction": 0.80,
    # the output forced (modalities=[medium]) on a request for that medium: the auto rows' targets
    "forced_image.colour": 0.90,
    "forced_image.shape": 0.75,
    "forced_audio.pitch": 0.90,
    "forced_video.direction": 0.80,
    "forced_video.colour": 0.85,
    "clean_replies": 1.00,
    "casual_phrasing": 0.95,
    "second_turn": 0.95,
    "media_to_media": 0.80,
    # media -> text on renderings training never used (world.vary's held-out settings)
    "heldout_rendering.image_to_text.colour": 0.90,
    "heldout_rendering.image_to_text.shape": 0.80,
    "heldout_rendering.audio_to_text.pitch": 0.90,
    "heldout_rendering.video_to_text.direction": 0.80,
}
"""The quality targets: the fraction of held-out samples each metric must get right."""

OPEN_TARGETS: dict[str, str] = {}
"""Targets an open issue sets that the shipped model does not meet yet, and why. They are measured and shown as below
target, but :func:`failures` (and so ``make eval``) leaves them out until they are met; then they leave this table.
A test checks the shipped model's recorded evaluation against it."""

INFO_METRICS: tuple[str, ...] = (
    "text_to_audio.style", "audio_to_text.style", "video_to_text.colour", "forced_audio.style", "out_of_world",
    "heldout_rendering.audio_to_text.style", "heldout_rendering.video_to_text.colour",
)  # fmt: skip
"""Metrics reported without a target."""

METRICS: tuple[str, ...] = (*TARGETS, *INFO_METRICS)
"""Every metric of a report, in report order."""

# per modality: the attributes scored for generation (text -> media) and for captioning (media -> text)
_GENERATED = {
    Modality.IMAGE: ("text_to_image", ("colour", "shape")),
    Modality.AUDIO: ("text_to_audio", ("pitch", "style")),
    Modality.VIDEO: ("text_to_video", ("direction", "colour")),
}
_CAPTIONED = {
    Modality.IMAGE: ("image_to_text", ("colour", "shape")),
    Modality.AUDIO: ("audio_to_text", ("pitch", "style")),
    Modality.VIDEO: ("video_to_text", ("direction", "colour")),
}
_FORCED = {
    Modality.IMAGE: ("forced_image", ("colour", "shape")),
    Modality.AUDIO: ("forced_audio", ("pitch", "style")),
    Modality.VIDEO: ("forced_video", ("direction", "colour")),
}
_RENDERED_CAPTIONED = {m: (f"heldout_rendering.{task}", attrs) for m, (task, attrs) in _CAPTIONED.items()}
_ORACLES = {Modality.IMAGE: image_attributes, Modality.AUDIO: audio_attributes, Modality.VIDEO: video_attributes}
TASKS: tuple[str, ...] = (
    "generation", "captioning", "forced", "casual", "second_turn", "media_to_media", "out_of_world", "renderings",
)  # fmt: skip
"""What :func:`evaluate` can run: ``generation`` (text -> media, routing), ``captioning`` (media -> text),
``forced`` (a request for one medium with ``modalities=[medium]``), ``casual`` (requests typed as people type),
``second_turn`` ("now make it blue" after the model's own first reply, or a request for another medium),
``media_to_media`` ("make this move left" with an image), ``out_of_world`` ("draw a cat": honest refusal, no media),
``renderings`` (media -> text on held-out renderings). ``clean_replies`` is scored on every generation reply."""
_CLEAN = re.compile(r"([A-Z][^.!?]*[.!?]\s*)+")  # whole sentences
_SENTENCE = re.compile(r"Here is ([a-z ]+)\.")
_MARKERS = ("USER", "ASSISTANT", "</s>", "###", "Human:")
_REQUEST_SIZES = (1, 2, 1, 3, 1, 2)  # cycled: the 1 / 2 / 3-item mix of world.draw_request's default
_MAX_EXAMPLES = 5  # wrong answers kept per task in a report


# ------------------------------------------------------------------------------------------------------------
# The held-out set
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionCase:
    """A held-out media item and the question asked about it."""

    item: world.Item
    question: str
    heldout_rendering: bool = False  # rendered with world.vary's held-out settings (scored as heldout_rendering.*)


def heldout_requests(n: int, seed: int = HELDOUT_SEED) -> list[world.Request]:
    """Held-out generation requests in which every media modality is requested at least ``n`` times.

    Requests of 1, 2 and 3 items are drawn in turn (1, 2, 1, 3, 1, 2, ...) with :func:`world.draw_request` until
    each modality has ``n`` items, so there are at least ``n`` samples per text -> media figure and more than ``n``
    for routing.

    Args:
        n: the least number of items per modality (>= 1).
        seed: the held-out seed; the same seed gives the same requests.

    Returns:
        The requests, in drawing order.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng([seed, 1])
    counts = dict.fromkeys(MEDIA_MODALITIES, 0)
    requests: list[world.Request] = []
    while min(counts.values()) < n:
        request = world.draw_request(rng, count=_REQUEST_SIZES[len(requests) % len(_REQUEST_SIZES)])
        for item in request.items:
            counts[item.modality] += 1
        requests.append(request)
    return requests


def heldout_items(n: int, seed: int = HELDOUT_SEED) -> list[CaptionCase]:
    """``n`` held-out media items per modality (images, then sounds, then clips), each with a caption question.

    Args:
        n: items per modality (>= 1).
        seed: the held-out seed.

    Returns:
        ``3 * n`` cases; the question is one of :data:`world.ASK_CAPTION` for the item's modality.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng([seed, 2])
    cases = []
    for modality in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO):
        for _ in range(n):
            item = world.draw_item(rng, modality)
            questions = world.ASK_CAPTION[modality]
            cases.append(CaptionCase(item, questions[int(rng.integers(len(questions)))]))
    return cases


def heldout_rendered_items(n: int, seed: int = HELDOUT_SEED) -> list[CaptionCase]:
    """As :func:`heldout_items`, each item rendered with :func:`world.vary`'s held-out settings (frame sizes,
    frame counts, frame rates, clip lengths the training never used; other shades, paths and sizes)."""
    rng = np.random.default_rng([seed, 8])
    return [CaptionCase(world.vary(c.item, rng, "heldout"), c.question, True) for c in heldout_items(n, seed)]


def heldout_single_requests(n: int, seed: int = HELDOUT_SEED) -> list[world.Request]:
    """``n`` one-item requests per medium (images, then sounds, then clips), phrased as :func:`world.draw_request`."""
    rng = np.random.default_rng([seed, 3])
    requests = []
    for modality in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO):
        for _ in range(n):
            item = world.draw_item(rng, modality)
            prompt = world.GENERATE[modality][int(rng.integers(len(world.GENERATE[modality])))].format(item.caption)
            requests.append(world.Request(prompt, (item,)))
    return requests


def heldout_casual_requests(n: int, seed: int = HELDOUT_SEED) -> list[world.Request]:
    """``n`` requests of 1, 2 and 3 items typed as people type them (:func:`world.draw_casual_request`)."""
    rng = np.random.default_rng([seed, 4])
    return [world.draw_casual_request(rng, _REQUEST_SIZES[i % len(_REQUEST_SIZES)]) for i in range(n)]


@dataclass(frozen=True)
class TwoTurns:
    """A one-item request, then a second turn about its item (or for another medium)."""

    first: world.Request
    second: world.Request


def heldout_two_turns(n: int, seed: int = HELDOUT_SEED) -> list[TwoTurns]:
    """``n`` two-turn conversations: two in three change an attribute of the first turn's item ("now make it
    blue"), one in three asks for another medium."""
    rng = np.random.default_rng([seed, 5])
    cases = []
    for i in range(n):
        first = world.draw_casual_request(rng, 1) if i % 2 else world.draw_request(rng, 1)
        if i % 3 < 2:
            second = world.draw_follow_up(rng, first.items[0])
        else:
            others = [m for m in MEDIA_MODALITIES if m not in first.modalities]
            modality = others[int(rng.integers(len(others)))]
            item = world.draw_item(rng, modality)
            phrasings = world.GENERATE[modality]
            second = world.Request(phrasings[int(rng.integers(len(phrasings)))].format(item.caption), (item,))
        cases.append(TwoTurns(first, second))
    return cases


def heldout_media_requests(n: int, seed: int = HELDOUT_SEED) -> list[world.MediaRequest]:
    """``n`` media -> media requests (:func:`world.draw_media_request`), half the source items rendered with the
    held-out settings."""
    rng = np.random.default_rng([seed, 6])
    cases = []
    for i in range(n):
        source = world.draw_item(rng, (Modality.IMAGE, Modality.VIDEO)[i % 2])
        request = world.draw_media_request(rng, source)
        if i % 4 >= 2:
            request = world.MediaRequest(world.vary(source, rng, "heldout"), request.prompt, request.items)
        cases.append(request)
    return cases


def heldout_out_of_world(n: int, seed: int = HELDOUT_SEED) -> list[str]:
    """``n`` requests for things the world lacks, from the held-out list (:data:`world.OUT_OF_WORLD`)."""
    rng = np.random.default_rng([seed, 7])
    return [world.draw_out_of_world(rng, "heldout") for _ in range(n)]


# ------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------


class _Tally:
    """Right / total counts per metric and a few wrong answers per task."""

    def __init__(self) -> None:
        self.counts = {name: [0, 0] for name in METRICS}
        self.examples: list[dict[str, Any]] = []
        self._kept: dict[str, int] = {}

    def add(self, name: str, right: bool) -> None:
        self.counts[name][0] += int(right)
        self.counts[name][1] += 1

    def score(
        self, task: str, attributes: Sequence[str], expected: Mapping[str, Any], found: Mapping[str, Any]
    ) -> bool:
        """Score each attribute; True when all are right."""
        rights = [expected[a] == found.get(a) for a in attributes]
        for attribute, right in zip(attributes, rights, strict=True):
            self.add(f"{task}.{attribute}", right)
        return all(rights)

    def example(self, task: str, **details: Any) -> None:
        if self._kept.get(task, 0) < _MAX_EXAMPLES:
            self._kept[task] = self._kept.get(task, 0) + 1
            self.examples.append({"task": task, **details})


def _skip_decoders(modality: Modality, index: int, total: int) -> bool:
    return False  # on_decode: the evaluator renders the conditioning itself, in batches


@torch.no_grad()
def evaluate(
    pipe: Any,
    *,
    samples: int = 96,
    seed: int = HELDOUT_SEED,
    batch_size: int = 16,
    progress: bool = True,
    max_new_tokens: int = 128,
    decoder_settings: Mapping[str, Any] | None = None,
    tasks: Collection[str] = TASKS,
) -> dict[str, Any]:
    """Score a pipeline on held-out toy-world requests and media.

    Args:
        pipe: an ``AnyGPTPipeline`` (any decoders: the oracles read images, clips and sounds of any size).
        samples: at least this many samples per text -> media figure, and exactly this many media per
            captioning figure.
        seed: the held-out seed (also seeds the LLM and every decoder sample).
        batch_size: conditionings rendered per decoder call.
        progress: show a progress bar.
        max_new_tokens: LLM reply length limit.
        decoder_settings: settings passed to every decoder (``num_inference_steps``, ``guidance_scale``,
            ``height``, ``width``, ``num_frames``, ``audio_seconds``); None keeps each decoder's defaults.
        tasks: some of :data:`TASKS` (default all); the metrics of a task left out are None.

    Returns:
        A JSON-safe report: ``{"metrics": {name: {"value", "correct", "total", "target"}}, "meta": {...},
        "examples": [...]}``. ``value`` is the fraction right (None when nothing was scored), ``target`` the
        metric's entry in :data:`TARGETS` (None for informational metrics); ``meta`` holds ``samples``, ``seed``,
        ``seconds`` and the counts of requests and caption items; ``examples`` a few wrong answers per task.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"tasks: expected some of {', '.join(TASKS)}, got {sorted(tasks)}")
    start = time.perf_counter()
    settings = dict(decoder_settings or {})
    requests = heldout_requests(samples, seed) if "generation" in tasks else []
    cases = heldout_items(samples, seed) if "captioning" in tasks else []
    if "renderings" in tasks:
        cases += heldout_rendered_items(samples, seed)
    forced = heldout_single_requests(samples, seed) if "forced" in tasks else []
    casual = heldout_casual_requests(samples, seed) if "casual" in tasks else []
    two_turns = heldout_two_turns(samples, seed) if "second_turn" in tasks else []
    media = heldout_media_requests(samples, seed) if "media_to_media" in tasks else []
    outside = heldout_out_of_world(samples, seed) if "out_of_world" in tasks else []
    tally = _Tally()
    total = len(requests) + len(cases) + len(forced) + len(casual) + len(two_turns) + len(media) + len(outside)
    bar = tqdm(total=total, desc="toy-world eval", unit="step", disable=not progress)
    try:
        queued = _generate(pipe, requests, tally, bar, seed=seed, max_new_tokens=max_new_tokens)
        llm = {"seed": seed, "max_new_tokens": max_new_tokens}
        queued += _generate_forced(pipe, forced, tally, bar, start=len(queued), **llm)
        _ask_casual(pipe, casual, tally, bar, **llm)
        _ask_two_turns(pipe, two_turns, tally, bar, **llm)
        queued += _ask_media(pipe, media, tally, bar, start=len(queued), **llm)
        _ask_outside(pipe, outside, tally, bar, **llm)
        _render(pipe, queued, tally, bar, seed=seed, batch_size=batch_size, settings=settings)
        _caption(pipe, cases, tally, bar, seed=seed, max_new_tokens=max_new_tokens)
    finally:
        bar.close()
    metrics = {}
    for name in METRICS:
        right, total = tally.counts[name]
        metrics[name] = {
            "value": right / total if total else None,
            "correct": right,
            "total": total,
            "target": TARGETS.get(name),
        }
    report = {
        "metrics": metrics,
        "meta": {
            "samples": samples,
            "seed": seed,
            "seconds": round(time.perf_counter() - start, 3),
            "requests": len(requests),
            "caption_items": len(cases),
            "tasks": [t for t in TASKS if t in tasks],
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "decoder_settings": {k: v for k, v in settings.items() if v is not None},
        },
        "examples": tally.examples,
    }
    failed = failures(report, include_open=True)
    scored = [name for name in TARGETS if _was_run(report, name)]  # the targets of the tasks this call ran
    logger.info(
        "toy-world evaluation: %d/%d targets met in %.1f s%s",
        len(scored) - len(failed),
        len(scored),
        report["meta"]["seconds"],
        f" (below target: {', '.join(f'{n} (open)' if n in OPEN_TARGETS else n for n in failed)})" if failed else "",
    )
    return report


DECODER_METRICS: tuple[str, ...] = (
    "image.colour", "image.shape", "audio.pitch", "audio.style", "video.direction", "video.colour",
)  # fmt: skip
"""The metrics of :func:`evaluate_decoders`, ``<modality>.<attribute>``."""


@torch.no_grad()
def evaluate_decoders(
    pipe: Any,
    *,
    samples: int = 96,
    seed: int = HELDOUT_SEED,
    batch_size: int = 16,
    progress: bool = True,
    decoder_settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score each decoder alone: held-out captions encoded by the decoder's own text encoder
    (``Decoder.encode_captions``, what stage 2 trains the output projectors to produce) and rendered, the media
    scored by the same oracles as :func:`evaluate`. This is the ceiling of the text -> media figures: the system
    can only get there when its output projectors reproduce the caption embeddings.

    Args:
        pipe: an ``AnyGPTPipeline``; its LLM is not used.
        samples: held-out items per modality (the media of :func:`heldout_items`, by caption).
        seed: the held-out seed (also seeds every sample's generator).
        batch_size: captions rendered per decoder call.
        progress: show a progress bar.
        decoder_settings: as for :func:`evaluate`.

    Returns:
        ``{"metrics": {"image.colour": {"value", "correct", "total", "target": None}, ...}, "meta": {...}}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    settings = dict(decoder_settings or {})
    cases = [case for case in heldout_items(samples, seed) if case.item.modality in pipe.decoders]
    counts = {name: [0, 0] for name in DECODER_METRICS}
    bar = tqdm(total=len(cases), desc="toy-world decoders", unit="item", disable=not progress)
    try:
        for modality in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO):
            items = [case.item for case in cases if case.item.modality is modality]
            decoder = pipe.decoders.get(modality)
            for begin in range(0, len(items), batch_size):
                batch = items[begin : begin + batch_size]
                embeds = decoder.encode_captions([item.caption for item in batch])
                generators = [torch.Generator(device="cpu").manual_seed(seed + begin + i) for i in range(len(batch))]
                outputs = decoder.generate(embeds, generator=generators, show_progress=False, **settings)
                for item, media in zip(batch, outputs, strict=True):
                    found = _ORACLES[modality](media)
                    for attribute, expected in item.attributes().items():
                        name = f"{modality.value}.{attribute}"
                        counts[name][0] += int(found.get(attribute) == expected)
                        counts[name][1] += 1
                bar.update(len(batch))
    finally:
        bar.close()
    metrics = {
        name: {"value": right / total if total else None, "correct": right, "total": total, "target": None}
        for name, (right, total) in counts.items()
    }
    meta = {"samples": samples, "seed": seed, "seconds": round(time.perf_counter() - start, 3),
            "decoder_settings": {k: v for k, v in settings.items() if v is not None}}  # fmt: skip
    return {"metrics": metrics, "meta": meta}


@dataclass
class _Queued:
    """A requested item whose signal group the LLM emitted: its conditioning waits to be rendered."""

    index: int  # position among all queued items: seeds its decoder sample
    prompt: str
    item: world.Item
    conditioning: torch.Tensor  # (1, L, D), or (1, D) for pooled conditioning
    task: str | None = None  # None: text -> medium (_GENERATED); "forced"; "media_to_media" (one figure, all right)


def _reply(pipe: Any, prompt: str, *, seed: int, max_new_tokens: int, modalities: Any = "auto", **media: Any) -> Any:
    """The pipeline's greedy reply (``modalities="auto"`` unless given), decoders skipped (their conditioning is
    kept)."""
    return pipe(
        prompt,
        **media,
        modalities=modalities,
        seed=seed,
        temperature=0.0,
        max_new_tokens=max_new_tokens,
        show_progress=False,
        on_decode=_skip_decoders,
    )


def _generate(
    pipe: Any, requests: list[world.Request], tally: _Tally, bar: Any, *, seed: int, max_new_tokens: int
) -> list[_Queued]:
    """Run the LLM on every request: score routing and queue the conditioning of each produced item."""
    queued: list[_Queued] = []
    bar.set_postfix_str("requests")
    for i, request in enumerate(requests):
        out = _reply(pipe, request.prompt, seed=seed + i, max_new_tokens=max_new_tokens)
        emitted = {Modality.parse(m) for m in out.conditioning}
        _score_clean(tally, request.prompt, out)
        routed = emitted == request.modalities
        tally.add("routing", routed)
        if not routed:
            tally.example(
                "routing",
                prompt=request.prompt,
                expected=sorted(m.value for m in request.modalities),
                found=sorted(m.value for m in emitted),
                reply=out.text,
            )
        for item in request.items:
            conditioning = out.conditioning.get(item.modality.value)
            if conditioning is None:  # not produced: wrong on every attribute
                task, attributes = _GENERATED[item.modality]
                tally.score(task, attributes, item.attributes(), {})
                tally.example(task, prompt=request.prompt, expected=item.caption, found="(not produced)")
            else:
                queued.append(_Queued(len(queued), request.prompt, item, conditioning[:1].detach()))
        bar.update()
    return queued


def _score_clean(tally: _Tally, prompt: str, out: Any) -> bool:
    """A clean reply: whole sentences only (no fragment such as ", and make a clip"), nothing of the chat template,
    and one "Here is ..." sentence per medium produced (no media without words, no words without media)."""
    text = out.text.strip()
    clean = (
        not any(m in text for m in _MARKERS)
        and (not text or bool(_CLEAN.fullmatch(text)))
        and len(_SENTENCE.findall(text)) == len(out.conditioning)
    )
    tally.add("clean_replies", clean)
    if not clean:
        tally.example("clean_replies", prompt=prompt, reply=out.text)
    return clean


def _words_right(request: world.Request | world.MediaRequest, out: Any) -> bool:
    """The reply produced exactly the requested media, and its sentences name each item's attributes in order."""
    emitted = {Modality.parse(m) for m in out.conditioning}
    said = _SENTENCE.findall(out.text)
    if emitted != {item.modality for item in request.items} or len(said) != len(request.items):
        return False
    return all(
        caption_attributes(words).get(key) == value
        for words, item in zip(said, request.items, strict=True)
        for key, value in item.attributes().items()
    )


def _generate_forced(
    pipe: Any, requests: list[world.Request], tally: _Tally, bar: Any, *, seed: int, max_new_tokens: int, start: int
) -> list[_Queued]:
    """Ask for one medium with that medium forced (``modalities=[medium]``); queue what was produced."""
    queued: list[_Queued] = []
    bar.set_postfix_str("forced")
    for i, request in enumerate(requests):
        (item,) = request.items
        if item.modality not in pipe.decoders:
            bar.update()
            continue
        out = _reply(pipe, request.prompt, seed=seed + i, max_new_tokens=max_new_tokens, modalities=[item.modality])
        _score_clean(tally, request.prompt, out)
        conditioning = out.conditioning.get(item.modality.value)
        if conditioning is None:
            task, attributes = _FORCED[item.modality]
            tally.score(task, attributes, item.attributes(), {})
        else:
            index = start + len(queued)
            queued.append(_Queued(index, request.prompt, item, conditioning[:1].detach(), task="forced"))
        bar.update()
    return queued


def _ask_casual(
    pipe: Any, requests: list[world.Request], tally: _Tally, bar: Any, *, seed: int, max_new_tokens: int
) -> None:
    """Requests typed as people type them: right when the reply makes the requested media and names them right."""
    bar.set_postfix_str("casual")
    for i, request in enumerate(requests):
        out = _reply(pipe, request.prompt, seed=seed + i, max_new_tokens=max_new_tokens)
        _score_clean(tally, request.prompt, out)
        right = _words_right(request, out)
        tally.add("casual_phrasing", right)
        if not right:
            tally.example("casual_phrasing", prompt=request.prompt, expected=request.reply()[0][0], reply=out.text)
        bar.update()


def _ask_two_turns(
    pipe: Any, cases: list[TwoTurns], tally: _Tally, bar: Any, *, seed: int, max_new_tokens: int
) -> None:
    """Two turns in one conversation (the model's own first reply kept): the second reply is scored."""
    bar.set_postfix_str("second turns")
    for i, case in enumerate(cases):
        conversation = Conversation()
        pipe(
            case.first.prompt, conversation=conversation, seed=seed + i, temperature=0.0,
            max_new_tokens=max_new_tokens, show_progress=False, on_decode=_skip_decoders,
        )  # fmt: skip
        out = pipe(
            case.second.prompt, conversation=conversation, seed=seed + i, temperature=0.0,
            max_new_tokens=max_new_tokens, show_progress=False, on_decode=_skip_decoders,
        )  # fmt: skip
        _score_clean(tally, case.second.prompt, out)
        right = _words_right(case.second, out)
        tally.add("second_turn", right)
        if not right:
            first = conversation.turns[1].text if len(conversation.turns) > 1 else ""
            tally.example(
                "second_turn", first=case.first.prompt, first_reply=first, prompt=case.second.prompt,
                expected=case.second.reply()[0][0], reply=out.text,
            )  # fmt: skip
        bar.update()


def _ask_media(
    pipe: Any, cases: list[world.MediaRequest], tally: _Tally, bar: Any, *, seed: int, max_new_tokens: int, start: int
) -> list[_Queued]:
    """An image or clip in, another out: queue the produced item (scored when rendered, all attributes right)."""
    queued: list[_Queued] = []
    readable = {Modality.parse(m) for m in pipe.config.input_modalities}
    bar.set_postfix_str("media -> media")
    for i, case in enumerate(cases):
        (item,) = case.items
        if case.source.modality not in readable or item.modality not in pipe.decoders:
            bar.update()
            continue
        media = {case.source.modality.plural: [world.media_input(case.source)]}
        out = _reply(pipe, case.prompt, seed=seed + i, max_new_tokens=max_new_tokens, **media)
        _score_clean(tally, case.prompt, out)
        emitted = {Modality.parse(m) for m in out.conditioning}
        if emitted != {item.modality}:
            tally.add("media_to_media", False)
            tally.example("media_to_media", prompt=case.prompt, source=case.source.caption, expected=item.caption,
                          reply=out.text)  # fmt: skip
        else:
            conditioning = out.conditioning[item.modality.value][:1].detach()
            queued.append(_Queued(start + len(queued), case.prompt, item, conditioning, task="media_to_media"))
        bar.update()
    return queued


def _ask_outside(pipe: Any, prompts: list[str], tally: _Tally, bar: Any, *, seed: int, max_new_tokens: int) -> None:
    """Requests for what the world lacks: right when the reply says what the model can make and makes nothing."""
    bar.set_postfix_str("out of world")
    for i, prompt in enumerate(prompts):
        out = _reply(pipe, prompt, seed=seed + i, max_new_tokens=max_new_tokens)
        right = not out.conditioning and "I can only" in out.text
        tally.add("out_of_world", right)
        if not right:
            tally.example("out_of_world", prompt=prompt, reply=out.text)
        bar.update()


def _render(
    pipe: Any,
    queued: list[_Queued],
    tally: _Tally,
    bar: Any,
    *,
    seed: int,
    batch_size: int,
    settings: dict[str, Any],
) -> None:
    """Render the queued conditionings with each modality's decoder in batches and score them with the oracles."""
    bar.total += len(queued)
    bar.refresh()
    for modality in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO):
        todo = [q for q in queued if q.item.modality is modality]
        if not todo:
            continue
        bar.set_postfix_str(f"rendering {modality.value}")
        decoder = pipe.decoders[modality]
        task, attributes = _GENERATED[modality]
        for begin in range(0, len(todo), batch_size):
            batch = todo[begin : begin + batch_size]
            embeds = torch.cat([q.conditioning for q in batch])
            generators = [torch.Generator(device="cpu").manual_seed(seed + q.index) for q in batch]
            outputs = decoder.generate(embeds, generator=generators, show_progress=False, **settings)
            for q, media in zip(batch, outputs, strict=True):
                found = _ORACLES[modality](media)
                if q.task == "media_to_media":
                    right = all(found.get(k) == v for k, v in q.item.attributes().items() if k != "style")
                    tally.add("media_to_media", right)
                    if not right:
                        found_words = _describe(found)
                        tally.example("media_to_media", prompt=q.prompt, expected=q.item.caption, found=found_words)
                    continue
                name, names = _FORCED[modality] if q.task == "forced" else (task, attributes)
                if not tally.score(name, names, q.item.attributes(), found):
                    tally.example(name, prompt=q.prompt, expected=q.item.caption, found=_describe(found))
            bar.update(len(batch))


def _caption(pipe: Any, cases: list[CaptionCase], tally: _Tally, bar: Any, *, seed: int, max_new_tokens: int) -> None:
    """Ask for a caption of every held-out item and score the words of the reply."""
    readable = {Modality.parse(m) for m in pipe.config.input_modalities}
    for modality in sorted({case.item.modality for case in cases} - readable, key=lambda m: m.value):
        logger.warning("the pipeline reads no %s input: %s captioning is not scored", modality.value, modality.value)
    bar.set_postfix_str("captions")
    for i, case in enumerate(cases):
        modality = case.item.modality
        if modality in readable:
            media = world.media_input(case.item)
            out = _reply(
                pipe, case.question, seed=seed + i, max_new_tokens=max_new_tokens, **{modality.plural: [media]}
            )
            task, attributes = (_RENDERED_CAPTIONED if case.heldout_rendering else _CAPTIONED)[modality]
            found = caption_attributes(out.text)
            if not tally.score(task, attributes, case.item.attributes(), found):
                tally.example(task, question=case.question, expected=case.item.caption, found=out.text)
        bar.update()


def _describe(found: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in found.items())


# ------------------------------------------------------------------------------------------------------------
# Reading a report
# ------------------------------------------------------------------------------------------------------------


def task_of(metric: str) -> tuple[str, ...]:
    """The tasks of :data:`TASKS` that score ``metric`` (``clean_replies``: every task with generation replies)."""
    if metric == "clean_replies":
        return ("generation", "forced", "casual", "second_turn", "media_to_media")
    if metric.startswith("heldout_rendering."):
        return ("renderings",)
    if metric.startswith("forced_"):
        return ("forced",)
    if metric.startswith(("text_to_", "routing")):
        return ("generation",)
    if "_to_text." in metric:
        return ("captioning",)
    return ({"casual_phrasing": "casual"}.get(metric, metric),)


def _was_run(report: Mapping[str, Any], metric: str) -> bool:
    tasks = report.get("meta", {}).get("tasks")
    return tasks is None or any(t in tasks for t in task_of(metric))


def failures(report: Mapping[str, Any], *, include_open: bool = False) -> list[str]:
    """The metrics with a target that the report does not meet (nothing scored counts as not met; metrics of tasks
    the report did not run are left out).

    Args:
        report: what :func:`evaluate` returned.
        include_open: also the :data:`OPEN_TARGETS` (targets an open issue sets that the shipped model does not meet
            yet: reported as below target, but not counted here unless asked, so ``make eval`` guards what is met).

    Returns:
        Metric names, in :data:`METRICS` order.
    """
    metrics = report["metrics"]
    failed = []
    for name, target in TARGETS.items():
        if not _was_run(report, name) or (name in OPEN_TARGETS and not include_open):
            continue
        value = metrics.get(name, {}).get("value")
        if value is None or value < target:
            failed.append(name)
    return failed


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a Markdown table: metric, value, target, pass / fail and the number of samples.

    Args:
        report: what :func:`evaluate` returned.

    Returns:
        Markdown text, one row per metric of :data:`METRICS` (informational metrics have no target and no verdict;
        a metric of a task not run shows "-"; an open target below its target shows "FAIL (open)"), then a line with
        the sample count, seed and time.
    """
    lines = ["| metric | value | target | result | n |", "|---|---:|---:|:---:|---:|"]
    for name in METRICS:
        entry = report["metrics"].get(name, {})
        value, target, total = entry.get("value"), TARGETS.get(name), entry.get("total", 0)
        shown = "-" if value is None else f"{100 * value:.1f}%"
        if target is None:
            verdict, wanted = "", "-"
        elif not _was_run(report, name):
            verdict, wanted = "-", f"{100 * target:.0f}%"
        else:
            verdict = "pass" if value is not None and value >= target else "FAIL"
            if verdict == "FAIL" and name in OPEN_TARGETS:
                verdict = "FAIL (open)"
            wanted = f"{100 * target:.0f}%"
        lines.append(f"| {name} | {shown} | {wanted} | {verdict} | {total} |")
    meta = report.get("meta", {})
    missed, still_open = failures(report), [m for m in failures(report, include_open=True) if m in OPEN_TARGETS]
    lines.append("")
    lines.append(
        f"samples {meta.get('samples')}, seed {meta.get('seed')}, {meta.get('requests')} requests, "
        f"{meta.get('seconds')} s; {len(missed)} of {len(TARGETS) - len(OPEN_TARGETS)} targets missed"
        + (f"; open targets still below: {', '.join(still_open)}" if still_open else "")
    )
    return "\n".join(lines)


def format_decoder_report(report: Mapping[str, Any]) -> str:
    """What :func:`evaluate_decoders` returned, as a Markdown table (metric, value, n)."""
    lines = ["| decoder alone | value | n |", "|---|---:|---:|"]
    for name in DECODER_METRICS:
        entry = report["metrics"].get(name, {})
        value = entry.get("value")
        lines.append(f"| {name} | {'-' if value is None else f'{100 * value:.1f}%'} | {entry.get('total', 0)} |")
    meta = report.get("meta", {})
    lines.append("")
    lines.append(f"samples {meta.get('samples')}, seed {meta.get('seed')}, {meta.get('seconds')} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------


def evaluate_with_table(
    pipe: Any, *, decoders: bool = False, max_new_tokens: int | None = None, **kwargs: Any
) -> tuple[dict[str, Any], str]:
    """:func:`evaluate` (or, with ``decoders``, :func:`evaluate_decoders`) with ``kwargs``, and the report as a
    Markdown table. ``max_new_tokens`` (None: the default) applies to the system evaluation only."""
    if decoders:
        report = evaluate_decoders(pipe, **kwargs)
        return report, format_decoder_report(report)
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    report = evaluate(pipe, **kwargs)
    return report, format_report(report)


# How long each task takes, relative (measured on the 2-core machine): parallel jobs get groups of equal weight.
_TASK_WEIGHTS = {"generation": 5.0, "forced": 5.0, "captioning": 1.0, "renderings": 1.0, "casual": 1.0,
                 "second_turn": 1.5, "media_to_media": 2.5, "out_of_world": 0.5}  # fmt: skip


def split_tasks(tasks: Sequence[str], jobs: int) -> list[list[str]]:
    """``tasks`` in ``jobs`` groups of about equal work (heaviest first, each to the lightest group so far)."""
    groups: list[list[str]] = [[] for _ in range(max(1, min(jobs, len(tasks))))]
    loads = [0.0] * len(groups)
    for task in sorted(tasks, key=lambda t: -_TASK_WEIGHTS.get(t, 1.0)):
        i = loads.index(min(loads))
        groups[i].append(task)
        loads[i] += _TASK_WEIGHTS.get(task, 1.0)
    return [[t for t in TASKS if t in group] for group in groups if group]


def merge_reports(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One report from reports of disjoint task groups of the same held-out set (counts summed per metric)."""
    if not reports:
        raise ValueError("no report to merge")
    metrics = {}
    for name in METRICS:
        right = sum(r["metrics"][name]["correct"] for r in reports)
        total = sum(r["metrics"][name]["total"] for r in reports)
        metrics[name] = {"value": right / total if total else None, "correct": right, "total": total,
                         "target": TARGETS.get(name)}  # fmt: skip
    meta = dict(reports[0]["meta"])
    meta["seconds"] = max(r["meta"]["seconds"] for r in reports)
    for key in ("requests", "caption_items"):
        meta[key] = sum(r["meta"][key] for r in reports)
    meta["tasks"] = [t for t in TASKS if any(t in r["meta"].get("tasks", []) for r in reports)]
    meta["jobs"] = len(reports)
    return {"metrics": metrics, "meta": meta, "examples": [e for r in reports for e in r["examples"]]}


def _evaluate_in_processes(
    model: str, *, tasks: Sequence[str], jobs: int, samples: int, seed: int, batch_size: int,
    runtime: RuntimeOptions | None,
) -> dict[str, Any]:  # fmt: skip
    """:func:`evaluate` of ``model`` with its tasks split over ``jobs`` processes (one thread each when there are
    fewer cores than jobs x 2), their reports merged."""
    groups = split_tasks(tasks, jobs)
    threads = max(1, len(os.sched_getaffinity(0)) // len(groups))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    extra = []
    if runtime is not None and runtime.device:
        extra += ["--device", runtime.device]
    if runtime is not None and runtime.dtype:
        extra += ["--dtype", runtime.dtype]
    with tempfile.TemporaryDirectory(prefix="anygpt-eval-") as folder:
        outputs = [Path(folder) / f"part-{i}.json" for i in range(len(groups))]
        children = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "toyworld.evaluate",
                    model,
                    "--tasks",
                    ",".join(group),
                    "--samples",
                    str(samples),
                    "--seed",
                    str(seed),
                    "--batch-size",
                    str(batch_size),
                    "--output",
                    str(out),
                    *extra,
                ],
                env=env,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            for group, out in zip(groups, outputs, strict=True)
        ]
        codes = [child.wait() for child in children]
        missing = [i for i, out in enumerate(outputs) if not out.is_file()]
        if missing:
            raise RuntimeError(
                f"evaluation job(s) {', '.join(str(i) for i in missing)} ended without a report (exit codes {codes}); "
                "run with --jobs 1 to see the error"
            )
        return merge_reports([json.loads(out.read_text()) for out in outputs])


def run(
    model: str, *, samples: int = 96, seed: int = HELDOUT_SEED, batch_size: int = 16,
    runtime: RuntimeOptions | None = None, output: str | os.PathLike | None = None, decoders: bool = False,
    tasks: Sequence[str] = TASKS, jobs: int = 1,
) -> int:  # fmt: skip
    """Evaluate ``model`` (a folder or preset name), print the Markdown table, write the JSON report to ``output``.

    Args:
        runtime: where and in which precision the model runs (``--device``, ``--dtype``, ...); None: fp32 on the CPU.
        tasks: some of :data:`TASKS` (the system evaluation).
        jobs: processes the tasks are split over (the system evaluation; their reports merged). The tiny models use
            two cores poorly, so two jobs on two cores finish sooner than one.

    Returns:
        The exit status: 1 when a target is missed (the system evaluation), 0 otherwise.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks: expected some of {', '.join(TASKS)}, got {', '.join(tasks) or 'none'}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs > 1 and not decoders:
        report = _evaluate_in_processes(
            model, tasks=tasks, jobs=jobs, samples=samples, seed=seed, batch_size=batch_size, runtime=runtime
        )
        table = format_report(report)
    else:
        pipe = AnyGPTPipeline.from_pretrained(model, runtime=runtime)
        kwargs = {} if decoders else {"tasks": tasks}
        report, table = evaluate_with_table(
            pipe, decoders=decoders, samples=samples, seed=seed, batch_size=batch_size, **kwargs
        )
    missed = [] if decoders else failures(report)
    if output is not None:
        output = Path(output)
        write_text_atomic(output, json.dumps(report, indent=2) + "\n")  # makes the folder
    sys.stdout.write(table + "\n")
    if missed:
        sys.stdout.write(f"below target: {', '.join(missed)}\n")
    return 1 if missed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m toyworld.evaluate MODEL [--samples N] [--tasks A,B] [--output report.json] [--decoders]``: see
    :func:`run`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a folder written by save_pretrained, or a preset name")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="e.g. cuda; default: the pipeline's (CPU)")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16; default: each component's own")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, some of {', '.join(TASKS)}")
    parser.add_argument("--jobs", type=int, default=1, help="processes the tasks are split over")
    parser.add_argument("--output", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--decoders", action="store_true", help="score the decoders alone (their ceiling)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    runtime = RuntimeOptions(device=args.device, dtype=args.dtype) if args.device or args.dtype else None
    return run(
        args.model, samples=args.samples, seed=args.seed, batch_size=args.batch_size, runtime=runtime,
        output=args.output, decoders=args.decoders, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        jobs=args.jobs,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
