"""Stable Diffusion (1.5) as an image decoder: conditioning is CLIP text hidden states (B, L, 768), L <= 77."""

from __future__ import annotations

from typing import Any

from diffusers import DiffusionPipeline, StableDiffusionPipeline

from anygpt.base.modality import Modality
from decoders.base import Decoder, register_decoder
from decoders.tiny import tiny_stable_diffusion_components


@register_decoder("stable-diffusion")
class StableDiffusionDecoder(Decoder):
    """Text-to-image ``StableDiffusionPipeline`` driven by ``prompt_embeds``; returns ``PIL.Image`` objects.

    The safety checker is disabled (the pipeline allows ``safety_checker=None``): outputs are not filtered.
    """

    modality = Modality.IMAGE
    pipeline_class = StableDiffusionPipeline
    tiny_components = staticmethod(tiny_stable_diffusion_components)
    pipeline_options = {"safety_checker": None, "requires_safety_checker": False}
    standard_cond_dim = 768  # CLIP ViT-L/14 text encoder
    output_type = "pil"

    def _size_kwargs(self, *, height: int, width: int, num_frames: int, audio_seconds: float) -> dict[str, Any]:
        return {"height": height, "width": width}

    def _outputs(self, pipe: DiffusionPipeline, output: Any) -> list[Any]:
        return list(output.images)
