"""ZeroScope v2 (``TextToVideoSDPipeline``) as a video decoder: conditioning is (B, L, 1024) CLIP states, L <= 77."""

from __future__ import annotations

from typing import Any

import numpy as np
from diffusers import DiffusionPipeline, TextToVideoSDPipeline

from anygpt.base.media import Video
from anygpt.base.modality import Modality
from decoders.base import Decoder, register_decoder
from decoders.tiny import tiny_zeroscope_components


@register_decoder("zeroscope")
class ZeroScopeDecoder(Decoder):
    """Text-to-video ``TextToVideoSDPipeline`` driven by ``prompt_embeds``; returns ``Video`` objects.

    The pipeline is deprecated in diffusers (no fixes after 0.33.1) but unchanged; it stays behind this
    interface.
    """

    modality = Modality.VIDEO
    pipeline_class = TextToVideoSDPipeline
    tiny_components = staticmethod(tiny_zeroscope_components)
    standard_cond_dim = 1024  # OpenCLIP ViT-H/14 text encoder

    def _size_kwargs(self, *, height: int, width: int, num_frames: int, audio_seconds: float) -> dict[str, Any]:
        return {"height": height, "width": width, "num_frames": num_frames}

    def _outputs(self, pipe: DiffusionPipeline, output: Any) -> list[Any]:
        frames = np.asarray(output.frames)  # (B, T, H, W, 3) float in [0, 1]
        frames = (frames * 255).round().clip(0, 255).astype(np.uint8)  # as diffusers' numpy_to_pil
        return [Video(frames=clip, fps=float(self.config.fps)) for clip in frames]
