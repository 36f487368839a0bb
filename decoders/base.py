"""Decoders: frozen diffusers pipelines that turn conditioning embeddings into images, videos and audio.

Every decoder wraps one unmodified diffusers pipeline and drives it through ``prompt_embeds`` /
``negative_prompt_embeds`` only. What differs between decoders is data on the subclass: the modality, the
pipeline class, the standard conditioning shape, how captions are encoded (the pipeline's own method), which
size arguments the pipeline takes and how its output becomes a ``PIL.Image`` / :class:`~anygpt.base.media.Video` /
:class:`~anygpt.base.media.Audio`. The lifecycle (lazy load, device and dtype, caching the empty-prompt embedding,
shape checks) lives here.
"""

from __future__ import annotations

import inspect
import logging
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline

from anygpt.base.errors import GenerationStopped
from anygpt.base.logs import is_progress_bar_enabled
from anygpt.base.modality import Modality
from anygpt.base.utils import resolve_dtype, torchao_weight_config

logger = logging.getLogger(__name__)

__all__ = [
    "Decoder",
    "DecoderConfig",
    "DecoderSpec",
    "GenerationStopped",
    "build_decoder",
    "decoder_class",
    "list_decoder_presets",
    "list_decoders",
    "register_decoder",
]

TINY_SOURCE = "tiny"
_OFFLOAD_PLANS = ("none", "model", "sequential", "group")  # anygpt.core.runtime.OFFLOAD_PLANS


# ----------------------------------------------------------------------------------------------------
# Spec


@dataclass(frozen=True)
class DecoderSpec:
    """What a decoder's conditioning looks like: the target of an output projector.

    Attributes:
        modality: what the decoder produces.
        cond_len: tokens per conditioning sequence (77 for CLIP text encoders by default, any length up to the
            tokenizer's ``model_max_length`` when configured; 1 for pooled conditioning).
        cond_dim: width of each token (SD 1.5: 768, ZeroScope: 1024, AudioLDM: 512).
        pooled: the conditioning is one vector per sample, ``prompt_embeds`` of shape (B, cond_dim)
            (AudioLDM).
    """

    modality: Modality
    cond_len: int
    cond_dim: int
    pooled: bool = False

    def __post_init__(self) -> None:
        if self.cond_len < 1 or self.cond_dim < 1:
            raise ValueError(f"cond_len and cond_dim must be positive, got {self.cond_len} and {self.cond_dim}")
        if self.pooled and self.cond_len != 1:
            raise ValueError(f"a pooled spec has cond_len 1, got {self.cond_len}")

    @property
    def cond_shape(self) -> tuple[int, ...]:
        """Shape of one sample's conditioning: ``(cond_dim,)`` when pooled, else ``(cond_len, cond_dim)``."""
        return (self.cond_dim,) if self.pooled else (self.cond_len, self.cond_dim)


# ----------------------------------------------------------------------------------------------------
# Registry


_DECODERS: dict[str, type[Decoder]] = {}


def register_decoder(kind: str) -> Callable[[type[Decoder]], type[Decoder]]:
    """Class decorator registering a :class:`Decoder` subclass under a lowercase ``kind`` name.

    Args:
        kind: the name used in :attr:`DecoderConfig.kind`, e.g. ``"stable-diffusion"``.

    Raises:
        ValueError: when the name is taken.
    """
    key = kind.strip().lower()

    def decorate(cls: type[Decoder]) -> type[Decoder]:
        if key in _DECODERS and _DECODERS[key] is not cls:
            raise ValueError(f"decoder kind {key!r} is already registered to {_DECODERS[key].__name__}")
        cls.kind = key
        _DECODERS[key] = cls
        return cls

    return decorate


def list_decoders() -> list[str]:
    """Return the registered decoder kinds, sorted."""
    return sorted(_DECODERS)


def decoder_class(kind: str) -> type[Decoder]:
    """Return the :class:`Decoder` subclass registered for ``kind``.

    Raises:
        ValueError: for an unknown kind, listing the valid ones.
    """
    key = str(kind).strip().lower()
    if key not in _DECODERS:
        raise ValueError(f"unknown decoder kind {kind!r}: expected one of {', '.join(list_decoders())}")
    return _DECODERS[key]


def build_decoder(config: DecoderConfig) -> Decoder:
    """Build the decoder that ``config.kind`` names. Nothing is loaded until first use.

    Args:
        config: the decoder's configuration, e.g. ``DecoderConfig.from_preset("tiny-stable-diffusion")``.

    Returns:
        An unloaded :class:`Decoder`.
    """
    return decoder_class(config.kind)(config)


# ----------------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class DecoderConfig:
    """Configuration of one decoder.

    Attributes:
        kind: registered decoder kind: ``"stable-diffusion"``, ``"zeroscope"`` or ``"audioldm"``.
        source: ``"tiny"`` (random tiny components built in memory), a Hugging Face model id looked up in the
            local cache, or a local folder holding a diffusers ``model_index.json``. Nothing is ever
            downloaded.
        seed: initialisation seed of the tiny components.
        torch_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        num_inference_steps: default denoising steps.
        guidance_scale: default classifier-free guidance scale (<= 1 disables guidance).
        height: default image / video height in pixels (multiple of 8).
        width: default image / video width in pixels (multiple of 8).
        num_frames: default video length in frames.
        fps: frame rate attached to generated videos.
        audio_seconds: default audio length in seconds.
        cond_len: conditioning tokens (>= 1); ``None`` means the kind's standard (77, or 1 for pooled
            conditioning). A sequence decoder (Stable Diffusion, ZeroScope) takes any length up to its tokenizer's
            ``model_max_length`` (77): the UNet's cross-attention accepts any sequence length, and
            :meth:`Decoder.encode_captions` keeps the first ``cond_len`` tokens of the pipeline's encoding.
            Pooled decoders (AudioLDM) take only ``None`` or 1.
        cond_dim: conditioning width; ``None`` means the kind's real model's (768, 1024, 512). Tiny components
            are built at this width (the tiny presets use 32). Checked against the loaded text encoder.
    """

    kind: str
    source: str = TINY_SOURCE
    seed: int = 0
    torch_dtype: str = "float32"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    num_frames: int = 24
    fps: float = 8.0
    audio_seconds: float = 5.0
    cond_len: int | None = None
    cond_dim: int | None = None

    def __post_init__(self) -> None:
        self.kind = decoder_class(self.kind).kind  # normalises the name; raises listing the valid kinds
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"source must be 'tiny', a model id or a local folder, got {self.source!r}")
        if not isinstance(self.torch_dtype, str):
            raise ValueError(f"torch_dtype must be a dtype name such as 'float32', got {self.torch_dtype!r}")
        try:
            resolve_dtype(self.torch_dtype)
        except ValueError as error:
            raise ValueError(f"torch_dtype: {error}") from None
        _check_int("seed", self.seed, minimum=0)
        _check_int("num_inference_steps", self.num_inference_steps, minimum=1)
        _check_int("num_frames", self.num_frames, minimum=1)
        for name in ("height", "width"):
            value = getattr(self, name)
            _check_int(name, value, minimum=8)
            if value % 8:
                raise ValueError(f"{name} must be a multiple of 8, got {value}")
        for name in ("guidance_scale", "fps", "audio_seconds"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.fps <= 0 or self.audio_seconds <= 0:
            raise ValueError(f"fps and audio_seconds must be positive, got {self.fps} and {self.audio_seconds}")
        for name in ("cond_len", "cond_dim"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        cls = decoder_class(self.kind)
        if cls.pooled and self.cond_len not in (None, 1):
            raise ValueError(
                f"{self.kind} conditioning is one pooled vector: cond_len must be None or 1, got {self.cond_len}"
            )

    @property
    def is_tiny(self) -> bool:
        """Whether the components are tiny random ones built in memory."""
        return self.source == TINY_SOURCE

    @property
    def modality(self) -> Modality:
        """What this decoder produces."""
        return decoder_class(self.kind).modality

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        """Build a config from :meth:`to_dict` output.

        Raises:
            ValueError: on unknown keys (listing the valid ones) or invalid values.
        """
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown DecoderConfig keys {unknown}: valid keys are {', '.join(sorted(valid))}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DecoderConfig:
        """Build the config of a named preset, e.g. ``"stable-diffusion-v1-5"`` or ``"tiny-audioldm"``.

        Args:
            name: a name from :func:`list_decoder_presets`.
            **overrides: fields to change, e.g. ``num_inference_steps=25``.

        Raises:
            ValueError: for an unknown name, listing the valid ones.
        """
        key = str(name).strip().lower()
        if key not in _PRESETS:
            raise ValueError(f"unknown decoder preset {name!r}: expected one of {', '.join(list_decoder_presets())}")
        return cls.from_dict({**_PRESETS[key], **overrides})


def _or_default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# Conditioning widths are those of each model's text encoder config (text_encoder/config.json: hidden_size, or
# projection_dim for AudioLDM's CLAP); the decoder checks them against the loaded model.
_TINY = {"source": TINY_SOURCE, "num_inference_steps": 3, "cond_dim": 32}
_PRESETS: dict[str, dict[str, Any]] = {
    "stable-diffusion-v1-5": {
        "kind": "stable-diffusion",
        "source": "stable-diffusion-v1-5/stable-diffusion-v1-5",  # the maintained copy; runwayml/ is gone
        "num_inference_steps": 50,
        "guidance_scale": 7.5,
        "height": 512,
        "width": 512,
        "cond_dim": 768,
    },
    "zeroscope-v2-576w": {
        "kind": "zeroscope",
        "source": "cerspense/zeroscope_v2_576w",
        "num_inference_steps": 40,
        "guidance_scale": 7.5,
        "height": 320,
        "width": 576,
        "num_frames": 24,
        "fps": 8.0,
        "cond_dim": 1024,
    },
    "audioldm-l-full": {
        "kind": "audioldm",
        "source": "cvssp/audioldm-l-full",
        "num_inference_steps": 50,
        "guidance_scale": 2.5,
        "audio_seconds": 5.0,
        "cond_dim": 512,
    },
    "tiny-stable-diffusion": {"kind": "stable-diffusion", **_TINY, "height": 64, "width": 64},
    "tiny-zeroscope": {"kind": "zeroscope", **_TINY, "height": 64, "width": 64, "num_frames": 8, "fps": 8.0},
    "tiny-audioldm": {"kind": "audioldm", **_TINY, "guidance_scale": 2.5, "audio_seconds": 1.0},
}


def list_decoder_presets() -> list[str]:
    """Return the names accepted by :meth:`DecoderConfig.from_preset`, sorted."""
    return sorted(_PRESETS)


# ----------------------------------------------------------------------------------------------------
# Decoder


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class Decoder(ABC):
    """A frozen diffusers pipeline driven by conditioning embeddings.

    Subclasses are data: class attributes (modality, pipeline class, tiny builder, standard conditioning
    shape, output type) plus two small conversions (:meth:`_size_kwargs`, :meth:`_outputs`); a decoder whose
    pipeline encodes captions differently overrides :meth:`_encode_with_pipeline`. Pipelines stay unmodified.

    Construction is cheap: the pipeline is built on the first :meth:`generate` / :meth:`encode_captions` (or
    an explicit :meth:`load`) and kept until :meth:`unload`.

    Args:
        config: a :class:`DecoderConfig` whose kind is this class's.

    Example:
        >>> decoder = build_decoder(DecoderConfig.from_preset("tiny-stable-diffusion"))
        >>> images = decoder.generate(decoder.encode_captions(["a red circle"]))
    """

    kind: ClassVar[str]  # set by register_decoder
    modality: ClassVar[Modality]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    tiny_components: ClassVar[Callable[..., dict[str, Any]]]  # keyword-only seed, cond_dim -> pipeline kwargs
    pipeline_options: ClassVar[dict[str, Any]] = {}  # extra pipeline arguments, tiny or pretrained
    pooled: ClassVar[bool] = False
    standard_cond_len: ClassVar[int] = 77
    standard_cond_dim: ClassVar[int]
    output_type: ClassVar[str] = "np"  # what the pipeline is asked for; _outputs converts it

    def __init__(self, config: DecoderConfig) -> None:
        if decoder_class(config.kind) is not type(self):
            raise ValueError(f"{type(self).__name__} cannot be built from a {config.kind!r} config")
        self.config = config
        self.load_count = 0
        self._pipeline: DiffusionPipeline | None = None
        self._device: torch.device | None = None
        self._dtype: torch.dtype = resolve_dtype(config.torch_dtype)
        self._negative: torch.Tensor | None = None
        self._offload = "none"  # one of OFFLOAD_PLANS (see enable_offload)
        self._before_use: Callable[[], None] | None = None
        self._quantize: str | None = None  # "8bit" / "4bit" denoiser weights (see set_quantization)
        self._quantization_backend = "torchao"
        self._compile = False
        self._quantized = False  # whether the loaded pipeline's denoiser holds quantized weights
        self._built: DiffusionPipeline | None = None  # a pipeline handed to adopt(), used by the next load

    # ---- description

    @property
    def spec(self) -> DecoderSpec:
        """The conditioning this decoder takes, from its config (checked against the model on load)."""
        return DecoderSpec(
            modality=self.modality,
            cond_len=self.config.cond_len or self.standard_cond_len,
            cond_dim=self.config.cond_dim or self.standard_cond_dim,
            pooled=self.pooled,
        )

    @property
    def is_loaded(self) -> bool:
        """Whether the diffusers pipeline is built and held."""
        return self._pipeline is not None

    @property
    def pipeline(self) -> DiffusionPipeline:
        """The underlying diffusers pipeline (loads it if needed). Call it directly only for checks."""
        return self.load()

    @property
    def device(self) -> torch.device:
        """Where the pipeline runs (or will run)."""
        return self._device or torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The pipeline's (or future pipeline's) dtype."""
        return self._dtype

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.config.source!r}, spec={self.spec.cond_shape}, "
            f"loaded={self.is_loaded}, device={self.device}, dtype={self.dtype})"
        )

    # ---- lifecycle

    def load(self) -> DiffusionPipeline:
        """Build the pipeline once and keep it; later calls return the same object.

        Returns:
            The diffusers pipeline, on :attr:`device` in :attr:`dtype`.

        Raises:
            FileNotFoundError: a real source is neither a local folder nor in the Hugging Face cache.
            ValueError: the loaded text encoder's conditioning shape differs from :attr:`spec`.
        """
        if self._pipeline is not None:
            return self._pipeline
        start = time.perf_counter()
        if self.pipeline_options:
            logger.info("%s decoder pipeline options: %s", self.kind, self.pipeline_options)
        quantization = None if self._built is not None else self._quantization_config()
        if self._built is not None:
            pipe, self._built = self._built, None
        elif self.config.is_tiny:
            components = self.tiny_components(seed=self.config.seed, cond_dim=self.spec.cond_dim)
            pipe = self.pipeline_class(**{**components, **self.pipeline_options})
            if quantization is not None:
                pipe = self._reload_quantized(pipe, quantization)
        else:
            pipe = self._from_pretrained(quantization)
        self._quantized = quantization is not None
        self._check_loaded_spec(pipe)
        self._place(pipe)
        if self._compile:
            pipe.unet.compile()  # in place: the module keeps its type, hooks and attributes
        pipe.set_progress_bar_config(disable=True)
        self._pipeline = pipe
        self.load_count += 1
        logger.info(
            "loaded %s decoder from %s in %.2f s (%s, %s)",
            self.kind,
            self.config.source,
            time.perf_counter() - start,
            self.device,
            self._dtype,
        )
        return pipe

    def unload(self) -> None:
        """Drop the pipeline and cached embeddings (freeing their memory); the next use loads it again."""
        if self._pipeline is not None and self._offload in ("model", "sequential"):
            self._pipeline.remove_all_hooks()
        self._pipeline = None
        self._negative = None

    def adopt(self, pipe: DiffusionPipeline) -> Decoder:
        """Use ``pipe``, already built (e.g. a released architecture with random weights, for benchmarks), instead
        of loading one: it is checked against :attr:`spec` and placed like a loaded pipeline.

        Raises:
            ValueError: ``pipe`` is not a ``pipeline_class`` or its conditioning differs from :attr:`spec`.
        """
        if not isinstance(pipe, self.pipeline_class):
            raise ValueError(f"{self.kind} decoder needs a {self.pipeline_class.__name__}, got {type(pipe).__name__}")
        self.unload()
        self._built = pipe
        self.load()
        return self

    # ---- placement: offload, quantization, compilation (anygpt.core.runtime.RuntimeOptions sets them)

    @property
    def offload_plan(self) -> str:
        """How the pipeline is placed: ``"none"`` (on :attr:`device`), ``"model"``, ``"sequential"``, ``"group"``."""
        return self._offload

    def enable_offload(
        self, plan: str, device: str | torch.device, *, before_use: Callable[[], None] | None = None
    ) -> Decoder:
        """Keep the pipeline's weights in CPU memory and run it on ``device`` (now if loaded, otherwise on load).

        Plans (diffusers' own, unchanged): ``"model"`` (``enable_model_cpu_offload``: one component at a time on
        ``device``, and after every :meth:`generate` / :meth:`encode_captions` none: a decoder loaded lazily stays
        loaded but leaves the accelerator between uses), ``"sequential"`` (``enable_sequential_cpu_offload``: layer by
        layer, least memory), ``"group"`` (``enable_group_offload``: one block at a time, streams on CUDA), or
        ``"none"`` (the whole pipeline on ``device``).

        Args:
            plan: one of the plans above.
            device: the execution device (an accelerator; ``"cpu"`` works too and attaches the same hooks).
            before_use: called before each use, e.g. to move another model off the accelerator first.

        Raises:
            ValueError: an unknown plan, or leaving ``"group"`` on a loaded pipeline (diffusers cannot undo it:
                :meth:`unload` first).
        """
        if plan not in _OFFLOAD_PLANS:
            raise ValueError(f"offload plan: expected one of {', '.join(_OFFLOAD_PLANS)}, got {plan!r}")
        if self._pipeline is not None and self._offload == "group" and plan != "group":
            raise ValueError(
                f"{self.kind} decoder: group offload cannot be undone on a loaded pipeline; unload() first"
            )
        self._device = torch.device(device)
        self._before_use = before_use
        previous, self._offload = self._offload, plan
        if self._pipeline is not None and (plan != previous or plan == "none"):
            if previous in ("model", "sequential"):
                self._pipeline.remove_all_hooks()
            self._place(self._pipeline)
        return self

    def offload(self) -> None:
        """Move a loaded pipeline's weights to the CPU, keeping it loaded; the next use moves them back.

        Under the ``"model"`` plan this happens after every use by itself; under ``"sequential"`` / ``"group"`` the
        weights live on the CPU already.
        """
        if self._pipeline is None:
            return
        if self._offload == "model":
            self._pipeline.maybe_free_model_hooks()
        elif self._offload == "none" and self._pipeline.device.type != "cpu":
            self._pipeline.to(device="cpu")

    def set_quantization(self, quantize: str | None, backend: str = "torchao") -> Decoder:
        """Load the denoiser's (UNet's) linear layers with 8- or 4-bit weights, through diffusers'
        ``PipelineQuantizationConfig`` (takes effect at the next load).

        Args:
            quantize: ``None``, ``"8bit"`` or ``"4bit"``.
            backend: ``"bitsandbytes"`` (diffusers supports it on CUDA only: elsewhere the weights stay unquantized,
                with a log line) or ``"torchao"``.
        """
        if quantize not in (None, "8bit", "4bit"):
            raise ValueError(f"quantize: expected None, '8bit' or '4bit', got {quantize!r}")
        if backend not in ("bitsandbytes", "torchao"):
            raise ValueError(f"quantization backend: expected 'bitsandbytes' or 'torchao', got {backend!r}")
        if self._pipeline is not None and (quantize, backend) != (self._quantize, self._quantization_backend):
            logger.info("%s decoder: the new quantization applies from its next load", self.kind)
        self._quantize, self._quantization_backend = quantize, backend
        return self

    def set_compile(self, compile: bool = True) -> Decoder:
        """``torch.compile`` the denoiser (in place, at the next load or now); the first steps compile it."""
        self._compile = bool(compile)
        if compile and self._pipeline is not None:
            self._pipeline.unet.compile()
        return self

    def _quantization_config(self) -> Any:
        """diffusers' ``PipelineQuantizationConfig`` for the denoiser, or None (none wanted, or not possible here)."""
        if self._quantize is None:
            return None
        from diffusers import PipelineQuantizationConfig

        if self._quantization_backend == "bitsandbytes":
            if self.device.type != "cuda":
                logger.info(
                    "%s decoder: diffusers quantizes with bitsandbytes on CUDA only; its weights stay %s on %s",
                    self.kind,
                    self._dtype,
                    self.device,
                )
                return None
            kwargs = (
                {"load_in_8bit": True}
                if self._quantize == "8bit"
                else {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": self._dtype}
            )
            return PipelineQuantizationConfig(
                quant_backend=f"bitsandbytes_{self._quantize}", quant_kwargs=kwargs, components_to_quantize=["unet"]
            )
        from diffusers import TorchAoConfig

        bits = 8 if self._quantize == "8bit" else 4
        config = TorchAoConfig(torchao_weight_config(bits, self.device))
        return PipelineQuantizationConfig(quant_mapping={"unet": config})

    def _reload_quantized(self, pipe: DiffusionPipeline, quantization: Any) -> DiffusionPipeline:
        """A pipeline built in memory (tiny), saved and loaded back with its quantization config: the same
        ``from_pretrained`` path a real model takes."""
        with tempfile.TemporaryDirectory(prefix="anygpt-decoder-") as folder:
            pipe.save_pretrained(folder)
            return self.pipeline_class.from_pretrained(
                folder, dtype=self._dtype, quantization_config=quantization, **self.pipeline_options
            )

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> Decoder:
        """Move the pipeline now if it is loaded, otherwise when it loads.

        Args:
            device: target device, or ``None`` to keep the current one.
            dtype: target floating dtype (a ``torch.dtype`` or a name such as ``"bfloat16"``), or ``None`` to
                keep the current one.

        Returns:
            ``self``.
        """
        if device is not None:
            self._device = torch.device(device)
        if dtype is not None:
            self._dtype = resolve_dtype(dtype)
        if self._pipeline is not None:
            self._place(self._pipeline)
        self._negative = None
        return self

    # ---- the two operations

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Embed captions with the decoder's own text encoder, as its pipeline computes ``prompt_embeds``.

        This is the stage-2 training target of the output projector.

        When ``config.cond_len`` is shorter than the pipeline's native length (the tokenizer's
        ``model_max_length``, 77), the result is the pipeline's own (B, 77, D) encoding cut to its first
        ``cond_len`` tokens. CLIP's text encoder is causal, so the embedding at position ``i`` depends only on
        tokens ``0..i``: the kept rows are exactly what the encoder computes for those tokens, whatever follows.
        Caption text past the first ``cond_len - 1`` tokens (after the start token) does not reach the result.

        Args:
            captions: B strings.

        Returns:
            (B, cond_len, cond_dim), or (B, cond_dim) for pooled conditioning; on the pipeline's device, in
            the text encoder's dtype.
        """
        if isinstance(captions, str) or not captions:
            raise ValueError("captions must be a non-empty list of strings")
        pipe = self._prepare()
        embeds = self._encode_with_pipeline(pipe, list(captions), pipe._execution_device)
        if self._offload == "model":
            pipe.maybe_free_model_hooks()  # the text encoder leaves the accelerator
        if not self.pooled and embeds.dim() == 3 and embeds.shape[1] > self.spec.cond_len:
            embeds = embeds[:, : self.spec.cond_len].contiguous()
        self._check_shape(embeds, "encoded captions")
        return embeds

    @torch.no_grad()
    def generate(
        self,
        prompt_embeds: torch.Tensor,
        *,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        audio_seconds: float | None = None,
        show_progress: bool | None = None,
        should_stop: Callable[[], bool] | None = None,
        callback_on_step_end: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]] | None = None,
    ) -> list[Any]:
        """Generate one output per row of ``prompt_embeds``.

        Arguments left as ``None`` take the config's defaults. Size arguments a decoder does not use
        (``num_frames`` for images, ``height`` for audio, ...) are ignored: one call serves every decoder.

        Args:
            prompt_embeds: (B, cond_len, cond_dim), or (B, cond_dim) for pooled conditioning (:attr:`spec`).
            negative_prompt_embeds: same shape, or batch 1 (expanded); default: the empty caption's embedding.
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance scale; <= 1 disables guidance.
            generator: torch generator(s) for reproducible sampling.
            height: image / video height in pixels.
            width: image / video width in pixels.
            num_frames: video frames.
            audio_seconds: audio length in seconds.
            show_progress: show the pipeline's progress bar (on stderr, labelled with the modality); None:
                ``anygpt.logging.is_progress_bar_enabled()`` (off unless anygpt's verbosity is INFO or bars were
                enabled).
            should_stop: called before the first denoising step and after every step; when it returns True the
                generation is abandoned (nothing is returned) and :class:`GenerationStopped` is raised. It goes to
                the pipeline's ``callback_on_step_end`` (Stable Diffusion) or its older ``callback`` with
                ``callback_steps=1`` (ZeroScope's ``TextToVideoSDPipeline``, AudioLDM); a pipeline with neither is
                checked before it starts only.
            callback_on_step_end: diffusers' ``callback(pipe, step, timestep, callback_kwargs) -> dict`` after every
                denoising step, ``pipe`` being this decoder's diffusers pipeline. A pipeline with only the older
                ``callback`` gets ``callback_kwargs={"latents": latents}``, and ``"latents"`` in the returned dict
                replace them in place.

        Returns:
            B outputs: ``PIL.Image.Image`` for images; :class:`anygpt.base.media.Video` (uint8 (T, H, W, 3), the
            config's fps) for video; :class:`anygpt.base.media.Audio` (float32 (T,), the vocoder's rate) for audio.

        Raises:
            ValueError: when an embedding's shape does not match :attr:`spec`.
            GenerationStopped: ``should_stop`` returned True.
        """
        self._check_shape(prompt_embeds, "prompt_embeds")
        batch = prompt_embeds.shape[0]
        if negative_prompt_embeds is not None:
            self._check_shape(negative_prompt_embeds, "negative_prompt_embeds", batch=(1, batch))
        pipe = self._prepare()
        target = {"device": pipe._execution_device, "dtype": pipe.unet.dtype}
        if negative_prompt_embeds is None:
            negative_prompt_embeds = self.empty_caption_embedding()
        negative = negative_prompt_embeds.to(**target)
        negative = negative.expand(batch, *negative.shape[1:]) if negative.shape[0] == 1 else negative
        if show_progress is None:
            show_progress = is_progress_bar_enabled()
        pipe.set_progress_bar_config(disable=not show_progress, desc=self.modality.value)
        cfg = self.config
        if should_stop is not None and should_stop():
            raise GenerationStopped(f"{self.kind} decoder stopped before its first step")
        stop_kwargs = self._step_callback(pipe, should_stop, callback_on_step_end)
        output = pipe(
            prompt_embeds=prompt_embeds.to(**target),
            negative_prompt_embeds=negative,
            num_inference_steps=_or_default(num_inference_steps, cfg.num_inference_steps),
            guidance_scale=_or_default(guidance_scale, cfg.guidance_scale),
            generator=generator,
            output_type=self.output_type,
            **self._size_kwargs(
                height=_or_default(height, cfg.height),
                width=_or_default(width, cfg.width),
                num_frames=_or_default(num_frames, cfg.num_frames),
                audio_seconds=_or_default(audio_seconds, cfg.audio_seconds),
            ),
            **stop_kwargs,
        )
        if self._offload == "model":
            pipe.maybe_free_model_hooks()  # not every pipeline does it at its end (AudioLDM's vocoder)
        return self._outputs(pipe, output)

    def _step_callback(
        self,
        pipe: DiffusionPipeline,
        should_stop: Callable[[], bool] | None,
        user_callback: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]] | None,
    ) -> dict[str, Any]:
        """The pipeline arguments that run ``user_callback`` after every denoising step, then raise
        ``GenerationStopped`` when ``should_stop`` returns True."""
        if should_stop is None and user_callback is None:
            return {}
        parameters = inspect.signature(pipe.__call__).parameters

        def after_step(step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if user_callback is not None:
                callback_kwargs = user_callback(pipe, step, timestep, callback_kwargs)
            if should_stop is not None and should_stop():
                raise GenerationStopped(f"{self.kind} decoder stopped after denoising step {step + 1}")
            return callback_kwargs

        if "callback_on_step_end" in parameters:
            return {"callback_on_step_end": lambda _pipe, step, timestep, kwargs: after_step(step, timestep, kwargs)}
        if "callback" in parameters:

            def legacy(step: int, timestep: Any, latents: torch.Tensor) -> None:
                returned = after_step(step, timestep, {"latents": latents})
                new = returned.get("latents") if isinstance(returned, dict) else None
                if new is not None and new is not latents:
                    latents.copy_(new)

            extra = {"callback_steps": 1} if "callback_steps" in parameters else {}
            return {"callback": legacy, **extra}
        logger.debug("%s pipeline takes no step callback: it runs without should_stop / callback", self.kind)
        return {}

    def empty_caption_embedding(self) -> torch.Tensor:
        """``encode_captions([""])``, computed once per load: the default negative conditioning, (1, ...).

        It goes through :meth:`encode_captions`, so it has the configured ``cond_len`` like the prompts.
        """
        if self._negative is None:
            self._negative = self.encode_captions([""])
        return self._negative

    # ---- hooks: what differs between decoders

    def _encode_with_pipeline(self, pipe: DiffusionPipeline, captions: list[str], device: torch.device) -> torch.Tensor:
        """The pipeline's own caption encoding, without guidance: what it passes on as ``prompt_embeds``."""
        prompt_embeds, _ = pipe.encode_prompt(captions, device, 1, False)  # one per prompt, no guidance
        return prompt_embeds

    @abstractmethod
    def _size_kwargs(self, *, height: int, width: int, num_frames: int, audio_seconds: float) -> dict[str, Any]:
        """The pipeline's size arguments, picked from the generic ones."""

    @abstractmethod
    def _outputs(self, pipe: DiffusionPipeline, output: Any) -> list[Any]:
        """Convert the pipeline's output (called with :attr:`output_type`) to one media object per sample."""

    def _spec_of(self, pipe: DiffusionPipeline) -> DecoderSpec:
        """The conditioning the loaded pipeline's text encoder natively produces (its longest ``cond_len``)."""
        return DecoderSpec(
            modality=self.modality,
            cond_len=pipe.tokenizer.model_max_length,
            cond_dim=pipe.text_encoder.config.hidden_size,
        )

    # ---- helpers

    def _prepare(self) -> DiffusionPipeline:
        """The loaded pipeline, ready to run: ``before_use`` called, weights back on :attr:`device` after
        :meth:`offload`."""
        pipe = self.load()
        if self._before_use is not None:
            self._before_use()
        if self._offload == "none" and pipe.device != self.device:
            pipe.to(device=self.device)
        return pipe

    def _place(self, pipe: DiffusionPipeline) -> None:
        """Cast ``pipe`` to :attr:`dtype` (quantized weights excepted) and place it by the offload plan: on
        :attr:`device`, or in CPU memory behind diffusers' offload hooks that run it on :attr:`device`."""
        if pipe.dtype != self._dtype and not self._quantized:
            pipe.to(dtype=self._dtype)
        if self._offload == "none":
            if pipe.device != self.device:
                pipe.to(device=self.device)
        elif self._offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif self._offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        elif not getattr(pipe, "_anygpt_group_offload", False):
            pipe.enable_group_offload(
                onload_device=self.device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=self.device.type == "cuda",
            )
            pipe._anygpt_group_offload = True

    def _check_shape(self, embeds: torch.Tensor, name: str, batch: tuple[int, ...] | None = None) -> None:
        expected = self.spec.cond_shape
        ok = isinstance(embeds, torch.Tensor) and embeds.dim() == len(expected) + 1
        ok = ok and tuple(embeds.shape[1:]) == expected and embeds.shape[0] >= 1
        ok = ok and (batch is None or embeds.shape[0] in batch)
        if not ok:
            found = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            rows = "B" if batch is None else " or ".join(str(b) for b in sorted(set(batch)))
            shape = ", ".join(map(str, (rows, *expected)))
            raise ValueError(f"{self.kind} decoder {name}: expected shape ({shape}), found {found}")

    def _check_loaded_spec(self, pipe: DiffusionPipeline) -> None:
        """The config's width must be the text encoder's; its length at most the tokenizer's maximum."""
        loaded, declared = self._spec_of(pipe), self.spec
        source = self.config.source
        if loaded.cond_dim != declared.cond_dim:
            raise ValueError(
                f"{self.kind} decoder from {source!r} has a text encoder of width {loaded.cond_dim}, but the "
                f"config declares cond_dim={declared.cond_dim}: set cond_dim={loaded.cond_dim} in its DecoderConfig"
            )
        if declared.cond_len > loaded.cond_len:
            raise ValueError(
                f"{self.kind} decoder from {source!r}: cond_len={declared.cond_len} is longer than its tokenizer's "
                f"model_max_length={loaded.cond_len}: set cond_len to at most {loaded.cond_len} in its DecoderConfig"
            )

    def _from_pretrained(self, quantization: Any = None) -> DiffusionPipeline:
        """Load the pipeline from a local folder or the Hugging Face cache, never from the network (with
        ``quantization``, diffusers' ``PipelineQuantizationConfig``, if given)."""
        from huggingface_hub import constants, try_to_load_from_cache

        source = self.config.source
        cache = Path(constants.HF_HUB_CACHE)
        local = Path(source).expanduser()
        is_hub_id = bool(_HUB_ID.match(source)) and not local.exists()
        if local.is_dir() and (local / "model_index.json").is_file():
            location = str(local)
        elif is_hub_id and isinstance(try_to_load_from_cache(source, "model_index.json", cache_dir=cache), str):
            location = source
        else:
            raise FileNotFoundError(self._missing_message(local, cache, is_hub_id))
        logger.info("loading %s (%s) with %s", source, self.config.torch_dtype, self.pipeline_class.__name__)
        try:
            return self.pipeline_class.from_pretrained(
                location,
                dtype=self._dtype,  # diffusers >= 0.36 name of the deprecated torch_dtype
                local_files_only=True,
                cache_dir=cache,
                **({"quantization_config": quantization} if quantization is not None else {}),
                **self.pipeline_options,
            )
        except OSError as error:  # a partial download: some component files are missing
            raise FileNotFoundError(f"{self._missing_message(local, cache, is_hub_id)} ({error})") from error

    def _missing_message(self, local: Path, cache: Path, is_hub_id: bool) -> str:
        source = self.config.source
        places = [f"the local folder {local.resolve()} (needs model_index.json)"]
        if is_hub_id:
            places.append(f"the Hugging Face cache {cache} (HF_HUB_CACHE)")
        how = (
            f"download it on a machine with network access with `hf download {source}` (or "
            f"huggingface_hub.snapshot_download({source!r})) and copy the cache here or point HF_HUB_CACHE "
            "at it, "
            "or set source to a local folder holding a diffusers model_index.json"
            if is_hub_id
            else "set source to a folder holding a diffusers model_index.json, or to a Hugging Face model id"
        )
        looked = " and ".join(places)
        return f"{self.kind} decoder weights {source!r} not found; looked in {looked}. To fix: {how}."
