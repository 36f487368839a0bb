"""The toy world's oracle evaluation as an ``anygpt eval`` task: ``anygpt eval toyworld --model toyworld --limit 8``.

The harness (``anygpt.apps.evaluation``) must not import the toy world, so this task is registered from here, as
the ``toyworld`` entry of the ``anygpt.eval_tasks`` entry-point group in ``pyproject.toml``.

It asks what :mod:`toyworld.evaluate` asks (its held-out requests and caption items, greedy, ``modalities="auto"``)
and judges the answers with the same oracles, under the same metric names and targets; the difference is the path:
here each request runs through ``pipe.run`` like every other task (its media rendered by the pipeline, seeded with
the request's seed, written to the run's folder and listed in ``predictions.jsonl``), where ``evaluate`` renders
the conditioning itself in batches with other decoder seeds. The figures therefore agree up to the decoders' noise
draws, not bit for bit. The held-out seed is ``toyworld.evaluate.HELDOUT_SEED + --seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from anygpt.apps.evaluation.tasks import EvalContext, EvalTask, metric_entry
from anygpt.base.modality import Modality
from anygpt.core.request import GenerationRequest
from toyworld import world
from toyworld.evaluate import (
    HELDOUT_SEED,
    METRICS,
    TARGETS,
    CaptionCase,
    heldout_items,
    heldout_requests,
    task_of,
)
from toyworld.oracles import audio_attributes, caption_attributes, image_attributes, video_attributes

__all__ = ["ToyWorldTask"]

_ORACLES = {Modality.IMAGE: image_attributes, Modality.AUDIO: audio_attributes, Modality.VIDEO: video_attributes}


@dataclass(frozen=True)
class ToySample:
    """A held-out generation request or caption item, with the seed ``toyworld.evaluate`` gives it."""

    id: str
    seed: int
    request: world.Request | None = None
    case: CaptionCase | None = None


class ToyWorldTask(EvalTask):
    name = "toyworld"
    summary = "the toy world's held-out requests and media, judged by its oracles (generation, routing, captions)"
    # the metrics of the evaluator's generation and captioning tasks, the ones these samples measure (the forced,
    # casual, second-turn, media -> media, out-of-world and held-out rendering rows are `anygpt toyworld eval`'s)
    metrics = tuple(m for m in METRICS if set(task_of(m)) & {"generation", "captioning"} and m != "clean_replies")
    needs_data = False

    def samples(self, data: str | None, ctx: EvalContext, *, limit: int | None, **read: Any) -> tuple[list, dict]:
        if data is not None:
            raise ValueError("eval toyworld: the toy world draws its own held-out set; --data is not used")
        per_figure = limit or 96
        seed = HELDOUT_SEED + ctx.seed
        requests, cases = heldout_requests(per_figure, seed), heldout_items(per_figure, seed)
        samples = [ToySample(f"request-{i:04d}", seed + i, request=r) for i, r in enumerate(requests)]
        samples += [ToySample(f"{c.item.modality.value}-{i:04d}", seed + i, case=c) for i, c in enumerate(cases)]
        data_entry = {"path": None, "format": "toyworld held-out set", "heldout_seed": seed, "samples": len(samples),
                      "per_figure": per_figure, "requests": len(requests), "caption_items": len(cases)}  # fmt: skip
        return samples, data_entry

    def request(self, sample: ToySample, index: int, ctx: EvalContext) -> GenerationRequest:
        settings = {"temperature": 0.0, **ctx.generation}
        if sample.request is not None:
            return GenerationRequest(
                sample.request.prompt, modalities="auto", seed=sample.seed, id=sample.id, **settings
            )
        item = sample.case.item
        media = {item.modality.plural: [world.media_input(item)]}
        return GenerationRequest(
            sample.case.question, modalities="auto", seed=sample.seed, id=sample.id, **media, **settings
        )

    def record(self, sample: ToySample, output: Any, request: GenerationRequest, ctx: EvalContext) -> dict[str, Any]:
        right: dict[str, bool] = {}
        if sample.request is not None:
            emitted = sorted(output.conditioning)
            right["routing"] = set(emitted) == {m.value for m in sample.request.modalities}
            found_all = {}
            for item in sample.request.items:
                media = getattr(output, item.modality.plural)
                found = _ORACLES[item.modality](media[0]) if media else {}
                found_all[item.modality.value] = found
                for attribute, expected in item.attributes().items():
                    right[f"text_to_{item.modality.value}.{attribute}"] = found.get(attribute) == expected
            return {"kind": "generation", "expected": [i.caption for i in sample.request.items], "emitted": emitted,
                    "found": found_all, "oracle": right}  # fmt: skip
        item = sample.case.item
        found = caption_attributes(output.text)
        for attribute, expected in item.attributes().items():
            right[f"{item.modality.value}_to_text.{attribute}"] = found.get(attribute) == expected
        return {"kind": "caption", "expected": item.caption, "found": found, "oracle": right}

    def score(self, samples: Sequence[ToySample], predictions: Sequence[dict[str, Any]], ctx: EvalContext):
        counts = {name: [0, 0] for name in METRICS}
        for prediction in predictions:
            for name, right in prediction["oracle"].items():
                counts[name][0] += int(right)
                counts[name][1] += 1
        results = {}
        for name in self.selected(ctx):
            correct, total = counts[name]
            results[name] = metric_entry(correct / total if total else None, total, correct=correct)
            results[name]["target"] = TARGETS.get(name)
        per_sample = {p["id"]: {k: float(v) for k, v in p["oracle"].items()} for p in predictions}
        return results, per_sample

    def sheet_entry(self, sample: ToySample, prediction: dict[str, Any], ctx: EvalContext) -> dict[str, Any]:
        entry = super().sheet_entry(sample, prediction, ctx)
        if sample.case is not None:
            entry.update(media=world.media_input(sample.case.item), modality=sample.case.item.modality)
        entry["prompt"] = f"{entry['prompt']} [expected: {', '.join(_as_list(prediction['expected']))}]"
        return entry


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)
