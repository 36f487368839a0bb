"""The released decoders' architectures, written by hand: their components built from configs, never downloaded.

HAND-WRITTEN CONFIGS. The values below transcribe each released model's component ``config.json`` files (UNet, VAE,
text encoder, vocoder) as published on the Hugging Face hub for the presets' sources; they are not read from the
hub (nothing can be downloaded here). They serve two things only: counting parameters and estimating memory on the
``meta`` device (``anygpt.core.memory``), and benchmarks with random weights at the real widths
(``benchmarks/bench_realsize.py``). Real inference always loads the model's own files (``Decoder.load``).

Built sizes (parameters, every component with weights): Stable Diffusion 1.5 1.07 B (UNet 860 M, VAE 84 M, CLIP
ViT-L/14 text 123 M), ZeroScope v2 576w 1.84 B (3-D UNet 1.41 B, VAE 84 M, OpenCLIP ViT-H/14 text 340 M), AudioLDM-L
full 0.98 B (UNet, 8-channel mel VAE, CLAP RoBERTa text encoder, HiFi-GAN vocoder); ``tests/test_realsize.py`` checks
them.

``layers`` builds the same widths at reduced depth (UNet and VAE ``layers_per_block``, text-encoder layers), for
CPU runs of the benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffusers import AutoencoderKL, UNet2DConditionModel, UNet3DConditionModel
from transformers import (
    ClapTextConfig,
    ClapTextModelWithProjection,
    CLIPTextConfig,
    CLIPTextModel,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
)

from decoders.clip_tokenizer import build_clip_tokenizer
from decoders.tiny import _audioldm_scheduler, _sd_scheduler, _zeroscope_scheduler

__all__ = ["RELEASED_SOURCES", "has_released_architecture", "released_components"]

_SD_SOURCES = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")
_ZEROSCOPE_SOURCES = ("cerspense/zeroscope_v2_576w",)
_AUDIOLDM_SOURCES = ("cvssp/audioldm-l-full",)


def _depth(layers: int | None, released: int) -> int:
    return released if layers is None else max(1, min(int(layers), released))


def _sd_vae(layers: int | None, in_channels: int = 3, channels=(128, 256, 512, 512), latent_channels: int = 4):
    # stable-diffusion-v1-5 vae/config.json (ZeroScope's VAE is the same)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=_depth(layers, 2),
        act_fn="silu",
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=512,
    )


def _stable_diffusion(layers: int | None) -> dict[str, Any]:
    # unet/config.json of stable-diffusion-v1-5
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=_depth(layers, 2),
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=32,
    )
    # text_encoder/config.json: CLIP ViT-L/14 text tower
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=_depth(layers, 12),
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    return {
        "unet": unet,
        "vae": _sd_vae(layers),
        "text_encoder": text_encoder,
        "tokenizer": build_clip_tokenizer(),
        "scheduler": _sd_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def _zeroscope(layers: int | None) -> dict[str, Any]:
    # unet/config.json of cerspense/zeroscope_v2_576w (ModelScope text-to-video UNet3DConditionModel)
    unet = UNet3DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=_depth(layers, 2),
        attention_head_dim=64,
        cross_attention_dim=1024,
        norm_num_groups=32,
    )
    # text_encoder/config.json: OpenCLIP ViT-H/14 text tower in CLIPTextModel form
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=_depth(layers, 23),
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
        )
    )
    return {
        "unet": unet,
        "vae": _sd_vae(layers),
        "text_encoder": text_encoder,
        "tokenizer": build_clip_tokenizer(),
        "scheduler": _zeroscope_scheduler(),
    }


def _audioldm(layers: int | None) -> dict[str, Any]:
    # AudioLDM-L: model_channels 256, channel_mult (1, 2, 3, 5), attention at downsampling 2, 4 and 8, FiLM-style
    # class conditioning by the 512-d CLAP embedding concatenated to the time embedding, 8 latent channels (the
    # diffusers conversion of audioldm-l-full: unet/config.json)
    widths = (256, 512, 768, 1280)
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=8,
        out_channels=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=widths,
        layers_per_block=_depth(layers, 2),
        attention_head_dim=tuple(w // 64 for w in widths),
        cross_attention_dim=widths,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=512,
        class_embeddings_concat=True,
        norm_num_groups=32,
    )
    # vae/config.json: a 1-channel mel VAE, ch 128, ch_mult (1, 2, 4), 8 latent channels
    vae = _sd_vae(layers, in_channels=1, channels=(128, 256, 512), latent_channels=8)
    # text_encoder/config.json: CLAP's RoBERTa-base text tower with its 512-d projection
    text_encoder = ClapTextModelWithProjection(
        ClapTextConfig(
            vocab_size=50265,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=_depth(layers, 12),
            num_attention_heads=12,
            max_position_embeddings=514,
            type_vocab_size=1,
            projection_dim=512,
            pad_token_id=1,
        )
    )
    # vocoder/config.json: HiFi-GAN, 64 mel bins in, 16 kHz out (160 samples per frame)
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=64,
            sampling_rate=16000,
            upsample_initial_channel=1024,
            upsample_rates=[5, 4, 2, 2, 2],
            upsample_kernel_sizes=[16, 16, 8, 4, 4],
            resblock_kernel_sizes=[3, 7, 11],
            resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
            normalize_before=False,
        )
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": build_clip_tokenizer(),  # ids < 49408 fit RoBERTa's table; anygpt conditions by embeddings
        "scheduler": _audioldm_scheduler(),
        "vocoder": vocoder,
    }


_BUILDERS: dict[str, Callable[[int | None], dict[str, Any]]] = {
    **dict.fromkeys(_SD_SOURCES, _stable_diffusion),
    **dict.fromkeys(_ZEROSCOPE_SOURCES, _zeroscope),
    **dict.fromkeys(_AUDIOLDM_SOURCES, _audioldm),
}
RELEASED_SOURCES: tuple[str, ...] = tuple(_BUILDERS)
"""The hub ids whose architecture is written here."""


def has_released_architecture(source: str) -> bool:
    """Whether :func:`released_components` knows ``source``."""
    return source in _BUILDERS


def released_components(source: str, *, layers: int | None = None) -> dict[str, Any]:
    """The keyword arguments of the released model's diffusers pipeline, with freshly initialised weights.

    Build it under ``with torch.device("meta")`` to allocate nothing (sizes only).

    Args:
        source: a hub id from :data:`RELEASED_SOURCES` (the decoder presets' sources).
        layers: None for the released depth; N for at most N layers per UNet / VAE block and per text-encoder stack
            (same widths), for CPU benchmarks.

    Raises:
        ValueError: an unknown source, listing the known ones.
    """
    if source not in _BUILDERS:
        raise ValueError(
            f"no hand-written architecture for decoder source {source!r}: known are {', '.join(RELEASED_SOURCES)}"
        )
    components = _BUILDERS[source](layers)
    for component in components.values():
        if hasattr(component, "eval"):
            component.eval()
    return components
