"""Gated cross-attention (Flamingo) as a fusion mode: the LLM reads the media through cross-attention blocks.

Every ``every``-th decoder layer of the frozen LLM (layers 0, k, 2k, ...) gets a block in front of it::

    x = x + tanh(attn_gate) * CrossAttention(LayerNorm(x), media)   # queries: the text, keys / values: the media
    x = x + tanh(ff_gate) * FeedForward(LayerNorm(x))

Both gates are scalars initialised to 0, so a fresh model computes exactly what the plain LLM computes, and
training opens the gates gradually (Alayrac et al., 2022, "Flamingo", section 2.2 and figure 4).

The blocks are installed with forward pre-hooks that rewrite each chosen layer's ``hidden_states`` argument: the
LLM's own modules, its LoRA adapter and its checkpoints are untouched, and removing the hooks gives the plain LLM
back. The media the blocks read (the "context") is set by ``AnyGPTModel.embed_inputs`` from the projected features
of each row's media items; generation steps with a key/value cache keep the context of the prompt they continue.

One simplification against Flamingo: every text token of a row attends to *all* media items of that row, not only
to the most recent preceding one. Rows without media get exactly their input back.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass
class CrossAttentionConfig:
    """Gated cross-attention blocks inserted into the frozen LLM.

    Args:
        every: a block before every ``every``-th decoder layer, starting at layer 0 (1: before every layer).
        num_heads: attention heads of each block (the LLM's hidden size must divide by it).
        ff_mult: the feed-forward's inner size as a multiple of the LLM's hidden size.
        inline: whether the projected media tokens are also spliced into the sequence ("beside" the input
            projector: each item is ``K`` placeholder tokens, as without cross-attention) or only read through
            cross-attention ("instead of": each item is one placeholder token, which marks where it was, like
            Flamingo's ``<image>`` token).
    """

    every: int = 4
    num_heads: int = 8
    ff_mult: int = 4
    inline: bool = False

    def __post_init__(self):
        for name in ("every", "num_heads", "ff_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"cross_attention.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.inline, bool):
            raise ValueError(f"cross_attention.inline must be true or false, got {self.inline!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CrossAttentionConfig:
        if not isinstance(data, dict):
            raise ValueError(f"cross_attention: expected a mapping of options, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"cross_attention: unknown keys {sorted(unknown)}; valid keys are {sorted(known)}")
        return cls(**data)


class GatedCrossAttentionBlock(nn.Module):
    """One Flamingo block: gated cross-attention to the media, then a gated feed-forward.

    Args:
        dim: the LLM's hidden size (the media features have it too: they are the input projector's output).
        num_heads: attention heads.
        ff_mult: feed-forward inner size = ``ff_mult * dim``.
    """

    def __init__(self, dim: int, *, num_heads: int, ff_mult: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross_attention.num_heads {num_heads} does not divide the LLM's hidden size {dim}")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ff_mult * dim, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * dim, dim, bias=False),
        )
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B, T, H) hidden states entering a decoder layer (any dtype; the result has the same).
            media: (B, S, H) the media features of each row, padded.
            media_mask: (B, S) True where ``media`` holds a feature.

        Returns:
            (B, T, H): ``x`` plus the gated updates; rows whose mask is all False get exactly ``x``.
        """
        dtype = self.to_q.weight.dtype
        b, t, _ = x.shape
        has_media = media_mask.any(dim=-1)  # (B,)
        keep = has_media.to(dtype)[:, None, None]  # (B, 1, 1)
        # a row without media attends to its padding (finite, then multiplied by 0) instead of to nothing (NaN)
        attend = (media_mask | ~has_media[:, None])[:, None, None, :]  # (B, 1, 1, S)
        h = x.to(dtype)
        q = self.to_q(self.norm(h))
        k, v = self.to_kv(media.to(dtype)).chunk(2, dim=-1)

        def heads(z: torch.Tensor) -> torch.Tensor:  # (B, L, H) -> (B, heads, L, H / heads)
            return z.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attend)
        attended = self.to_out(attended.transpose(1, 2).reshape(b, t, -1))  # (B, T, H)
        attn_update = torch.tanh(self.attn_gate) * (attended * keep)
        ff_update = torch.tanh(self.ff_gate) * (self.ff(h + attn_update) * keep)
        # the residual stays in x's dtype: with both gates at 0 the update is exactly 0 and x comes back unchanged
        return x + (attn_update + ff_update).to(x.dtype)


def find_decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (also through a peft wrapper).

    The one ``nn.ModuleList`` whose length is ``config.num_hidden_layers``.

    Raises:
        ValueError: no such list, or more than one.
    """
    config = getattr(language_model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if count is None:
        raise ValueError(f"{type(language_model).__name__} has no config.num_hidden_layers: cannot find its layers")
    found = [m for m in language_model.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(found) != 1:
        raise ValueError(
            f"{type(language_model).__name__}: expected one list of {count} decoder layers, found {len(found)}; "
            "gated cross-attention cannot be installed on this model"
        )
    return found[0]


class GatedCrossAttentionLayers(nn.Module):
    """The blocks of one LLM, keyed by the index of the decoder layer they precede, and their media context.

    Args:
        config: which layers, heads, feed-forward size.
        hidden_size: the LLM's hidden size.
        num_layers: the LLM's decoder layer count.

    Example:
        >>> blocks = GatedCrossAttentionLayers(CrossAttentionConfig(every=2), hidden_size=64, num_layers=4)
        >>> blocks.install(llm)                 # hooks on layers 0 and 2
        >>> blocks.set_context(media, mask)     # (B, S, H), (B, S); AnyGPTModel.embed_inputs does this
        >>> logits = llm(inputs_embeds=embeds).logits
    """

    def __init__(self, config: CrossAttentionConfig, *, hidden_size: int, num_layers: int):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(hidden_size, num_heads=config.num_heads, ff_mult=config.ff_mult)
                for i in range(0, num_layers, config.every)
            }
        )
        self._handles: list = []
        self._context: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def layer_indices(self) -> list[int]:
        return [int(i) for i in self.blocks]

    @property
    def gates(self) -> torch.Tensor:
        """(N, 2): every block's attention and feed-forward gate (detached)."""
        return torch.stack([torch.cat([b.attn_gate, b.ff_gate]) for b in self.blocks.values()]).detach()

    # ------------------------------------------------------------------ hooks
    def install(self, language_model: nn.Module) -> None:
        """Put the blocks in front of their decoder layers (forward pre-hooks)."""
        if self._handles:
            raise RuntimeError("the cross-attention blocks are already installed")
        layers = find_decoder_layers(language_model)
        if max(self.layer_indices) >= len(layers):
            raise ValueError(f"cross-attention blocks for layer {max(self.layer_indices)}, the LLM has {len(layers)}")
        for index in self.layer_indices:
            hook = self._pre_hook(self.blocks[str(index)])
            self._handles.append(layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        logger.info("gated cross-attention before decoder layers %s", self.layer_indices)

    def remove(self) -> None:
        """Remove the hooks (the LLM is plain again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, block: GatedCrossAttentionBlock):
        def hook(module, args, kwargs):
            if self._context is None:
                return None
            media, mask = self._context
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[0] != media.shape[0]:
                raise ValueError(
                    f"gated cross-attention: the media context holds {media.shape[0]} row(s), the LLM runs "
                    f"{hidden.shape[0]}; set it for this batch with AnyGPTModel.embed_inputs (batched beam search "
                    "and several returned sequences are not supported)"
                )
            hidden = block(hidden, media.to(hidden.device), mask.to(hidden.device))
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    # ------------------------------------------------------------------ context
    def set_context(self, media: torch.Tensor | None, mask: torch.Tensor | None = None) -> None:
        """The media every following LLM forward reads: (B, S, H) features and a (B, S) mask of the real ones.

        None: no media (the blocks are skipped and the LLM is exactly the plain one).
        """
        if media is None:
            self._context = None
            return
        if mask is None:
            mask = torch.ones(media.shape[:2], dtype=torch.bool, device=media.device)
        if media.ndim != 3 or mask.shape != media.shape[:2]:
            raise ValueError(f"media context: expected (B, S, H) and a (B, S) mask, got {media.shape}, {mask.shape}")
        self._context = (media, mask.bool())

    @contextlib.contextmanager
    def rows(self, index: torch.Tensor | None):
        """Narrow the context to the batch rows ``index`` while the LLM runs on those rows only (e.g. one forward
        per LoRA adapter over its rows); None keeps every row."""
        saved = self._context
        if saved is not None and index is not None:
            self._context = (saved[0][index.to(saved[0].device)], saved[1][index.to(saved[1].device)])
        try:
            yield
        finally:
            self._context = saved

    @property
    def context(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._context


def media_context(
    input_ids: torch.Tensor, features: dict[int, torch.Tensor], *, inline: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Each row's media features, in the order their placeholders appear in the row, padded to one length.

    Args:
        input_ids: (B, T).
        features: per placeholder token id, (M, K, H) projected features of that modality's items in placeholder
            order (row-major over the batch).
        inline: True: each item fills ``K`` placeholder positions (one feature each); False: each item is one
            placeholder position carrying its ``K`` features.

    Returns:
        (B, S, H) context and (B, S) mask (True where a feature is), or (None, None) when there are no media.

    Raises:
        ValueError: when the placeholder positions do not match the features given.
    """
    rows, times, orders, vectors = [], [], [], []
    for placeholder, feats in features.items():
        where = (input_ids == placeholder).nonzero()  # (P, 2), row-major
        dim = feats.shape[-1]
        if feats.numel() == 0:
            per_position = feats.new_zeros((0, 1, dim))  # no items of this modality
        elif inline:
            per_position = feats.reshape(-1, 1, dim)  # (M*K, 1, H): one feature per position
        else:
            per_position = feats.reshape(feats.shape[0], -1, dim)  # (M, K, H): an item's features per position
        if where.shape[0] != per_position.shape[0]:
            what = "feature vectors" if inline else "media items"
            raise ValueError(
                f"placeholder token {placeholder} appears {where.shape[0]} times in the input but "
                f"{per_position.shape[0]} {what} were given"
            )
        if where.shape[0] == 0:
            continue
        k = per_position.shape[1]
        rows.append(where[:, 0, None].expand(-1, k).reshape(-1))
        times.append(where[:, 1, None].expand(-1, k).reshape(-1))
        orders.append(torch.arange(k, device=input_ids.device).expand(where.shape[0], -1).reshape(-1))
        vectors.append(per_position.reshape(-1, per_position.shape[-1]))
    if not vectors:
        return None, None
    row, time, order, vector = (torch.cat(x) for x in (rows, times, orders, vectors))
    batch, length = input_ids.shape
    width = int(order.max()) + 1
    sort = torch.argsort((row * length + time) * width + order)
    row, vector = row[sort], vector[sort]
    counts = torch.bincount(row, minlength=batch)  # (B,)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(row.shape[0], device=row.device) - starts[row]
    size = int(counts.max())
    context = vector.new_zeros((batch, size, vector.shape[-1])).index_put((row, slot), vector)
    mask = torch.zeros((batch, size), dtype=torch.bool, device=row.device).index_put(
        (row, slot), torch.ones_like(slot, dtype=torch.bool)
    )
    return context, mask


def count_parameters(config: CrossAttentionConfig, *, hidden_size: int, num_layers: int) -> int:
    """The blocks' parameter count for an LLM of this size (built on the meta device: no memory)."""
    with torch.device("meta"):
        layers = GatedCrossAttentionLayers(config, hidden_size=hidden_size, num_layers=num_layers)
    return sum(p.numel() for p in layers.parameters())
