"""The feature cache: the frozen encoder's output per media file and each decoder's caption embeddings.

Layout under the cache folder::

    encoder-{fingerprint}/shard-{time}-{random}.safetensors   tensors "{n}.embeds", "{n}.tokens"
    encoder-{fingerprint}/shard-{time}-{random}.json          {media_id: {"n", "size", "mtime_ns", "sha256"}}
    captions-{modality}-{fingerprint}/shard-....safetensors   tensors "{n}"
    captions-{modality}-{fingerprint}/shard-....json          {sha256(caption): {"n"}}

The encoder's fingerprint hashes its config, its weights and the source of the preprocessing code; a decoder's
hashes its config and the names, sizes and mtimes of its text encoder's and tokenizer's files. A changed component
never reads stale entries. A media entry records the file's size, mtime and content hash: a file whose size or mtime
changed is hashed again, and a changed hash means the entry is ignored and recomputed (a file replaced by another of
the same size *and* the same mtime, e.g. ``cp -p``, is not noticed: clear the cache folder after such a copy).
Shards are written whole (temporary file, then rename; the JSON sidecar last), so a killed run leaves no corrupt
entry, and several processes can write at once (each writes its own shards; no shared index).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import anygpt.base.media
import encoders.transforms
from anygpt.base.media import load_media
from anygpt.base.modality import Modality
from anygpt.base.utils import atomic_file, file_sha256, resolve_local_model, write_text_atomic
from training.data.records import MediaFile

logger = logging.getLogger(__name__)


def module_fingerprint(config: dict, module: torch.nn.Module | None) -> str:
    """A short hash of a component's config and weights."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    if module is not None:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def code_fingerprint(*modules) -> str:
    """A hash of the source of the modules that turn files into model inputs (preprocessing changes invalidate)."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


def files_fingerprint(folder: Path | None, subfolders: Sequence[str]) -> list:
    """(name, size, mtime) of the weight files under ``folder``'s ``subfolders``: cheap, no loading."""
    if folder is None or not folder.is_dir():
        return []
    found = []
    for sub in subfolders:
        for path in sorted((folder / sub).glob("*")):
            if path.is_file():
                stat = path.stat()
                found.append([f"{sub}/{path.name}", stat.st_size, stat.st_mtime_ns])
    return found


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    encoder_calls: int = 0  # batched encoder / text-encoder calls made for misses


class _ShardStore:
    """Entries spread over immutable shard files in one folder (no folder: nothing is stored)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.entries: dict[str, dict] = {}  # key -> meta (with "shard")
        self.memory: dict[str, dict[str, torch.Tensor]] = {}  # key -> tensors not written to a shard yet
        self.pending: dict[str, tuple[dict, dict[str, torch.Tensor]]] = {}
        self._handles: dict = {}
        if folder is not None and folder.is_dir():
            for sidecar in sorted(folder.glob("shard-*.json")):  # newest last: later entries win
                shard = sidecar.with_suffix(".safetensors")
                if not shard.is_file():
                    continue
                try:
                    meta = json.loads(sidecar.read_text())
                except (OSError, json.JSONDecodeError):
                    logger.warning("feature cache: ignoring unreadable %s", sidecar)
                    continue
                for key, entry in meta.items():
                    self.entries[key] = {**entry, "shard": shard.name}

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self.memory:
            return self.memory[key]
        entry = self.entries.get(key)
        if entry is None:
            return None
        handle = self._handles.get(entry["shard"])
        if handle is None:
            handle = self._handles[entry["shard"]] = safe_open(str(self.folder / entry["shard"]), framework="pt")
        return {name: handle.get_tensor(f"{entry['n']}.{name}") for name in entry["tensors"]}

    def put(self, key: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            return  # no cache folder: nothing is kept, every use computes again
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        self.memory[key] = tensors
        self.entries[key] = {**meta, "shard": None}
        self.pending[key] = (meta, tensors)

    def flush(self) -> None:
        if self.folder is None or not self.pending:
            self.pending.clear()
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        flat, sidecar = {}, {}
        for n, (key, (meta, tensors)) in enumerate(self.pending.items()):
            for name, tensor in tensors.items():
                flat[f"{n}.{name}"] = tensor
            sidecar[key] = {**meta, "n": n, "tensors": sorted(tensors)}
        with atomic_file(self.folder / f"{stem}.safetensors", suffix=".safetensors") as tmp:
            save_file(flat, str(tmp))
        write_text_atomic(self.folder / f"{stem}.json", json.dumps(sidecar))  # the sidecar last: it makes the entries
        for key, entry in sidecar.items():
            self.entries[key] = {**entry, "shard": f"{stem}.safetensors"}
        logger.debug("feature cache: wrote %d entries to %s", len(sidecar), self.folder / stem)
        for key in self.pending:
            self.memory.pop(key, None)
        self.pending.clear()


class MediaFeatureCache:
    """Encoder features per media file, keyed by media id.

    Args:
        root: the cache folder (None: no cache; every use encodes again).
        encoder: the frozen ``ImageBindEncoder``.
        load: ``(modality, path) -> decoded media`` (defaults to ``anygpt.base.media.load_media`` with the encoder's
            frame budget for video).
        batch_size: how many missing items to encode in one call.
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        encoder,
        *,
        load: Callable | None = None,
        batch_size: int = 16,
        flush_every: int = 256,
    ):
        self.encoder = encoder
        self.fingerprint = None  # without a cache folder nothing is stored: no need to hash the encoder's weights
        folder = None
        if root is not None:
            preprocessing = code_fingerprint(encoders.transforms, anygpt.base.media)
            config = {**encoder.config.to_dict(), "preprocessing": preprocessing}
            self.fingerprint = module_fingerprint(config, encoder)
            folder = Path(root) / f"encoder-{self.fingerprint}"
        self.store = _ShardStore(folder)
        self.load = load or self._default_load
        self.batch_size = batch_size
        self.flush_every = flush_every
        self.stats = CacheStats()
        self._checked: dict[str, bool] = {}  # media ids whose file was checked against its entry this run

    def _default_load(self, modality: Modality, path: Path):
        max_frames = self.encoder.max_video_frames if modality is Modality.VIDEO else None
        return load_media(modality, path, max_frames=max_frames)

    def _valid(self, item: MediaFile) -> bool:
        entry = self.store.entries.get(item.media_id)
        if entry is None:
            return False
        if item.media_id in self._checked:
            return self._checked[item.media_id]
        stat = item.path.stat()
        ok = entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns
        if not ok and entry.get("size") == stat.st_size:
            ok = entry.get("sha256") == file_sha256(item.path)  # touched but unchanged
        if not ok:
            logger.info("feature cache: %s changed on disk, encoding it again", item.path)
        self._checked[item.media_id] = ok
        return ok

    def get(
        self, items: Sequence[MediaFile], *, need_tokens: bool = False
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(embeds (D,), tokens (N, D') or None)`` per item, computing and storing the missing ones.

        Token sequences are large (hundreds of vectors per item at real size): they are stored and returned only
        when ``need_tokens`` (an input projector that reads them); an entry stored without them is a miss then.
        """
        results: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        missing: dict[Modality, dict[str, MediaFile]] = {}
        for item in items:
            if item.media_id in results:
                continue
            entry = self.store.entries.get(item.media_id)
            has = entry is not None and (not need_tokens or "tokens" in entry.get("tensors", ["tokens"]))
            if has and (item.media_id in self.store.memory or self._valid(item)):
                tensors = self.store.get(item.media_id)
                results[item.media_id] = (tensors["embeds"], tensors.get("tokens") if need_tokens else None)
                self.stats.hits += 1
            else:
                missing.setdefault(item.modality, {})[item.media_id] = item
        for modality, todo in missing.items():
            todo_items = list(todo.values())
            for start in range(0, len(todo_items), self.batch_size):
                chunk = todo_items[start : start + self.batch_size]
                values = [self.load(modality, item.path) for item in chunk]
                with torch.no_grad():
                    out = self.encoder.encode(modality, values)
                self.stats.encoder_calls += 1
                for i, item in enumerate(chunk):
                    stat = item.path.stat()
                    meta = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(item.path)}
                    tensors = {"embeds": out.embeds[i].float()}
                    if need_tokens:
                        tensors["tokens"] = out.tokens[i].float()
                    self.store.put(item.media_id, meta, tensors)
                    self._checked[item.media_id] = True
                    results[item.media_id] = (tensors["embeds"], tensors.get("tokens"))
                    self.stats.misses += 1
            if len(self.store.pending) >= self.flush_every:
                self.flush()
        return [results[item.media_id] for item in items]

    def flush(self) -> None:
        self.store.flush()


class CaptionEmbeddingCache:
    """Caption embeddings by one decoder's own text encoder, keyed by the caption's hash.

    Args:
        root: the cache folder (None: no cache; every use embeds again).
        decoder: a ``decoders.Decoder`` (its pipeline loads on the first miss).
    """

    def __init__(self, root: str | os.PathLike | None, decoder):
        self.decoder = decoder
        # the decoder's config names its weights (a hub id or folder, or a tiny model's seed); for real weights the
        # text encoder's and tokenizer's files (names, sizes, mtimes) are part of the key too
        local = None
        if not decoder.config.is_tiny:
            try:
                local = Path(resolve_local_model(decoder.config.source, what="decoder"))
            except (FileNotFoundError, ValueError, OSError):
                local = None
        files = files_fingerprint(local, ["text_encoder", "tokenizer"])
        self.fingerprint = module_fingerprint({"config": decoder.config.to_dict(), "files": files}, None)
        folder = None
        if root is not None:
            folder = Path(root) / f"captions-{decoder.spec.modality.value}-{self.fingerprint}"
        self.store = _ShardStore(folder)
        self.stats = CacheStats()

    @staticmethod
    def key(caption: str) -> str:
        return hashlib.sha256(caption.encode()).hexdigest()

    def get(self, captions: Sequence[str]) -> list[torch.Tensor]:
        """``(L, D)`` (or ``(D,)`` for a pooled decoder) per caption."""
        keys = [self.key(c) for c in captions]
        found: dict[str, torch.Tensor] = {}
        todo = {}
        for caption, key in zip(captions, keys, strict=True):
            if key in found or key in todo:
                continue
            entry = self.store.get(key)
            if entry is None:
                todo[key] = caption
            else:
                found[key] = entry["embeds"]
                self.stats.hits += 1
        if todo:
            with torch.no_grad():
                embeds = self.decoder.encode_captions(list(todo.values()))
            self.stats.encoder_calls += 1
            for i, key in enumerate(todo):
                found[key] = embeds[i].float().cpu()
                self.store.put(key, {}, {"embeds": found[key]})
                self.stats.misses += 1
        return [found[key] for key in keys]

    def flush(self) -> None:
        self.store.flush()
