"""``anygpt info``: the registered names (model presets, projectors, decoders, encoders), and with ``--memory`` a
model's size and the GPU memory each placement plan needs (built on the meta device: nothing is allocated).

The registries (and torch, diffusers behind them) are imported only by the topics that read them: ``anygpt info
presets`` imports nothing heavy and answers at once.
"""

from __future__ import annotations

import argparse

from anygpt.base.errors import UsageError

COMMANDS = {"info": "list presets, projectors, decoders and encoders; --memory: a model's size and GPU memory per plan"}

TOPICS = ("all", "presets", "projectors", "input_projectors", "output_projectors", "decoders", "encoders")

PRESET_SUMMARIES = {
    "toyworld": "trained on the toy world, shipped: ImageBind 64-d -> 4-layer Llama -> SD/ZeroScope/AudioLDM 64 px",
    "tiny": "random, for tests (noise out): ImageBind 32-d -> 2-layer Llama -> tiny SD/ZeroScope/AudioLDM",
    "nextgpt-7b": "NExT-GPT, local backbones: ImageBind-huge -> Vicuna-7B + LoRA -> SD 1.5/ZeroScope/AudioLDM",
}
"""``anygpt info presets``: what each model name is, in a line. Its names are ``anygpt.core.config.list_presets()``
(tests/test_cli.py checks it), so that ``info presets`` needs no import of the models' code."""

DEFAULT_MODEL = "toyworld"
"""``anygpt.core.config.DEFAULT_MODEL``, repeated here light (tests/test_cli.py checks that they agree)."""

PLAN_VALUES = {
    "dtype": ("float32", "float16", "bfloat16"),
    "offload": ("none", "decoders", "model", "sequential", "group"),
    "quantize": ("8bit", "4bit"),
}
"""The values of ``--dtype``, ``--offload`` and ``--quantize``, for the help: ``anygpt.core.runtime``'s ``DTYPES``,
``OFFLOAD_PLANS`` and ``QUANTIZATIONS`` (tests/test_cli.py checks that they agree; ``RuntimeOptions`` checks a value
when ``--memory`` runs)."""


def info(topic: str = "all") -> dict[str, list[str]]:
    """The registered names of ``topic`` (one of ``TOPICS``); only the registries the topic reads are imported.

    Raises:
        UsageError: an unknown topic, listing the valid ones.
    """
    if topic not in TOPICS:
        raise UsageError(f"info: unknown topic {topic!r}; expected one of {', '.join(TOPICS)}")
    keys = {
        "all": ["presets", "input_projectors", "output_projectors", "decoders", "encoders"],
        "projectors": ["input_projectors", "output_projectors"],
    }.get(topic, [topic])
    return {key: _names(key) for key in keys}


def _names(key: str) -> list[str]:
    """One registry's names, its package imported now (torch, diffusers and the rest come with it)."""
    if key == "presets":
        from anygpt.core.config import list_presets

        return list_presets()
    if key == "decoders":
        from decoders import list_decoder_presets

        return list_decoder_presets()
    if key == "encoders":
        from encoders import list_encoder_presets

        return list_encoder_presets()
    from projectors import list_input_projectors, list_output_projectors

    return list_input_projectors() if key == "input_projectors" else list_output_projectors()


def describe_presets() -> str:
    """One line per model name: what it is (encoder -> LLM -> decoders in a few words)."""
    names = sorted(PRESET_SUMMARIES)
    width = max(map(len, names)) + 1
    lines = ["presets: the names --model takes (or a folder written by save_pretrained)"]
    for name in names:
        default = " (default)" if name == DEFAULT_MODEL else ""
        lines.append(f"  {name + ':':<{width}} {PRESET_SUMMARIES[name]}{default}")
    return "\n".join(lines)


def describe_connectors() -> str:
    """What each registered projector (and the cross-attention fusion) does, and how training selects it."""
    from projectors import describe_projectors

    lines = []
    for side in ("input", "output"):
        lines.append(f"\n{side} projectors (training: --set {side}_projector=NAME):")
        for name, summary in describe_projectors(side).items():
            lines.append(f"  {name:<12} {summary}")
    lines.append("\nfusion (training: --set cross_attention.every=4):")
    lines.append(
        "  cross_attention  Flamingo's gated cross-attention blocks y = x + tanh(g) * xattn(x, media), g = 0 at start, "
        "before every k-th LLM layer, reading the input projector's output (instead of or beside splicing it in)."
    )
    return "\n".join(lines)


def memory(
    model: str = DEFAULT_MODEL,
    *,
    dtype: str | None = None,
    offload: str | None = None,
    quantize: str | None = None,
    device: str = "cuda",
) -> str:
    """``anygpt info --memory``: every component's parameters (trainable / frozen) and weight memory, then the peak
    to expect on one GPU for each plan, and the plan chosen by default on a 24 GB and a 16 GB GPU.

    Args:
        model: a preset, a packaged model or a ``save_pretrained`` folder.
        dtype, offload, quantize: estimate this one plan instead of the standard ones (unset parts: fp16 and no
            offload on CUDA).
        device: the device the plans are for (the quantization format depends on it).
    """
    from anygpt.core.memory import default_runtime, memory_report, standard_plans
    from anygpt.core.runtime import RuntimeOptions

    if dtype is None and offload is None and quantize is None:
        plans = standard_plans(device)
    else:
        plans = [RuntimeOptions(device=device, dtype=dtype, offload=offload or "none", quantize=quantize)]
    lines = [memory_report(model, plans).format()]
    if device.startswith("cuda"):
        for gib in (24, 16):
            plan = default_runtime(model, device, gpu_memory_gib=gib)
            lines.append(f"default on a {gib} GB GPU: {plan.describe()}")
    return "\n".join(lines)


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic", nargs="?", default="all", help=f"one of {', '.join(TOPICS)} (default all)")
    parser.add_argument("--memory", action="store_true", help="the model's size and the GPU memory of each plan")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="with --memory: a preset, packaged model or folder")
    dtypes, plans, quantizations = (", ".join(PLAN_VALUES[key]) for key in ("dtype", "offload", "quantize"))
    parser.add_argument("--dtype", default=None, help=f"with --memory: one plan in {dtypes}")
    parser.add_argument("--offload", default=None, help=f"with --memory: one plan with {plans}")
    parser.add_argument("--quantize", default=None, help=f"with --memory: one plan with a {quantizations} LLM")
    parser.add_argument("--device", default="cuda", help="with --memory: the device of the plans (default cuda)")


def run(args: argparse.Namespace) -> int:
    if args.memory:
        quantize = None if args.quantize in (None, "none") else args.quantize
        print(memory(args.model, dtype=args.dtype, offload=args.offload, quantize=quantize, device=args.device))
        return 0
    if any(v is not None for v in (args.dtype, args.offload, args.quantize)) or args.model != DEFAULT_MODEL:
        raise UsageError("info: --model, --dtype, --offload and --quantize go with --memory")
    if args.topic == "presets":
        print(describe_presets())
        return 0
    for key, names in info(args.topic).items():
        print(f"{key}: {', '.join(names)}")
    if args.topic == "projectors":
        print(describe_connectors())
    return 0
