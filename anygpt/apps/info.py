"""``anygpt info``: the registered names (model presets, projectors, decoders, encoders)."""

from __future__ import annotations

import argparse

from anygpt.base.errors import UsageError
from anygpt.core.config import list_presets
from decoders import list_decoder_presets
from encoders import list_encoder_presets
from projectors import describe_projectors, list_input_projectors, list_output_projectors

COMMANDS = {"info": "list presets, projectors, decoders and encoders"}

TOPICS = ("all", "presets", "projectors", "input_projectors", "output_projectors", "decoders", "encoders")


def info(topic: str = "all") -> dict[str, list[str]]:
    """The registered names of ``topic`` (one of ``TOPICS``).

    Raises:
        UsageError: an unknown topic, listing the valid ones.
    """
    table = {
        "presets": list_presets(),
        "input_projectors": list_input_projectors(),
        "output_projectors": list_output_projectors(),
        "decoders": list_decoder_presets(),
        "encoders": list_encoder_presets(),
    }
    if topic == "all":
        return table
    if topic == "projectors":
        return {k: v for k, v in table.items() if k.endswith("projectors")}
    if topic not in table:
        raise UsageError(f"info: unknown topic {topic!r}; expected one of {', '.join(TOPICS)}")
    return {topic: table[topic]}


def describe_connectors() -> str:
    """What each registered projector (and the cross-attention fusion) does, and how training selects it."""
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


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic", nargs="?", default="all", help=f"one of {', '.join(TOPICS)} (default all)")


def run(args: argparse.Namespace) -> int:
    for key, names in info(args.topic).items():
        print(f"{key}: {', '.join(names)}")
    if args.topic == "projectors":
        print(describe_connectors())
    return 0
