"""AudioLDM as an audio decoder: conditioning is one L2-normalised CLAP text embedding per sample (B, 512)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import AudioLDMPipeline, DiffusionPipeline

from anygpt.base.media import Audio
from anygpt.base.modality import Modality
from decoders.base import Decoder, DecoderSpec, register_decoder
from decoders.tiny import tiny_audioldm_components


@register_decoder("audioldm")
class AudioLDMDecoder(Decoder):
    """Text-to-audio ``AudioLDMPipeline`` driven by ``prompt_embeds``; returns mono ``Audio`` objects.

    The pipeline feeds ``prompt_embeds`` (B, D) to the UNet as class labels, so the conditioning is pooled.
    The pipeline is deprecated in diffusers (no fixes after 0.33.1) but unchanged; it stays behind this
    interface.
    """

    modality = Modality.AUDIO
    pipeline_class = AudioLDMPipeline
    tiny_components = staticmethod(tiny_audioldm_components)
    pooled = True
    standard_cond_len = 1
    standard_cond_dim = 512  # CLAP text projection

    def _spec_of(self, pipe: DiffusionPipeline) -> DecoderSpec:
        cond_dim = pipe.text_encoder.config.projection_dim
        return DecoderSpec(self.modality, cond_len=1, cond_dim=cond_dim, pooled=True)

    def _encode_with_pipeline(self, pipe: DiffusionPipeline, captions: list[str], device: torch.device) -> torch.Tensor:
        return pipe._encode_prompt(captions, device, 1, False)  # CLAP text_embeds, L2-normalised

    def _size_kwargs(self, *, height: int, width: int, num_frames: int, audio_seconds: float) -> dict[str, Any]:
        return {"audio_length_in_s": float(audio_seconds)}

    def _outputs(self, pipe: DiffusionPipeline, output: Any) -> list[Any]:
        rate = int(pipe.vocoder.config.sampling_rate)
        return [Audio(waveform=np.asarray(w, dtype=np.float32), sample_rate=rate) for w in output.audios]
