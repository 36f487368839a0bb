"""The whole system's configuration: one dataclass of component configs, and named presets."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from anygpt.base.modality import MEDIA_MODALITIES, Modality
from anygpt.core.fusion import CrossAttentionConfig
from anygpt.core.llm import LanguageModelConfig, llm_config_from_preset
from anygpt.core.tokens import SignalTokenConfig
from decoders import DecoderConfig
from encoders import ImageBindConfig


@dataclass
class ProjectorConfig:
    """A projector chosen by registry name, with its options (see ``anygpt info projectors``)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.name = str(self.name).lower()
        self.options = dict(self.options)


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
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnyGPTConfig:
        data = copy.deepcopy(data)
        known = {
            "encoder", "llm", "decoders", "signal_tokens", "input_projector", "output_projector",
            "output_projector_overrides", "input_modalities", "seed", "cross_attention",
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
