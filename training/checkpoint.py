"""Resumable checkpoints: ``checkpoint-STEP/`` with everything needed to continue exactly.

Contents: ``trainable.safetensors`` (the trained tensors only), ``optimizer.pt``, ``scheduler.pt``,
``rng-RANK.pt`` (every process's RNG states) and ``trainer_state.json`` (step, data position, config). A
checkpoint is written into a hidden temporary folder and renamed into place when complete, so a killed run never
leaves a checkpoint that looks complete but is not. ``.pt`` files are read back with ``weights_only=True``.

Also here: which checkpoint a run resumes from (``resume_folder``), the checks that it belongs to the run
(``check_checkpoint``) and the metrics log cut back to its step (``trim_metrics``).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from anygpt.base.errors import ConfigError
from anygpt.base.utils import write_text_atomic

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
FINAL_DIR = "final"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python_version": py_version,
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gaussian": float(np_state[4]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    accelerator,
    output_dir: Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer,
    scheduler,
    state: dict,
    keep: int,
) -> Path:
    """Write ``checkpoint-{step}`` atomically (all processes call this) and prune old ones. Returns its path.

    Not ``anygpt.base.utils.atomic_directory``: a protocol between processes. Every process writes its RNG state into
    the one ``.checkpoint-STEP.tmp`` folder between barriers, the main process renames it, and ``clean_partial``
    finds the folders of killed writes by that name.
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:  # every machine (a multi-node run needs a shared file system)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    sharded = accelerator.distributed_type.value in ("DEEPSPEED", "FSDP")
    if sharded:  # the optimizer state lives in shards: let accelerate gather and write it
        accelerator.save_state(str(tmp / "accelerate_state"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors"
        )
        if not sharded:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "sharded": sharded}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def clean_partial(output_dir: str | Path) -> None:
    """Remove the temporary folders of checkpoint writes that were killed."""
    for tmp in Path(output_dir).glob(".checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        logger.info("removed %s (an unfinished checkpoint write)", tmp)


def read_checkpoint(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The trainer state and the trained tensors of a checkpoint, read without touching the run (to validate)."""
    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise ValueError(f"{folder}: not a complete checkpoint ({STATE_FILE} missing)")
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{state_path}: not valid JSON ({err})") from None
    return state, load_file(folder / "trainable.safetensors")


def restore_checkpoint(accelerator, folder: str | Path, state: dict, *, optimizer, scheduler) -> None:
    """Restore optimizer, scheduler and this process's RNG from a checkpoint validated with ``read_checkpoint``."""
    folder = Path(folder)
    if state.get("world_size") != accelerator.num_processes:
        logger.warning(
            "%s was written by %s process(es), resuming with %d: the data plan is global, so the batches are the "
            "same, but the processes' random streams differ",
            folder,
            state.get("world_size"),
            accelerator.num_processes,
        )
    if state.get("sharded"):
        accelerator.load_state(str(folder / "accelerate_state"))
    else:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
    rng_file = folder / f"rng-{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))


def step_of(folder: Path) -> int:
    """The step of a ``checkpoint-STEP`` folder."""
    return int(folder.name.rsplit("-", 1)[-1])


def resume_folder(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint a run continues from.

    Args:
        output_dir: the run's folder.
        resume: None (a fresh run: refuses a folder holding a previous run), ``"auto"`` (the newest complete
            checkpoint in ``output_dir``, if any) or a checkpoint folder.

    Raises:
        ConfigError: a previous run without ``--resume``, a folder that is no checkpoint, or a checkpoint older than
            others of the same run.
    """
    existing = list_checkpoints(output_dir)
    if resume is None:
        if existing or (output_dir / FINAL_DIR).exists():
            raise ConfigError(
                f"{output_dir} holds a previous run; pass --resume auto to continue it, or choose another --output-dir"
            )
        return None
    if resume == "auto":
        return existing[-1] if existing else None
    folder = Path(resume).expanduser().resolve()
    if not (folder / STATE_FILE).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE})")
    newer = [p for p in existing if folder.parent == output_dir and step_of(p) > step_of(folder)]
    if newer:
        raise ConfigError(
            f"--resume {folder}: newer checkpoints of the same run exist ({', '.join(p.name for p in newer)}); "
            "resuming from an older one would mix two runs: remove the newer ones first, or resume from the newest"
        )
    return folder


def check_checkpoint(
    folder: Path,
    state: dict,
    trained: Mapping[str, torch.Tensor],
    run: Mapping[str, object],
    parameters: Mapping[str, torch.Tensor],
) -> None:
    """Check that a checkpoint (read with ``read_checkpoint``) belongs to this run before loading it.

    Args:
        folder: the checkpoint folder (for messages).
        state, trained: what ``read_checkpoint`` returned.
        run: this run's ``stage``, ``start``, ``global_batch`` and ``max_steps``.
        parameters: this run's trained parameters by name.

    Raises:
        ConfigError: naming what differs.
    """
    checks = [
        ("stage", "another stage"),
        ("start", "another starting model (--from)"),
        ("global_batch", "batch_size x processes x accumulation"),
        ("max_steps", "the learning-rate schedule would change"),
    ]
    for key, why in checks:
        if state.get(key) != run[key]:
            raise ConfigError(f"{folder}: written with {key} {state.get(key)!r}, this run has {run[key]!r} ({why})")
    if set(trained) != set(parameters):
        diff = sorted(set(trained) ^ set(parameters))
        raise ConfigError(
            f"{folder}: its trained tensors differ from this run's ({diff[:3]}...): another stage objective or "
            "trainable: section?"
        )
    for name, param in parameters.items():
        if tuple(trained[name].shape) != tuple(param.shape):
            raise ConfigError(f"{folder}: {name} has shape {tuple(trained[name].shape)}, expected {tuple(param.shape)}")


def trim_metrics(path: Path, step: int) -> None:
    """Keep the lines of a metrics log up to ``step`` (the checkpoint a run resumes from): the log then continues as
    a straight run's would. Lines that are not valid JSON (a killed write) are dropped."""
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s line %d is not valid JSON (a killed write?): dropped", path, number)
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))
