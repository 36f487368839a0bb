"""Flamingo's Perceiver Resampler: a fixed number of learned latents read the encoder's token sequence.

Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning", section 2.1 and appendix A.1.1:
each layer lets the latents attend to the concatenation of the media tokens and the latents themselves, followed by
a feed-forward block; the output length is the number of latents whatever the input length or frame count.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config

from projectors.input import InputProjector
from projectors.registry import register_input_projector


class _ResamplerLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ff_mult: int):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ff_mult * dim, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * dim, dim, bias=False),
        )

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        # latents (B, L, C), media (B, N, C); keys/values: [media; latents] as in Flamingo
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(media), q], dim=1)
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.ff(latents)


@register_input_projector("perceiver")
class PerceiverResamplerProjector(InputProjector):
    """Flamingo's Perceiver Resampler as an input projector: ``num_latents`` (64) LLM tokens per item.

    ``Linear(D_tok -> hidden_dim)`` on the token sequence (after optional ``spatial_pool`` x ``spatial_pool``
    pooling of the patches), ``depth`` resampler layers, LayerNorm, ``Linear(hidden_dim -> H)``.
    """

    uses_tokens = True
    uses_grid = True
    presets = {"tiny": {"num_latents": 8, "hidden_dim": 32, "depth": 1, "num_heads": 2}, "real": {}}

    @register_to_config
    def __init__(
        self,
        *,
        in_dim: int,
        token_dim: int,
        out_dim: int,
        num_latents: int = 64,
        hidden_dim: int = 1024,
        depth: int = 6,
        num_heads: int = 8,
        ff_mult: int = 4,
        spatial_pool: int = 1,
        grid: list[int] | None = None,
    ):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"perceiver projector: hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        for key, value in (("num_latents", num_latents), ("depth", depth), ("spatial_pool", spatial_pool)):
            if value < 1:
                raise ValueError(f"perceiver projector: {key} must be >= 1, got {value}")
        self.in_fc = nn.Linear(token_dim, hidden_dim)
        self.latents = nn.Parameter(torch.randn(1, num_latents, hidden_dim) * 0.02)
        self.layers = nn.ModuleList([_ResamplerLayer(hidden_dim, num_heads, ff_mult) for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden_dim)
        self.out_fc = nn.Linear(hidden_dim, out_dim)

    @property
    def num_output_tokens(self) -> int:
        return self.config.num_latents

    def forward(self, embeds: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        media = self.in_fc(self.token_sequence(tokens))  # (B, N', C)
        latents = self.latents.expand(media.shape[0], -1, -1).to(media.dtype)
        for layer in self.layers:
            latents = layer(latents, media)
        return self.out_fc(self.norm(latents))  # (B, num_latents, H)
