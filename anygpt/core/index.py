"""The folder format written by ``save_pretrained``: one JSON index (the full config and the trained parts' files).

A folder holds ``anygpt_index.json`` and the files it names, relative to the folder, so it works wherever it is.
Component sources (encoder checkpoint, LLM, decoders) are a preset's hub id or ``"tiny"``, a path inside the folder
written ``./...``, a model shipped in the package written ``packaged:NAME/...`` (resolved against this machine's
install, so a model saved or fine-tuned from ``toyworld`` loads anywhere), or a path elsewhere on this machine.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

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
    """``folder / rel`` for a path named in an index, refusing absolute paths and paths that leave ``folder``."""
    folder = Path(folder).resolve()
    path = (folder / str(rel)).resolve()
    if Path(str(rel)).is_absolute() or not path.is_relative_to(folder):
        raise ValueError(f"{folder / INDEX_FILE}: {what} path {rel!r} points outside the model folder")
    if not path.exists():
        raise ValueError(f"{folder / INDEX_FILE}: {what} {rel!r} is missing from the folder")
    return path


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
    """Read and validate ``anygpt_index.json``: (config, parts). Clear ValueErrors name the file and the problem."""
    path = Path(folder) / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {index.get('format_version')!r}, this anygpt reads version {FORMAT_VERSION}"
        )
    missing = [k for k in ("config", "parts") if not isinstance(index.get(k), dict)]
    if missing:
        raise ValueError(f"{path}: missing or invalid key(s) {missing}")
    parts = index["parts"]
    for key in ("token_embeddings", "tokenizer"):
        if key not in parts:
            raise ValueError(f"{path}: parts has no {key!r}")
    try:
        config = AnyGPTConfig.from_dict(index["config"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: invalid config ({err})") from None
    _resolve_inside(folder, config)
    return config, parts


def _resolve_inside(folder: str | os.PathLike, config: AnyGPTConfig) -> None:
    """Make component paths written ``./...`` absolute against ``folder``: a self-contained model folder holds its
    encoder, LLM and decoders and names them relative to itself, so it works wherever it is. Such a path must stay
    inside the folder and exist (never looked up in the working directory or the hub). ``packaged:NAME/...`` is
    resolved the same way inside the packaged model ``NAME`` of this install."""
    folder = Path(folder).resolve()

    def inside(value: str | None, what: str) -> str | None:
        if value and value.startswith("./"):
            return str(resolve_part(folder, value, what))
        if value and value.startswith(PACKAGED_PREFIX):
            return str(_resolve_packaged(folder / INDEX_FILE, value, what))
        return value

    config.encoder.checkpoint = inside(config.encoder.checkpoint, "encoder.checkpoint")
    config.llm.source = inside(config.llm.source, "llm.source")
    for name, decoder in config.decoders.items():
        decoder.source = inside(decoder.source, f"decoders.{name}.source")


def _resolve_packaged(index_path: Path, reference: str, what: str) -> Path:
    """The path of ``packaged:NAME/REL`` in this install; clear ValueErrors name the index, the field and the value."""
    name, _, rel = reference[len(PACKAGED_PREFIX) :].partition("/")
    if name not in PACKAGED_MODELS or not rel:
        raise ValueError(
            f"{index_path}: {what} {reference!r} is not a packaged component: expected packaged:NAME/PATH with NAME "
            f"one of {', '.join(sorted(PACKAGED_MODELS))}"
        )
    root = packaged_model_dir(name).resolve()
    path = (root / rel).resolve()
    if Path(rel).is_absolute() or not path.is_relative_to(root):
        raise ValueError(f"{index_path}: {what} {reference!r} points outside the packaged model {name!r}")
    if not path.exists():
        raise ValueError(
            f"{index_path}: {what} {reference!r} is missing from the packaged model {name!r} at {root} "
            f"(this anygpt {_anygpt_version()} ships a different {name!r})"
        )
    return path
