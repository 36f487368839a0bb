"""The whole system's configuration: one dataclass of component configs, and named presets."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from anygpt.base.errors import ConfigError
from anygpt.base.modality import MEDIA_MODALITIES, Modality
from anygpt.core.fusion import CrossAttentionConfig
from anygpt.core.llm import LanguageModelConfig, llm_config_from_preset
from anygpt.core.tokens import SignalTokenConfig
from decoders import DecoderConfig
from encoders import ImageBindConfig
from encoders.anyres import DEFAULT_GRIDS, check_grids
from projectors.token_merge import parse_token_merge

RESOLUTIONS = ("fixed", "anyres")
"""How images are read: ``fixed`` (the encoder's 224 x 224) or ``anyres`` (a global view plus tiles)."""
MAX_IMAGE_TOKENS = 1 << 16
"""The largest ``image_input.max_image_tokens`` accepted."""


@dataclass
class ProjectorConfig:
    """A projector chosen by registry name, with its options (see ``anygpt info projectors``)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.name = str(self.name).lower()
        self.options = dict(self.options)


@dataclass
class ImageInputConfig:
    """How images reach the input projector: the encoder's fixed 224 x 224, or AnyRes tiles, and a token budget.

    Args:
        resolution: ``"fixed"`` (one 224 x 224 view, ImageBind's transform) or ``"anyres"`` (LLaVA-NeXT's dynamic
            resolution, ``encoders.anyres``: a global view, then the tiles of a grid chosen by aspect ratio, then blank
            tiles up to the largest grid's tile count). The connector reads each view as one image (K tokens) and
            the views go to the LLM one after the other, the image placeholder's embedding between consecutive ones:
            ``V * K + (V - 1)`` tokens per image with ``V = 1 + max tiles``. Needs a connector that reads the token
            sequence (``uses_tokens``: group, qformer, perceiver, cabstractor, linear / mlp with ``source: tokens``):
            the single-embedding connectors (linear / mlp on the pooled embedding) refuse it (``ConfigError``).
            Video keeps the fixed path. A call may ask for the other one (``GenerationRequest.image_resolution``).
        anyres_grids: the grid shapes ``[rows, cols]`` AnyRes chooses from (1 .. 8 each, at most 16 tiles, no shape
            twice); also used by calls that ask for AnyRes on a fixed-resolution system.
        max_image_tokens: the most LLM tokens (projected features) one image may take, or None (no bound). AnyRes
            uses only the grids that fit (the largest ones are dropped); a system whose fixed view, or AnyRes layout
            with even its smallest grid, does not fit is refused when the model is built (``ConfigError``).
    """

    resolution: str = "fixed"
    anyres_grids: list[list[int]] = field(default_factory=lambda: [list(g) for g in DEFAULT_GRIDS])
    max_image_tokens: int | None = None

    def __post_init__(self):
        if self.resolution not in RESOLUTIONS:
            raise ConfigError(f"image_input.resolution: expected 'fixed' or 'anyres', got {self.resolution!r}")
        try:
            self.anyres_grids = [list(g) for g in check_grids(self.anyres_grids, "image_input.anyres_grids")]
        except ValueError as err:
            raise ConfigError(str(err)) from None
        budget = self.max_image_tokens
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= MAX_IMAGE_TOKENS
        ):
            raise ConfigError(
                f"image_input.max_image_tokens: expected an integer in 1 .. {MAX_IMAGE_TOKENS} or null, got {budget!r}"
            )

    @property
    def is_default(self) -> bool:
        return self == ImageInputConfig()

    def to_dict(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "anyres_grids": [list(g) for g in self.anyres_grids],
            "max_image_tokens": self.max_image_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageInputConfig:
        """Build from :meth:`to_dict` output; unknown keys raise ``ConfigError`` naming them."""
        if not isinstance(data, dict):
            raise ConfigError(f"image_input: expected a mapping, got {data!r}")
        unknown = sorted(set(data) - {"resolution", "anyres_grids", "max_image_tokens"})
        if unknown:
            raise ConfigError(f"image_input: unknown keys {unknown}; valid keys are anyres_grids, max_image_tokens, "
                              "resolution")  # fmt: skip
        return cls(**data)


@dataclass
class AnyGPTConfig:
    """Everything needed to build an AnyGPT system.

    Args:
        encoder: ImageBind config (``encoders.ImageBindConfig``).
        llm: language model config.
        signal_tokens: signal-token counts per output modality.
        input_projector: the input projector (one instance per input modality).
        output_projector: the output projector (one instance per output modality).
        output_projector_overrides: per-modality option overrides of the output projector, e.g.
            ``{"audio": {"num_queries": 1}}``.
        decoders: decoder config per output modality (``decoders.DecoderConfig``).
        input_modalities: the media modalities the system reads.
        seed: initialisation seed of the projectors and new token rows.
        cross_attention: gated cross-attention blocks (Flamingo) in the LLM, or None (media are only spliced in
            as tokens); see ``anygpt.core.fusion``.
        image_input: fixed resolution or AnyRes tiles for images, and a token budget (:class:`ImageInputConfig`).

    The input projector's options may hold ``token_merge`` (``{ratio: r}`` or ``{target: n}``,
    ``projectors.token_merge``): each view's connector output is merged down by ToMe's bipartite soft matching before
    the LLM reads it (not a constructor option of the connector: the model applies it); connectors that give one
    token per item refuse it when the model is built.
    """

    encoder: Any
    llm: LanguageModelConfig
    decoders: dict[str, Any]
    signal_tokens: SignalTokenConfig = field(default_factory=SignalTokenConfig)
    input_projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig("linear"))
    output_projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig("transformer"))
    output_projector_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    input_modalities: list[str] = field(default_factory=lambda: [m.value for m in MEDIA_MODALITIES])
    seed: int = 0
    cross_attention: CrossAttentionConfig | None = None
    image_input: ImageInputConfig = field(default_factory=ImageInputConfig)

    def __post_init__(self):
        self.input_modalities = [Modality.parse(m).value for m in self.input_modalities]
        for m in self.input_modalities:
            if Modality(m) not in MEDIA_MODALITIES:
                raise ValueError(f"input_modalities: {m!r} is not a media modality")
        self.decoders = {Modality.parse(k).value: v for k, v in self.decoders.items()}
        missing = set(self.decoders) - set(self.signal_tokens.counts)
        if missing:
            raise ValueError(f"decoders {sorted(missing)} have no signal tokens in signal_tokens.counts")
        for m in self.output_projector_overrides:
            Modality.parse(m)
        if self.cross_attention is not None and not isinstance(self.cross_attention, CrossAttentionConfig):
            self.cross_attention = CrossAttentionConfig.from_dict(self.cross_attention)
        if self.image_input is None:
            self.image_input = ImageInputConfig()
        elif not isinstance(self.image_input, ImageInputConfig):
            self.image_input = ImageInputConfig.from_dict(self.image_input)
        parse_token_merge(self.input_projector.options.get("token_merge"), "input_projector.options.token_merge")

    @property
    def output_modalities(self) -> list[Modality]:
        return [Modality(m) for m in self.decoders]

    def output_projector_options(self, modality: Modality) -> dict[str, Any]:
        options = dict(self.output_projector.options)
        options.update(self.output_projector_overrides.get(modality.value, {}))
        return options

    def to_dict(self) -> dict[str, Any]:
        data = {
            "encoder": self.encoder.to_dict(),
            "llm": self.llm.to_dict(),
            "decoders": {k: v.to_dict() for k, v in self.decoders.items()},
            "signal_tokens": self.signal_tokens.to_dict(),
            "input_projector": {"name": self.input_projector.name, "options": self.input_projector.options},
            "output_projector": {
                "name": self.output_projector.name,
                "options": self.output_projector.options,
            },
            "output_projector_overrides": copy.deepcopy(self.output_projector_overrides),
            "input_modalities": list(self.input_modalities),
            "seed": self.seed,
        }
        if self.cross_attention is not None:  # absent otherwise: indexes written before it stay as they were
            data["cross_attention"] = self.cross_attention.to_dict()
        if not self.image_input.is_default:  # likewise
            data["image_input"] = self.image_input.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnyGPTConfig:
        data = copy.deepcopy(data)
        known = {
            "encoder", "llm", "decoders", "signal_tokens", "input_projector", "output_projector",
            "output_projector_overrides", "input_modalities", "seed", "cross_attention", "image_input",
        }  # fmt: skip
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown AnyGPT config keys {sorted(unknown)}; valid keys are {sorted(known)}")
        return cls(
            encoder=ImageBindConfig.from_dict(data["encoder"]),
            llm=LanguageModelConfig.from_dict(data["llm"]),
            decoders={k: DecoderConfig.from_dict(v) for k, v in data["decoders"].items()},
            signal_tokens=SignalTokenConfig(**data.get("signal_tokens", {})),
            input_projector=ProjectorConfig(**data.get("input_projector", {"name": "linear"})),
            output_projector=ProjectorConfig(**data.get("output_projector", {"name": "transformer"})),
            output_projector_overrides=data.get("output_projector_overrides", {}),
            input_modalities=data.get("input_modalities", [m.value for m in MEDIA_MODALITIES]),
            seed=data.get("seed", 0),
            cross_attention=data.get("cross_attention"),
            image_input=data.get("image_input"),
        )


def _tiny() -> AnyGPTConfig:
    return AnyGPTConfig(
        encoder=ImageBindConfig.from_preset("tiny"),
        llm=llm_config_from_preset("tiny-llama"),
        decoders={
            "image": DecoderConfig.from_preset("tiny-stable-diffusion"),
            "video": DecoderConfig.from_preset("tiny-zeroscope"),
            "audio": DecoderConfig.from_preset("tiny-audioldm"),
        },
        output_projector=ProjectorConfig(
            "transformer",
            {"d_model": 64, "num_heads": 4, "num_encoder_layers": 1, "num_decoder_layers": 1},
        ),
    )


def _nextgpt_7b() -> AnyGPTConfig:
    return AnyGPTConfig(
        encoder=ImageBindConfig.from_preset("imagebind-huge"),
        llm=llm_config_from_preset("vicuna-7b-v1.5"),
        decoders={
            "image": DecoderConfig.from_preset("stable-diffusion-v1-5"),
            "video": DecoderConfig.from_preset("zeroscope-v2-576w"),
            "audio": DecoderConfig.from_preset("audioldm-l-full"),
        },
    )


PRESETS = {"tiny": _tiny, "nextgpt-7b": _nextgpt_7b}
# Trained models shipped inside the package (a save_pretrained folder holding its components).
PACKAGED_MODELS = {"toyworld": "models/toyworld"}
DEFAULT_MODEL = "toyworld"


def list_presets() -> list[str]:
    return sorted([*PRESETS, *PACKAGED_MODELS])


def config_from_preset(name: str) -> AnyGPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: expected one of {', '.join(list_presets())} or a folder")
    return PRESETS[name]()
