"""``anygpt eval TASK``: the field's standard metrics on a model, reproducibly (``anygpt.apps.evaluation``).

    anygpt eval t2i --model DIR --data dataset_coco.json --limit 5000 --out runs/t2i --device cuda
    anygpt eval caption --model DIR --data dataset_coco.json --out runs/coco-caption
    anygpt eval toyworld --model toyworld --limit 8 --out runs/toyworld
    anygpt eval t2v ... --resume            (continue an interrupted run: finished samples are not redone)

A command module of ``anygpt.cli``: ``COMMANDS``, ``add_arguments`` and ``run``. The tasks come from
``anygpt.apps.evaluation.tasks`` and the ``anygpt.eval_tasks`` entry points (the toy world's, for one).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from anygpt.apps.evaluation.networks import NETWORKS, FeatureNetworks
from anygpt.apps.evaluation.report import format_table
from anygpt.apps.evaluation.runner import run_evaluation
from anygpt.apps.evaluation.tasks import BUILTIN_TASKS, EvalContext, get_task, task_names
from anygpt.apps.runtime_args import add_runtime_arguments, runtime_options
from anygpt.base.errors import UsageError
from anygpt.core.pipeline import AnyGPTPipeline

__all__ = ["COMMANDS", "add_arguments", "run"]

COMMANDS: dict[str, str] = {
    "eval": "evaluate a model: FID/KID/CLIP score, FAD, CLIPSIM/FVD, COCO caption metrics, VQAv2, the toy world",
}


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """Fill the sub-parser of ``anygpt eval``."""
    if command != "eval":
        raise ValueError(f"unknown command {command!r}: expected one of {', '.join(COMMANDS)}")
    lines = [f"  {name:<9} {task.summary}" for name, task in BUILTIN_TASKS.items()]
    lines += [
        f"  {name:<9} (from the anygpt.eval_tasks entry points)" for name in task_names() if name not in BUILTIN_TASKS
    ]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "tasks:\n"
        + "\n".join(lines)
        + "\n\nfeature networks are never downloaded: "
        + "; ".join(f"{spec.flag} or ${spec.env}" for spec in NETWORKS.values())
    )
    parser.add_argument("task", choices=task_names(), help="what to evaluate (see below)")
    parser.add_argument("--model", default="toyworld", help="preset name or save_pretrained folder (default toyworld)")
    parser.add_argument("--data", help="the data file (COCO Karpathy JSON, AudioCaps CSV, MSR-VTT JSON, VQAv2 "
                        "questions JSON, NExT-GPT cc3m/webvid/audiocap JSON)")  # fmt: skip
    parser.add_argument("--format", help="the data file's format (default: recognised from the file)")
    parser.add_argument("--media-root", help="folder the data's media paths are relative to")
    parser.add_argument("--split", help="split of a Karpathy / MSR-VTT file (default test)")
    parser.add_argument("--annotations", help="VQAv2 annotations JSON (the answers)")
    parser.add_argument("--limit", type=int, help="the first N samples (toyworld: held-out items per figure)")
    parser.add_argument("--out", help="the run's folder (default runs/eval-TASK)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out; finished samples are kept")
    parser.add_argument("--seed", type=int, default=0, help="sample i is generated with seed + i (default 0)")
    parser.add_argument("--batch-size", type=int, default=1, help="requests generated together (default 1)")
    parser.add_argument("--feature-batch-size", type=int, default=16, help="media per feature-network batch")
    parser.add_argument("--metrics", help="comma-separated subset of the task's metrics")
    parser.add_argument("--prompt-template", help="the prompt, from {caption} / {question} / {noun}")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="LLM reply length limit")
    parser.add_argument("--steps", type=int, default=None, help="decoder denoising steps (default: each decoder's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = parser.add_argument_group("feature networks (local paths or Hugging Face cache ids; nothing downloads)")
    for name, spec in NETWORKS.items():
        group.add_argument(spec.flag, dest=f"network_{name}", metavar="PATH",
                           help=f"{spec.what} for {', '.join(spec.metrics)} (or ${spec.env})")  # fmt: skip
    add_runtime_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``anygpt eval``: evaluate, print the Markdown table and where the run's files are."""
    if args.command != "eval":
        raise ValueError(f"unknown command {args.command!r}: expected one of {', '.join(COMMANDS)}")
    for name in ("limit", "batch_size", "feature_batch_size", "max_new_tokens", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    task = get_task(args.task)
    runtime = runtime_options(args)
    device = (runtime.device if runtime is not None else None) or "cpu"
    generation = {"max_new_tokens": args.max_new_tokens, "num_inference_steps": args.steps}
    ctx = EvalContext(
        seed=args.seed,
        networks=FeatureNetworks({n: getattr(args, f"network_{n}") for n in NETWORKS}, device=device),
        metrics=None if not args.metrics else {m.strip() for m in args.metrics.split(",") if m.strip()},
        generation={k: v for k, v in generation.items() if v is not None},
        prompt_template=args.prompt_template,
        batch_size=args.feature_batch_size,
        out=Path(args.out or f"runs/eval-{args.task}").expanduser(),
    )
    read = {"format": args.format, "media_root": args.media_root, "split": args.split, "annotations": args.annotations}
    samples, data = task.samples(args.data, ctx, limit=args.limit, **read)
    if not samples:
        raise UsageError(f"eval {args.task}: no usable samples in {args.data}")
    task.check_networks(ctx)  # a missing feature network fails before the model loads
    pipe = AnyGPTPipeline.from_pretrained(args.model, runtime=runtime)
    report = run_evaluation(
        task, pipe, samples, ctx, model=args.model, data=data, resume=args.resume, progress=not args.no_progress,
        batch_size=args.batch_size, command=_command_line(args),
    )  # fmt: skip
    sys.stdout.write(format_table(report) + "\n")
    sys.stdout.write(f"\nreport: {ctx.out / 'report.json'}\ncontact sheet: {ctx.out / 'contact_sheet.png'}\n")
    targets = [m for m in report["metrics"].values() if m.get("target") is not None]
    return 1 if any(m["value"] is None or m["value"] < m["target"] for m in targets) else 0


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces the run (every option that was set), for the report."""
    words = ["anygpt", "eval", args.task]
    for name, value in vars(args).items():
        if name in ("command", "task", "verbose") or value is None or value is False:
            continue
        flag = NETWORKS[name[8:]].flag if name.startswith("network_") else "--" + name.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)
