"""Input projectors: map encoder features into the LLM's embedding space.

Every input projector takes the encoder's pooled embedding ``embeds`` (B, D) and its token sequence ``tokens``
(B, N, D_tok), and returns ``num_output_tokens`` LLM input embeddings per item: (B, K, H).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from projectors.registry import register_input_projector
from projectors.tokens import grid_of, pooled_grid, spatial_pool


class InputProjector(ModelMixin, ConfigMixin):
    """Base class. Subclasses set ``num_output_tokens`` and implement ``forward``."""

    projector_name = "base"
    #: whether ``forward`` reads the token sequence (False: only the pooled embedding).
    uses_tokens = False
    #: whether the constructor takes ``grid`` (``[num_prefix, height, width]`` of the token sequence), which the
    #: model fills in from the encoder per modality.
    uses_grid = False
    #: named option sets (besides the sizes the model fills in): ``tiny`` for tests, ``real`` for real-size models.
    presets: dict[str, dict] = {"tiny": {}, "real": {}}

    @property
    def num_output_tokens(self) -> int:  # K
        raise NotImplementedError

    def forward(self, embeds: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def token_sequence(self, tokens: torch.Tensor | None) -> torch.Tensor:
        """The encoder's token sequence (B, N, D_tok) a sequence connector reads, after its ``spatial_pool`` option
        (when it has one): (B, N', D_tok).

        Raises:
            ValueError: ``tokens`` is None, or does not fit the connector's ``grid`` for pooling.
        """
        if tokens is None:
            raise ValueError(
                f"{self.projector_name} projector needs the encoder's token sequence (B, N, D_tok); got None"
            )
        factor = self.config.get("spatial_pool", 1)
        return spatial_pool(tokens, factor, self.config.get("grid"), f"{self.projector_name} projector")


class _PatchOrPooled(InputProjector):
    """Linear and MLP connectors read either the pooled embedding (one token per item: NExT-GPT's legacy
    connector) or, with ``source="tokens"``, every patch token (one LLM token per patch, as LLaVA does; CLS tokens
    dropped), optionally compressed by ``spatial_pool`` x ``spatial_pool`` average pooling of the patch grid."""

    uses_grid = True

    def _check_source(self) -> None:
        source, pool = self.config.source, self.config.spatial_pool
        if source not in ("pooled", "tokens"):
            raise ValueError(f"{self.projector_name} projector: source must be 'pooled' or 'tokens', got {source!r}")
        if pool < 1:
            raise ValueError(f"{self.projector_name} projector: spatial_pool must be >= 1, got {pool}")
        if source == "tokens" and self.config.grid is None:
            raise ValueError(f"{self.projector_name} projector: source 'tokens' needs grid [num_prefix, h, w]")

    @property
    def uses_tokens(self) -> bool:
        return self.config.source == "tokens"

    @property
    def num_output_tokens(self) -> int:
        if self.config.source == "pooled":
            return 1
        _, height, width = pooled_grid(tuple(self.config.grid), self.config.spatial_pool)
        return height * width

    def _inputs(self, embeds: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        if self.config.source == "pooled":
            return embeds.unsqueeze(1)  # (B, 1, D)
        if tokens is None:
            raise ValueError(f"{self.projector_name} projector (source 'tokens') needs the token sequence; got None")
        grid = tuple(self.config.grid)
        if grid_of(tokens.shape[1], grid, self.projector_name) != grid:  # one LLM token per patch: the count is fixed
            raise ValueError(
                f"{self.projector_name} projector (source 'tokens') was built for {grid[0]} + {grid[1]} x {grid[2]} "
                f"tokens, got {tokens.shape[1]}"
            )
        tokens = spatial_pool(tokens, self.config.spatial_pool, grid, self.projector_name)
        return tokens[:, grid[0] :]  # the patch tokens: (B, h * w, D_tok)


@register_input_projector("linear")
class LinearInputProjector(_PatchOrPooled):
    """NExT-GPT legacy / LLaVA: ``Linear(D -> H)`` on the pooled embedding (one LLM token per item), or on every
    patch token with ``source="tokens"`` (LLaVA)."""

    presets = {"tiny": {}, "real": {}}

    @register_to_config
    def __init__(
        self,
        *,
        in_dim: int,
        token_dim: int,
        out_dim: int,
        source: str = "pooled",
        spatial_pool: int = 1,
        grid: list[int] | None = None,
    ):
        super().__init__()
        self._check_source()
        self.proj = nn.Linear(in_dim if source == "pooled" else token_dim, out_dim)

    def forward(self, embeds: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self._inputs(embeds, tokens))  # (B, K, H)


@register_input_projector("mlp")
class MLPInputProjector(_PatchOrPooled):
    """LLaVA-1.5: ``Linear(D -> H), GELU, Linear(H -> H)`` on the pooled embedding (one LLM token per item), or on
    every patch token with ``source="tokens"``."""

    presets = {"tiny": {}, "real": {}}

    @register_to_config
    def __init__(
        self,
        *,
        in_dim: int,
        token_dim: int,
        out_dim: int,
        hidden_dim: int | None = None,
        source: str = "pooled",
        spatial_pool: int = 1,
        grid: list[int] | None = None,
    ):
        super().__init__()
        self._check_source()
        hidden_dim = hidden_dim or out_dim
        self.fc1 = nn.Linear(in_dim if source == "pooled" else token_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, embeds: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self._inputs(embeds, tokens))))  # (B, K, H)


class _Mlp(nn.Sequential):
    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int):
        super().__init__(nn.Linear(dim_in, dim_hidden), nn.GELU(), nn.Linear(dim_hidden, dim_out))


class _CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + MLP, queries attend to a context sequence."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(context)
        queries = queries + self.attn(self.norm_q(queries), kv, kv, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class _GroupingBlock(nn.Module):
    """GroupViT grouping: ``num_groups`` group tokens gather the input tokens by (hard) assignment.

    The group tokens first read the inputs through cross-attention, then every input token is assigned to one
    group (straight-through hard softmax over the groups; Gumbel noise while training), and each group becomes the
    assignment-weighted mean of its tokens, followed by an MLP.
    """

    def __init__(self, dim: int, num_heads: int, num_groups: int, hard: bool = True, gumbel: bool = True):
        super().__init__()
        self.hard, self.gumbel = hard, gumbel
        self.norm_x = nn.LayerNorm(dim)
        self.norm_groups = nn.LayerNorm(dim)
        self.pre_assign = _CrossAttentionBlock(dim, num_heads)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, 4 * dim, dim)
        self.scale = dim**-0.5
        self.num_groups = num_groups

    def _assign(self, logits: torch.Tensor) -> torch.Tensor:
        # logits: (B, G, N); every input token (column) is assigned to one group.
        if self.gumbel and self.training:
            gumbels = -torch.empty_like(logits).exponential_().log()
            logits = logits + gumbels
        soft = logits.softmax(dim=1)
        if not self.hard:
            return soft
        index = soft.argmax(dim=1, keepdim=True)
        hard = torch.zeros_like(soft).scatter_(1, index, 1.0)
        return hard - soft.detach() + soft  # straight-through

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        # x: (B, N, C), groups: (B, G, C) -> (B, G, C)
        x = self.norm_x(x)
        groups = self.pre_assign(self.norm_groups(groups), x)
        logits = self.q_proj(groups) @ self.k_proj(x).transpose(1, 2) * self.scale  # (B, G, N)
        assign = self._assign(logits)
        assign = assign / (assign.sum(dim=-1, keepdim=True) + 1.0)
        new = groups + self.out_proj(assign @ self.v_proj(x))
        return new + self.mlp(self.norm_out(new))


@register_input_projector("group")
class GroupInputProjector(InputProjector):
    """NExT-GPT's grouping projector (GroupViT-style): the encoder's token sequence is grouped into
    ``num_groups[-1]`` tokens (8 by default) through successive grouping stages.

    Each stage runs ``depth`` transformer layers over [tokens; group tokens] and then a grouping block that merges
    the tokens into that stage's groups, which become the next stage's tokens.
    """

    uses_tokens = True
    uses_grid = True
    presets = {
        "tiny": {"hidden_dim": 32, "num_heads": 2, "num_groups": [16, 4], "depths": [1, 1], "final_depth": 1},
        "real": {},
    }

    @register_to_config
    def __init__(
        self,
        *,
        in_dim: int,
        token_dim: int,
        out_dim: int,
        hidden_dim: int = 512,
        num_heads: int = 8,
        num_groups: tuple[int, ...] | list[int] = (64, 8),
        depths: tuple[int, ...] | list[int] = (6, 3),
        final_depth: int = 3,
        hard_assignment: bool = True,
        spatial_pool: int = 1,
        grid: list[int] | None = None,
    ):
        super().__init__()
        if spatial_pool < 1:
            raise ValueError(f"group projector: spatial_pool must be >= 1, got {spatial_pool}")
        if len(num_groups) != len(depths) or not num_groups:
            raise ValueError(
                f"group projector: num_groups {list(num_groups)} and depths {list(depths)} must be non-empty and "
                "of the same length"
            )
        if hidden_dim % num_heads:
            raise ValueError(f"group projector: hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        self.in_fc = nn.Linear(token_dim, hidden_dim)
        self.group_tokens = nn.ParameterList([nn.Parameter(torch.randn(1, g, hidden_dim) * 0.02) for g in num_groups])

        def encoder(depth: int) -> nn.Module:
            if depth == 0:
                return nn.Identity()
            layer = nn.TransformerEncoderLayer(
                hidden_dim, num_heads, 4 * hidden_dim, dropout=0.0, batch_first=True, norm_first=True
            )
            return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

        self.stages = nn.ModuleList([encoder(d) for d in depths])
        self.grouping = nn.ModuleList(
            [_GroupingBlock(hidden_dim, num_heads, g, hard=hard_assignment, gumbel=hard_assignment) for g in num_groups]
        )
        self.final = encoder(final_depth)
        self.norm = nn.LayerNorm(hidden_dim)
        self.out_fc = nn.Linear(hidden_dim, out_dim)

    @property
    def num_output_tokens(self) -> int:
        return self.config.num_groups[-1]

    def forward(self, embeds: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        x = self.in_fc(self.token_sequence(tokens))  # (B, N, C)
        batch = x.shape[0]
        for stage, grouping, groups in zip(self.stages, self.grouping, self.group_tokens, strict=True):
            g = groups.expand(batch, -1, -1)
            y = stage(torch.cat([x, g], dim=1))
            x, g = y[:, : x.shape[1]], y[:, x.shape[1] :]
            x = grouping(x, g)  # (B, G, C)
        x = self.final(x)
        return self.out_fc(self.norm(x))  # (B, K, H)
