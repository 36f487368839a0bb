"""``anygpt data sample DIR``: the synthetic sample dataset plus ``stage1.yaml``..``stage3.yaml`` that run on it.

The configs use the tiny preset and small step counts, so all three stages run on a laptop CPU in about a minute.
Paths inside them are relative to the config files, so the folder can be moved anywhere.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from anygpt.base.utils import write_text_atomic
from toyworld.sample import write_sample_dataset

HEADER = """\
# Stage {stage} on the anygpt sample dataset ({what}).
# Run:    anygpt train --stage {stage} --config {name}{chain}
# Paths below are relative to this file.
"""
WHAT = {
    1: "encoder-side alignment: media in, caption out; trains the input projectors",
    2: "decoder-side alignment: caption in, caption + signal tokens out; trains the output projectors",
    3: "instruction tuning: conversations; trains LoRA",
}


def sample_stage_config(stage: int, datasets: list[dict]) -> dict:
    """The tiny-preset config of one stage over the sample dataset's ``datasets`` entries."""
    return {
        "stage": stage,
        "model": "tiny",
        "output_dir": f"runs/stage{stage}",
        "cache_dir": "cache",
        "data": {"sampling": "round_robin", "max_length": 512, "datasets": datasets},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine"},
        "train": {"batch_size": 4, "max_steps": 30, "save_every": 10, "log_every": 1, "seed": 13},
    }


def write_sample(root: str | Path, *, seed: int = 0, size: int = 12) -> Path:
    """Write the sample dataset and its stage configs into ``root``; returns ``root`` (absolute)."""
    root = Path(root).expanduser().resolve()
    stages = write_sample_dataset(root, seed=seed, size=size)
    for stage, datasets in stages.items():
        name = f"stage{stage}.yaml"
        chain = "" if stage == 1 else f" --from runs/stage{stage - 1}/final   (or start from the preset)"
        text = HEADER.format(stage=stage, what=WHAT[stage], name=name, chain=chain)
        text += yaml.safe_dump(sample_stage_config(stage, datasets), sort_keys=False)
        write_text_atomic(root / name, text)
    return root
