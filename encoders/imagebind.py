"""The frozen ImageBind encoder: Meta's model code (``imagebind-unofficial``), our own preprocessing and
loading.

Licence: ImageBind's code and weights are CC BY-NC-SA 4.0 (non-commercial).

Example::

    from anygpt.base.media import load_image
    from encoders import build_imagebind_encoder

    encoder = build_imagebind_encoder("tiny", seed=0)  # random weights, for tests
    out = encoder.encode("image", [load_image("cat.jpg")])
    out.embeds.shape  # (1, 32)
    out.tokens.shape  # (1, 257, 32)
    out = encoder.encode("image", [load_image("cat.jpg")], resolution="anyres")  # encoders/anyres.py
    out.tokens.shape  # (1, 5 * 257, 32): the global view, then 4 tile slots
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from anygpt.base.modality import Modality
from anygpt.base.utils import resolve_dtype
from encoders import anyres, transforms
from encoders.meta import import_imagebind

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_ENV",
    "CHECKPOINT_FILENAME",
    "CHECKPOINT_URL",
    "EncoderOutput",
    "ImageBindConfig",
    "ImageBindEncoder",
    "build_imagebind_encoder",
    "default_checkpoint_path",
    "find_imagebind_checkpoint",
    "import_imagebind",
    "list_encoder_presets",
    "load_imagebind_state_dict",
]

CHECKPOINT_ENV = "ANYGPT_IMAGEBIND_CHECKPOINT"
CHECKPOINT_FILENAME = "imagebind_huge.pth"
CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"

# Fixed by Meta's code (ImageBindModel hard-codes image size 224, text context 77 and the stems' kernels).
_VISION_KERNEL = (2, 14, 14)
_AUDIO_KERNEL = 16
_AUDIO_STRIDE = 10

_MODALITY_KEY = {
    Modality.IMAGE: "vision",
    Modality.VIDEO: "vision",
    Modality.AUDIO: "audio",
    Modality.TEXT: "text",
}


# ------------------------------------------------------------------------------------------------------------
# Config and presets
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ImageBindConfig:
    """Sizes and preprocessing of an ImageBind encoder. Defaults are Meta's ``imagebind_huge`` architecture.

    ``ImageBindModel`` builds six trunks (vision, text, audio, depth, thermal, IMU) and Meta's checkpoint
    holds all of them, so all sizes are here; anygpt uses vision (images, video) and audio, and text for
    retrieval checks.

    Args:
        out_embed_dim: D, the joint embedding size of the heads.
        vision_embed_dim, vision_num_blocks, vision_num_heads: vision trunk (images and video).
        text_embed_dim, text_num_blocks, text_num_heads: text trunk.
        audio_embed_dim, audio_num_blocks, audio_num_heads, audio_drop_path: audio trunk.
        depth_*, thermal_*, imu_*: the other trunks (unused by anygpt; needed to load Meta's checkpoint).
        pretrained: load weights from a checkpoint (see :func:`find_imagebind_checkpoint`) rather than random
            init.
        checkpoint: path of a checkpoint to load (implies loading); a missing file is an error, never replaced by
            another. ``None`` to look in the default places (``$ANYGPT_IMAGEBIND_CHECKPOINT``, then
            :func:`default_checkpoint_path`).
        torch_dtype: the dtype the encoder runs in (``"float32"``, ``"float16"``, ``"bfloat16"``); weights are cast
            to it after loading.
        video_clips, video_frames_per_clip, video_clip_seconds, video_spatial_crops: video preprocessing.
        audio_clips, audio_clip_seconds, audio_sample_rate, num_mel_bins, target_frames: audio preprocessing.
    """

    out_embed_dim: int = 1024
    vision_embed_dim: int = 1280
    vision_num_blocks: int = 32
    vision_num_heads: int = 16
    text_embed_dim: int = 1024
    text_num_blocks: int = 24
    text_num_heads: int = 16
    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    audio_drop_path: float = 0.1
    depth_embed_dim: int = 384
    depth_num_blocks: int = 12
    depth_num_heads: int = 8
    depth_drop_path: float = 0.0
    thermal_embed_dim: int = 768
    thermal_num_blocks: int = 12
    thermal_num_heads: int = 12
    thermal_drop_path: float = 0.0
    imu_embed_dim: int = 512
    imu_num_blocks: int = 6
    imu_num_heads: int = 8
    imu_drop_path: float = 0.7
    pretrained: bool = False
    checkpoint: str | None = None
    torch_dtype: str = "float32"
    video_clips: int = 5
    video_frames_per_clip: int = 2
    video_clip_seconds: float = 2.0
    video_spatial_crops: int = 3
    audio_clips: int = 3
    audio_clip_seconds: float = 2.0
    audio_sample_rate: int = 16000
    num_mel_bins: int = 128
    target_frames: int = 204

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("pretrained", "checkpoint", "torch_dtype"):
                continue
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"ImageBindConfig.{f.name} must be a positive integer, got {value!r}")
            if f.type == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ValueError(f"ImageBindConfig.{f.name} must be a number, got {value!r}")
        for trunk in ("vision", "text", "audio", "depth", "thermal", "imu"):
            dim, heads = getattr(self, f"{trunk}_embed_dim"), getattr(self, f"{trunk}_num_heads")
            if dim % heads:
                raise ValueError(
                    f"ImageBindConfig.{trunk}_embed_dim ({dim}) must be divisible by {trunk}_num_heads ({heads})"
                )
        for trunk in ("audio", "depth", "thermal", "imu"):
            rate = getattr(self, f"{trunk}_drop_path")
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"ImageBindConfig.{trunk}_drop_path must be in [0, 1), got {rate!r}")
        try:
            resolve_dtype(self.torch_dtype)
        except ValueError as error:
            raise ValueError(f"ImageBindConfig.torch_dtype: {error}") from None
        if not isinstance(self.pretrained, bool):
            raise ValueError(f"ImageBindConfig.pretrained must be a bool, got {self.pretrained!r}")
        if self.checkpoint is not None and (not isinstance(self.checkpoint, str) or not self.checkpoint.strip()):
            raise ValueError(
                f"ImageBindConfig.checkpoint must be a non-empty path string or None, got {self.checkpoint!r}"
            )
        if self.video_frames_per_clip % _VISION_KERNEL[0]:
            raise ValueError(
                f"ImageBindConfig.video_frames_per_clip must be a multiple of {_VISION_KERNEL[0]} "
                f"(the vision stem's temporal kernel), got {self.video_frames_per_clip}"
            )
        if self.video_spatial_crops not in (1, 3):
            raise ValueError(f"ImageBindConfig.video_spatial_crops must be 1 or 3, got {self.video_spatial_crops}")
        for name in ("video_clip_seconds", "audio_clip_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ImageBindConfig.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("num_mel_bins", "target_frames"):
            if getattr(self, name) < _AUDIO_KERNEL:
                raise ValueError(
                    f"ImageBindConfig.{name} must be at least {_AUDIO_KERNEL} (the audio stem's kernel), got "
                    f"{getattr(self, name)}"
                )

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-safe dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageBindConfig:
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ImageBindConfig keys: {', '.join(unknown)}")
        return cls(**dict(data))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ImageBindConfig:
        """A named preset (see :func:`list_encoder_presets`), with optional field overrides.

        Raises:
            ValueError: for an unknown name, listing the valid ones.
        """
        key = str(name).strip().lower()
        if key not in _PRESETS:
            raise ValueError(f"unknown ImageBind preset {name!r}: expected one of {', '.join(list_encoder_presets())}")
        return cls(**{**_PRESETS[key], **overrides})


_TINY_TRUNKS = {
    f"{trunk}_{field}": value
    for trunk in ("vision", "text", "audio", "depth", "thermal", "imu")
    for field, value in (("embed_dim", 32), ("num_blocks", 1), ("num_heads", 2))
}

_PRESETS: dict[str, dict[str, Any]] = {
    # Random weights, ~1.7 M parameters (1.6 M of them the text vocabulary): for tests.
    "tiny": {"out_embed_dim": 32, **_TINY_TRUNKS, "pretrained": False},
    # Meta's imagebind_huge (~1.2 B parameters); weights from imagebind_huge.pth.
    "imagebind-huge": {
        "out_embed_dim": 1024,
        "vision_embed_dim": 1280,
        "vision_num_blocks": 32,
        "vision_num_heads": 16,
        "text_embed_dim": 1024,
        "text_num_blocks": 24,
        "text_num_heads": 16,
        "audio_embed_dim": 768,
        "audio_num_blocks": 12,
        "audio_num_heads": 12,
        "audio_drop_path": 0.1,
        "imu_drop_path": 0.7,
        "pretrained": True,
    },
}


def list_encoder_presets() -> list[str]:
    """Names accepted by :meth:`ImageBindConfig.from_preset` and :func:`build_imagebind_encoder`."""
    return sorted(_PRESETS)


# ------------------------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------------------------


@dataclass
class EncoderOutput:
    """What the encoder returns for a batch.

    Attributes:
        embeds: (B, D) pooled embeddings exactly as ImageBind's heads and postprocessors give them (image:
            unit norm; video: mean of per-clip unit vectors; audio: unit norm x 20 per clip, averaged; text:
            unit norm x the learned logit scale).
        tokens: (B, N, D_tok) the trunk's output tokens (before the head's LayerNorm), averaged over clips for
            video and audio like the embeddings; token 0 is the CLS token.
    """

    embeds: torch.Tensor
    tokens: torch.Tensor


class _LinspaceOnCPU(TorchFunctionMode):
    """Run ``torch.linspace`` on the CPU: Meta's trunk calls ``.item()`` on it, which fails on meta."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.linspace and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


class ImageBindEncoder(nn.Module):
    """Frozen ImageBind: pure ``preprocess`` per item, batched ``forward``, ``encode`` for lists of items.

    Always in eval mode with no parameter requiring grad; ``forward`` runs under ``torch.no_grad()``. Build it
    with :func:`build_imagebind_encoder` (seeded random init or a checkpoint); the constructor alone draws
    from the global RNG and honours ``with torch.device("meta")``.

    Images are read at the fixed 224 x 224 unless :meth:`set_image_input` chooses AnyRes (``encoders.anyres``) as
    the default, or a call of :meth:`encode` asks for it.

    Args:
        config: sizes and preprocessing.
    """

    def __init__(self, config: ImageBindConfig) -> None:
        super().__init__()
        if not isinstance(config, ImageBindConfig):
            raise TypeError(f"ImageBindEncoder expects an ImageBindConfig, got {type(config).__name__}")
        self.config = config
        imagebind_model = import_imagebind()
        with _LinspaceOnCPU():
            self.model = imagebind_model.ImageBindModel(
                video_frames=config.video_frames_per_clip,
                kernel_size=_VISION_KERNEL,
                audio_kernel_size=_AUDIO_KERNEL,
                audio_stride=_AUDIO_STRIDE,
                out_embed_dim=config.out_embed_dim,
                vision_embed_dim=config.vision_embed_dim,
                vision_num_blocks=config.vision_num_blocks,
                vision_num_heads=config.vision_num_heads,
                audio_embed_dim=config.audio_embed_dim,
                audio_num_blocks=config.audio_num_blocks,
                audio_num_heads=config.audio_num_heads,
                audio_num_mel_bins=config.num_mel_bins,
                audio_target_len=config.target_frames,
                audio_drop_path=config.audio_drop_path,
                text_embed_dim=config.text_embed_dim,
                text_num_blocks=config.text_num_blocks,
                text_num_heads=config.text_num_heads,
                depth_embed_dim=config.depth_embed_dim,
                depth_num_blocks=config.depth_num_blocks,
                depth_num_heads=config.depth_num_heads,
                depth_drop_path=config.depth_drop_path,
                thermal_embed_dim=config.thermal_embed_dim,
                thermal_num_blocks=config.thermal_num_blocks,
                thermal_num_heads=config.thermal_num_heads,
                thermal_drop_path=config.thermal_drop_path,
                imu_embed_dim=config.imu_embed_dim,
                imu_num_blocks=config.imu_num_blocks,
                imu_num_heads=config.imu_num_heads,
                imu_drop_path=config.imu_drop_path,
            )
        self.execution_device: torch.device | None = None  # set by offloading (anygpt.core.runtime)
        self.image_resolution = "fixed"  # the default of encode(); set_image_input
        self.anyres_grids: tuple[tuple[int, int], ...] = anyres.DEFAULT_GRIDS
        self.requires_grad_(False)
        super().train(False)

    # ---- nn.Module -----------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> ImageBindEncoder:
        """The encoder is frozen: this keeps it in eval mode whatever ``mode`` says."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Where inputs go: :attr:`execution_device` when set (the weights wait elsewhere: offloading), else where
        the weights are."""
        if self.execution_device is not None:
            return self.execution_device
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def preload_module_classes(self) -> list[str]:
        """Submodule classes whose forward reads their children's tensors directly (the modality preprocessors'
        positional embeddings, ``nn.MultiheadAttention``'s output projection): layer-by-layer offloading loads them
        whole (accelerate's ``preload_module_classes``)."""
        names = {type(m).__name__ for m in self.model.modality_preprocessors.values()}
        names |= {type(m).__name__ for m in self.modules() if isinstance(m, nn.MultiheadAttention)}
        return sorted(names)

    # ---- sizes ---------------------------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        """D, the size of the pooled embeddings."""
        return self.config.out_embed_dim

    def token_dim(self, modality: Modality | str) -> int:
        """D_tok, the width of the trunk tokens for ``modality``."""
        key = self._key(modality)
        return {
            "vision": self.config.vision_embed_dim,
            "audio": self.config.audio_embed_dim,
            "text": self.config.text_embed_dim,
        }[key]

    def num_tokens(self, modality: Modality | str) -> int:
        """N, the number of trunk tokens per item (CLS included), from the stems' kernels and input sizes."""
        modality = Modality.parse(modality)
        key = self._key(modality)
        if key == "text":
            return self.model.modality_preprocessors["text"].context_length
        preprocessor = self.model.modality_preprocessors[key]
        if key == "vision":
            conv = preprocessor.rgbt_stem.proj[1]  # after PadIm2Video, which repeats an image to 2 frames
            frames = 2 if modality is Modality.IMAGE else self.config.video_frames_per_clip
            sizes = (frames, transforms.IMAGE_SIZE, transforms.IMAGE_SIZE)
        else:
            conv = preprocessor.rgbt_stem.proj
            sizes = (self.config.num_mel_bins, self.config.target_frames)
        patches = 1
        for size, kernel, stride in zip(sizes, conv.kernel_size, conv.stride, strict=True):
            patches *= (size - kernel) // stride + 1
        return preprocessor.num_cls_tokens + patches

    def token_grid(self, modality: Modality | str) -> tuple[int, int, int]:
        """The layout of the trunk tokens of ``modality``: ``(num_prefix, height, width)``.

        The sequence is ``num_prefix`` CLS tokens, then the patches row by row: images and videos a 16 x 16 grid per
        2-frame time step (time steps stacked along the height), audio (mel bins / 10 - 1) x (frames / 10 - 1).
        Connectors that keep locality (C-Abstractor, 2 x 2 pooling) read it.
        """
        modality = Modality.parse(modality)
        key = self._key(modality)
        if key == "text":
            raise ValueError("text tokens have no spatial grid")
        preprocessor = self.model.modality_preprocessors[key]
        if key == "vision":
            conv = preprocessor.rgbt_stem.proj[1]
            frames = 2 if modality is Modality.IMAGE else self.config.video_frames_per_clip
            sizes = (frames, transforms.IMAGE_SIZE, transforms.IMAGE_SIZE)
        else:
            conv = preprocessor.rgbt_stem.proj
            sizes = (self.config.num_mel_bins, self.config.target_frames)
        counts = [(size - k) // s + 1 for size, k, s in zip(sizes, conv.kernel_size, conv.stride, strict=True)]
        height, width = (counts[0] * counts[1], counts[2]) if len(counts) == 3 else tuple(counts)
        return preprocessor.num_cls_tokens, height, width

    @property
    def max_video_frames(self) -> int:
        """A good ``max_frames`` for :func:`anygpt.base.media.load_video`: 16 frames per clip window, enough that
        the frames picked per clip lie close to those picked from the full-rate video."""
        return 16 * self.config.video_clips

    def input_shape(self, modality: Modality | str) -> tuple[int, ...]:
        """Shape of one preprocessed item (what :meth:`preprocess` returns)."""
        modality = Modality.parse(modality)
        c = self.config
        size = transforms.IMAGE_SIZE
        if modality is Modality.IMAGE:
            return (3, size, size)
        if modality is Modality.VIDEO:
            return (c.video_clips * c.video_spatial_crops, 3, c.video_frames_per_clip, size, size)
        if modality is Modality.AUDIO:
            return (c.audio_clips, 1, c.num_mel_bins, c.target_frames)
        return (transforms.TEXT_CONTEXT_LENGTH,)

    def set_image_input(self, resolution: str = "fixed", grids: Sequence[Sequence[int]] | None = None) -> None:
        """How :meth:`encode` reads images by default: ``"fixed"`` (224 x 224) or ``"anyres"`` (a global view plus
        tiles, see ``encoders.anyres``), and the grid shapes AnyRes chooses from (kept for calls asking for AnyRes
        whatever the default).

        With ``"anyres"`` the grids are also held in the ``anyres_grids`` buffer, so the encoder's state dict (which
        the training feature cache fingerprints) tells AnyRes features from fixed-resolution ones.

        Raises:
            ValueError: an unknown resolution or invalid grids.
        """
        if resolution not in ("fixed", "anyres"):
            raise ValueError(f"image resolution must be 'fixed' or 'anyres', got {resolution!r}")
        if grids is not None:
            self.anyres_grids = anyres.check_grids(grids)
        self.image_resolution = resolution
        self._buffers.pop("anyres_grids_tensor", None)
        if resolution == "anyres":
            table = torch.tensor(self.anyres_grids, dtype=torch.long, device="cpu")
            self.register_buffer("anyres_grids_tensor", table.to(next(self.parameters()).device), persistent=True)

    # ---- preprocessing -------------------------------------------------------------------------------------

    def preprocess(self, modality: Modality | str, item: Any) -> torch.Tensor:
        """Turn one decoded item into the model's input (pure: no I/O, no device, float32 or int64 on the
        CPU).

        Args:
            modality: image, video, audio or text.
            item: image: ``PIL.Image.Image`` (or uint8 (H, W, 3)); video: :class:`anygpt.base.media.Video`; audio:
                :class:`anygpt.base.media.Audio` (any rate and channel count); text: ``str``.

        Returns:
            image (3, 224, 224); video (clips * crops, 3, frames_per_clip, 224, 224); audio (clips, 1,
            mel_bins, target_frames); text (77,) int64.
        """
        modality = Modality.parse(modality)
        c = self.config
        if modality is Modality.IMAGE:
            return transforms.image_transform(item)
        if modality is Modality.AUDIO:
            return transforms.audio_transform(
                item,
                sample_rate=c.audio_sample_rate,
                num_clips=c.audio_clips,
                clip_seconds=c.audio_clip_seconds,
                num_mel_bins=c.num_mel_bins,
                target_frames=c.target_frames,
            )
        if modality is Modality.VIDEO:
            return transforms.video_transform(
                item,
                num_clips=c.video_clips,
                frames_per_clip=c.video_frames_per_clip,
                clip_seconds=c.video_clip_seconds,
                num_crops=c.video_spatial_crops,
            )
        return transforms.text_transform(item)

    # ---- forward -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, modality: Modality | str, inputs: torch.Tensor) -> EncoderOutput:
        """Encode a batch of preprocessed items (no gradients: the encoder is frozen).

        Args:
            modality: image, video, audio or text.
            inputs: image (B, 3, 224, 224); video (B, S, 3, F, 224, 224); audio (B, S, 1, mel, frames); text
                (B, 77) token ids. Float inputs are cast to the module's dtype and device.

        Returns:
            :class:`EncoderOutput`: ``embeds`` (B, D) and ``tokens`` (B, N, D_tok); clips (S) are averaged.
        """
        return self.embed(modality, inputs)

    def embed(self, modality: Modality | str, inputs: torch.Tensor) -> EncoderOutput:
        """:meth:`forward` with autograd left on, for pretraining an encoder (e.g. contrastively); the trunks'
        parameters must be set to require grad by the caller. Same arguments and result as :meth:`forward`."""
        modality = Modality.parse(modality)
        key = self._key(modality)
        self._check_batch(modality, inputs)
        if modality is Modality.TEXT:
            inputs = inputs.to(device=self.device, dtype=torch.long)
        else:
            inputs = inputs.to(device=self.device, dtype=self.dtype)
        batch = inputs.shape[0]
        clips = 1
        if modality in (Modality.VIDEO, Modality.AUDIO):
            clips = inputs.shape[1]
            inputs = inputs.reshape(batch * clips, *inputs.shape[2:])
        model = self.model
        prepared = model.modality_preprocessors[key](**{key: inputs})
        tokens = model.modality_trunks[key](**prepared["trunk"])  # (B*S, N, D_tok)
        embeds = model.modality_heads[key](tokens, **prepared["head"])  # (B*S, D)
        embeds = model.modality_postprocessors[key](embeds)
        if modality in (Modality.VIDEO, Modality.AUDIO):
            embeds = embeds.reshape(batch, clips, -1).mean(dim=1)
            tokens = tokens.reshape(batch, clips, *tokens.shape[1:]).mean(dim=1)
        return EncoderOutput(embeds=embeds, tokens=tokens)

    def encode(self, modality: Modality | str, items: Sequence[Any], *, resolution: str | None = None) -> EncoderOutput:
        """Preprocess each item, stack them and run :meth:`forward` on the module's device and dtype.

        Args:
            modality: image, video, audio or text.
            items: decoded items as :meth:`preprocess` takes them (not a single item: wrap it in a list).
            resolution: images only: ``"fixed"`` or ``"anyres"`` (None: the default of :meth:`set_image_input`).
                AnyRes gives each image ``V = 1 + max tiles of the grids`` views (``encoders.anyres``): ``tokens``
                (B, V * N, D_tok), the views' sequences one after the other, global view first; ``embeds`` the global
                view's pooled embedding.

        Returns:
            :class:`EncoderOutput` with batch size ``len(items)``.
        """
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise TypeError(f"encode expects a list of items, got {type(items).__name__}")
        if not items:
            raise ValueError("encode got an empty list of items")
        if resolution not in (None, "fixed", "anyres"):
            raise ValueError(f"resolution must be 'fixed', 'anyres' or None, got {resolution!r}")
        if Modality.parse(modality) is Modality.IMAGE and (resolution or self.image_resolution) == "anyres":
            return self._encode_anyres(items)
        batch = torch.stack([self.preprocess(modality, item) for item in items])
        return self(modality, batch)

    def _encode_anyres(self, items: Sequence[Any]) -> EncoderOutput:
        """AnyRes images: every real view in one batch, the blank tile (when a slot needs it) encoded once."""
        slots = anyres.max_tiles(self.anyres_grids)
        views, layouts = [], []
        for item in items:
            item_views, layout = anyres.anyres_views(item, self.anyres_grids, slots=slots, blanks=False)
            views.append(item_views)
            layouts.append(layout)
        need_blank = any(layout.tiles < slots for layout in layouts)
        batch = torch.cat(views + ([anyres.blank_tile()[None]] if need_blank else []))
        out = self(Modality.IMAGE, batch)  # (sum of views [+ 1], N, D_tok)
        tokens, embeds, start = [], [], 0
        for layout in layouts:
            count = 1 + layout.tiles
            seq = [out.tokens[start : start + count]]
            if layout.tiles < slots:
                seq.append(out.tokens[-1:].expand(slots - layout.tiles, -1, -1))
            tokens.append(torch.cat(seq).flatten(0, 1))  # (V * N, D_tok)
            embeds.append(out.embeds[start])
            start += count
        return EncoderOutput(embeds=torch.stack(embeds), tokens=torch.stack(tokens))

    # ---- loading -------------------------------------------------------------------------------------------

    def load_imagebind_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict") -> None:
        """Load a state dict in Meta's key format (``modality_trunks.vision.blocks.0...``), strictly.

        Works on an encoder built on the meta device (tensors are assigned, not copied). Floating tensors end
        up float32.

        Raises:
            RuntimeError: listing a few missing, unexpected or mis-shaped keys.
        """
        expected = self.model.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        mismatched = [
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in sorted(set(expected) & set(state_dict))
            if tuple(state_dict[k].shape) != tuple(expected[k].shape)
        ]
        if missing or unexpected or mismatched:
            parts = []
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
                if keys:
                    more = f", ... ({len(keys)} in all)" if len(keys) > 5 else ""
                    parts.append(f"{label}: {', '.join(keys[:5])}{more}")
            raise RuntimeError(
                f"ImageBind checkpoint {source} does not match the config "
                f"(vision {self.config.vision_embed_dim}x{self.config.vision_num_blocks}, "
                f"out {self.embed_dim}): " + "; ".join(parts)
            )
        self.model.load_state_dict(dict(state_dict), strict=True, assign=True)
        still_meta = [name for name, t in self.model.state_dict().items() if t.is_meta]
        if still_meta:
            raise RuntimeError(f"ImageBind checkpoint {source} left tensors unset: {', '.join(still_meta[:5])}")
        self.to(torch.float32)
        self.requires_grad_(False)

    # ---- helpers -------------------------------------------------------------------------------------------

    @staticmethod
    def _key(modality: Modality | str) -> str:
        return _MODALITY_KEY[Modality.parse(modality)]

    def _check_batch(self, modality: Modality, inputs: torch.Tensor) -> None:
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"forward expects a tensor batch, got {type(inputs).__name__}; use encode() for items")
        item = self.input_shape(modality)
        if modality in (Modality.VIDEO, Modality.AUDIO):
            ok = inputs.ndim == len(item) + 1 and inputs.shape[1] >= 1 and tuple(inputs.shape[2:]) == item[1:]
            want = f"(B, S, {', '.join(map(str, item[1:]))})"
        else:
            ok = inputs.ndim == len(item) + 1 and tuple(inputs.shape[1:]) == item
            want = f"(B, {', '.join(map(str, item))})"
        if not ok or inputs.shape[0] == 0:
            raise ValueError(f"{modality.value} batch must have shape {want} with B >= 1, got {tuple(inputs.shape)}")
        if modality is Modality.TEXT and inputs.is_floating_point():
            raise ValueError("text batch must hold integer token ids, got a floating-point tensor")


# ------------------------------------------------------------------------------------------------------------
# Checkpoints and building
# ------------------------------------------------------------------------------------------------------------


def default_checkpoint_path() -> Path:
    """``$XDG_CACHE_HOME/anygpt/imagebind_huge.pth`` (``~/.cache`` when unset or relative)."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache).expanduser() if cache and Path(cache).expanduser().is_absolute() else Path.home() / ".cache"
    return base / "anygpt" / CHECKPOINT_FILENAME


def find_imagebind_checkpoint(config: ImageBindConfig | None = None) -> Path:
    """Find the ImageBind checkpoint.

    When ``config.checkpoint`` is set, that file and only that file is used: if it does not exist, this raises
    rather than falling back elsewhere. Otherwise ``$ANYGPT_IMAGEBIND_CHECKPOINT`` then
    :func:`default_checkpoint_path` are tried, and the first existing file wins.

    Raises:
        FileNotFoundError: ``config.checkpoint`` is set but is not a file (naming that path); or, with no
            ``config.checkpoint``, naming every place looked and where to get the weights.
    """
    how = (
        f"Download Meta's {CHECKPOINT_FILENAME} (CC BY-NC-SA 4.0) from {CHECKPOINT_URL} to "
        f"{default_checkpoint_path()}, or point ${CHECKPOINT_ENV} or config.checkpoint at it."
    )
    if config is not None and config.checkpoint:
        given = Path(config.checkpoint).expanduser().absolute()
        if given.is_file():
            return given
        state = "is a directory, not a file" if given.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"ImageBind checkpoint {given} (set by config.checkpoint={config.checkpoint!r}) {state}; no other "
            f"place is searched when checkpoint is set. Fix the path, or set checkpoint=None (with pretrained=True) "
            f"to search ${CHECKPOINT_ENV} and {default_checkpoint_path()}. Meta's {CHECKPOINT_FILENAME}: "
            f"{CHECKPOINT_URL}"
        )
    env = os.environ.get(CHECKPOINT_ENV, "").strip()
    places: list[tuple[str, Path | None]] = [
        (f"${CHECKPOINT_ENV}", Path(env).expanduser().absolute() if env else None),
        ("default", default_checkpoint_path()),
    ]
    looked = []
    for label, path in places:
        if path is None:
            looked.append(f"{label} (not set)")
        elif path.is_file():
            return path
        else:
            looked.append(f"{label} {path} ({'a directory' if path.is_dir() else 'missing'})")
    raise FileNotFoundError(f"ImageBind checkpoint not found; looked at: {'; '.join(looked)}. {how}")


def load_imagebind_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint: ``*.safetensors`` with safetensors, anything else (Meta's ``.pth``) with
    ``torch.load(..., map_location="cpu", weights_only=True)`` (never a full unpickle).

    Accepts a plain state dict or one wrapped under ``"model"`` / ``"state_dict"``.

    Raises:
        RuntimeError: when the file cannot be read safely or holds no tensor mapping.
    """
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"cannot load ImageBind checkpoint {path} with weights_only=True: {first}") from e
    if isinstance(state, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
                state = state[wrapper]
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise RuntimeError(f"ImageBind checkpoint {path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def build_imagebind_encoder(
    config: ImageBindConfig | str = "tiny", *, seed: int = 0, empty_weights: bool = False
) -> ImageBindEncoder:
    """Build a frozen ImageBind encoder from a config or preset name.

    Weights come from the checkpoint found by :func:`find_imagebind_checkpoint` when ``config.checkpoint`` is
    set or ``config.pretrained`` is true (strict keys; the model is built on the meta device first, so memory
    holds one copy); otherwise they are random, bit-for-bit reproducible for ``seed``, and the caller's RNG
    state is left untouched.

    Args:
        config: an :class:`ImageBindConfig` or a preset name (``"tiny"``, ``"imagebind-huge"``).
        seed: seed for random init.
        empty_weights: build the architecture on the meta device and read no checkpoint (sizes only; nothing is
            allocated).

    Returns:
        The encoder in ``config.torch_dtype`` on the CPU (meta with ``empty_weights``), in eval mode, no parameter
        requiring grad.

    Raises:
        FileNotFoundError: ``config.checkpoint`` names a missing file, or weights wanted but no checkpoint found.
        RuntimeError: checkpoint unreadable or not matching the config.
    """
    if isinstance(config, str):
        config = ImageBindConfig.from_preset(config)
    dtype = resolve_dtype(config.torch_dtype)
    if empty_weights:
        with torch.device("meta"):
            return ImageBindEncoder(config).to(dtype)
    if config.pretrained or config.checkpoint is not None:
        path = find_imagebind_checkpoint(config)
        logger.info("loading ImageBind weights from %s", path)
        state = load_imagebind_state_dict(path)
        with torch.device("meta"):
            encoder = ImageBindEncoder(config)
        encoder.load_imagebind_state_dict(state, source=str(path))
        return encoder.to(dtype)
    logger.debug("building ImageBind with random weights (seed %d)", seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = ImageBindEncoder(config)
    return encoder.to(dtype)
