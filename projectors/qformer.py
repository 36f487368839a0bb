"""BLIP-2's Querying Transformer (Q-Former) as an input and as an output connector.

Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large Language
Models", section 3.1: a fixed set of learned queries (32 x 768) goes through a BERT-base-sized transformer whose
layers let the queries attend to each other and, every ``cross_attention_frequency``-th layer, to the frozen
encoder's features; a ``Linear`` then maps the query outputs into the LLM. The transformer is transformers'
``Blip2QFormerModel``, built with its query side only (no text feed-forward, as BLIP-2 drops it for the LLM stage);
``training.blip2`` adds the text side for BLIP-2's representation pre-training (ITC, ITM, ITG).

The output connector is NExT-GPT's ``qformer`` mode of its output projector: the signal tokens (hidden state +
input embedding) go through ``Linear(H -> hidden)`` and become the keys and values that ``num_queries`` learned queries
read through a 2-layer Q-Former with cross-attention in every layer, followed by ``Linear(hidden -> D)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from projectors.input import InputProjector
from projectors.output import OutputProjector
from projectors.registry import register_input_projector, register_output_projector

TINY_QFORMER = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


def qformer_config(
    what: str,
    *,
    encoder_hidden_size: int,
    num_queries: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    cross_attention_frequency: int,
    dropout: float,
) -> Blip2QFormerConfig:
    """A ``Blip2QFormerConfig`` for a connector, with its sizes checked (``ValueError`` naming ``what``)."""
    for key, value in (
        ("num_queries", num_queries),
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("intermediate_size", intermediate_size),
        ("cross_attention_frequency", cross_attention_frequency),
    ):
        if value < 1:
            raise ValueError(f"{what}: {key} must be >= 1, got {value}")
    if hidden_size % num_heads:
        raise ValueError(f"{what}: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{what}: dropout must be in [0, 1), got {dropout}")
    return Blip2QFormerConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=encoder_hidden_size,
        use_qformer_text_input=False,  # the query side only; training.blip2 brings the text side
    )


def _queries(num_queries: int, config: Blip2QFormerConfig) -> nn.Parameter:
    return nn.Parameter(torch.randn(1, num_queries, config.hidden_size) * config.initializer_range)


@register_input_projector("qformer")
class QFormerInputProjector(InputProjector):
    """BLIP-2's Q-Former: ``num_queries`` (32) LLM tokens per item, whatever the length of the token sequence.

    The learned queries read the encoder's token sequence (B, N, D_tok) (after optional ``spatial_pool`` x
    ``spatial_pool`` pooling of the patches) through cross-attention every ``cross_attention_frequency`` layers of a
    ``Blip2QFormerModel``; ``Linear(hidden_size -> H)`` maps the query outputs into the LLM.

    Args:
        in_dim, token_dim, out_dim: the pooled embedding's size (unused), the token size (the keys' and values'
            input size) and the LLM's hidden size.
        num_queries: learned queries, = LLM tokens per item (BLIP-2: 32).
        hidden_size, num_layers, num_heads, intermediate_size: the Q-Former's size (BLIP-2: BERT-base).
        cross_attention_frequency: a cross-attention block in every n-th layer (BLIP-2: 2).
        dropout: hidden and attention dropout.
        grid: ``[num_prefix, height, width]`` of the token sequence (filled in by the model from the encoder).
        spatial_pool: 1 (off) or the pooling factor of the patch grid (2: 4x fewer keys and values).

    Example:
        >>> proj = QFormerInputProjector(in_dim=32, token_dim=32, out_dim=64, **QFormerInputProjector.presets["tiny"])
        >>> proj(torch.randn(2, 32), torch.randn(2, 257, 32)).shape
        torch.Size([2, 4, 64])
    """

    uses_tokens = True
    uses_grid = True
    presets = {"tiny": {"num_queries": 4, **TINY_QFORMER}, "real": {}}

    @register_to_config
    def __init__(
        self,
        *,
        in_dim: int,
        token_dim: int,
        out_dim: int,
        num_queries: int = 32,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_frequency: int = 2,
        dropout: float = 0.0,
        grid: list[int] | None = None,
        spatial_pool: int = 1,
    ):
        super().__init__()
        if spatial_pool < 1:
            raise ValueError(f"qformer projector: spatial_pool must be >= 1, got {spatial_pool}")
        config = qformer_config(
            "qformer projector",
            encoder_hidden_size=token_dim,
            num_queries=num_queries,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            cross_attention_frequency=cross_attention_frequency,
            dropout=dropout,
        )
        self.query_tokens = _queries(num_queries, config)
        self.qformer = Blip2QFormerModel(config)
        self.proj = nn.Linear(hidden_size, out_dim)

    @property
    def num_output_tokens(self) -> int:
        return self.config.num_queries

    def media_tokens(self, tokens: torch.Tensor | None) -> torch.Tensor:
        """The keys and values the queries read: the token sequence after ``spatial_pool``. (B, N', D_tok)."""
        return self.token_sequence(tokens)

    def query_features(self, tokens: torch.Tensor | None) -> torch.Tensor:
        """The Q-Former's query outputs before the LLM projection (what BLIP-2's first stage trains).

        Args:
            tokens: (B, N, D_tok) encoder token sequences.

        Returns:
            (B, num_queries, hidden_size).
        """
        media = self.media_tokens(tokens)
        queries = self.query_tokens.expand(media.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=media).last_hidden_state

    def forward(self, embeds: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        features = self.query_features(tokens)  # (B, K, hidden)
        return self.proj(features.to(self.proj.weight.dtype))  # (B, K, H)


@register_output_projector("qformer")
class QFormerOutputProjector(OutputProjector):
    """NExT-GPT's ``qformer`` output projector: learned queries read the signal tokens through a small Q-Former.

    ``Linear(H -> hidden_size)`` on (hidden states + input embeddings) of the N signal tokens gives the keys and
    values; ``num_queries`` learned queries read them through a ``Blip2QFormerModel`` (NExT-GPT: 2 BERT-base layers,
    cross-attention in each), then ``Linear(hidden_size -> D)``: (B, L, D).
    """

    presets = {"tiny": dict(TINY_QFORMER), "real": {}}

    @register_to_config
    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        num_queries: int,
        num_signal_tokens: int,
        hidden_size: int = 768,
        num_layers: int = 2,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_frequency: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        config = qformer_config(
            "qformer output projector",
            encoder_hidden_size=hidden_size,
            num_queries=num_queries,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            cross_attention_frequency=cross_attention_frequency,
            dropout=dropout,
        )
        self.in_fc = nn.Linear(in_dim, hidden_size)
        self.query_tokens = _queries(num_queries, config)
        self.qformer = Blip2QFormerModel(config)
        self.out_fc = nn.Linear(hidden_size, out_dim)

    def forward(self, hidden_states: torch.Tensor, input_embeds: torch.Tensor) -> torch.Tensor:
        signal = self.in_fc(hidden_states + input_embeds)  # (B, N, hidden)
        queries = self.query_tokens.expand(signal.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=signal).last_hidden_state  # (B, L, hidden)
        return self.out_fc(out.to(self.out_fc.weight.dtype))  # (B, L, D)
