"""Honeybee's C-Abstractor: convolutional blocks and adaptive pooling, keeping locality.

Cha et al. 2024, "Honeybee: Locality-enhanced Projector for Multimodal LLM", section 3.2: the patch tokens, laid
out on their grid, go through ResNet blocks, adaptive average pooling to a ``sqrt(M) x sqrt(M)`` grid and more
ResNet blocks; an MLP reads each of the M cells out into the LLM. Neighbouring patches stay neighbours throughout,
unlike a resampler's global attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config

from projectors.input import InputProjector
from projectors.registry import register_input_projector
from projectors.tokens import grid_of, split_grid


class _Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1 convolutions) with channel LayerNorm (GroupNorm with one group) and SiLU."""

    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        inner = max(dim // ratio, 1)
        self.body = nn.Sequential(
            nn.Conv2d(dim, inner, 1, bias=False),
            nn.GroupNorm(1, inner),
            nn.SiLU(),
            nn.Conv2d(inner, inner, 3, padding=1, bias=False),
            nn.GroupNorm(1, inner),
            nn.SiLU(),
            nn.Conv2d(inner, dim, 1, bias=False),
            nn.GroupNorm(1, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x + self.body(x))


@register_input_projector("cabstractor")
class CAbstractorProjector(InputProjector):
    """Honeybee's C-Abstractor as an input projector: ``num_queries`` (M, a square; 64 by default) LLM tokens.

    The patch tokens (CLS tokens dropped) plus a learned position embedding, ``Linear(D_tok -> hidden_dim)``,
    ``depth`` ResNet blocks, adaptive average pooling to ``sqrt(M) x sqrt(M)``, ``depth`` ResNet blocks, then a
    ``mlp_depth``-layer MLP readout into the LLM (H). A sequence whose length does not fit ``grid`` is read as a
    square grid when it is one.
    """

    uses_tokens = True
    uses_grid = True
    presets = {"tiny": {"num_queries": 4, "hidden_dim": 32, "depth": 1}, "real": {}}

    @register_to_config
    def __init__(
        self,
        *,
        in_dim: int,
        token_dim: int,
        out_dim: int,
        num_queries: int = 64,
        hidden_dim: int = 1024,
        depth: int = 3,
        mlp_depth: int = 2,
        grid: list[int] | None = None,
    ):
        super().__init__()
        side = math.isqrt(num_queries)
        if num_queries < 1 or side * side != num_queries:
            raise ValueError(f"cabstractor projector: num_queries must be a square (4, 16, 64, ...), got {num_queries}")
        if depth < 0 or mlp_depth < 1:
            raise ValueError(f"cabstractor projector: depth >= 0 and mlp_depth >= 1, got {depth} and {mlp_depth}")
        self.side = side
        patches = grid[1] * grid[2] if grid is not None else 0
        # learned absolute positions of the grid it was built for (Honeybee adds them before the blocks)
        self.position = nn.Parameter(torch.zeros(1, patches, token_dim)) if patches else None
        self.in_fc = nn.Linear(token_dim, hidden_dim)
        self.net_in = nn.Sequential(*[_Bottleneck(hidden_dim) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.net_out = nn.Sequential(*[_Bottleneck(hidden_dim) for _ in range(depth)])
        readout: list[nn.Module] = [nn.Linear(hidden_dim, out_dim)]
        for _ in range(mlp_depth - 1):
            readout += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.readout = nn.Sequential(*readout)

    @property
    def num_output_tokens(self) -> int:
        return self.config.num_queries

    def forward(self, embeds: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.token_sequence(tokens)  # no pooling option: it pools by itself
        layout = grid_of(tokens.shape[1], self.config.grid, "cabstractor")
        _, patches = split_grid(tokens, layout)  # (B, D_tok, h, w)
        x = patches.flatten(2).transpose(1, 2)  # (B, h * w, D_tok)
        if self.position is not None and self.position.shape[1] == x.shape[1]:
            x = x + self.position.to(x.dtype)
        x = self.in_fc(x).transpose(1, 2).reshape(x.shape[0], -1, layout[1], layout[2])  # (B, C, h, w)
        x = self.net_out(self.pool(self.net_in(x)))  # (B, C, s, s)
        return self.readout(x.flatten(2).transpose(1, 2))  # (B, M, H)
