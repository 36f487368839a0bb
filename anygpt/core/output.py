"""What a generation call returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from anygpt.base.media import Audio, Video


@dataclass
class AnyGPTOutput:
    """What one call produced.

    Attributes:
        text: the reply text (signal tokens removed).
        images: generated images.
        videos: generated clips (uint8 frames (T, H, W, 3) and fps).
        audios: generated waveforms (float32 and sample rate).
        token_ids: every token the LLM produced, signal groups included.
        conditioning: the output projector's conditioning per modality, (G, L, D) or (G, D).
        stopped: the caller ended the call early while the media were rendered (``on_decode`` returned False or
            ``should_stop`` returned True): the media rendered before are here, the others are missing.
    """

    text: str
    images: list[Image.Image] = field(default_factory=list)
    videos: list[Video] = field(default_factory=list)
    audios: list[Audio] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    stopped: bool = False
