"""``anygpt train``, ``anygpt data sample`` and ``anygpt cache``: the training side of the command line."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_commands(sub) -> None:
    """Add the training sub-commands to the ``anygpt`` parser."""
    train = sub.add_parser("train", help="run a training stage (0, 1, 2 or 3) from a YAML config")
    train.add_argument("--stage", type=int, choices=(0, 1, 2, 3), required=True)
    train.add_argument("--config", required=True, help="the stage's YAML config")
    train.add_argument("--from", dest="start", help="preset name or a previous stage's final/ folder")
    train.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    train.add_argument("--output-dir", help="where checkpoints, metrics and final/ go")
    train.add_argument("--max-steps", type=int, help="optimizer steps (overrides train.max_steps)")
    train.add_argument("--resume", help="'auto' (the newest checkpoint in the output folder) or a checkpoint folder")

    data = sub.add_parser("data", help="datasets: write a small synthetic sample dataset")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    sample = data_sub.add_parser("sample", help="write a synthetic dataset in NExT-GPT's formats + stage configs")
    sample.add_argument("dir", help="folder to write (new or empty)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--size", type=int, default=12, help="records per dataset")

    cache = sub.add_parser("cache", help="precompute encoder features and caption embeddings for a stage config")
    cache.add_argument("--config", required=True)
    cache.add_argument("--stage", type=int, choices=(0, 1, 2, 3))
    cache.add_argument("--from", dest="start", help="preset name or a final/ folder (default: the config's model)")
    cache.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cache.add_argument("--cache-dir", help="the cache folder (default: the config's cache_dir)")

    toy = sub.add_parser("toyworld", help="the toy world: its dataset, the recipe that trains `toyworld`, evaluation")
    toy_sub = toy.add_subparsers(dest="toyworld_command", required=True)
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
        "--install", action="store_true", help="copy the packaged model into the anygpt package (for its developers)"
    )
    world = toy_sub.add_parser("data", help="write the toy world's dataset (NExT-GPT formats)")
    world.add_argument("dir")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--quick", action="store_true", help="a small dataset")
    ev = toy_sub.add_parser("eval", help="score a model on held-out toy-world prompts and media")
    ev.add_argument("model", nargs="?", default="toyworld", help="preset name or folder (default toyworld)")
    ev.add_argument("--samples", type=int, default=96, help="samples per figure")
    ev.add_argument("--output", help="write the JSON report here")
    ev.add_argument(
        "--decoders", action="store_true", help="score each decoder alone from its own caption embeddings (a ceiling)"
    )


COMMANDS = ("train", "data", "cache", "toyworld")


def run(args: argparse.Namespace) -> None:
    if args.command == "train":
        _train(args)
    elif args.command == "data":
        _sample(args)
    elif args.command == "toyworld":
        _toyworld(args)
    else:
        _cache(args)


def _toyworld(args: argparse.Namespace) -> None:
    if args.toyworld_command == "data":
        from toyworld.data import WorldSizes, write_world

        info = write_world(args.dir, seed=args.seed, sizes=WorldSizes.quick() if args.quick else None)
        print(json.dumps(info["counts"]))
    elif args.toyworld_command == "eval":
        from toyworld import evaluate as toy_eval

        status = toy_eval.run(args.model, samples=args.samples, output=args.output, decoders=args.decoders)
        if status:
            raise SystemExit(status)
    else:
        from toyworld.recipe import RecipeSettings, install_package, run_recipe

        settings = RecipeSettings.quick(args.seed) if args.quick else RecipeSettings(seed=args.seed)
        only = [p.strip() for p in args.only.split(",")] if args.only else None
        run_recipe(args.out, settings, only=only, until=args.until, jobs=args.jobs)
        print((Path(args.out) / "summary.md").read_text())
        if args.install:
            print(f"installed: {install_package(args.out)}")


def _train(args: argparse.Namespace) -> None:
    from training.config import load_config
    from training.trainer import StageTrainer

    config = load_config(args.config, overrides=args.overrides, stage=args.stage)
    trainer = StageTrainer(
        config, start=args.start, output_dir=args.output_dir, max_steps=args.max_steps, resume=args.resume
    )
    final = trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"final model: {final}")


def _sample(args: argparse.Namespace) -> None:
    from toyworld.sample_configs import write_sample

    root = write_sample(args.dir, seed=args.seed, size=args.size)
    print(f"sample dataset: {root}")
    for stage in (1, 2, 3):
        print(f"  anygpt train --stage {stage} --config {root / f'stage{stage}.yaml'}")


def _cache(args: argparse.Namespace) -> None:
    from training.config import ConfigError, load_config
    from training.precompute import precompute

    overrides = list(args.overrides)
    if args.cache_dir:
        overrides.append(f"cache_dir={Path(args.cache_dir).expanduser().resolve()}")
    config = load_config(args.config, overrides=overrides, stage=args.stage)
    if config.cache_dir is None:
        raise ConfigError(f"{config.source}: cache_dir: not set; give --cache-dir DIR or set cache_dir in the config")
    stats = precompute(config, start=args.start)
    print(json.dumps(stats))
