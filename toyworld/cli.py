"""``anygpt toyworld ...`` and ``anygpt data sample``: the toy world's commands.

A command module of ``anygpt.cli`` (which loads it only for these commands): ``COMMANDS`` names the commands with
their one-line help, ``add_arguments`` fills a command's parser and ``run`` runs the parsed arguments.

    anygpt toyworld recipe OUT [--quick] [--only PARTS] [--until PART] [--jobs N] [--seed S] [--install]
    anygpt toyworld data DIR [--seed S] [--quick]
    anygpt toyworld eval [MODEL] [--samples N] [--output FILE] [--decoders]
    anygpt data sample DIR [--seed S] [--size N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from anygpt.apps.runtime_args import add_runtime_arguments, runtime_options
from anygpt.core.index import packaged_model_dir
from toyworld import evaluate
from toyworld.data import WorldSizes, write_world
from toyworld.recipe import PARTS, RecipeSettings, install_package, run_recipe, seed_decoders
from toyworld.sample_configs import write_sample

__all__ = ["COMMANDS", "add_arguments", "run"]

COMMANDS: dict[str, str] = {
    "toyworld": "the toy world: its dataset, the recipe that trains `toyworld`, evaluation",
    "data": "datasets: write a small synthetic sample dataset",
}


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """Fill the sub-parser of ``command`` (one of ``COMMANDS``)."""
    if command == "toyworld":
        _toyworld_arguments(parser)
    elif command == "data":
        data_sub = parser.add_subparsers(dest="data_command", required=True)
        sample = data_sub.add_parser("sample", help="write a synthetic dataset in NExT-GPT's formats + stage configs")
        sample.add_argument("dir", help="folder to write (new or empty)")
        sample.add_argument("--seed", type=int, default=0)
        sample.add_argument("--size", type=int, default=12, help="records per dataset")
    else:
        raise ValueError(f"unknown command {command!r}: expected one of {', '.join(COMMANDS)}")


def _toyworld_arguments(parser: argparse.ArgumentParser) -> None:
    toy_sub = parser.add_subparsers(dest="toyworld_command", required=True)
    recipe = toy_sub.add_parser("recipe", help="train the toyworld model from nothing (resumable; parts skip if done)")
    recipe.add_argument("out", help="the recipe's folder (every part writes a sub-folder)")
    recipe.add_argument("--quick", action="store_true", help="a few steps of every part (checks the recipe runs)")
    recipe.add_argument("--only", help="comma-separated parts to run (their inputs must be done)")
    recipe.add_argument("--until", help="stop after this part")
    recipe.add_argument(
        "--jobs", type=int, default=1,
        help="parts run at once, each in its own process with its share of the cores, all of them when it runs "
        "alone (2 on a 2-core machine: small models use two cores poorly, so two parts side by side finish sooner)",
    )  # fmt: skip
    recipe.add_argument("--seed", type=int, default=0)
    recipe.add_argument(
        "--decoders-from", metavar="MODEL",
        help="keep the decoders of this packaged toy-world model (a folder, or `toyworld` for the shipped one) "
        "instead of training them: retrains the data, encoder, language model and stages 1-3 only",
    )  # fmt: skip
    recipe.add_argument(
        "--install", action="store_true", help="copy the packaged model into the anygpt package (for its developers)"
    )
    world = toy_sub.add_parser("data", help="write the toy world's dataset (NExT-GPT formats)")
    world.add_argument("dir")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--quick", action="store_true", help="a small dataset")
    ev = toy_sub.add_parser("eval", help="score a model on held-out toy-world prompts and media")
    ev.add_argument("model", nargs="?", default="toyworld", help="preset name or folder (default toyworld)")
    ev.add_argument("--samples", type=int, default=96, help="held-out items per figure")
    ev.add_argument("--output", help="write the JSON report here")
    ev.add_argument(
        "--decoders", action="store_true", help="score each decoder alone from its own caption embeddings (a ceiling)"
    )
    ev.add_argument(
        "--tasks", default=",".join(evaluate.TASKS),
        help=f"comma-separated, some of {', '.join(evaluate.TASKS)} (default all)",
    )  # fmt: skip
    ev.add_argument(
        "--jobs", type=int, default=1,
        help="processes the tasks are split over, their reports merged (2 on a 2-core machine finishes sooner)",
    )  # fmt: skip
    add_runtime_arguments(ev)


def run(args: argparse.Namespace) -> int | None:
    """Run ``args.command`` with its parsed arguments; returns the exit status (None: 0)."""
    if args.command == "data":
        return sample(args)
    if args.command != "toyworld":
        raise ValueError(f"unknown command {args.command!r}: expected one of {', '.join(COMMANDS)}")
    if args.toyworld_command == "data":
        return world_data(args)
    if args.toyworld_command == "eval":
        return evaluate_model(args)
    return recipe(args)


def world_data(args: argparse.Namespace) -> None:
    """``anygpt toyworld data DIR``: the toy world's dataset; prints its counts."""
    info = write_world(args.dir, seed=args.seed, sizes=WorldSizes.quick() if args.quick else None)
    print(json.dumps(info["counts"]))


def evaluate_model(args: argparse.Namespace) -> int:
    """``anygpt toyworld eval``: prints the table; 1 when the system misses a target."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    return evaluate.run(
        args.model, samples=args.samples, output=args.output, decoders=args.decoders, runtime=runtime_options(args),
        tasks=tasks, jobs=args.jobs,
    )  # fmt: skip


def recipe(args: argparse.Namespace) -> None:
    """``anygpt toyworld recipe OUT``: the recipe's parts (those not done yet); prints the summary."""
    settings = RecipeSettings.quick(args.seed) if args.quick else RecipeSettings(seed=args.seed)
    only = [p.strip() for p in args.only.split(",")] if args.only else None
    if args.decoders_from:
        model = Path(args.decoders_from)
        if not (model / "anygpt_index.json").is_file():  # not a model folder: a packaged model's name
            model = packaged_model_dir(args.decoders_from)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        seed_decoders(args.out, model)
        trained_before = {"image-decoder", "video-decoder", "audio-decoder"}  # what the seeded parts were made from
        only = [p for p in (only or PARTS) if p not in trained_before]
    run_recipe(args.out, settings, only=only, until=args.until, jobs=args.jobs)
    print((Path(args.out) / "summary.md").read_text())
    if args.install:
        print(f"installed: {install_package(args.out)}")


def sample(args: argparse.Namespace) -> None:
    """``anygpt data sample DIR``: the sample dataset and the stage configs that run on it."""
    root = write_sample(args.dir, seed=args.seed, size=args.size)
    print(f"sample dataset: {root}")
    for stage in (1, 2, 3):
        print(f"  anygpt train --stage {stage} --config {root / f'stage{stage}.yaml'}")
