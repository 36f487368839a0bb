"""Evaluation tasks: what a task asks the model for each sample, what it keeps of the answer, how it is scored.

========  =======================  ===========================================================================
task      the model is asked       metrics
========  =======================  ===========================================================================
``t2i``   caption -> image         ``fid``, ``kid`` (Inception), ``clip_score`` (CLIP)
``t2a``   caption -> audio         ``fad`` (CLAP embeddings), ``clap_score`` (CLAP)
``t2v``   caption -> video         ``clipsim`` (CLIP), ``fvd`` (I3D; only when the network is given)
``caption`` media -> text          ``bleu_1..4``, ``meteor``, ``rouge_l``, ``cider``, ``spice`` (when it can run)
``vqa``   image + question -> text ``vqa_accuracy`` (VQAv2, 0-100)
========  =======================  ===========================================================================

A task is an ``EvalTask``; the built-in ones are here, others come from the Python entry-point group
``anygpt.eval_tasks`` (``name = "module:Class"``), which is how the toy world's task (``toyworld/eval_task.py``)
is found without this layer importing the toy world.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from anygpt.apps.evaluation import metrics as M
from anygpt.apps.evaluation.data import DataSet, Sample, read_data
from anygpt.apps.evaluation.networks import FeatureNetworks
from anygpt.apps.evaluation.vqa import vqa_accuracy
from anygpt.base.errors import UsageError
from anygpt.base.media import load_audio, load_image, load_video
from anygpt.base.modality import Modality
from anygpt.core.request import GenerationRequest

logger = logging.getLogger(__name__)

__all__ = [
    "ENTRY_POINT_GROUP",
    "EvalContext",
    "EvalTask",
    "get_task",
    "task_names",
]

ENTRY_POINT_GROUP = "anygpt.eval_tasks"
"""The entry-point group through which packages add tasks (``name = "module:Class"``, an ``EvalTask`` subclass)."""


@dataclass
class EvalContext:
    """What a task needs besides its samples: the run's settings and feature networks.

    Attributes:
        seed: the run's seed; sample ``i`` is generated with ``seed + i``.
        networks: the feature networks (located and loaded on first use).
        metrics: the metrics asked for (None: the task's defaults).
        generation: extra ``GenerationRequest`` fields for every sample (``max_new_tokens``, ``num_inference_steps``
            ...).
        prompt_template: how a sample becomes the prompt (``{caption}`` / ``{question}`` / ``{noun}``); None: the
            data's own instruction where it has one, else the task's default.
        batch_size: feature-network batch size.
        out: the run's folder (media paths in predictions are relative to it).
        unavailable: optional metrics that cannot be measured here -> why (``EvalTask.check_networks`` fills it).
    """

    seed: int = 0
    networks: FeatureNetworks = field(default_factory=FeatureNetworks)
    metrics: set[str] | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    prompt_template: str | None = None
    batch_size: int = 16
    out: Path = Path(".")
    unavailable: dict[str, str] = field(default_factory=dict)


def metric_entry(value: float | None, n: int, **extra: Any) -> dict[str, Any]:
    """One metric of a report: its value, the number of samples it was measured on, and notes."""
    notes = {k: v for k, v in extra.items() if v is not None and v != ""}
    return {"value": None if value is None else float(value), "n": n, **notes}


class EvalTask:
    """One kind of evaluation. Subclasses set the class attributes and implement ``request``, ``record`` and
    ``score``; ``samples`` reads the data file by default.

    Class attributes:
        name: the task's name on the command line.
        summary: one line for ``anygpt eval --help``.
        metrics: every metric it reports, in order.
        optional: metrics measured only when they can be (their network or tool is there); the others raise when
            their feature network is missing.
        networks: metric -> the feature network it needs (``networks.NETWORKS``).
        needs_data: whether ``--data`` is required.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[frozenset[str]] = frozenset()
    networks: ClassVar[dict[str, str]] = {}
    needs_data: ClassVar[bool] = True

    # ------------------------------------------------------------------ set-up
    def selected(self, ctx: EvalContext) -> list[str]:
        """The metrics this run measures (``ctx.metrics`` checked against the task's; unavailable ones left out)."""
        if ctx.metrics is None:
            return [m for m in self.metrics if m not in ctx.unavailable]
        unknown = sorted(ctx.metrics - set(self.metrics))
        if unknown:
            raise UsageError(
                f"--metrics: {', '.join(unknown)} not measured by {self.name}; it has {', '.join(self.metrics)}"
            )
        return [m for m in self.metrics if m in ctx.metrics and m not in ctx.unavailable]

    def check_networks(self, ctx: EvalContext) -> dict[str, str]:
        """Locate every feature network the selected metrics need, before any generation (so a missing one fails
        at once). Returns optional metric -> why it will be skipped."""
        skipped: dict[str, str] = {}
        for metric in self.selected(ctx):
            network = self.networks.get(metric)
            if network is None:
                continue
            try:
                ctx.networks.locate(network)
            except FileNotFoundError as err:
                explicit = ctx.metrics is not None and metric in ctx.metrics
                if metric in self.optional and not explicit:
                    skipped[metric] = f"not measured: {str(err).split('; looked at')[0]}"
                else:
                    raise
        ctx.unavailable.update(skipped)
        return skipped

    def samples(self, data: str | None, ctx: EvalContext, *, limit: int | None, **read: Any) -> tuple[list[Any], dict]:
        """The samples and the report's ``data`` entry (path, format, sha256, counts)."""
        if data is None:
            raise UsageError(f"eval {self.name}: --data is required (a data file: see anygpt eval --help)")
        dataset = read_data(data, limit=limit, **read)
        self.check_data(dataset)
        return dataset.samples, dataset.describe()

    def check_data(self, dataset: DataSet) -> None:
        """Raise ``UsageError`` when the data does not suit the task (e.g. images for ``t2a``)."""

    def check_model(self, pipe: Any, samples: Sequence[Any]) -> None:
        """Raise ``UsageError`` when the model cannot do the task (no decoder / no input of the modality)."""

    # ------------------------------------------------------------------ per sample
    def request(self, sample: Any, index: int, ctx: EvalContext) -> GenerationRequest:
        raise NotImplementedError

    def record(self, sample: Any, output: Any, request: GenerationRequest, ctx: EvalContext) -> dict[str, Any]:
        """What a prediction line keeps besides the runner's fields (id, prompt, reply text, media paths)."""
        return {}

    # ------------------------------------------------------------------ scoring
    def score(
        self, samples: Sequence[Any], predictions: Sequence[dict[str, Any]], ctx: EvalContext
    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """The metrics over every sample, and per-sample scores (sample id -> {metric: value})."""
        raise NotImplementedError

    def sheet_entry(self, sample: Any, prediction: dict[str, Any], ctx: EvalContext) -> dict[str, Any]:
        """One cell of the contact sheet: the generated (or input) media, the reference, the prompt, the reply."""
        generated = [p for paths in prediction.get("media", {}).values() for p in paths]
        return {
            "id": prediction["id"],
            "media": str(ctx.out / generated[0]) if generated else None,
            "prompt": prediction.get("prompt", ""),
            "text": prediction.get("text", ""),
        }


# ------------------------------------------------------------------------------------------------------------
# text -> media
# ------------------------------------------------------------------------------------------------------------


class _TextToMedia(EvalTask):
    modality: ClassVar[Modality]
    default_template: ClassVar[str] = "{caption}"

    def check_data(self, dataset: DataSet) -> None:
        wrong = [s for s in dataset.samples if s.modality is not self.modality]
        if wrong:
            found = wrong[0].modality.value if wrong[0].modality else "no"
            raise UsageError(
                f"eval {self.name}: {dataset.path} holds {found} media (sample {wrong[0].id}), expected "
                f"{self.modality.value} references"
            )

    def check_model(self, pipe: Any, samples: Sequence[Any]) -> None:
        if self.modality not in pipe.decoders:
            raise UsageError(f"eval {self.name}: the model has no {self.modality.value} decoder")

    def request(self, sample: Sample, index: int, ctx: EvalContext) -> GenerationRequest:
        if ctx.prompt_template is not None:
            prompt = ctx.prompt_template.format(caption=sample.text)
        else:
            prompt = sample.prompt or self.default_template.format(caption=sample.text)
        return GenerationRequest(
            prompt=prompt, modalities=[self.modality.value], seed=ctx.seed + index, id=sample.id, **ctx.generation
        )

    def record(self, sample: Sample, output: Any, request: GenerationRequest, ctx: EvalContext) -> dict[str, Any]:
        return {"caption": sample.text, "reference": str(sample.media) if sample.media else None}

    def sheet_entry(self, sample: Sample, prediction: dict[str, Any], ctx: EvalContext) -> dict[str, Any]:
        entry = super().sheet_entry(sample, prediction, ctx)
        entry.update(reference=prediction.get("reference"), modality=self.modality, reference_modality=self.modality)
        return entry

    def _generated(self, predictions: Sequence[dict[str, Any]], ctx: EvalContext) -> list[tuple[int, Path]]:
        """(position, path of the first generated item) of each prediction that produced one."""
        found = []
        for position, prediction in enumerate(predictions):
            paths = prediction.get("media", {}).get(self.modality.value) or []
            if paths:
                found.append((position, ctx.out / paths[0]))
        return found

    @staticmethod
    def _note_missing(total: int, produced: int) -> str:
        return f"{total - produced} sample(s) produced no media and are left out" if produced < total else ""


class TextToImageTask(_TextToMedia):
    name = "t2i"
    summary = "captions -> images: FID and KID against the reference images, CLIP score against the captions"
    metrics = ("fid", "kid", "clip_score")
    networks = {"fid": "inception", "kid": "inception", "clip_score": "clip"}
    modality = Modality.IMAGE

    def score(self, samples, predictions, ctx):
        chosen, produced = self.selected(ctx), self._generated(predictions, ctx)
        note = self._note_missing(len(predictions), len(produced))
        images = [load_image(path) for _, path in produced]
        results: dict[str, dict[str, Any]] = {}
        per_sample: dict[str, dict[str, Any]] = {}
        if {"fid", "kid"} & set(chosen):
            network = ctx.networks.inception()
            references = [load_image(samples[i].media) for i, _ in produced]
            real = M.image_features(references, network, batch_size=ctx.batch_size)
            fake = M.image_features(images, network, batch_size=ctx.batch_size)
            values = M.fid_kid(real, fake, seed=ctx.seed)
            if "fid" in chosen:
                results["fid"] = metric_entry(values["fid"], len(images), note=note)
            if "kid" in chosen:
                results["kid"] = metric_entry(values["kid"], len(images), std=values["kid_std"], note=note)
        if "clip_score" in chosen:
            model, processor = ctx.networks.clip()
            scores = M.clip_scores(images, [samples[i].text for i, _ in produced], model, processor)
            results["clip_score"] = metric_entry(scores["clip_score"], len(images), note=note)
            for (i, _), value in zip(produced, scores["per_sample"], strict=True):
                per_sample.setdefault(samples[i].id, {})["clip_score"] = value
        return results, per_sample


class TextToAudioTask(_TextToMedia):
    name = "t2a"
    summary = "captions -> audio: FAD (CLAP embeddings) against the reference audio, CLAP score against the captions"
    metrics = ("fad", "clap_score")
    networks = {"fad": "clap", "clap_score": "clap"}
    modality = Modality.AUDIO

    def score(self, samples, predictions, ctx):
        chosen, produced = self.selected(ctx), self._generated(predictions, ctx)
        note = self._note_missing(len(predictions), len(produced))
        model, extractor, tokenizer = ctx.networks.clap()
        generated = M.clap_embeddings([load_audio(p) for _, p in produced], model, extractor, batch_size=ctx.batch_size)
        results: dict[str, dict[str, Any]] = {}
        per_sample: dict[str, dict[str, Any]] = {}
        if "fad" in chosen:
            references = [load_audio(samples[i].media) for i, _ in produced]
            real = M.clap_embeddings(references, model, extractor, batch_size=ctx.batch_size)
            results["fad"] = metric_entry(M.frechet_distance(real, generated), len(produced), note=note)
        if "clap_score" in chosen:
            texts = M.clap_text_embeddings([samples[i].text for i, _ in produced], model, tokenizer)
            cosines = M.cosine(generated, texts)
            results["clap_score"] = metric_entry(float(cosines.mean()), len(produced), note=note)
            for (i, _), value in zip(produced, cosines.tolist(), strict=True):
                per_sample.setdefault(samples[i].id, {})["clap_score"] = value
        return results, per_sample


class TextToVideoTask(_TextToMedia):
    name = "t2v"
    summary = "captions -> video: CLIPSIM (mean frame-text CLIP similarity); FVD when an I3D network is given"
    metrics = ("clipsim", "fvd")
    optional = frozenset({"fvd"})
    networks = {"clipsim": "clip", "fvd": "i3d"}
    modality = Modality.VIDEO

    def score(self, samples, predictions, ctx):
        chosen, produced = self.selected(ctx), self._generated(predictions, ctx)
        note = self._note_missing(len(predictions), len(produced))
        videos = [load_video(p) for _, p in produced]
        results: dict[str, dict[str, Any]] = {}
        per_sample: dict[str, dict[str, Any]] = {}
        if "clipsim" in chosen:
            model, processor = ctx.networks.clip()
            scores = M.clipsim_scores(videos, [samples[i].text for i, _ in produced], model, processor)
            results["clipsim"] = metric_entry(scores["clipsim"], len(videos), note=note)
            for (i, _), value in zip(produced, scores["per_sample"], strict=True):
                per_sample.setdefault(samples[i].id, {})["clipsim"] = value
        if "fvd" in chosen:
            network = ctx.networks.i3d()
            real = M.i3d_features([load_video(samples[i].media) for i, _ in produced], network)
            fake = M.i3d_features(videos, network)
            results["fvd"] = metric_entry(M.frechet_distance(real, fake), len(videos), note=note)
        return results, per_sample


# ------------------------------------------------------------------------------------------------------------
# media -> text
# ------------------------------------------------------------------------------------------------------------

_NOUNS = {Modality.IMAGE: "image", Modality.AUDIO: "audio", Modality.VIDEO: "video"}


class _MediaToText(EvalTask):
    default_template: ClassVar[str]
    uses_data_prompt: ClassVar[bool] = True  # the data's own question (NExT-GPT's comprehension turns) when it has one

    def check_model(self, pipe: Any, samples: Sequence[Any]) -> None:
        unread = sorted({s.modality.value for s in samples} - set(pipe.config.input_modalities))
        if unread:
            raise UsageError(f"eval {self.name}: the model reads no {unread[0]} input (it reads "
                             f"{', '.join(pipe.config.input_modalities)})")  # fmt: skip

    def request(self, sample: Sample, index: int, ctx: EvalContext) -> GenerationRequest:
        noun = _NOUNS[sample.modality]
        if ctx.prompt_template is not None:
            prompt = ctx.prompt_template.format(noun=noun, question=sample.text, caption=sample.text)
        elif self.uses_data_prompt and sample.prompt:
            prompt = sample.prompt
        else:
            prompt = self.default_template.format(noun=noun, question=sample.text)
        return GenerationRequest(
            prompt=prompt,
            modalities=[],
            seed=ctx.seed + index,
            id=sample.id,
            **{sample.modality.plural: [str(sample.media)]},
            **ctx.generation,
        )

    def sheet_entry(self, sample: Sample, prediction: dict[str, Any], ctx: EvalContext) -> dict[str, Any]:
        return {
            "id": prediction["id"],
            "media": str(sample.media),
            "modality": sample.modality,
            "prompt": prediction.get("prompt", ""),
            "text": prediction.get("text", ""),
        }


class CaptionTask(_MediaToText):
    name = "caption"
    summary = "image, audio or video -> caption: BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE (COCO caption toolkit)"
    metrics = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice")
    optional = frozenset({"spice"})
    default_template = "Describe this {noun} in one sentence."

    def check_data(self, dataset: DataSet) -> None:
        if any(s.media is None for s in dataset.samples):
            raise UsageError(f"eval caption: {dataset.path} has samples without media to caption")

    def check_networks(self, ctx: EvalContext) -> dict[str, str]:
        chosen = self.selected(ctx)
        if not M.java_available():
            raise UsageError("eval caption: the COCO caption toolkit needs Java (its tokenizer, METEOR and SPICE)")
        skipped = {}
        if "spice" in chosen:
            usable, reason = M.spice_available()
            if not usable:
                if ctx.metrics is not None and "spice" in ctx.metrics:
                    raise UsageError(f"spice cannot run here: {reason}")
                skipped["spice"] = f"not measured: {reason}"
        ctx.unavailable.update(skipped)
        return skipped

    def record(self, sample: Sample, output: Any, request: GenerationRequest, ctx: EvalContext) -> dict[str, Any]:
        return {"references": sample.references, "input": str(sample.media)}

    def score(self, samples, predictions, ctx):
        chosen = self.selected(ctx)
        refs = {p["id"]: p["references"] for p in predictions}
        preds = {p["id"]: p.get("text", "") for p in predictions}
        scored = M.caption_scores(refs, preds, spice="spice" in chosen)
        results = {
            name: metric_entry(scored["metrics"][name], len(preds)) for name in chosen if name in scored["metrics"]
        }
        per_sample = {i: {k: v for k, v in values.items() if k in chosen} for i, values in scored["per_sample"].items()}
        return results, per_sample


class VQATask(_MediaToText):
    name = "vqa"
    summary = "image + question -> answer: VQAv2 accuracy (the official answer normalisation), 0-100"
    metrics = ("vqa_accuracy",)
    default_template = "{question}\nAnswer the question using a single word or phrase."
    uses_data_prompt = False

    def check_data(self, dataset: DataSet) -> None:
        if any(not s.references or s.modality is not Modality.IMAGE for s in dataset.samples):
            raise UsageError(f"eval vqa: {dataset.path} is not VQA data (images with questions and human answers)")

    def record(self, sample: Sample, output: Any, request: GenerationRequest, ctx: EvalContext) -> dict[str, Any]:
        return {"question": sample.text, "answers": sample.references, "input": str(sample.media)}

    def score(self, samples, predictions, ctx):
        accuracies = {p["id"]: 100 * vqa_accuracy(p.get("text", ""), p["answers"]) for p in predictions}
        mean = float(np.mean(list(accuracies.values()))) if accuracies else None
        per_sample = {i: {"vqa_accuracy": a} for i, a in accuracies.items()}
        return {"vqa_accuracy": metric_entry(mean, len(accuracies))}, per_sample


# ------------------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------------------

BUILTIN_TASKS: dict[str, type[EvalTask]] = {
    task.name: task for task in (TextToImageTask, TextToAudioTask, TextToVideoTask, CaptionTask, VQATask)
}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def task_names() -> list[str]:
    """Every task's name: the built-in ones, then those of the entry-point group (found without importing them)."""
    return [*BUILTIN_TASKS, *sorted(set(_entry_points()) - set(BUILTIN_TASKS))]


def get_task(name: str) -> EvalTask:
    """A new task object by name (an entry point's module is imported now).

    Raises:
        UsageError: an unknown name (listing the known ones), or an entry point that is not an ``EvalTask``.
    """
    if name in BUILTIN_TASKS:
        return BUILTIN_TASKS[name]()
    entry = _entry_points().get(name)
    if entry is None:
        raise UsageError(f"unknown evaluation task {name!r}; tasks: {', '.join(task_names())}")
    cls = entry.load()
    if not (isinstance(cls, type) and issubclass(cls, EvalTask)):
        raise UsageError(f"evaluation task {name!r}: entry point {entry.value} is not an EvalTask subclass")
    return cls()
