"""One evaluation run: generate every sample (resumably), score, and write the run's folder.

    OUT/
      run.json            what the run is (task, model, data, seed, settings): a resumed run must match it
      predictions.jsonl   one line per sample: id, seed, prompt, reply text, generated media paths, per-sample scores
      media/              the generated media, ``{sample id}_{modality}{k}.{png,wav,mp4}``
      report.json         metrics, model, data (sha256), seeds, settings, feature networks, versions, git revision
      results.md          the metrics as a Markdown table
      contact_sheet.png   samples beside their prompts

Each finished sample is appended to ``predictions.jsonl`` at once (flushed and synced), so an interrupted run loses
at most the sample in flight: ``--resume`` reads the file (a torn last line is dropped), skips the samples it holds
and generates the rest. Sample ``i`` is always generated with seed ``seed + i``, so a resumed run produces what an
uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from anygpt.apps.evaluation.report import git_revision, library_versions, write_contact_sheet, write_report
from anygpt.apps.evaluation.tasks import EvalContext, EvalTask
from anygpt.apps.outputs import save_outputs
from anygpt.base.errors import UsageError
from anygpt.base.utils import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["read_predictions", "run_evaluation"]

PREDICTIONS = "predictions.jsonl"
RUN_FILE = "run.json"
SHEET_SAMPLES = 16


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete lines of a predictions file (a torn last line, from an interrupted write, is dropped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the last line, cut by an interruption
                logger.warning("%s: dropping a torn last line", path)
                continue
            raise UsageError(
                f"{path}:{number}: not a JSON line; this is not a predictions file of anygpt eval"
            ) from None
    return records


def _write_predictions(path: Path, records: Sequence[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _check_resume(out: Path, identity: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
    """The predictions already made (resume), after checking the folder belongs to the same run."""
    run_file, predictions = out / RUN_FILE, out / PREDICTIONS
    done = read_predictions(predictions)
    if not resume:
        if done or run_file.exists():
            raise UsageError(
                f"{out} holds an earlier evaluation ({len(done)} predictions); pass --resume to continue it, or "
                "choose another --out"
            )
        return []
    if run_file.is_file():
        earlier = json.loads(run_file.read_text(encoding="utf-8"))
        differ = sorted(k for k in set(identity) | set(earlier) if identity.get(k) != earlier.get(k))
        if differ:
            raise UsageError(
                f"--resume: {out} holds a run with other {', '.join(differ)} "
                f"(earlier {', '.join(f'{k}={earlier.get(k)!r}' for k in differ)[:300]})"
            )
    _write_predictions(predictions, done)  # without a torn last line, before appending
    return done


def run_evaluation(
    task: EvalTask,
    pipe: Any,
    samples: Sequence[Any],
    ctx: EvalContext,
    *,
    model: str,
    data: dict[str, Any] | None,
    resume: bool = False,
    progress: bool = True,
    batch_size: int = 1,
    command: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``pipe`` on ``samples`` with ``task`` and write the run's folder (``ctx.out``).

    Args:
        task: the task (its networks are located before any generation, so a missing one fails at once).
        pipe: an ``AnyGPTPipeline``.
        samples: what ``task.samples`` returned.
        ctx: the run's settings; ``ctx.out`` is the folder written.
        model: the model's name or folder, for the report.
        data: the report's ``data`` entry.
        resume: continue the run already in ``ctx.out`` (it must be the same task, model, data, seed and settings).
        progress: show a progress bar.
        batch_size: requests answered together (``pipe.run_batch``); 1 runs each alone (``pipe.run``).
        command: the command line, for the report.

    Returns:
        The report (also written to ``report.json``).

    Raises:
        UsageError: a folder holding another run, or a resumed run that differs from it.
    """
    started = time.perf_counter()
    out = Path(ctx.out)
    out.mkdir(parents=True, exist_ok=True)
    task.check_networks(ctx)
    skipped = dict(ctx.unavailable)
    task.check_model(pipe, samples)
    identity = {
        "task": task.name,
        "model": model,
        "data": (data or {}).get("sha256") or (data or {}).get("path"),
        "samples": [s.id for s in samples],
        "seed": ctx.seed,
        "generation": ctx.generation,
        "prompt_template": ctx.prompt_template,
    }
    done = _check_resume(out, identity, resume)
    write_text_atomic(out / RUN_FILE, json.dumps(identity, indent=2) + "\n")
    by_id = {r["id"]: r for r in done}
    todo = [(i, s) for i, s in enumerate(samples) if s.id not in by_id]
    if done:
        logger.info("resuming: %d of %d samples already done", len(samples) - len(todo), len(samples))
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=f"eval {task.name}", unit="sample",
               disable=not progress)  # fmt: skip
    try:
        with (out / PREDICTIONS).open("a", encoding="utf-8") as handle:
            for begin in range(0, len(todo), batch_size):
                batch = todo[begin : begin + batch_size]
                requests = [task.request(sample, index, ctx) for index, sample in batch]
                if len(requests) == 1:
                    outputs = [pipe.run(requests[0], show_progress=False)]
                else:
                    outputs = pipe.run_batch(requests)
                for (index, sample), request, output in zip(batch, requests, outputs, strict=True):
                    record = _record(task, sample, index, request, output, ctx)
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                    by_id[sample.id] = record
                bar.update(len(batch))
    finally:
        bar.close()
    predictions = [by_id[s.id] for s in samples]
    generated_seconds = time.perf_counter() - started
    metrics, per_sample = task.score(samples, predictions, ctx) if predictions else ({}, {})
    for name, reason in skipped.items():
        metrics[name] = {"value": None, "n": 0, "skipped": reason}
    metrics = {name: metrics[name] for name in task.metrics if name in metrics}
    for record in predictions:
        if record["id"] in per_sample:
            record["scores"] = per_sample[record["id"]]
    _write_predictions(out / PREDICTIONS, predictions)
    report = {
        "task": task.name,
        "metrics": metrics,
        "model": {"name": model, "runtime": None if pipe.runtime is None else pipe.runtime.describe()},
        "data": data,
        "seed": ctx.seed,
        "seeds": "sample i is generated with seed + i (its GenerationRequest.seed); KID's subsets with seed",
        "settings": {
            "generation": ctx.generation,
            "prompt_template": ctx.prompt_template,
            "batch_size": batch_size,
            "feature_batch_size": ctx.batch_size,
            "metrics": [m for m in task.metrics if m in metrics],
        },
        "feature_networks": ctx.networks.describe(),
        "versions": library_versions(),
        "git": git_revision(),
        "command": command or " ".join(sys.argv),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 2),
        "generation_seconds": round(generated_seconds, 2),
        "files": {"predictions": PREDICTIONS, "table": "results.md", "contact_sheet": "contact_sheet.png"},
    }
    write_report(out, report)
    by_sample = {s.id: s for s in samples}
    entries = [task.sheet_entry(by_sample[p["id"]], p, ctx) for p in predictions[:SHEET_SAMPLES]]
    write_contact_sheet(out / "contact_sheet.png", entries, title=f"anygpt eval {task.name} - {model}")
    return report


def _record(task: EvalTask, sample: Any, index: int, request: Any, output: Any, ctx: EvalContext) -> dict[str, Any]:
    """One prediction line: the runner's fields, then the task's."""
    written = save_outputs(output, ctx.out / "media", sample.id)
    media = {m.value: [p.relative_to(ctx.out).as_posix() for p in paths] for m, paths in written.items() if paths}
    record = {
        "id": sample.id,
        "index": index,
        "seed": request.seed,
        "prompt": request.prompt,
        "text": output.text,
        "media": media,
    }
    record.update(task.record(sample, output, request, ctx))
    return record
