"""Q-Former pretraining: BLIP-2's representation learning of Q-Former input projectors (``--stage 0``, optional,
before stage 1).

Li et al. 2023 (BLIP-2), section 3.2: before the Q-Former meets the LLM, it learns to pull out of the frozen
encoder's features what text can say about them, with three objectives that share its self-attention layers
between the learned queries and the text:

* **ITC**, image-text contrastive: the text's CLS output against every query output (max over the queries),
  a symmetric cross-entropy over the batch; text and queries do not see each other (unimodal masks).
* **ITM**, image-text matching: queries and text see each other (bidirectional mask); a Linear(hidden, 2) head on
  the query outputs, averaged, says matched or not, for the true pairs and for in-batch hard negatives. BLIP-2 draws
  the negatives by softmax over the ITC similarity; this module takes the argmax (the hardest non-matching caption of
  each media item and the hardest non-matching media item of each caption), which is deterministic and testable.
* **ITG**, image-grounded text generation: the text, led by a DEC token, attends causally to the previous text and
  to all queries, the queries only to each other; cross-entropy of the next text token (an LM head tied to the
  text embeddings).

The Q-Former is the input projector's own ``Blip2QFormerModel`` and learned queries (shared, so what trains here
is what stage 1 starts from); this module adds what BLIP-2 drops for the LLM stage: the text embeddings (over the
LLM tokenizer's vocabulary, plus CLS and DEC), each layer's text feed-forward block (initialised from the query
feed-forward, as both come from the same BERT weights in BLIP-2), the ITC projections and temperature, the ITM head
and the LM head. The trainer checkpoints them with the projectors (so a run resumes) but ``final/`` holds only the
model with its pre-trained Q-Former projectors: ``anygpt train --stage 1 --from RUN/final`` continues.

Texts are the examples' supervised tokens: for a caption pair (pair task ``caption``), the caption and the end of
the reply. Negatives and contrast are in-batch, per micro-batch and per modality (BLIP-2 gathers them over GPUs).
Every loss term returns a sum over pairs; the trainer divides by the number of pairs in the global batch.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.blip_2.modeling_blip_2 import (
    Blip2QFormerIntermediate,
    Blip2QFormerOutput,
    Blip2TextEmbeddings,
)

from anygpt.base.modality import Modality
from projectors.qformer import QFormerInputProjector
from training.config import Blip2LossConfig
from training.examples import IGNORE_INDEX

logger = logging.getLogger(__name__)

#: the Q-Former pretraining loss terms, in the order the trainer logs them.
BLIP2_LOSSES = ("itc", "itm", "itg")


def blip2_terms(weights: Blip2LossConfig) -> tuple[str, ...]:
    """The terms Q-Former pretraining computes: those with a weight > 0, in ``BLIP2_LOSSES`` order."""
    return tuple(name for name in BLIP2_LOSSES if getattr(weights, name) > 0)


class _TextFeedForward(nn.Module):
    """The text positions' feed-forward block of one Q-Former layer (transformers' BLIP-2 modules)."""

    def __init__(self, config):
        super().__init__()
        self.intermediate = Blip2QFormerIntermediate(config)
        self.output = Blip2QFormerOutput(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(hidden), hidden)


class Blip2Objectives(nn.Module):
    """BLIP-2's ITC, ITM and ITG around one ``QFormerInputProjector`` (whose Q-Former and queries it shares).

    Args:
        projector: the Q-Former input projector to pre-train (a registered submodule: ``parameters()`` covers it).
        vocab_size: the LLM tokenizer's size (captions are LLM token ids); CLS and DEC are added after it.
        pad_token_id: the tokenizer's padding id (its text embedding row gets no gradient), or None.
        embed_dim: size of the ITC projections (BLIP-2: 256).
        max_text_length: text positions (CLS or DEC included; BLIP-2: 32); longer captions are cut.

    Example:
        >>> objectives = Blip2Objectives(projector, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        >>> sums = objectives(tokens, [torch.tensor(ids) for ids in caption_ids])  # {"itc", "itm", "itg"}
    """

    def __init__(
        self,
        projector: QFormerInputProjector,
        *,
        vocab_size: int,
        pad_token_id: int | None = None,
        embed_dim: int = 256,
        max_text_length: int = 32,
    ):
        super().__init__()
        if not isinstance(projector, QFormerInputProjector):
            raise TypeError(f"BLIP-2 objectives need a QFormerInputProjector, got {type(projector).__name__}")
        if max_text_length < 2:
            raise ValueError(f"max_text_length must be >= 2 (CLS or DEC and one token), got {max_text_length}")
        self.projector = projector
        qformer = projector.qformer
        config = copy.deepcopy(qformer.config)
        config.vocab_size = vocab_size + 2
        config.max_position_embeddings = max_text_length
        config.pad_token_id = pad_token_id
        config.use_qformer_text_input = True
        hidden = config.hidden_size
        self.vocab_size = vocab_size
        self.cls_token_id = vocab_size  # leads the text of ITC and ITM (BERT's [CLS])
        self.dec_token_id = vocab_size + 1  # leads the text of ITG (BLIP-2's [DEC])
        self.pad_token_id = pad_token_id if pad_token_id is not None else 0
        self.max_text_length = max_text_length
        self.embeddings = Blip2TextEmbeddings(config)
        self.text_ffn = nn.ModuleList([_TextFeedForward(config) for _ in qformer.encoder.layer])
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.itm_head = nn.Linear(hidden, 2)
        self.lm_transform = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        )
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        self._init_weights(config.initializer_range)

    @torch.no_grad()
    def _init_weights(self, std: float) -> None:
        for module in (self.embeddings, self.vision_proj, self.text_proj, self.itm_head, self.lm_transform):
            for sub in module.modules():
                if isinstance(sub, nn.Linear | nn.Embedding):
                    sub.weight.normal_(0.0, std)
                if isinstance(sub, nn.Linear) and sub.bias is not None:
                    sub.bias.zero_()
        if self.embeddings.word_embeddings.padding_idx is not None:
            self.embeddings.word_embeddings.weight[self.embeddings.word_embeddings.padding_idx].zero_()
        for ffn, layer in zip(self.text_ffn, self.projector.qformer.encoder.layer, strict=True):
            ffn.intermediate.load_state_dict(layer.intermediate_query.state_dict())
            ffn.output.load_state_dict(layer.output_query.state_dict())

    # ------------------------------------------------------------------ inputs
    def text_inputs(self, captions: list[torch.Tensor], first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``first`` (CLS or DEC) + each caption, cut to ``max_text_length`` and right-padded.

        Returns:
            ids (B, T) and mask (B, T) (1 at real positions).
        """
        rows = [caption[: self.max_text_length - 1].tolist() for caption in captions]
        length = 1 + max(len(r) for r in rows)
        device = self.lm_bias.device
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            ids[i, : 1 + len(row)] = torch.tensor([first, *row], dtype=torch.long)
            mask[i, : 1 + len(row)] = 1
        return ids, mask

    @staticmethod
    def attention_mask(text_mask: torch.Tensor, num_queries: int, causal: bool, dtype: torch.dtype) -> torch.Tensor:
        """The additive self-attention mask over ``[queries; text]``: (B, 1, Q + T, Q + T).

        Bidirectional (ITC's text pass, ITM): every position sees every real position. Causal (ITG): queries see
        the queries only; text sees all queries and the real text up to itself.
        """
        batch, length = text_mask.shape
        total = num_queries + length
        keys = torch.cat([text_mask.new_ones(batch, num_queries), text_mask], dim=1).bool()  # (B, Q + T)
        allowed = keys[:, None, :].expand(batch, total, total)
        if causal:
            rule = torch.ones(total, total, dtype=torch.bool, device=text_mask.device)
            rule[:num_queries, num_queries:] = False  # queries do not see the text
            rule[num_queries:, num_queries:] = rule[num_queries:, num_queries:].tril()  # text sees earlier text
            allowed = allowed & rule
        mask = torch.zeros(batch, 1, total, total, dtype=dtype, device=text_mask.device)
        return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)

    # ------------------------------------------------------------------ the shared Q-Former
    def encode(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        media: torch.Tensor | None = None,
        *,
        causal: bool = False,
    ) -> torch.Tensor:
        """Run the projector's Q-Former over ``[queries; text]`` (``media`` given) or the text alone.

        The layers are the ``Blip2QFormerModel``'s own (self-attention, cross-attention for the query positions,
        the query feed-forward); the text positions go through this module's text feed-forward blocks, as in
        ``Blip2QFormerLayer`` built with ``use_qformer_text_input``. (The loop is written out because BLIP-2's ITG mask,
        causal text over bidirectional queries, is not one that ``Blip2QFormerModel.forward`` builds.)

        Args:
            text_ids, text_mask: (B, T).
            media: (B, N, D_tok) keys and values of the cross-attention (after the projector's ``spatial_pool``),
                or None for a text-only pass (query length 0, no cross-attention).
            causal: ITG's mask (see ``attention_mask``).

        Returns:
            (B, Q + T, hidden): the query outputs first (Q = 0 without media).
        """
        qformer = self.projector.qformer
        dtype = qformer.layernorm.weight.dtype
        queries = None
        if media is not None:
            queries = self.projector.query_tokens.expand(media.shape[0], -1, -1)
            media = media.to(dtype)
        hidden = self.embeddings(input_ids=text_ids, query_embeds=queries)
        hidden = qformer.dropout(qformer.layernorm(hidden.to(dtype)))
        num_queries = 0 if queries is None else queries.shape[1]
        mask = self.attention_mask(text_mask, num_queries, causal, dtype)
        for layer, text_ffn in zip(qformer.encoder.layer, self.text_ffn, strict=True):
            attended = layer.attention(hidden, attention_mask=mask)
            parts = []
            if num_queries:
                query = attended[:, :num_queries]
                if layer.has_cross_attention:
                    query = layer.crossattention(query, encoder_hidden_states=media)
                parts.append(layer.feed_forward_chunk_query(query))
            parts.append(text_ffn(attended[:, num_queries:]))
            hidden = torch.cat(parts, dim=1)
        return hidden

    def media_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The query outputs of a query-only pass (the projector's own path): (B, Q, hidden)."""
        return self.projector.query_features(tokens)

    def text_features(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The CLS output of a text-only pass: (B, hidden)."""
        return self.encode(text_ids, text_mask)[:, 0]

    def similarity(self, media_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """ITC similarity: for each media item and text, the max over the queries of the cosine similarity of
        the projected query output and the projected CLS output. (B_media, B_text), not divided by the temperature.
        """
        media = F.normalize(self.vision_proj(media_features), dim=-1)  # (B, Q, E)
        text = F.normalize(self.text_proj(text_features), dim=-1)  # (B', E)
        return torch.einsum("bqe,te->btq", media, text).amax(dim=-1)

    @staticmethod
    def hard_negatives(similarity: torch.Tensor, same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The hardest in-batch negatives by ITC similarity (BLIP-2 samples them by softmax; this takes the argmax).

        Args:
            similarity: (B, B) media x text.
            same: (B, B) bool, True where media item i and text j are a match (the diagonal, and equal captions).

        Returns:
            for each media item the index of its most similar non-matching text, and for each text the index of its
            most similar non-matching media item; -1 where there is none (all of the batch matches).
        """
        masked = similarity.masked_fill(same, float("-inf"))
        text_for_media = masked.argmax(dim=1)
        media_for_text = masked.argmax(dim=0)
        text_for_media[~(~same).any(dim=1)] = -1
        media_for_text[~(~same).any(dim=0)] = -1
        return text_for_media, media_for_text

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """ITG's next-token logits over the LLM vocabulary (tied to the text embeddings): (..., vocab_size)."""
        weight = self.embeddings.word_embeddings.weight[: self.vocab_size]
        return F.linear(self.lm_transform(hidden), weight, self.lm_bias)

    # ------------------------------------------------------------------ the losses
    def forward(
        self, tokens: torch.Tensor, captions: list[torch.Tensor], terms: tuple[str, ...] | list[str] = BLIP2_LOSSES
    ) -> dict[str, torch.Tensor]:
        """The loss sums of a batch of media-caption pairs.

        Args:
            tokens: (B, N, D_tok) encoder token sequences.
            captions: B 1-d tensors of LLM token ids (the pair's caption).
            terms: which of ``itc``, ``itm``, ``itg`` to compute.

        Returns:
            each asked term summed over the B pairs: ITC the mean of the two directions' cross-entropy, ITM the
            mean cross-entropy of the pair and its (up to) two hard negatives, ITG the mean next-token
            cross-entropy of the caption.
        """
        unknown = set(terms) - set(BLIP2_LOSSES)
        if unknown:
            raise ValueError(f"unknown BLIP-2 loss terms {sorted(unknown)}: expected some of {BLIP2_LOSSES}")
        if len(captions) != tokens.shape[0]:
            raise ValueError(f"{tokens.shape[0]} media items but {len(captions)} captions")
        batch = tokens.shape[0]
        ids, mask = self.text_inputs(captions, self.cls_token_id)
        same = (ids[:, None] == ids[None]).all(-1) & (mask[:, None] == mask[None]).all(-1)  # equal captions match
        media = self.projector.media_tokens(tokens)
        sums: dict[str, torch.Tensor] = {}
        if "itc" in terms or "itm" in terms:
            similarity = self.similarity(self.media_features(tokens), self.text_features(ids, mask))  # (B, B)
        if "itc" in terms:
            logits = similarity.float() / self.temp.clamp(0.001, 0.5)
            targets = same.float() / same.float().sum(dim=1, keepdim=True)  # symmetric: one for both directions
            media_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1)
            text_to_media = -(targets * logits.t().log_softmax(dim=1)).sum(dim=1)
            sums["itc"] = ((media_to_text + text_to_media) / 2).sum()
        if "itm" in terms:
            with torch.no_grad():
                text_for_media, media_for_text = self.hard_negatives(similarity.detach(), same)
            index = torch.arange(batch, device=ids.device)
            media_index = torch.cat([index, index, media_for_text.clamp(min=0)])
            text_index = torch.cat([index, text_for_media.clamp(min=0), index])
            joint = self.encode(ids[text_index], mask[text_index], media[media_index])
            num_queries = self.projector.config.num_queries
            logits = self.itm_head(joint[:, :num_queries]).mean(dim=1).float()  # (3B, 2)
            labels = torch.cat([index.new_ones(batch), index.new_zeros(2 * batch)])
            ce = F.cross_entropy(logits, labels, reduction="none").view(3, batch)
            present = torch.stack([torch.ones_like(ce[0]), text_for_media.ge(0).float(), media_for_text.ge(0).float()])
            sums["itm"] = ((ce * present).sum(dim=0) / present.sum(dim=0)).sum()
        if "itg" in terms:
            dec_ids = ids.clone()
            dec_ids[:, 0] = self.dec_token_id
            hidden = self.encode(dec_ids, mask, media, causal=True)[:, self.projector.config.num_queries :]
            logits = self.lm_logits(hidden[:, :-1]).float()  # position t predicts text token t + 1
            labels = dec_ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
            ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
            count = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
            sums["itg"] = (ce.sum(dim=1) / count).sum()
        return sums


# ---------------------------------------------------------------------------------------------- the trainer side
class QFormerPretrainingModule(nn.Module):
    """What the optimizer sees in Q-Former pretraining: the model (its Q-Former input projectors train) and one
    ``Blip2Objectives`` per input modality (their heads train and are checkpointed; ``final/`` never holds them).

    ``forward`` takes the trainer's micro-batch (the same tensors as ``StageModule``): each row's media item is
    found by its placeholder tokens, its caption is its supervised tokens.
    """

    def __init__(self, model, objectives: nn.ModuleDict, weights: Blip2LossConfig):
        super().__init__()
        self.model = model  # first: the shared projector parameters are named model.input_projectors.*
        self.objectives = objectives
        self.terms = blip2_terms(weights)

    @classmethod
    def for_model(cls, model, weights: Blip2LossConfig, *, seed: int) -> QFormerPretrainingModule:
        """One ``Blip2Objectives`` per input projector of ``model``, their heads drawn from ``seed``."""
        objectives = nn.ModuleDict()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, projector in model.input_projectors.items():
                objectives[name] = Blip2Objectives(
                    projector,
                    vocab_size=len(model.tokenizer),
                    pad_token_id=model.tokenizer.pad_token_id,
                    max_text_length=weights.max_text_length,
                )
        return cls(model, objectives, weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        media: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
        targets: dict | None = None,
        diffusion: dict | None = None,
        **unused,
    ) -> dict[str, torch.Tensor]:
        """Loss sums of one micro-batch: ``itc``, ``itm``, ``itg`` (those with a weight > 0), summed over pairs."""
        captions = [row[row != IGNORE_INDEX] for row in labels]
        sums: dict[str, torch.Tensor] = {}
        placeholders = self.model.tokens.placeholder
        for name, (_, tokens) in media.items():
            rows = (input_ids == placeholders[Modality(name)]).any(dim=1).nonzero().flatten().tolist()
            if tokens is None or len(rows) != tokens.shape[0]:
                raise RuntimeError(
                    f"Q-Former pretraining: {len(rows)} rows with {name} placeholders, "
                    f"{'no token sequences' if tokens is None else tokens.shape[0]} {name} items"
                )
            parts = self.objectives[name](tokens, [captions[i] for i in rows], self.terms)
            for term, value in parts.items():
                sums[term] = sums[term] + value if term in sums else value
        return sums
