"""``anygpt train`` and ``anygpt cache``: the training library's commands.

A command module of ``anygpt.cli`` (which loads it only for these commands): ``COMMANDS`` names the commands with
their one-line help, ``add_arguments`` fills a command's parser and ``run`` runs the parsed arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from anygpt.base.errors import ConfigError
from training.checkpoint import list_checkpoints
from training.config import load_config
from training.precompute import precompute
from training.trainer import StageTrainer

logger = logging.getLogger(__name__)

__all__ = ["COMMANDS", "add_arguments", "run"]

COMMANDS: dict[str, str] = {
    "train": "run a training stage from a YAML config (0: Q-Former pretraining, 1, 2 or 3)",
    "cache": "precompute encoder features and caption embeddings for a stage config",
}
STAGE_HELP = (
    "0 Q-Former pretraining (BLIP-2, optional), 1 encoder-side alignment, 2 decoder-side alignment, "
    "3 instruction tuning"
)


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """Fill the sub-parser of ``command`` (one of ``COMMANDS``)."""
    if command == "train":
        parser.add_argument("--stage", type=int, choices=(0, 1, 2, 3), required=True, help=STAGE_HELP)
        parser.add_argument("--config", required=True, help="the stage's YAML config")
        parser.add_argument("--from", dest="start", help="preset name or a previous stage's final/ folder")
        parser.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
        )
        parser.add_argument("--output-dir", help="where checkpoints, metrics and final/ go")
        parser.add_argument("--max-steps", type=int, help="optimizer steps (overrides train.max_steps)")
        parser.add_argument(
            "--resume", help="'auto' (the newest checkpoint in the output folder) or a checkpoint folder"
        )
    elif command == "cache":
        parser.add_argument("--config", required=True)
        parser.add_argument("--stage", type=int, choices=(0, 1, 2, 3), help=STAGE_HELP)
        parser.add_argument("--from", dest="start", help="preset name or a final/ folder (default: the config's model)")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        parser.add_argument("--cache-dir", help="the cache folder (default: the config's cache_dir)")
    else:
        raise ValueError(f"unknown command {command!r}: expected one of {', '.join(COMMANDS)}")


def run(args: argparse.Namespace) -> int | None:
    """Run ``args.command`` with its parsed arguments; returns the exit status (None: 0)."""
    if args.command == "train":
        return train(args)
    if args.command == "cache":
        return cache(args)
    raise ValueError(f"unknown command {args.command!r}: expected one of {', '.join(COMMANDS)}")


def train(args: argparse.Namespace) -> int | None:
    """``anygpt train``: one stage run; prints the ``final/`` folder.

    SIGTERM is handled as Ctrl-C (a checkpoint after the running step, see ``training.trainer``); the exit status is
    then 143 (128 + SIGTERM), as for a process the signal ended.
    """
    config = load_config(args.config, overrides=args.overrides, stage=args.stage)
    trainer = StageTrainer(
        config, start=args.start, output_dir=args.output_dir, max_steps=args.max_steps, resume=args.resume
    )
    try:
        final = trainer.train()
    except KeyboardInterrupt:
        if getattr(trainer, "stop_signal", None) != signal.SIGTERM:
            raise
        written = list_checkpoints(trainer.output_dir)
        hint = f"; {written[-1].name} written, continue with --resume auto" if written else ""
        print(f"anygpt: terminated (SIGTERM){hint}", file=sys.stderr)
        return 128 + signal.SIGTERM
    if trainer.accelerator.is_main_process:
        print(f"final model: {final}")
    return None


def cache(args: argparse.Namespace) -> None:
    """``anygpt cache``: fill the feature cache; prints the counts as one JSON line."""
    overrides = list(args.overrides)
    if args.cache_dir:
        overrides.append(f"cache_dir={Path(args.cache_dir).expanduser().resolve()}")
    config = load_config(args.config, overrides=overrides, stage=args.stage)
    if config.cache_dir is None:
        raise ConfigError(f"{config.source}: cache_dir: not set; give --cache-dir DIR or set cache_dir in the config")
    stats = precompute(config, start=args.start)
    print(json.dumps(stats))
