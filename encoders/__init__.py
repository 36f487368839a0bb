"""Frozen media encoders. anygpt uses ImageBind (Meta; code and weights CC BY-NC-SA 4.0)."""

from __future__ import annotations

from encoders.imagebind import (
    EncoderOutput,
    ImageBindConfig,
    ImageBindEncoder,
    build_imagebind_encoder,
    default_checkpoint_path,
    find_imagebind_checkpoint,
    list_encoder_presets,
    load_imagebind_state_dict,
)

__all__ = [
    "EncoderOutput",
    "ImageBindConfig",
    "ImageBindEncoder",
    "build_imagebind_encoder",
    "default_checkpoint_path",
    "find_imagebind_checkpoint",
    "list_encoder_presets",
    "load_imagebind_state_dict",
]
