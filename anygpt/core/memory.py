"""How big a configuration is and how much GPU memory each way of running it needs, without allocating it.

Every component is built on the ``meta`` device (``AnyGPTModel.build(empty_weights=True)``; the decoders from their
tiny builders or the released architectures written in ``decoders.architectures``), so even ``nextgpt-7b`` is sized
in about a second with nothing downloaded or allocated. Parameters are counted exactly. Weight bytes follow the
plan's dtype and quantization exactly (quantized: the linear layers of the LLM's decoder blocks and of the decoders'
UNets, at the storage cost of the backend's format). Activations are formula estimates (documented at
``Workload``), and the peak adds a fixed CUDA context: treat them as estimates to be checked on a GPU
(``benchmarks/bench_realsize.py --full`` measures the peaks).

Example (what ``anygpt info --model nextgpt-7b --memory`` prints)::

    from anygpt.core.memory import memory_report, standard_plans

    report = memory_report("nextgpt-7b")  # the standard plans on CUDA; or runtime_plans=[RuntimeOptions(...), ...]
    print(report.format())
    report.plans[0].peak_gib
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from anygpt.base.errors import ConfigError
from anygpt.base.modality import Modality
from anygpt.base.utils import resolve_dtype
from anygpt.core.config import PACKAGED_MODELS, AnyGPTConfig, config_from_preset
from anygpt.core.index import INDEX_FILE, packaged_model_dir, read_index
from anygpt.core.model import AnyGPTModel
from anygpt.core.runtime import RuntimeOptions
from decoders import build_decoder
from decoders.architectures import has_released_architecture, released_components

logger = logging.getLogger(__name__)

GIB = 1024**3
CUDA_CONTEXT_BYTES = GIB // 2
"""CUDA context, cuBLAS / cuDNN workspaces and allocator slack added to every peak (typically 0.3-0.6 GiB)."""
FIT_MARGIN = 0.95
"""``default_runtime`` keeps an estimated peak under this share of the GPU's memory."""

# Bytes per quantized weight, scales included: bitsandbytes int8 (per-row fp32 scales), NF4 (an fp32 absmax per 64);
# torchao int8 (per-row scales), int4 on CUDA (bf16 scale + zero per group of 128), int4 elsewhere (one int4 per byte,
# bf16 scale + zero per group of 32).
_QUANTIZED_BYTES = {
    ("bitsandbytes", "8bit", "cuda"): 1.0,
    ("bitsandbytes", "4bit", "cuda"): 0.5 + 4 / 64,
    ("torchao", "8bit", "cuda"): 1.0,
    ("torchao", "4bit", "cuda"): 0.5 + 4 / 128,
    ("torchao", "4bit", "cpu"): 1.0 + 4 / 32,
}


@dataclass(frozen=True)
class Workload:
    """The call whose peak is estimated. Activation formulas (bytes ``b`` of the compute dtype, batch ``B`` = 2 with
    classifier-free guidance, latent area ``h x w`` = pixels / 64, ``F`` frames):

    - LLM: the key/value cache of ``context_tokens`` (2 x layers x tokens x hidden) + every layer's hidden states
      of one forward over them (the signal-token pass asks for them) + one layer's MLP and attention working set.
    - encoder: one video (clips x crops x 257 tokens) through one block: 12 x tokens x width.
    - UNet (one denoising step): 6,000 x (C / 320) x h x w x F x B x b, C its first block's width (skip
      connections and the widest level's working set, flash / memory-efficient attention).
    - VAE decode, one frame at a time (``vae.enable_slicing``): 8 x 128 x H x W x b.
    - text encoders and the vocoder: their largest hidden state, small.
    """

    context_tokens: int = 1024
    image_size: tuple[int, int] = (512, 512)
    video_size: tuple[int, int] = (320, 576)
    video_frames: int = 24
    audio_seconds: float = 5.0
    guidance: bool = True

    @classmethod
    def from_config(cls, config: AnyGPTConfig, context_tokens: int = 1024) -> Workload:
        """The decoders' default sizes (``decoders.*.height / width / num_frames / audio_seconds``)."""
        values: dict = {"context_tokens": context_tokens}
        for name, decoder in config.decoders.items():
            if name == "image":
                values["image_size"] = (decoder.height, decoder.width)
            elif name == "video":
                values["video_size"] = (decoder.height, decoder.width)
                values["video_frames"] = decoder.num_frames
            elif name == "audio":
                values["audio_seconds"] = decoder.audio_seconds
        return cls(**values)


@dataclass
class ComponentSize:
    """One component's parameters.

    Attributes:
        name: ``"encoder"``, ``"llm"``, ``"input projectors"``, ``"output projectors"``, ``"cross-attention"``,
            ``"decoder image"``, ...
        params: every parameter.
        trainable: those the training stages train (projectors, cross-attention, LoRA, the added token rows).
        parts: parameters per part (LLM: base / lora / added rows; decoder: unet / vae / text_encoder / vocoder).
        quantizable: parameters in the linear layers that 8-/4-bit loading quantizes (LLM decoder blocks; UNet).
        largest_layer: parameters of the largest single layer (what sequential offload holds at once).
        dtype: the configured dtype.
    """

    name: str
    params: int
    trainable: int
    parts: dict[str, int]
    quantizable: int
    largest_layer: int
    dtype: torch.dtype

    @property
    def frozen(self) -> int:
        return self.params - self.trainable


@dataclass
class PlanEstimate:
    """GPU memory of one plan.

    Attributes:
        runtime: the plan.
        weights: bytes of every weight under the plan's dtypes and quantization (wherever they are).
        resident: bytes on the GPU for the whole call.
        peak: resident + the heaviest stage + the CUDA context.
        peak_stage: the stage where the peak falls.
        stages: per stage, the bytes it adds on top of ``resident`` (weights it brings + activations).
    """

    runtime: RuntimeOptions
    weights: int
    resident: int
    peak: int
    peak_stage: str
    stages: dict[str, int] = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def fits(self, gib: float) -> bool:
        """Whether the estimated peak stays under ``gib`` GiB (with ``FIT_MARGIN``)."""
        return self.peak <= gib * GIB * FIT_MARGIN


@dataclass
class MemoryReport:
    """Sizes of every component and the estimated GPU peak of each plan (:func:`memory_report`)."""

    model: str
    components: list[ComponentSize]
    plans: list[PlanEstimate]
    workload: Workload

    @property
    def total_params(self) -> int:
        return sum(c.params for c in self.components)

    def format(self) -> str:
        """Two plain-text tables: components (parameters, trainable / frozen, weight GiB per dtype) and plans."""
        rows = [("component", "params", "trainable", "frozen", "fp32 GiB", "fp16 GiB", "parts")]
        for c in self.components:
            parts = ", ".join(f"{k} {_count(v)}" for k, v in c.parts.items()) if len(c.parts) > 1 else ""
            rows.append(
                (
                    c.name,
                    _count(c.params),
                    _count(c.trainable),
                    _count(c.frozen),
                    _gib(4 * c.params),
                    _gib(2 * c.params),
                    parts,
                )  # fmt: skip
            )
        total = self.total_params
        trainable = sum(c.trainable for c in self.components)
        rows.append(("total", _count(total), _count(trainable), _count(total - trainable), _gib(4 * total),
                     _gib(2 * total), ""))  # fmt: skip
        w = self.workload
        lines = [f"{self.model}: parameters and weight memory (built on the meta device)", _table(rows), ""]
        lines.append(
            f"Estimated peak GPU memory of one call (context {w.context_tokens} tokens; image "
            f"{w.image_size[0]}x{w.image_size[1]}; video {w.video_frames} frames {w.video_size[0]}x{w.video_size[1]}; "
            f"audio {w.audio_seconds:g} s; guidance {'on' if w.guidance else 'off'}): weights exact, activations "
            f"estimated, {CUDA_CONTEXT_BYTES / GIB:.1f} GiB CUDA context included"
        )
        rows = [("plan", "weights GiB", "resident GiB", "peak GiB", "peak at", "fits")]
        for plan in self.plans:
            fits = ", ".join(f"{g} GB" for g in (8, 12, 16, 24, 32, 48) if plan.fits(g)) or "> 48 GB"
            rows.append(
                (
                    plan.runtime.describe(),
                    _gib(plan.weights),
                    _gib(plan.resident),
                    _gib(plan.peak),
                    plan.peak_stage,
                    fits.split(", ")[0] + "+" if plan.fits(48) else fits,
                )  # fmt: skip
            )
        lines.append(_table(rows))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Building on the meta device
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MetaSystem:
    """Every component of a configuration built on the meta device."""

    config: AnyGPTConfig
    model: AnyGPTModel
    decoders: dict[Modality, dict[str, nn.Module]]  # per output modality, the pipeline's modules by name


def build_meta(config: AnyGPTConfig) -> MetaSystem:
    """Build ``config`` on the meta device: the model (``AnyGPTModel.build(empty_weights=True)``) and each decoder's
    modules (tiny builders, or the released architectures of ``decoders.architectures`` for the presets' sources).

    Raises:
        ConfigError: a decoder whose source is neither tiny nor a released architecture written here; an LLM that is
            neither on this machine nor a known architecture.
    """
    decoders = {Modality(m): build_decoder(c) for m, c in config.decoders.items()}
    model = AnyGPTModel.build(config, {m: d.spec for m, d in decoders.items()}, empty_weights=True)
    modules: dict[Modality, dict[str, nn.Module]] = {}
    for modality, decoder in decoders.items():
        source = decoder.config.source
        with torch.device("meta"):
            if decoder.config.is_tiny:
                built = decoder.tiny_components(seed=0, cond_dim=decoder.spec.cond_dim)
            elif has_released_architecture(source):
                built = released_components(source)
            else:
                raise ConfigError(
                    f"decoders.{modality.value}.source {source!r}: cannot size it without loading (only tiny "
                    "components and the released architectures in decoders.architectures are known)"
                )
        dtype = resolve_dtype(decoder.config.torch_dtype)
        modules[modality] = {
            k: v if next(v.parameters()).dtype == dtype else v.to(dtype)
            for k, v in built.items()
            if isinstance(v, nn.Module)
        }
    return MetaSystem(config, model, modules)


def component_sizes(system: MetaSystem) -> list[ComponentSize]:
    """Parameters of every component of a meta-built system."""
    model = system.model
    llm = model.language_model
    config = system.config
    base = sum(p.numel() for n, p in llm.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in llm.named_parameters() if "lora_" in n)
    hidden = model.hidden_size
    added = len(model.tokens.all_added_ids) * hidden * (2 if llm.get_output_embeddings() is not None else 1)
    sizes = [
        _size("encoder", model.encoder, trainable=0, dtype=resolve_dtype(config.encoder.torch_dtype)),
        ComponentSize(
            name="llm",
            params=base + lora,
            trainable=lora + added,
            parts={"base": base - added, "added token rows": added, "lora": lora},
            quantizable=_linear_params(llm, inside_blocks=True),
            largest_layer=_largest_layer(llm),
            dtype=resolve_dtype(config.llm.torch_dtype),
        ),
    ]
    projector_dtype = next(model.input_projectors.parameters()).dtype
    for name, module in (("input projectors", model.input_projectors), ("output projectors", model.output_projectors)):
        sizes.append(_size(name, module, trainable=_count_params(module), dtype=projector_dtype))
    if model.cross_attention is not None:
        cross = model.cross_attention
        sizes.append(_size("cross-attention", cross, trainable=_count_params(cross), dtype=projector_dtype))
    for modality, modules in system.decoders.items():
        parts = {name: _count_params(m) for name, m in modules.items()}
        unet = modules["unet"]
        sizes.append(
            ComponentSize(
                name=f"decoder {modality.value}",
                params=sum(parts.values()),
                trainable=0,
                parts=parts,
                quantizable=_linear_params(unet, inside_blocks=False),
                largest_layer=max(_largest_layer(m) for m in modules.values()),
                dtype=next(unet.parameters()).dtype,
            )
        )
    return sizes


# --------------------------------------------------------------------------------------------------------------
# Estimating a plan
# --------------------------------------------------------------------------------------------------------------


def estimate_plan(
    system: MetaSystem,
    runtime: RuntimeOptions,
    workload: Workload | None = None,
    sizes: list[ComponentSize] | None = None,
) -> PlanEstimate:
    """The GPU memory of one call of ``system`` run as ``runtime`` says (see the module docstring for what is exact
    and what is estimated)."""
    workload = workload or Workload.from_config(system.config)
    sizes = sizes or component_sizes(system)
    by_name = {c.name: c for c in sizes}
    device = "cuda" if runtime.execution_device.type == "cuda" else "cpu"
    small = [c for c in sizes if c.name in ("input projectors", "output projectors", "cross-attention")]

    def weights(c: ComponentSize, params: int | None = None) -> int:
        dtype = runtime.torch_dtype or c.dtype
        b = torch.finfo(dtype).bits // 8
        total = c.params if params is None else params
        quantized = _quantized(c, runtime, device)
        if not quantized or params is not None:
            return total * b
        return (
            int(c.quantizable * _QUANTIZED_BYTES[(runtime.backend, runtime.quantize, device)])
            + (total - c.quantizable) * b
        )

    def compute_bytes(c: ComponentSize) -> int:
        return torch.finfo(runtime.torch_dtype or c.dtype).bits // 8

    llm = by_name["llm"]
    llm_quantized = _quantized(llm, runtime, device)
    stages: dict[str, tuple[int, int]] = {}  # name -> (weights needed on the GPU, activations)
    enc = by_name["encoder"]
    stages["encoder"] = (weights(enc), _encoder_activations(system, workload, compute_bytes(enc)))
    stages["llm"] = (0 if llm_quantized else weights(llm), _llm_activations(system, workload, compute_bytes(llm)))
    decoder_parts: dict[str, tuple[int, int]] = {}
    for modality, modules in system.decoders.items():
        c = by_name[f"decoder {modality.value}"]
        b = compute_bytes(c)
        acts = _decoder_activations(modality, modules, workload, b)
        for part, module in modules.items():
            if part == "unet":
                part_weights = weights(c) - sum(weights(c, n) for k, n in c.parts.items() if k != "unet")
            else:
                part_weights = weights(c, _count_params(module))
            decoder_parts[f"{modality.value} {part}"] = (part_weights, acts.get(part, 0))

    resident = sum(weights(c) for c in small) + (weights(llm) if llm_quantized else 0)
    total = sum(weights(c) for c in sizes)
    plan = runtime.offload
    added: dict[str, int] = {}
    if plan == "none":
        resident = total
        added = {k: a for k, (_, a) in {**stages, **decoder_parts}.items()}
    elif plan == "decoders":
        resident += weights(enc) + stages["llm"][0]
        added = {k: a for k, (_, a) in stages.items()}
        added.update({k: w + a for k, (w, a) in decoder_parts.items()})
    elif plan == "model":
        added = {k: w + a for k, (w, a) in {**stages, **decoder_parts}.items()}
    else:  # sequential / group: the largest layer (two with group prefetching) of the component that runs
        held = 2 if plan == "group" else 1
        layers = {"encoder": enc, "llm": llm}
        for name, (_, acts) in stages.items():
            layer = 0 if name == "llm" and llm_quantized else weights(layers[name], layers[name].largest_layer)
            added[name] = held * layer + acts
        for modality in system.decoders:
            c = by_name[f"decoder {modality.value}"]
            for key, (_, acts) in decoder_parts.items():
                if key.startswith(f"{modality.value} "):
                    added[key] = held * weights(c, c.largest_layer) + acts
    peak_stage = max(added, key=added.get)
    return PlanEstimate(
        runtime=runtime,
        weights=total,
        resident=resident,
        peak=resident + added[peak_stage] + CUDA_CONTEXT_BYTES,
        peak_stage=peak_stage,
        stages=added,
    )


def standard_plans(device: str = "cuda") -> list[RuntimeOptions]:
    """The plans ``anygpt info --memory`` compares: the configured dtypes, then fp16 with every offload plan, and
    fp16 with an 8-bit and a 4-bit LLM under model offload."""
    return [
        RuntimeOptions(device=device),
        RuntimeOptions(device=device, dtype="float16"),
        RuntimeOptions(device=device, dtype="float16", offload="decoders"),
        RuntimeOptions(device=device, dtype="float16", offload="model"),
        RuntimeOptions(device=device, dtype="float16", offload="decoders", quantize="8bit"),
        RuntimeOptions(device=device, dtype="float16", offload="model", quantize="8bit"),
        RuntimeOptions(device=device, dtype="float16", offload="model", quantize="4bit"),
        RuntimeOptions(device=device, dtype="float16", offload="group"),
        RuntimeOptions(device=device, dtype="float16", offload="sequential"),
    ]


# Fastest first: the first that fits is the default (quantization changes outputs, so it comes after the offloads
# that keep them).
_DEFAULT_ORDER = (
    {"dtype": "float16"},
    {"dtype": "float16", "offload": "decoders"},
    {"dtype": "float16", "offload": "model"},
    {"dtype": "float16", "offload": "model", "quantize": "8bit"},
    {"dtype": "float16", "offload": "model", "quantize": "4bit"},
    {"dtype": "float16", "offload": "group"},
    {"dtype": "float16", "offload": "sequential"},
)


def default_runtime(
    config: AnyGPTConfig | str, device: str = "cuda", *, gpu_memory_gib: float | None = None
) -> RuntimeOptions:
    """The default plan for ``config`` on ``device``: on a CUDA device, the fastest plan whose estimated peak fits
    its memory (fp16 everywhere; then the decoders offloaded between uses; then one component at a time; then an
    8- / 4-bit LLM; then group and sequential offload). Elsewhere: the configured dtypes on ``device``.

    For ``nextgpt-7b``: 24 GiB gives fp16 with the decoders offloaded between uses, 16 GiB fp16 with model offload
    (``tests/test_realsize.py`` checks both estimates).

    Args:
        config: a config or a model name (preset or ``save_pretrained`` folder).
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``, ...
        gpu_memory_gib: the GPU's memory; None: the device's own (24 when no CUDA device is visible).
    """
    if torch.device(device).type != "cuda":
        return RuntimeOptions(device=device)
    config = _config_of(config)
    if gpu_memory_gib is None:
        gpu_memory_gib = 24.0
        if torch.cuda.is_available():
            gpu_memory_gib = torch.cuda.get_device_properties(torch.device(device)).total_memory / GIB
    system = build_meta(config)
    sizes = component_sizes(system)
    for options in _DEFAULT_ORDER:
        runtime = RuntimeOptions(device=device, **options)
        if estimate_plan(system, runtime, sizes=sizes).fits(gpu_memory_gib):
            return runtime
    return RuntimeOptions(device=device, **_DEFAULT_ORDER[-1])


def memory_report(
    model: str | AnyGPTConfig,
    runtime_plans: list[RuntimeOptions] | None = None,
    *,
    workload: Workload | None = None,
) -> MemoryReport:
    """Build ``model`` on the meta device and estimate every plan.

    Args:
        model: a preset name (``tiny``, ``nextgpt-7b``), a ``save_pretrained`` folder, or a config.
        runtime_plans: the plans to estimate; None: :func:`standard_plans` on CUDA. A plan's ``device`` only selects
            the quantization format (CPU or CUDA kernels): the estimate is always of one GPU.
        workload: the call to estimate (default: the decoders' default sizes, ``Workload.from_config``).

    Returns:
        a :class:`MemoryReport`; ``report.format()`` is the table ``anygpt info --memory`` prints.

    Raises:
        ConfigError: a component that cannot be sized without loading it.
    """
    name = model if isinstance(model, str) else "config"
    config = _config_of(model)
    system = build_meta(config)
    sizes = component_sizes(system)
    workload = workload or Workload.from_config(config)
    plans = [estimate_plan(system, p, workload, sizes) for p in (runtime_plans or standard_plans())]
    return MemoryReport(model=name, components=sizes, plans=plans, workload=workload)


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _config_of(model: str | AnyGPTConfig) -> AnyGPTConfig:
    if isinstance(model, AnyGPTConfig):
        return model
    folder = Path(model).expanduser()
    if not (folder / INDEX_FILE).is_file() and str(model) in PACKAGED_MODELS:
        folder = packaged_model_dir(str(model))  # a model shipped in the package
    if (folder / INDEX_FILE).is_file():
        return read_index(folder)[0]
    return config_from_preset(str(model))


def _quantized(c: ComponentSize, runtime: RuntimeOptions, device: str) -> bool:
    if runtime.quantize is None or c.quantizable == 0:
        return False
    if c.name.startswith("decoder") and runtime.backend == "bitsandbytes" and device != "cuda":
        return False  # diffusers' bitsandbytes backend needs CUDA
    return c.name == "llm" or c.name.startswith("decoder")


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _size(name: str, module: nn.Module, *, trainable: int, dtype: torch.dtype) -> ComponentSize:
    return ComponentSize(
        name=name,
        params=_count_params(module),
        trainable=trainable,
        parts={name: _count_params(module)},
        quantizable=0,
        largest_layer=_largest_layer(module),
        dtype=dtype,
    )


def _linear_params(module: nn.Module, *, inside_blocks: bool) -> int:
    """Weights of the ``nn.Linear`` layers a quantizer replaces (the LLM's: inside its decoder blocks only, the
    output layer and LoRA excluded)."""
    total = 0
    for name, sub in module.named_modules():
        if type(sub) is not nn.Linear or "lora_" in name or name.endswith("lm_head"):
            continue
        if inside_blocks and ".layers." not in f".{name}":
            continue
        total += sub.weight.numel()
    return total


def _largest_layer(module: nn.Module) -> int:
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)


def _llm_activations(system: MetaSystem, w: Workload, b: int) -> int:
    arch = system.model.language_model.config
    hidden, layers = arch.hidden_size, arch.num_hidden_layers
    kv_heads = getattr(arch, "num_key_value_heads", None) or arch.num_attention_heads
    head_dim = hidden // arch.num_attention_heads
    t = w.context_tokens
    kv_cache = 2 * layers * t * kv_heads * head_dim * b
    hidden_states = (layers + 1) * t * hidden * b
    working = t * (3 * arch.intermediate_size + 6 * hidden) * b
    return kv_cache + hidden_states + working


def _encoder_activations(system: MetaSystem, w: Workload, b: int) -> int:
    c = system.config.encoder
    tokens = c.video_clips * c.video_spatial_crops * (1 + (c.video_frames_per_clip // 2) * 16 * 16)
    return 12 * tokens * c.vision_embed_dim * b


def _decoder_activations(modality: Modality, modules: dict[str, nn.Module], w: Workload, b: int) -> dict[str, int]:
    batch = 2 if w.guidance else 1
    per_area = 6000 * modules["unet"].config.block_out_channels[0] // 320
    if modality is Modality.AUDIO:
        frames = int(w.audio_seconds * 100)  # 10 ms mel frames
        mel = 64
        unet = per_area * (frames // 4) * (mel // 4) * batch * b
        vae = 8 * 128 * frames * mel * b
        vocoder = 8 * 1024 * frames * b
        return {"unet": unet, "vae": vae, "vocoder": vocoder, "text_encoder": 77 * 1024 * 8 * b}
    height, width = w.image_size if modality is Modality.IMAGE else w.video_size
    frames = 1 if modality is Modality.IMAGE else w.video_frames
    unet = per_area * (height // 8) * (width // 8) * frames * batch * b
    vae = 8 * 128 * height * width * b
    return {"unet": unet, "vae": vae, "text_encoder": 77 * 1024 * 8 * b}


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return str(n)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, row in enumerate(rows):
        out.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if j == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


__all__ = [
    "CUDA_CONTEXT_BYTES",
    "ComponentSize",
    "MemoryReport",
    "MetaSystem",
    "PlanEstimate",
    "Workload",
    "build_meta",
    "component_sizes",
    "default_runtime",
    "estimate_plan",
    "memory_report",
    "standard_plans",
]
