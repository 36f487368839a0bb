"""Output projectors: map the LLM's signal-token hidden states to a decoder's conditioning.

Every output projector takes the last-layer hidden states at the N signal tokens (B, N, H) and the signal tokens'
input embeddings (B, N, H), and returns ``num_queries`` conditioning vectors of the decoder's size: (B, L, D).
A decoder that is conditioned on a pooled vector (AudioLDM) uses L = 1 and reads ``out[:, 0]``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from projectors.registry import register_output_projector


class OutputProjector(ModelMixin, ConfigMixin):
    projector_name = "base"
    #: named option sets (besides the sizes the model fills in): ``tiny`` for tests, ``real`` for real-size models.
    presets: dict[str, dict] = {"tiny": {}, "real": {}}

    def forward(self, hidden_states: torch.Tensor, input_embeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_output_projector("transformer")
class TransformerOutputProjector(OutputProjector):
    """NExT-GPT's output projector: ``Linear(H -> d_model)``, an encoder-decoder ``nn.Transformer`` whose encoder
    reads the signal tokens (hidden state + input embedding) and whose decoder reads ``num_queries`` learned queries,
    then ``Linear(d_model -> D)``.
    """

    presets = {"tiny": {"d_model": 64, "num_heads": 4, "num_encoder_layers": 1, "num_decoder_layers": 1}, "real": {}}

    @register_to_config
    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        num_queries: int,
        num_signal_tokens: int,
        d_model: int = 512,
        num_heads: int = 4,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"transformer output projector: d_model {d_model} not divisible by {num_heads} heads")
        self.in_fc = nn.Linear(in_dim, d_model)
        with warnings.catch_warnings():  # norm_first disables the nested-tensor fast path; nothing to warn about
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.transformer = self._make_transformer(
                d_model,
                num_heads,
                num_encoder_layers,
                num_decoder_layers,
                dim_feedforward or 4 * d_model,
                dropout,
            )
        self.queries = nn.Parameter(torch.randn(1, num_queries, d_model) * 0.02)
        self.out_fc = nn.Linear(d_model, out_dim)

    @staticmethod
    def _make_transformer(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout):
        return nn.Transformer(
            d_model=d_model,
            nhead=nhead,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )

    def forward(self, hidden_states: torch.Tensor, input_embeds: torch.Tensor) -> torch.Tensor:
        x = self.in_fc(hidden_states + input_embeds)  # (B, N, d_model)
        queries = self.queries.expand(x.shape[0], -1, -1).to(x.dtype)
        return self.out_fc(self.transformer(x, queries))  # (B, L, D)


@register_output_projector("linear")
class LinearOutputProjector(OutputProjector):
    """A per-token linear map: the N signal tokens are mapped to D, then linearly resampled along the token axis to
    ``num_queries`` (a learned (L x N) mixing matrix), so any query count works."""

    @register_to_config
    def __init__(self, *, in_dim: int, out_dim: int, num_queries: int, num_signal_tokens: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.mix = nn.Parameter(torch.full((num_queries, num_signal_tokens), 1.0 / num_signal_tokens))

    def forward(self, hidden_states: torch.Tensor, input_embeds: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[1] != self.mix.shape[1]:
            raise ValueError(
                f"linear output projector expects {self.mix.shape[1]} signal tokens, got {hidden_states.shape[1]}"
            )
        x = self.fc(hidden_states + input_embeds)  # (B, N, D)
        return torch.einsum("ln,bnd->bld", self.mix.to(x.dtype), x)  # (B, L, D)
