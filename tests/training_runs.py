"""Small stage-1 training runs on the ``sample`` fixture's data (conftest.py), shared by the hardening tests that
kill, damage and resume them."""

from __future__ import annotations

from pathlib import Path

from training.config import load_config
from training.trainer import StageTrainer

SETS = {"cache_dir": "null", "train.save_every": 2, "train.keep_checkpoints": 3}
"""A checkpoint every 2 steps, 3 kept, no feature cache."""


def run_stage(sample: Path, out: Path, steps: int = 4, resume: str | None = None, **sets) -> Path:
    """Stage 1 on ``sample`` into ``out`` for ``steps`` steps (``sets``: more ``--set`` overrides)."""
    overrides = [f"{k}={v}" for k, v in {**SETS, **sets}.items()]
    config = load_config(sample / "stage1.yaml", overrides=overrides)
    return StageTrainer(config, output_dir=out, max_steps=steps, resume=resume).train()
