"""Output side of anygpt: frozen diffusers decoders conditioned on embeddings.

Example:
    >>> from decoders import DecoderConfig, build_decoder
    >>> decoder = build_decoder(DecoderConfig.from_preset("tiny-stable-diffusion"))
    >>> decoder.spec.cond_shape
    (77, 32)
"""

from decoders.audioldm import AudioLDMDecoder
from decoders.base import (
    Decoder,
    DecoderConfig,
    DecoderSpec,
    build_decoder,
    decoder_class,
    list_decoder_presets,
    list_decoders,
    register_decoder,
)
from decoders.clip_tokenizer import build_clip_tokenizer
from decoders.stable_diffusion import StableDiffusionDecoder
from decoders.zeroscope import ZeroScopeDecoder

__all__ = [
    "AudioLDMDecoder",
    "Decoder",
    "DecoderConfig",
    "DecoderSpec",
    "StableDiffusionDecoder",
    "ZeroScopeDecoder",
    "build_clip_tokenizer",
    "build_decoder",
    "decoder_class",
    "list_decoder_presets",
    "list_decoders",
    "register_decoder",
]
