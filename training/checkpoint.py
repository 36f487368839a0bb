"""Resumable checkpoints: ``checkpoint-STEP/`` with everything needed to continue exactly.

Contents: ``trainable.safetensors`` (the trained tensors only), ``optimizer.pt``, ``scheduler.pt``,
``rng-RANK.pt`` (every process's RNG states) and ``trainer_state.json`` (step, data position, config). A
checkpoint is written into a hidden temporary folder and renamed into place when complete, so a killed run never
leaves a checkpoint that looks complete but is not. ``.pt`` files are read back with ``weights_only=True``. A full
disk ends the write with a ``TrainingError`` saying how much to free; the previous checkpoints are kept.

Also here: which checkpoint a run resumes from (``resume_folder``), the checks that it belongs to the run
(``check_checkpoint``), the checks that it is whole (``load_checkpoint``: every file present and readable, this
run's keys and shapes, finite values; a damaged checkpoint is a ``CheckpointError``, and ``--resume auto`` falls back
to the newest good one), the lock a run holds on its folder (``run_lock``), the sweep of what killed writes left
(``clean_partial``) and the metrics log cut back to its step (``trim_metrics``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from anygpt.base.errors import CheckpointError, ConfigError, TrainingError
from anygpt.base.utils import write_text_atomic
from anygpt.core.index import check_finite, read_json, read_weights

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
FINAL_DIR = "final"
LOCK_FILE = ".anygpt-train.lock"
DAMAGED_SUFFIX = ".damaged"
PRUNED_SUFFIX = ".pruned"
"""A checkpoint being removed is renamed ``.checkpoint-STEP.pruned`` first: a kill while it is deleted leaves a hidden
folder (swept by ``clean_partial``), never a half-deleted ``checkpoint-STEP`` that lists as complete."""
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


def any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective: every process calls it), so that all processes take
    the same branch after one of them failed."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([1.0 if flag else 0.0], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


def _write(path: Path, data: bytes) -> None:
    """Write one file of a checkpoint (the one place its bytes reach the disk: errors are plain ``OSError``s)."""
    with open(path, "wb") as handle:
        handle.write(data)


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # into memory: torch.save into a full disk fails without saying why
    return buffer.getvalue()


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) says the disk or the quota is full."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def format_size(size: int) -> str:
    """``size`` bytes for people: ``"512 B"``, ``"3.2 MB"``, ``"1.5 GB"``."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def free_space(folder: Path) -> int | None:
    """The bytes free on the device holding ``folder`` (None: unknown)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


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
    finds the folders of killed writes by that name. A checkpoint of the same step is replaced only once the new one
    is complete.

    Raises:
        TrainingError: the disk is full (saying how much the checkpoint needs and how much is free); the
            temporary folder is removed and the previous checkpoints are intact.
        OSError: another error writing the files (the temporary folder is removed).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    error: OSError | None = None
    if accelerator.is_local_main_process:  # every machine (a multi-node run needs a shared file system)
        try:
            tmp.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            error = err
    accelerator.wait_for_everyone()
    blob = _torch_bytes(rng_state())
    need = len(blob)
    if error is None:
        try:
            _write(tmp / f"rng-{accelerator.process_index}.pt", blob)
        except OSError as err:
            error = err
    sharded = accelerator.distributed_type.value in ("DEEPSPEED", "FSDP")
    if sharded:  # the optimizer state lives in shards: let accelerate gather and write it (a collective)
        try:
            accelerator.save_state(str(tmp / "accelerate_state"))
        except OSError as err:
            error = error or err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {
            TRAINABLE_FILE: safetensors_bytes({k: v.detach().float().cpu().contiguous() for k, v in trainable.items()})
        }
        if not sharded:
            files[OPTIMIZER_FILE] = _torch_bytes(optimizer.state_dict())
        files[SCHEDULER_FILE] = _torch_bytes(scheduler.state_dict())
        files[STATE_FILE] = json.dumps({**state, "step": step, "sharded": sharded}, indent=2).encode()
        need += sum(len(data) for data in files.values())
        for name, data in files.items():
            if error is not None:
                break
            try:
                _write(tmp / name, data)
            except OSError as err:
                error = err
    if any_process(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        if error is None:
            raise TrainingError(f"another process could not write checkpoint-{step} in {output_dir} (see its message)")
        if not disk_full(error):
            raise error
        previous = list_checkpoints(output_dir)
        kept = f"{previous[-1].name} is intact" if previous else "no earlier checkpoint was written"
        free = free_space(output_dir)
        raise TrainingError(
            f"no space left on the device of {output_dir} while writing checkpoint-{step} (it needs about "
            f"{format_size(need)}{f', {format_size(free)} are free' if free is not None else ''}): free space "
            f"there (other runs, other files; train.keep_checkpoints keeps fewer checkpoints), then continue with "
            f"--resume auto; {kept}"
        ) from None
    if accelerator.is_main_process:
        _move_into_place(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            _remove_checkpoint(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``; an existing ``final`` is set aside first (``.NAME.old``) and removed
    after, so that a kill in between leaves one complete checkpoint (``clean_partial`` puts it back)."""
    if not final.exists():
        tmp.rename(final)
        return
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint: hidden first (``PRUNED_SUFFIX``), so that no kill leaves it half-deleted under its name."""
    pruned = folder.with_name(f".{folder.name}{PRUNED_SUFFIX}")
    if pruned.exists():
        shutil.rmtree(pruned, ignore_errors=True)
    folder.rename(pruned)
    shutil.rmtree(pruned, ignore_errors=True)


def clean_partial(output_dir: str | Path) -> None:
    """Remove what killed writes left in a run's folder (call it holding ``run_lock``: they are a dead run's).

    The temporary folders of checkpoint writes (``.checkpoint-STEP.tmp``), of checkpoints being pruned
    (``.checkpoint-STEP.pruned``), of the final save (``.final.*tmp-*``, and ``.final.old-*`` set aside while it was
    replaced) and of the metrics log. A checkpoint set aside while it was replaced (``.checkpoint-STEP.old``) is put
    back when the new one never arrived.
    """
    output_dir = Path(output_dir)
    for old in output_dir.glob(".checkpoint-*.old"):
        final = output_dir / old.name[1 : -len(".old")]
        if not final.exists() and _NAME.match(final.name):
            old.rename(final)
            logger.warning("restored %s (a replacement of it was killed)", final)
        else:
            shutil.rmtree(old, ignore_errors=True)
    patterns = (
        ".checkpoint-*.tmp",
        f".checkpoint-*{PRUNED_SUFFIX}",
        f".{FINAL_DIR}.*tmp-*",
        f".{FINAL_DIR}.old-*",
        ".metrics.jsonl.*tmp*",
    )
    for pattern in patterns:
        for tmp in output_dir.glob(pattern):
            if tmp.is_symlink() or not tmp.exists():
                continue
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            logger.info("removed %s (left by a killed write)", tmp)


@contextlib.contextmanager
def run_lock(output_dir: str | Path) -> Iterator[None]:
    """Hold ``output_dir`` for one run (``LOCK_FILE``, an advisory lock the system drops when the process ends): a
    second run into the same folder is refused, and what temporaries the folder holds are a dead run's.

    Raises:
        ConfigError: another live process holds the folder.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = Path(output_dir) / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise ConfigError(
                f"{output_dir} is in use by another anygpt train ({owner}); wait for it to end, or choose another "
                "--output-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


@dataclasses.dataclass
class LoadedCheckpoint:
    """Everything a checkpoint holds for this process, read and checked (``load_checkpoint``)."""

    folder: Path
    state: dict
    trained: dict[str, torch.Tensor]
    optimizer: dict | None  # None: sharded (accelerate's own state folder)
    scheduler: dict
    rng: dict | None  # None: written by fewer processes than this run has

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _read_torch(path: Path) -> object:
    """A ``.pt`` file of a checkpoint, read with ``weights_only=True``.

    Raises:
        CheckpointError: missing or unreadable.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: missing" if not path.exists() else f"{path}: not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and storage errors alike: the file is damaged
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable torch file ({reason}); the file is damaged") from None


def load_checkpoint(
    folder: str | Path,
    *,
    run: Mapping[str, object],
    parameters: Mapping[str, torch.Tensor],
    optimizer,
    process_index: int = 0,
) -> LoadedCheckpoint:
    """Read a checkpoint and check it, before anything of the run changes.

    Args:
        folder: the checkpoint folder.
        run: this run's ``stage``, ``start``, ``global_batch`` and ``max_steps`` (``check_checkpoint``).
        parameters: this run's trained parameters by name (the keys and shapes ``trainable.safetensors`` must hold).
        optimizer: this run's optimizer (the parameter groups ``optimizer.pt`` must match).
        process_index: this process (its ``rng-RANK.pt``).

    Raises:
        CheckpointError: a damaged checkpoint: a file missing or unreadable, a step that is not its name's, keys or
            shapes that are not this run's, non-finite values.
        ConfigError: a whole checkpoint of another run (``check_checkpoint``).
    """
    folder = Path(folder)
    state = read_json(folder / STATE_FILE, what=STATE_FILE)
    step = state.get("step")
    match = _NAME.match(folder.name)
    if not isinstance(step, int) or step < 0 or (match and int(match.group(1)) != step):
        raise CheckpointError(f"{folder / STATE_FILE}: step {step!r} does not match the folder's name")
    check_checkpoint(folder, state, run)
    if isinstance(run.get("max_steps"), int) and step > run["max_steps"]:
        raise CheckpointError(f"{folder / STATE_FILE}: step {step} is past the run's max_steps {run['max_steps']}")
    trained = read_weights(folder / TRAINABLE_FILE, expected=parameters, what="trained tensors")
    if state.get("sharded"):
        if not (folder / "accelerate_state").is_dir():
            raise CheckpointError(f"{folder / 'accelerate_state'}: missing (the sharded optimizer state)")
        saved_optimizer = None
    else:
        saved_optimizer = _read_torch(folder / OPTIMIZER_FILE)
        _check_optimizer_state(folder / OPTIMIZER_FILE, saved_optimizer, optimizer)
    scheduler = _read_torch(folder / SCHEDULER_FILE)
    if not isinstance(scheduler, dict):
        raise CheckpointError(f"{folder / SCHEDULER_FILE}: holds {type(scheduler).__name__}, not a scheduler state")
    rng = None
    world = state.get("world_size")
    if not isinstance(world, int) or process_index < world:
        path = folder / f"rng-{process_index}.pt"
        rng = _read_torch(path)
        if not isinstance(rng, dict) or "torch" not in rng or "python" not in rng:
            raise CheckpointError(f"{path}: not a random-state file; the file is damaged")
    return LoadedCheckpoint(folder, state, trained, saved_optimizer, scheduler, rng)


def _check_optimizer_state(path: Path, saved: object, optimizer) -> None:
    """``optimizer.pt`` fits this run's optimizer: its parameter groups, one state per trained tensor of that
    tensor's shape, finite values."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise CheckpointError(f"{path}: not an optimizer state; the file is damaged")
    groups = saved.get("param_groups")
    ours = optimizer.param_groups
    if not isinstance(groups, list) or len(groups) != len(ours):
        count = len(groups) if isinstance(groups, list) else groups
        raise CheckpointError(f"{path}: holds {count} parameter groups, this run's optimizer has {len(ours)}")
    params = {}
    for i, (group, mine) in enumerate(zip(groups, ours, strict=True)):
        ids = group.get("params") if isinstance(group, dict) else None
        if not isinstance(ids, list) or len(ids) != len(mine["params"]):
            count = len(ids) if isinstance(ids, list) else ids
            raise CheckpointError(
                f"{path}: parameter group {i} holds {count} tensors, this run trains {len(mine['params'])}"
            )
        params.update(zip(ids, mine["params"], strict=True))
    for index, entry in saved["state"].items():
        if index not in params or not isinstance(entry, dict):
            raise CheckpointError(f"{path}: a state for parameter {index!r}, which this run's optimizer has not")
        shape = tuple(params[index].shape)
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor) or value.ndim == 0:
                continue
            if tuple(value.shape) != shape:
                raise CheckpointError(
                    f"{path}: key 'state.{index}.{key}' has shape {tuple(value.shape)}, expected {shape}"
                )
            check_finite(path, f"state.{index}.{key}", value)


def apply_checkpoint(
    accelerator, loaded: LoadedCheckpoint, parameters: Mapping[str, torch.Tensor], *, optimizer, scheduler
) -> None:
    """Load a checkpoint read with ``load_checkpoint`` into the run: trained tensors, optimizer, scheduler and
    this process's RNG."""
    folder, state = loaded.folder, loaded.state
    if state.get("world_size") != accelerator.num_processes:
        logger.warning(
            "%s was written by %s process(es), resuming with %d: the data plan is global, so the batches are the "
            "same, but the processes' random streams differ",
            folder,
            state.get("world_size"),
            accelerator.num_processes,
        )
    with torch.no_grad():
        for name, param in parameters.items():
            param.copy_(loaded.trained[name].to(param))
    try:
        if loaded.optimizer is None:
            accelerator.load_state(str(folder / "accelerate_state"))
        else:
            optimizer.load_state_dict(loaded.optimizer)
        scheduler.load_state_dict(loaded.scheduler)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{folder}: the optimizer or scheduler state does not fit this run ({err})") from None
    if loaded.rng is not None:
        try:
            set_rng_state(loaded.rng)
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(
                f"{folder}: its random state cannot be restored ({err}); the file is damaged"
            ) from None


def move_damaged(folder: Path) -> Path:
    """Set a damaged checkpoint aside (``checkpoint-STEP.damaged``, which no run lists or prunes); returns where."""
    target = folder.with_name(folder.name + DAMAGED_SUFFIX)
    number = 2
    while target.exists():
        target = folder.with_name(f"{folder.name}{DAMAGED_SUFFIX}-{number}")
        number += 1
    folder.rename(target)
    return target


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


def check_checkpoint(folder: Path, state: dict, run: Mapping[str, object]) -> None:
    """Check that a checkpoint belongs to this run before loading it (``load_checkpoint`` calls it).

    Args:
        folder: the checkpoint folder (for messages).
        state: its ``trainer_state.json``.
        run: this run's ``stage``, ``start``, ``global_batch`` and ``max_steps``.

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
