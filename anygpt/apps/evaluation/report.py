"""What a run leaves behind besides its predictions: ``report.json``, ``results.md`` and ``contact_sheet.png``.

``report.json`` says what was measured and how to measure it again: the metrics, the model, the data (with its
sha256), the seeds, the settings, the feature networks, the library versions and the harness's git revision.
The contact sheet puts samples beside their prompts: the generated media (an image; a video's frames; a sound's
spectrogram), the reference where there is one, the prompt and the reply.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from anygpt.base.media import Audio, Video, guess_modality, load_media, to_mono
from anygpt.base.modality import Modality
from anygpt.base.utils import atomic_file, write_text_atomic

__all__ = ["format_table", "git_revision", "library_versions", "write_contact_sheet", "write_report"]

LIBRARIES = (
    "anygpt", "torch", "torchvision", "torchaudio", "transformers", "diffusers", "peft", "accelerate", "numpy",
    "pillow", "torchmetrics", "torch-fidelity", "pycocoevalcap", "lmms-eval",
)  # fmt: skip
_CELL = 160  # thumbnail side in the contact sheet
_TEXT_LINES = 5


def library_versions() -> dict[str, str | None]:
    """The installed version of each library the numbers depend on (None: not installed), and Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> dict[str, Any]:
    """The harness's git revision and whether its checkout has uncommitted changes (None outside a checkout)."""
    folder = Path(__file__).resolve().parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder, capture_output=True, text=True,
            timeout=60, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}
    return {"revision": revision, "dirty": bool(status.strip())}


def write_report(folder: str | os.PathLike, report: Mapping[str, Any]) -> Path:
    """``report.json`` (atomically) and ``results.md`` (the table) into ``folder``; returns the report's path."""
    folder = Path(folder)
    path = write_text_atomic(folder / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    write_text_atomic(folder / "results.md", format_table(report) + "\n")
    return path


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value and abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def format_table(report: Mapping[str, Any]) -> str:
    """The report's metrics as a Markdown table (metric, value, n, note), then one line naming what was run."""
    data = report.get("data") or {}
    source = Path(str(data["path"])).name if data.get("path") else data.get("format", "-")
    lines = [
        f"### anygpt eval {report.get('task')}: {report.get('model', {}).get('name')} on {source}",
        "",
        "| metric | value | n | note |",
        "|---|---:|---:|---|",
    ]
    for name, entry in report.get("metrics", {}).items():
        note = entry.get("skipped") or entry.get("note") or ""
        if entry.get("target") is not None:
            verdict = "pass" if entry.get("value") is not None and entry["value"] >= entry["target"] else "FAIL"
            note = f"target {entry['target']:.2f}: {verdict}" + (f"; {note}" if note else "")
        lines.append(f"| {name} | {_shown(entry.get('value'))} | {entry.get('n', '-')} | {note} |")
    git = report.get("git", {})
    lines += [
        "",
        f"{report.get('data', {}).get('samples')} samples, seed {report.get('seed')}, "
        f"{report.get('seconds')} s, anygpt {str(git.get('revision') or '?')[:10]}"
        f"{' (uncommitted changes)' if git.get('dirty') else ''}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# the contact sheet
# ------------------------------------------------------------------------------------------------------------


def _font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(image: Image.Image, side: int) -> Image.Image:
    image = image.convert("RGB")
    image.thumbnail((side, side))
    canvas = Image.new("RGB", (side, side), (236, 236, 236))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def _video_strip(video: Video, side: int) -> Image.Image:
    """Four frames of a clip, evenly spaced, as a 2 x 2 tile."""
    count = len(video.frames)
    picks = [video.frames[int(i * (count - 1) / 3)] for i in range(4)] if count else []
    tile = Image.new("RGB", (side, side), (236, 236, 236))
    for k, frame in enumerate(picks):
        corner = ((k % 2) * side // 2, (k // 2) * side // 2)
        tile.paste(_fit(Image.fromarray(np.asarray(frame, dtype=np.uint8)), side // 2), corner)
    return tile


def _spectrogram(audio: Audio, side: int) -> Image.Image:
    """A log-magnitude spectrogram of (up to) the first 10 s (numpy STFT), low frequencies at the bottom."""
    wave = to_mono(audio).waveform.astype(np.float32)[: int(audio.sample_rate * 10)]
    window = 512
    if wave.size < window:
        wave = np.pad(wave, (0, window - wave.size))
    hop = max(1, (wave.size - window) // max(1, side - 1))
    frames = np.lib.stride_tricks.sliding_window_view(wave, window)[::hop] * np.hanning(window)
    magnitude = np.log1p(np.abs(np.fft.rfft(frames, axis=-1)).T[::-1] * 10)
    scaled = (255 * magnitude / max(float(magnitude.max()), 1e-6)).astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB").resize((side, side))


def media_thumbnail(item: Any, modality: Modality | str | None, side: int = _CELL) -> Image.Image:
    """A square picture of a media item (a path or the object): the image, a video's frames, a sound's spectrogram."""
    if item is None:
        return Image.new("RGB", (side, side), (236, 236, 236))
    modality = Modality.parse(modality) if modality is not None else None
    if isinstance(item, str | os.PathLike):
        modality = modality or guess_modality(item)
        item = load_media(modality, item, max_frames=16) if modality is Modality.VIDEO else load_media(modality, item)
    if isinstance(item, Image.Image):
        return _fit(item, side)
    if isinstance(item, Video):
        return _video_strip(item, side)
    if isinstance(item, Audio):
        return _spectrogram(item, side)
    raise TypeError(f"media_thumbnail: cannot draw a {type(item).__name__}")


def write_contact_sheet(
    path: str | os.PathLike, entries: Sequence[Mapping[str, Any]], *, columns: int = 4, title: str = ""
) -> Path | None:
    """Write a grid of samples to ``path`` (PNG, atomically): per entry its ``media`` (path or object, with its
    ``modality``), the ``reference`` media when given, and its ``prompt`` and ``text`` written beneath.

    Returns:
        ``path``, or None when there is nothing to show.
    """
    if not entries:
        return None
    font, small = _font(13), _font(11)
    with_reference = any(e.get("reference") is not None for e in entries)
    cell_w = _CELL * (2 if with_reference else 1) + 12
    cell_h = _CELL + 14 * (_TEXT_LINES + 1) + 12
    columns = max(1, min(columns, len(entries)))
    rows = (len(entries) + columns - 1) // columns
    top = 28 if title else 4
    sheet = Image.new("RGB", (cell_w * columns, top + cell_h * rows), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 6), title, fill="black", font=font)
    for index, entry in enumerate(entries):
        x, y = (index % columns) * cell_w + 6, top + (index // columns) * cell_h + 4
        sheet.paste(media_thumbnail(entry.get("media"), entry.get("modality")), (x, y))
        if with_reference:
            reference = entry.get("reference")
            sheet.paste(media_thumbnail(reference, entry.get("reference_modality")), (x + _CELL, y))
            draw.text((x + _CELL + 3, y + 2), "reference", fill=(200, 0, 0), font=small)
        lines = [f"{entry.get('id', index)}: {entry.get('prompt', '')}"]
        if entry.get("text"):
            lines.append(f"-> {entry['text']}")
        wrapped = [w for line in lines for w in textwrap.wrap(line, width=max(16, cell_w // 7))][:_TEXT_LINES]
        for k, line in enumerate(wrapped):
            draw.text((x, y + _CELL + 4 + 14 * k), line, fill="black", font=small)
    with atomic_file(path, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)
