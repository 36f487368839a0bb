"""Small shared helpers: dtype names, locating real checkpoints offline, atomic file and folder writes, and the sweep
of temporaries that a killed writer left behind."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TEMPORARY_MARKER = ".anygpt-tmp-"
"""What names the temporaries of :func:`atomic_file` and :func:`atomic_directory`:
``.NAME.anygpt-tmp-<pid>-<random><suffix>`` beside the target ``NAME``, ``<pid>`` the writing process."""

_TEMPORARY_NAME = re.compile(
    r"\.(?P<name>.+)" + re.escape(TEMPORARY_MARKER) + r"(?P<pid>[0-9]+)-[a-z0-9_]{8}(?P<suffix>.*)", re.DOTALL
)
_TEMPORARY_NAME_BYTES = 150  # of the target's name kept in a temporary's name (file names hold 255 bytes)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a dtype name ("float32", "float16", "bfloat16") to ``torch.dtype``; clear error for others."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def torchao_weight_config(bits: int, device: str | torch.device):
    """torchao's weight-only quantization config for ``bits`` (8 or 4) on ``device``'s kind.

    8-bit: ``Int8WeightOnlyConfig`` (per-row scales). 4-bit on CUDA: ``Int4WeightOnlyConfig`` (groups of 128, the
    tinygemm tile layout); elsewhere ``IntxWeightOnlyConfig(int4, groups of 32)``, whose int4 values are held one per
    byte (4-bit precision, 8-bit storage: the CPU has no packed int4 kernel).
    """
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig  # optional
    from torchao.quantization.granularity import PerGroup

    if bits == 8:
        return Int8WeightOnlyConfig()
    if bits != 4:
        raise ValueError(f"torchao weight bits: expected 8 or 4, got {bits!r}")
    if torch.device(device).type == "cuda":
        return Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


def resolve_local_model(source: str, *, what: str) -> str:
    """Return a local folder holding the model ``source``: the folder itself, or its Hugging Face cache snapshot.

    Nothing is downloaded. Raises ``FileNotFoundError`` naming the id and every place looked.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    if not _is_repo_id(source):
        raise FileNotFoundError(f"{what} folder {str(path)!r} does not exist (and {source!r} is not a hub id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return snapshot_download(source, local_files_only=True)
    except Exception as err:  # huggingface_hub raises several kinds for "not in cache"
        raise FileNotFoundError(
            f"{what} {source!r} is neither a local folder nor in the Hugging Face cache ({HF_HUB_CACHE}); "
            f"download it first, e.g. `hf download {source}`, or pass the folder path"
        ) from err


def _is_repo_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    On failure (any exception, ``KeyboardInterrupt`` included) the temporary folder is removed and ``target`` is left as
    it was. The folder is named ``.NAME.anygpt-tmp-<pid>-<random>`` (see :data:`TEMPORARY_MARKER`): one left by a
    killed process is removed by :func:`sweep_stale_temporaries`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should follow the user's umask
        yield tmp
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one rename.

    ``suffix`` keeps the extension a writer looks at (e.g. ".png"). On failure (any exception, ``KeyboardInterrupt``
    included) the temporary file is removed and ``target`` is left as it was, so a reader never sees a half-written
    file. The temporary is named ``.NAME.anygpt-tmp-<pid>-<random><suffix>`` (see :data:`TEMPORARY_MARKER`): one left
    by a killed process is removed by :func:`sweep_stale_temporaries`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=suffix, dir=target.parent)
    tmp = Path(name)
    try:
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result should follow the user's umask
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _temporary_prefix(target: Path) -> str:
    """``.NAME.anygpt-tmp-<pid>-``: what a temporary beside ``target`` is named before its random part."""
    name = target.name.encode("utf-8", "surrogateescape")[:_TEMPORARY_NAME_BYTES].decode("utf-8", "ignore")
    return f".{name}{TEMPORARY_MARKER}{os.getpid()}-"


def temporary_owner(name: str) -> int | None:
    """The id of the process that made the temporary named ``name`` (:func:`atomic_file`, :func:`atomic_directory`),
    or None when ``name`` is not such a temporary's name."""
    match = _TEMPORARY_NAME.fullmatch(name)
    return int(match["pid"]) if match else None


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie (a process of another user counts).

    Off POSIX systems the answer is always True: nothing is known, so nothing is swept.
    """
    if os.name != "posix":
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    try:  # Linux: a zombie has exited and only waits for its parent to read its status
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def sweep_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers left in ``folder``: the files and folders named
    ``.NAME.anygpt-tmp-<pid>-<random>...`` (:func:`atomic_file`, :func:`atomic_directory`) whose process ``<pid>`` is
    gone. Everything else is kept: other files, temporaries of running processes (this one included), symbolic
    links. Only ``folder`` itself is looked at, not its subfolders; a folder that does not exist holds nothing.

    A temporary written on another machine into a shared folder is judged by a process id of this machine: sweep a
    shared folder only while no other machine writes into it.

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        pid = temporary_owner(entry.name)
        if pid is None or process_alive(pid):
            continue
        path = Path(entry.path)
        try:
            if entry.is_symlink():
                continue
            if entry.is_dir():
                shutil.rmtree(path)
            elif entry.is_file():
                path.unlink()
            else:
                continue
        except FileNotFoundError:  # another process swept it first
            continue
        except OSError as err:
            logger.warning("cannot remove %s, left by process %d: %s", path, pid, err)
            continue
        logger.info("removed %s, left by process %d that is gone", path, pid)
        removed.append(path)
    return removed


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``target`` atomically (see :func:`atomic_file`); returns ``target``."""
    with atomic_file(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
