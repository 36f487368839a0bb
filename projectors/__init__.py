"""Connectors between the encoder, the LLM and the decoders, selected by name."""

from projectors.cabstractor import CAbstractorProjector
from projectors.input import GroupInputProjector, InputProjector, LinearInputProjector, MLPInputProjector
from projectors.output import LinearOutputProjector, OutputProjector, TransformerOutputProjector
from projectors.perceiver import PerceiverResamplerProjector
from projectors.qformer import QFormerInputProjector, QFormerOutputProjector
from projectors.registry import (
    build_input_projector,
    build_output_projector,
    describe_projectors,
    get_input_projector_class,
    get_output_projector_class,
    list_input_projectors,
    list_output_projectors,
    register_input_projector,
    register_output_projector,
)
from projectors.token_merge import TokenMerge, merge_tokens, parse_token_merge

__all__ = [
    "InputProjector",
    "OutputProjector",
    "LinearInputProjector",
    "MLPInputProjector",
    "GroupInputProjector",
    "PerceiverResamplerProjector",
    "CAbstractorProjector",
    "QFormerInputProjector",
    "QFormerOutputProjector",
    "TransformerOutputProjector",
    "LinearOutputProjector",
    "build_input_projector",
    "build_output_projector",
    "describe_projectors",
    "get_input_projector_class",
    "get_output_projector_class",
    "list_input_projectors",
    "list_output_projectors",
    "register_input_projector",
    "register_output_projector",
    "TokenMerge",
    "merge_tokens",
    "parse_token_merge",
]
