"""The folder format written by ``save_pretrained``: one JSON index (the full config and the trained parts' files).

A folder holds ``anygpt_index.json`` and the files it names, relative to the folder, so it works wherever it is.
Every file read from a folder must resolve inside it (a symbolic link that leaves it is refused, file by file), and a
damaged file ends in one ``CheckpointError`` naming the file and, for weights, the key and both shapes: see
``read_json``, ``read_weights`` and ``check_tokenizer_folder``.
Component sources (encoder checkpoint, LLM, decoders) are a preset's hub id or ``"tiny"``, a path inside the folder
written ``./...``, a model shipped in the package written ``packaged:NAME/...`` (resolved against this machine's
install, so a model saved or fine-tuned from ``toyworld`` loads anywhere), or a path elsewhere on this machine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from anygpt.base.errors import CheckpointError
from anygpt.core.config import PACKAGED_MODELS, AnyGPTConfig

INDEX_FILE = "anygpt_index.json"
FORMAT_VERSION = 1
PACKAGED_PREFIX = "packaged:"
# where the packaged models live: the ``anygpt`` package folder (tests point it elsewhere)
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def _anygpt_version() -> str:
    try:
        return version("anygpt")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def packaged_model_dir(name: str) -> Path:
    """The folder of a model shipped in the package.

    Raises:
        FileNotFoundError: the package was installed without it (saying how to build it).
    """
    if name not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {name!r}: expected one of {', '.join(sorted(PACKAGED_MODELS))}")
    folder = PACKAGE_ROOT / PACKAGED_MODELS[name]
    if not (folder / INDEX_FILE).is_file():
        raise FileNotFoundError(
            f"the packaged model {name!r} is missing from {folder}; build it with "
            f"`anygpt toyworld recipe OUT --install` (about 2 hours on 2 CPU cores)"
        )
    return folder


def resolve_part(folder: str | os.PathLike, rel: str, what: str) -> Path:
    """``folder / rel`` for a path named in an index, refusing absolute paths and paths that leave ``folder``.

    Raises:
        CheckpointError: ``rel`` is not a relative path inside ``folder``, or it is missing.
    """
    folder = Path(folder).resolve()
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{folder / INDEX_FILE}: {what} is {rel!r}, expected a path relative to the folder")
    path = (folder / rel).resolve()
    if Path(rel).is_absolute() or not _inside(path, folder):
        raise CheckpointError(f"{folder / INDEX_FILE}: {what} path {rel!r} points outside the model folder")
    if not path.exists():
        raise CheckpointError(f"{folder / INDEX_FILE}: {what} {rel!r} is missing from the folder")
    return path


def _allowed_roots(folder: Path) -> list[Path]:
    """Where the files of the (resolved) ``folder`` may resolve: the folder itself, and for a Hugging Face hub
    download (``.../snapshots/REV/...``, whose files are links into ``.../blobs``) that repository's ``blobs``."""
    for revision in [folder, *folder.parents]:
        blobs = revision.parent.parent / "blobs"
        if revision.parent.name == "snapshots" and blobs.is_dir():
            return [folder, blobs]
    return [folder]


def _inside(path: Path, folder: Path) -> bool:
    return any(path.is_relative_to(root) for root in _allowed_roots(folder))


def contained_file(folder: str | os.PathLike, path: str | os.PathLike, what: str) -> Path:
    """``path`` (a file of the model ``folder``) resolved, once it is known to be a regular file inside ``folder``.

    File-level containment: a symbolic link to a file outside the model folder is refused even when the folders on
    the way are inside (a link into the hub cache's ``blobs`` of a downloaded folder is accepted).

    Raises:
        CheckpointError: naming the file: missing, not a file, or resolving outside ``folder``.
    """
    root = Path(folder).resolve()
    path = Path(path)
    resolved = path.resolve()
    if not _inside(resolved, root):
        raise CheckpointError(f"{path}: {what} resolves to {resolved}, outside the model folder {root}; refused")
    if not resolved.exists():
        raise CheckpointError(f"{path}: {what} is missing")
    if not resolved.is_file():
        raise CheckpointError(f"{path}: {what} is not a file")
    return resolved


def check_files_inside(folder: str | os.PathLike, part: str | os.PathLike, what: str) -> None:
    """Check that ``part`` (a file or folder of the model ``folder``) and every file under it resolve inside
    ``folder`` (``contained_file``): a component stored in the folder (``./llm``) may not link its weights out.

    Raises:
        CheckpointError: naming the first file that leaves the folder.
    """
    part = Path(part)
    files = [part] if not part.is_dir() else sorted(p for p in part.rglob("*") if p.is_symlink() or p.is_file())
    for path in files:
        if path.is_symlink() and path.resolve().is_dir():
            if not _inside(path.resolve(), Path(folder).resolve()):
                raise CheckpointError(f"{path}: {what} links to {path.resolve()}, outside the model folder; refused")
            continue
        contained_file(folder, path, what)


def read_json(path: str | os.PathLike, *, folder: str | os.PathLike | None = None, what: str = "file") -> dict:
    """A JSON object read from a model folder's file.

    Args:
        folder: the model folder the file must resolve inside (None: not checked).

    Raises:
        CheckpointError: naming the file: missing, outside ``folder``, not UTF-8, not valid JSON or not an object.
    """
    path = Path(path)
    if folder is not None:
        contained_file(folder, path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} is missing") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {err.start}); the file is damaged") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is damaged") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply; the file is damaged") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_weights(
    path: str | os.PathLike,
    *,
    folder: str | os.PathLike | None = None,
    expected: Mapping[str, torch.Tensor | tuple] | None = None,
    what: str = "weights",
    finite: bool = True,
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked before any is used.

    Args:
        folder: the model folder the file must resolve inside (``contained_file``; None: not checked).
        expected: the tensors (or shapes) the file must hold, by name: exactly these keys, these shapes, and a
            floating-point tensor where the model's is one. None: any keys.
        finite: refuse NaN and infinite values (naming the key and the first row holding one).

    Raises:
        CheckpointError: one line naming the file, and the key with the expected and the found shape where one
            differs: a missing, truncated or unreadable file, a missing or extra key, a wrong shape or kind, a
            non-finite value.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if folder is not None:
        contained_file(folder, path, what)
    elif not path.is_file():
        raise CheckpointError(f"{path}: {what} is missing" if not path.exists() else f"{path}: {what} is not a file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if expected is not None:
                _check_keys(path, keys, handle, expected)
            tensors = {key: handle.get_tensor(key) for key in keys}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason}); the file is damaged") from None
    if finite:
        for key, tensor in tensors.items():
            check_finite(path, key, tensor)
    return tensors


def _check_keys(path: Path, keys: list[str], handle, expected: Mapping[str, torch.Tensor | tuple]) -> None:
    missing = sorted(set(expected) - set(keys))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: key {missing[0]!r}{more} is missing")
    extra = sorted(set(keys) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{path}: key {extra[0]!r}{more} is not in the model")
    for key in keys:
        want = expected[key]
        shape = tuple(want.shape) if isinstance(want, torch.Tensor) else tuple(want)
        found_slice = handle.get_slice(key)
        found = tuple(found_slice.get_shape())
        if found != shape:
            raise CheckpointError(f"{path}: key {key!r} has shape {found}, expected {shape}")
        if isinstance(want, torch.Tensor) and want.is_floating_point():
            dtype = str(found_slice.get_dtype())
            if dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{path}: key {key!r} holds {dtype} values, expected floating-point weights")


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def check_finite(path: str | os.PathLike, key: str, tensor: torch.Tensor) -> None:
    """Refuse a floating-point tensor holding NaN or infinite values, naming the file, the key and the first row.

    Raises:
        CheckpointError: a non-finite value.
    """
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return
    bad = ~torch.isfinite(tensor)
    if tensor.ndim >= 2:
        row = int(bad.flatten(1).any(dim=1).nonzero()[0, 0])
        where = f"row {row} of shape {tuple(tensor.shape)}"
    else:
        where = f"element {int(bad.flatten().nonzero()[0, 0])} of shape {tuple(tensor.shape)}"
    raise CheckpointError(f"{path}: key {key!r} holds NaN or infinite values ({where}); the file is damaged")


def check_tokenizer_folder(folder: str | os.PathLike, *, root: str | os.PathLike | None = None) -> None:
    """Check a saved tokenizer before ``transformers`` reads it: every file inside ``root`` (default: ``folder``),
    every JSON file a readable JSON object, ``tokenizer_config.json`` present, and ``tokenizer.json`` (or a
    SentencePiece ``tokenizer.model``) present and, for the former, readable by ``tokenizers``.

    Raises:
        CheckpointError: naming the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: the tokenizer folder is missing")
    root = Path(root) if root is not None else folder
    check_files_inside(root, folder, "tokenizer file")
    if not (folder / "tokenizer_config.json").exists():
        raise CheckpointError(f"{folder / 'tokenizer_config.json'}: tokenizer file is missing")
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer.model").exists():
        raise CheckpointError(f"{folder / 'tokenizer.json'}: tokenizer file is missing")
    for path in sorted(folder.glob("*.json")):
        read_json(path, folder=root, what="tokenizer file")
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"{folder / 'tokenizer.json'}: not a readable tokenizer ({reason})") from None


def packaged_reference(path: str | None) -> str | None:
    """``path`` as ``packaged:NAME/REL`` when it lies inside a model shipped in the package, else unchanged.

    Example:
        >>> packaged_reference(str(PACKAGE_ROOT / "models/toyworld/decoders/image"))
        'packaged:toyworld/decoders/image'
        >>> packaged_reference("stable-diffusion-v1-5/stable-diffusion-v1-5")
        'stable-diffusion-v1-5/stable-diffusion-v1-5'
    """
    if not path or not Path(path).is_absolute():
        return path
    resolved = Path(path).resolve()
    for name, rel in PACKAGED_MODELS.items():
        root = (PACKAGE_ROOT / rel).resolve()
        if resolved.is_relative_to(root) and resolved != root:
            return f"{PACKAGED_PREFIX}{name}/{resolved.relative_to(root).as_posix()}"
    return path


def _component_sources(data: dict) -> list[tuple[dict, str, str]]:
    """The component source fields of a config dict: ``(holder, key, what)``."""
    fields = [(data["encoder"], "checkpoint", "encoder.checkpoint"), (data["llm"], "source", "llm.source")]
    fields += [(decoder, "source", f"decoders.{name}.source") for name, decoder in data["decoders"].items()]
    return fields


def write_index(folder: str | os.PathLike, config: AnyGPTConfig, parts: dict) -> None:
    """Write ``anygpt_index.json``: component paths inside a packaged model are written ``packaged:NAME/...``."""
    data = config.to_dict()
    for holder, key, _ in _component_sources(data):
        if key in holder:
            holder[key] = packaged_reference(holder[key])
    index = {
        "format": "anygpt",
        "format_version": FORMAT_VERSION,
        "anygpt_version": _anygpt_version(),
        "config": data,
        "parts": parts,
    }
    (Path(folder) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def read_index(folder: str | os.PathLike) -> tuple[AnyGPTConfig, dict]:
    """Read and validate ``anygpt_index.json``: (config, parts).

    Raises:
        CheckpointError: naming the file and the problem (a ``ValueError``): damaged JSON, a wrong format version,
            a missing or invalid key, a config that does not build, a part that does not fit the config.
    """
    path = Path(folder) / INDEX_FILE
    index = read_json(path, folder=folder, what="the model index")
    if index.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {index.get('format_version')!r}, this anygpt reads version {FORMAT_VERSION}"
        )
    missing = [k for k in ("config", "parts") if not isinstance(index.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path}: missing or invalid key(s) {missing}")
    parts = index["parts"]
    for key in ("token_embeddings", "tokenizer"):
        if key not in parts:
            raise CheckpointError(f"{path}: parts has no {key!r}")
    _check_parts(path, parts)
    try:
        config = AnyGPTConfig.from_dict(index["config"])
    except KeyError as err:
        raise CheckpointError(f"{path}: invalid config (missing key {err})") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: invalid config ({str(err).splitlines()[0] if str(err) else err!r})") from None
    if (config.llm.lora is None) != (not parts.get("lora")):
        has = "has no" if config.llm.lora is None else "has"
        holds = "names" if parts.get("lora") else "names no"
        raise CheckpointError(f"{path}: parts {holds} 'lora' files, but the config {has} llm.lora")
    _resolve_inside(folder, config)
    return config, parts


def _check_parts(path: Path, parts: dict) -> None:
    """The kinds of the index's ``parts`` entries: paths (strings), or ``{name: path}`` for projectors and
    per-modality LoRA adapters."""
    for key, value in parts.items():
        if key in ("input_projectors", "output_projectors") or (key == "lora" and isinstance(value, dict)):
            if not isinstance(value, dict) or not all(isinstance(v, str) and v for v in value.values()):
                raise CheckpointError(f"{path}: parts.{key} is {value!r}, expected {{name: path}}")
        elif key in ("token_embeddings", "tokenizer", "cross_attention", "lora"):
            if not isinstance(value, str) or not value:
                raise CheckpointError(f"{path}: parts.{key} is {value!r}, expected a path relative to the folder")


def _resolve_inside(folder: str | os.PathLike, config: AnyGPTConfig) -> None:
    """Make component paths written ``./...`` absolute against ``folder``: a self-contained model folder holds its
    encoder, LLM and decoders and names them relative to itself, so it works wherever it is. Such a path must stay
    inside the folder and exist (never looked up in the working directory or the hub). ``packaged:NAME/...`` is
    resolved the same way inside the packaged model ``NAME`` of this install."""
    folder = Path(folder).resolve()

    def inside(value: str | None, what: str) -> str | None:
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{folder / INDEX_FILE}: invalid config ({what} is {value!r:.80}, expected a string)")
        if value and value.startswith("./"):
            path = resolve_part(folder, value, what)
            check_files_inside(folder, path, what)  # its weight files too, one by one
            return str(path)
        if value and value.startswith(PACKAGED_PREFIX):
            return str(_resolve_packaged(folder / INDEX_FILE, value, what))
        return value

    config.encoder.checkpoint = inside(config.encoder.checkpoint, "encoder.checkpoint")
    config.llm.source = inside(config.llm.source, "llm.source")
    for name, decoder in config.decoders.items():
        decoder.source = inside(decoder.source, f"decoders.{name}.source")


def _resolve_packaged(index_path: Path, reference: str, what: str) -> Path:
    """The path of ``packaged:NAME/REL`` in this install; clear CheckpointErrors name the index, the field and the
    value."""
    name, _, rel = reference[len(PACKAGED_PREFIX) :].partition("/")
    if name not in PACKAGED_MODELS or not rel:
        raise CheckpointError(
            f"{index_path}: {what} {reference!r} is not a packaged component: expected packaged:NAME/PATH with NAME "
            f"one of {', '.join(sorted(PACKAGED_MODELS))}"
        )
    root = packaged_model_dir(name).resolve()
    path = (root / rel).resolve()
    if Path(rel).is_absolute() or not path.is_relative_to(root):
        raise CheckpointError(f"{index_path}: {what} {reference!r} points outside the packaged model {name!r}")
    if not path.exists():
        raise CheckpointError(
            f"{index_path}: {what} {reference!r} is missing from the packaged model {name!r} at {root} "
            f"(this anygpt {_anygpt_version()} ships a different {name!r})"
        )
    return path
