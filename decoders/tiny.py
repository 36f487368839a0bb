"""Builders of tiny, randomly initialised diffusers components, for tests and CPU smoke runs.

Each builder returns the keyword arguments of its (unmodified) diffusers pipeline class, so
``StableDiffusionPipeline(**tiny_stable_diffusion_components(seed=0))`` is a working pipeline. Sizes are
keyword-only; the architecture follows the real model's (same component classes, same scheduler family) at
0.1-1.6 M parameters per component (a text encoder's are mostly its 49,408-token embedding). Initialisation
is bit-for-bit deterministic for a seed and leaves the global RNG untouched.

Measured sizes that work (see STACK.md): UNet block channels (32, 64); a VAE whose norm groups differ from its
channel count; a HiFi-GAN whose upsample rates multiply to 160 (10 ms hop at 16 kHz) with ``kernel - rate``
even, so the waveform length is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
    UNet3DConditionModel,
)
from transformers import (
    ClapTextConfig,
    ClapTextModelWithProjection,
    CLIPTextConfig,
    CLIPTextModel,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
)

from decoders.clip_tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer

__all__ = [
    "tiny_audioldm_components",
    "tiny_stable_diffusion_components",
    "tiny_zeroscope_components",
]

TINY_AUDIO_SAMPLE_RATE = 16000
TINY_MEL_BINS = 64


def _seeded(seed: int, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``build`` with the CPU RNG seeded by ``seed``, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = build()
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return components


def _attention_first(attention: str, plain: str, levels: int) -> tuple[str, ...]:
    """Block types from the finest level down: attention blocks, then one plain block at the deepest level."""
    if levels < 2:
        raise ValueError(f"unet_channels needs at least 2 levels, got {levels}")
    return (attention,) * (levels - 1) + (plain,)


def _clip_text_encoder(cond_dim: int) -> CLIPTextModel:
    """A 2-layer CLIP text transformer over the real CLIP vocabulary; output (B, 77, cond_dim)."""
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=cond_dim,
        intermediate_size=2 * cond_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=cond_dim,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def _image_vae(channels: tuple[int, ...], in_channels: int) -> AutoencoderKL:
    """An AutoencoderKL with 4 latent channels and a downsampling factor ``2 ** (len(channels) - 1)``."""
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,  # not equal to the channel count: one channel per group loses colour
    )


def _sd_scheduler() -> PNDMScheduler:
    """Stable Diffusion 1.5's scheduler settings."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _zeroscope_scheduler() -> DDIMScheduler:
    """ZeroScope v2's scheduler settings."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _audioldm_scheduler() -> DDIMScheduler:
    """AudioLDM's scheduler settings."""
    return DDIMScheduler(
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_stable_diffusion_components(
    *, seed: int = 0, cond_dim: int = 32, unet_channels: tuple[int, ...] = (32, 64)
) -> dict[str, Any]:
    """Components of a tiny ``StableDiffusionPipeline``: CLIP text encoder, 2-D UNet, VAE, PNDM.

    Args:
        seed: initialisation seed.
        cond_dim: CLIP text width; ``prompt_embeds`` are (B, 77, cond_dim).
        unet_channels: UNet block channels (any number of levels; cross-attention in all but the deepest).

    Returns:
        Keyword arguments for ``StableDiffusionPipeline``, safety checker disabled.
    """

    def build() -> dict[str, Any]:
        return {
            "text_encoder": _clip_text_encoder(cond_dim),
            "unet": UNet2DConditionModel(
                sample_size=16,
                in_channels=4,
                out_channels=4,
                block_out_channels=unet_channels,
                layers_per_block=1,
                down_block_types=_attention_first("CrossAttnDownBlock2D", "DownBlock2D", len(unet_channels)),
                up_block_types=_attention_first("CrossAttnUpBlock2D", "UpBlock2D", len(unet_channels))[::-1],
                cross_attention_dim=cond_dim,
                # heads of width 8, as ZeroScope's UNet3DConditionModel(attention_head_dim=8) builds them (a 2-D UNet
                # reads attention_head_dim as the number of heads), so an image UNet's weights start a video UNet
                # unchanged.
                attention_head_dim=tuple(max(1, c // 8) for c in unet_channels),
            ),
            "vae": _image_vae((16, 32, 64), in_channels=3),  # 64 px -> 16x16 latents
            "tokenizer": build_clip_tokenizer(),
            "scheduler": _sd_scheduler(),
            "safety_checker": None,
            "feature_extractor": None,
            "image_encoder": None,
            "requires_safety_checker": False,
        }

    return _seeded(seed, build)


def tiny_zeroscope_components(
    *, seed: int = 0, cond_dim: int = 32, unet_channels: tuple[int, ...] = (32, 64)
) -> dict[str, Any]:
    """Components of a tiny ``TextToVideoSDPipeline`` (ZeroScope): CLIP text encoder, 3-D UNet, VAE, DDIM.

    Args:
        seed: initialisation seed.
        cond_dim: CLIP text width; ``prompt_embeds`` are (B, 77, cond_dim).
        unet_channels: UNet block channels (any number of levels; cross-attention in all but the deepest).

    Returns:
        Keyword arguments for ``TextToVideoSDPipeline``.
    """

    def build() -> dict[str, Any]:
        return {
            "text_encoder": _clip_text_encoder(cond_dim),
            "unet": UNet3DConditionModel(
                sample_size=16,
                in_channels=4,
                out_channels=4,
                block_out_channels=unet_channels,
                layers_per_block=1,
                down_block_types=_attention_first("CrossAttnDownBlock3D", "DownBlock3D", len(unet_channels)),
                up_block_types=_attention_first("CrossAttnUpBlock3D", "UpBlock3D", len(unet_channels))[::-1],
                cross_attention_dim=cond_dim,
                attention_head_dim=8,  # the head width of its spatial transformers: channels // 8 heads
            ),
            "vae": _image_vae((16, 32, 64), in_channels=3),
            "tokenizer": build_clip_tokenizer(),
            "scheduler": _zeroscope_scheduler(),
        }

    return _seeded(seed, build)


def tiny_audioldm_components(
    *,
    seed: int = 0,
    cond_dim: int = 32,
    unet_channels: tuple[int, ...] = (32, 64),
    vae_channels: tuple[int, ...] = (16, 32),
) -> dict[str, Any]:
    """Components of a tiny ``AudioLDMPipeline``: CLAP text encoder, UNet, mel VAE, HiFi-GAN vocoder, DDIM.

    The pipeline feeds the L2-normalised CLAP ``text_embeds`` (B, cond_dim) to the UNet as ``class_labels``: a
    ``simple_projection`` class embedding concatenated to the time embedding, and no cross-attention context
    (its attention blocks attend to themselves, so their ``cross_attention_dim`` equals the block widths).

    The CLAP text model reads the CLIP tokenizer's ids (vocabulary 49,408, padded to 77 for prompts; AudioLDM
    pads the empty negative prompt to ``cond_dim`` tokens). Its position ids are RoBERTa-style, offset by
    ``pad_token_id + 1``; the CLIP tokenizer pads with id 49407, so every position counts and the attention
    mask handles the padding.

    Args:
        seed: initialisation seed.
        cond_dim: CLAP projection width; ``prompt_embeds`` are (B, cond_dim).
        unet_channels: UNet block channels (any number of levels; attention in all but the first).
        vae_channels: mel VAE block channels; each level after the first halves time and mel bins.

    Returns:
        Keyword arguments for ``AudioLDMPipeline``; the vocoder makes 16 kHz audio from 64-bin mels at 100
        frames per second.
    """
    tokenizer = build_clip_tokenizer()
    pad_token_id = 1  # RoBERTa convention; positions start at pad_token_id + 1
    max_tokens = max(tokenizer.model_max_length, cond_dim)

    def build() -> dict[str, Any]:
        return {
            "text_encoder": ClapTextModelWithProjection(
                ClapTextConfig(
                    vocab_size=CLIP_VOCAB_SIZE,
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    max_position_embeddings=max_tokens + pad_token_id + 1,
                    projection_dim=cond_dim,
                    layer_norm_eps=1e-5,
                    pad_token_id=pad_token_id,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            ),
            "unet": UNet2DConditionModel(
                sample_size=32,
                in_channels=4,
                out_channels=4,
                block_out_channels=unet_channels,
                layers_per_block=1,
                down_block_types=_attention_first("CrossAttnDownBlock2D", "DownBlock2D", len(unet_channels))[::-1],
                up_block_types=_attention_first("CrossAttnUpBlock2D", "UpBlock2D", len(unet_channels)),
                cross_attention_dim=unet_channels,
                attention_head_dim=8,
                class_embed_type="simple_projection",
                projection_class_embeddings_input_dim=cond_dim,
                class_embeddings_concat=True,
            ),
            "vae": _image_vae(vae_channels, in_channels=1),  # mel (T, 64) -> latents (T/2, 32) for 2 levels
            "tokenizer": tokenizer,
            "scheduler": _audioldm_scheduler(),
            "vocoder": SpeechT5HifiGan(
                SpeechT5HifiGanConfig(
                    model_in_dim=TINY_MEL_BINS,
                    sampling_rate=TINY_AUDIO_SAMPLE_RATE,
                    upsample_initial_channel=64,
                    upsample_rates=[5, 4, 2, 2, 2],  # 160 samples per mel frame
                    upsample_kernel_sizes=[11, 8, 4, 4, 4],  # kernel - rate even: exact output length
                    resblock_kernel_sizes=[3],
                    resblock_dilation_sizes=[[1, 3]],
                    normalize_before=False,
                )
            ),
        }

    return _seeded(seed, build)
