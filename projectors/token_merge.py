"""Token merging (ToMe) for the token sequences connectors hand to the LLM.

Bolya et al. 2023, "Token Merging: Your ViT But Faster", section 3: *bipartite soft matching*. The tokens are split
alternately into two sets, A (positions 0, 2, 4, ...) and B (1, 3, 5, ...); every A token is linked to its most
similar B token (cosine similarity); the ``r`` A tokens with the strongest links are merged into their B token by a
size-weighted average (a token's size counts the original tokens it holds), and the sizes add up. One round removes
at most ``len(A) = ceil(N / 2)`` tokens (ToMe's bound, ``N // 2``, is used); a target further down runs rounds until
it is reached, carrying the sizes, so every output token is the size-weighted mean of the original tokens it holds.

Differences from ToMe, on purpose:

- the similarity is computed on the tokens themselves (ToMe uses the attention keys of the block it sits in; a
  connector's output has no keys);
- the surviving tokens keep their original order (ToMe puts the unmerged A tokens first, then B): the LLM reads them
  with position embeddings, so the spatial order a connector gives is kept;
- the sizes are returned but not used further (ToMe's proportional attention would need the LLM's attention to
  change).

No maintained implementation fits here: ``tomesd`` patches Stable Diffusion's UNet attention, ``timm`` has none, and
Meta's ``tome`` patches ``timm`` ViT blocks. This one works on any ``(B, N, C)`` tensor and is checked against a
brute-force reference in ``tests/test_token_merge.py``.

The option, in a system config's ``input_projector.options`` (``anygpt.core.config``): ``token_merge: {ratio: 0.5}``
(merge away half of each item's tokens: 2x fewer; 0.75: 4x fewer) or ``{target: 16}`` (at most 16 tokens per item).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from anygpt.base.errors import ConfigError

__all__ = ["TokenMerge", "merge_once", "merge_tokens", "parse_token_merge"]

MAX_TARGET = 1 << 20
"""The largest ``target`` accepted (a sanity bound: no connector gives more tokens per item)."""


@dataclass(frozen=True)
class TokenMerge:
    """How many tokens of a sequence to keep: ``ratio`` merges away ``floor(N * ratio)`` of ``N`` tokens (0 <= ratio
    < 1), ``target`` keeps ``min(N, target)``. Exactly one is set. Either way at least one token is kept.

    Example:
        >>> TokenMerge(ratio=0.5).count(257), TokenMerge(ratio=0.75).count(8), TokenMerge(target=16).count(8)
        (129, 2, 8)
    """

    ratio: float | None = None
    target: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.target is None):
            raise ConfigError("token_merge: give exactly one of ratio or target")

    def count(self, n: int) -> int:
        """The number of tokens left of ``n``."""
        if n <= 1:
            return n
        if self.target is not None:
            return max(1, min(n, self.target))
        return max(1, n - math.floor(n * self.ratio))

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio} if self.ratio is not None else {"target": self.target}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, N, C) merged down to ``count(N)`` tokens (sizes dropped)."""
        return merge_tokens(x, self.count(x.shape[1]))[0]


def parse_token_merge(value: Any, where: str = "token_merge") -> TokenMerge | None:
    """The ``token_merge`` option (``None``, ``{ratio: r}`` or ``{target: n}``, or a ``TokenMerge``) checked.

    Raises:
        ConfigError: naming ``where``: not a mapping, unknown or missing keys, a ratio outside [0, 1) or not a finite
            number, a target that is not an integer in 1 .. 2**20.
    """
    if value is None or isinstance(value, TokenMerge):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected {{ratio: r}} or {{target: n}}, got {value!r}")
    unknown = sorted(set(value) - {"ratio", "target"}, key=str)
    if unknown or len(value) != 1:
        raise ConfigError(
            f"{where}: expected exactly one of 'ratio' (0 <= r < 1) or 'target' (an integer >= 1), got {dict(value)!r}"
        )
    if "ratio" in value:
        ratio = value["ratio"]
        number = isinstance(ratio, int | float) and not isinstance(ratio, bool)
        if not number or not math.isfinite(ratio) or not 0 <= ratio < 1:
            raise ConfigError(f"{where}.ratio: expected a number in [0, 1) (0.5: 2x fewer tokens), got {ratio!r}")
        return TokenMerge(ratio=float(ratio))
    target = value["target"]
    if isinstance(target, bool) or not isinstance(target, int) or not 1 <= target <= MAX_TARGET:
        raise ConfigError(f"{where}.target: expected an integer in 1 .. {MAX_TARGET}, got {target!r}")
    return TokenMerge(target=target)


def merge_once(x: torch.Tensor, r: int, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of bipartite soft matching: ``r`` tokens merged away (at most ``N // 2``).

    Args:
        x: (B, N, C) tokens (each the size-weighted mean of the original tokens it holds).
        r: how many tokens to remove.
        sizes: (B, N) how many original tokens each holds (None: ones).

    Returns:
        (B, N - r, C) tokens in their original order and (B, N - r) sizes (float64 for float64 tokens, else
        float32: the sums are taken in that precision). Ties in similarity go to the lower index (the first B token
        for an A token; the earlier A token among equal links).
    """
    batch, n, channels = x.shape
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    if sizes is None:
        sizes = torch.ones(batch, n, dtype=work, device=x.device)
    sizes = sizes.to(device=x.device, dtype=work)
    r = max(0, min(int(r), n // 2))
    if r == 0:
        return x, sizes
    metric = F.normalize(x.detach().to(work), dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, |A|, |B|) cosine similarity
    best, best_b = scores.max(dim=-1)  # each A token's most similar B token (first on ties)
    order = best.argsort(dim=-1, descending=True, stable=True)
    src = order[:, :r]  # (B, r): the A tokens merged away (indices into A)
    dst = best_b.gather(1, src)  # (B, r): the B tokens they join (indices into B)

    weighted = x.to(work) * sizes[..., None]  # sums of the original tokens
    index = dst[..., None].expand(-1, -1, channels)
    merged_b = weighted[:, 1::2].scatter_add(1, index, weighted[:, ::2].gather(1, src[..., None].expand_as(index)))
    sizes_b = sizes[:, 1::2].scatter_add(1, dst, sizes[:, ::2].gather(1, src))
    total = weighted.clone()
    total[:, 1::2] = merged_b
    counts = sizes.clone()
    counts[:, 1::2] = sizes_b

    keep = torch.ones(batch, n, dtype=torch.bool, device=x.device)
    keep_a = keep[:, ::2].clone().scatter_(1, src, False)
    keep[:, ::2] = keep_a
    positions = torch.arange(n, device=x.device).expand(batch, n)[keep].reshape(batch, n - r)  # ascending per row
    counts = counts.gather(1, positions)
    out = total.gather(1, positions[..., None].expand(-1, -1, channels)) / counts[..., None]
    return out.to(x.dtype), counts


def merge_tokens(x: torch.Tensor, target: int, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` (B, N, C) down to ``target`` tokens with rounds of :func:`merge_once` (each removes at most half).

    Returns:
        (B, min(N, target), C) tokens in their original order and their sizes (B, min(N, target)): every token is the
        size-weighted mean of the original tokens it holds, and each row's sizes add up to N (or to the given
        ``sizes``' sum).

    Raises:
        ValueError: ``target`` < 1.
    """
    if target < 1:
        raise ValueError(f"merge_tokens: target must be >= 1, got {target}")
    if sizes is None:
        sizes = torch.ones(x.shape[0], x.shape[1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    sizes = sizes.to(x.device)
    while x.shape[1] > target:
        x, sizes = merge_once(x, min(x.shape[1] - target, x.shape[1] // 2), sizes)
    return x, sizes
