"""The encoder's token sequence as a grid: CLS (prefix) tokens, then patches row by row.

Connectors that keep locality (C-Abstractor) and 2 x 2 token compression need the patches' layout. The encoder
reports it (``ImageBindEncoder.token_grid``: ``(num_prefix, height, width)``) and the model passes it to every
connector that declares ``uses_grid``; a sequence of another length (a different input size) falls back to a square
grid when there is one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def grid_of(num_tokens: int, grid: tuple[int, int, int] | list[int] | None, what: str) -> tuple[int, int, int]:
    """``(num_prefix, height, width)`` of a sequence of ``num_tokens`` tokens.

    Args:
        num_tokens: N, the sequence length (prefix included).
        grid: the layout the connector was built for, or None (no prefix, square).
        what: the connector's name, for messages.

    Raises:
        ValueError: N fits neither ``grid`` nor a square (after the prefix).
    """
    prefix = int(grid[0]) if grid is not None else 0
    if grid is not None and prefix + int(grid[1]) * int(grid[2]) == num_tokens:
        return prefix, int(grid[1]), int(grid[2])
    side = math.isqrt(max(num_tokens - prefix, 0))
    if side > 0 and side * side == num_tokens - prefix:
        return prefix, side, side
    expected = f"{prefix} + {grid[1]} x {grid[2]}" if grid is not None else "a square number of"
    raise ValueError(
        f"{what}: cannot lay {num_tokens} tokens out as a grid: expected {expected} tokens "
        f"(set the connector's grid option to [num_prefix, height, width])"
    )


def split_grid(tokens: torch.Tensor, layout: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, C) -> prefix (B, P, C) and patches (B, C, H, W)."""
    prefix, height, width = layout
    batch, _, channels = tokens.shape
    patches = tokens[:, prefix:].reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    return tokens[:, :prefix], patches


def merge_grid(prefix: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """prefix (B, P, C) and patches (B, C, H, W) -> (B, P + H * W, C)."""
    return torch.cat([prefix, patches.flatten(2).transpose(1, 2)], dim=1)


def pooled_grid(layout: tuple[int, int, int], factor: int) -> tuple[int, int, int]:
    """The layout after ``factor`` x ``factor`` average pooling (odd edges pooled over what is there)."""
    prefix, height, width = layout
    if factor == 1:
        return layout
    return prefix, math.ceil(height / factor), math.ceil(width / factor)


def spatial_pool(
    tokens: torch.Tensor, factor: int, grid: tuple[int, int, int] | list[int] | None, what: str
) -> torch.Tensor:
    """``factor`` x ``factor`` average pooling of the patch tokens (the prefix tokens are kept as they are).

    ``factor`` 2 gives the literature's 2 x 2 compression: 4x fewer patch tokens. ``factor`` 1 returns ``tokens``.
    """
    if factor == 1:
        return tokens
    layout = grid_of(tokens.shape[1], grid, what)
    prefix, patches = split_grid(tokens, layout)
    pooled = F.avg_pool2d(patches, factor, stride=factor, ceil_mode=True, count_include_pad=False)
    return merge_grid(prefix, pooled)
