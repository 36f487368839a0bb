"""Writing a generation's media to files named ``{stem}_image0.png``, ``{stem}_video0.mp4``, ``{stem}_audio0.wav``."""

from __future__ import annotations

import os
from pathlib import Path

from anygpt.base.media import save_audio, save_image, save_video
from anygpt.base.modality import MEDIA_MODALITIES, Modality

WRITERS = {
    Modality.IMAGE: (".png", save_image),
    Modality.VIDEO: (".mp4", save_video),
    Modality.AUDIO: (".wav", save_audio),
}
"""The file extension and writer of each output modality: PNG, H.264 MP4, 16-bit WAV."""


def save_outputs(output, folder: str | os.PathLike, stem: str) -> dict[Modality, list[Path]]:
    """Write an ``AnyGPTOutput``'s images, videos and audio into ``folder`` (created), all or nothing: each file is
    written atomically, and the files already written are removed when a later one fails.

    Returns:
        The written paths per output modality (every media modality present, in the order of ``MEDIA_MODALITIES``).
    """
    folder = Path(folder).expanduser()
    written: dict[Modality, list[Path]] = {m: [] for m in MEDIA_MODALITIES}
    try:
        for modality in MEDIA_MODALITIES:
            ext, save = WRITERS[modality]
            for index, item in enumerate(getattr(output, modality.plural)):
                written[modality].append(save(item, folder / f"{stem}_{modality.value}{index}{ext}"))
    except BaseException:
        for path in (p for paths in written.values() for p in paths):
            path.unlink(missing_ok=True)
        raise
    return written
