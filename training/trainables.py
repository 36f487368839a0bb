"""What trains in a run: which parts of ``AnyGPTModel`` (``Trainable``), the trainable rows of the embedding matrices
(``TokenRows``), and ``apply_trainable`` that freezes the rest. Each stage's defaults live with its objective
(``training.objectives``); a config's ``trainable:`` section overrides them. The model itself has no notion of a stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from training.config import TrainableConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trainable:
    """Which parts train: the input and output projectors, the LoRA adapters, which added token rows, the gated
    cross-attention blocks."""

    input_projectors: bool
    output_projectors: bool
    lora: bool
    token_rows: str  # none | signal | all
    # the gated cross-attention blocks (anygpt.core.fusion): True (the model must have them), False, or None (train them
    # when the model has them)
    cross_attention: bool | None = False


def resolve_trainable(defaults: Trainable, overrides: TrainableConfig) -> Trainable:
    """A stage's defaults with the config's explicit choices applied."""
    chosen = {k: v for k, v in vars(overrides).items() if v is not None}
    return replace(defaults, **chosen)


class TokenRows(nn.Module):
    """Trainable copies of chosen rows of the LLM's input embedding and LM head; every other row stays frozen.

    Forward hooks put the rows in place: the input embedding's output at those ids, and the LM head's logits of
    those ids (computed from the hidden states and the trainable rows). Only ``len(ids) x hidden`` values per
    matrix train and carry optimizer state, instead of the whole vocabulary (NExT-GPT trained both full matrices by
    accident). ``merge()`` writes the rows back into the matrices (before saving).
    """

    def __init__(self, language_model: nn.Module, ids: list[int]):
        super().__init__()
        self.register_buffer("ids", torch.tensor(sorted(ids), dtype=torch.long), persistent=False)
        emb = language_model.get_input_embeddings()
        head = language_model.get_output_embeddings()
        self.tied = head is not None and head.weight is emb.weight
        self.input_rows = nn.Parameter(emb.weight.detach()[self.ids].float().clone())
        self.output_rows = None
        if head is not None and not self.tied:
            self.output_rows = nn.Parameter(head.weight.detach()[self.ids].float().clone())
        lookup = torch.full((emb.weight.shape[0],), -1, dtype=torch.long)
        lookup[self.ids] = torch.arange(len(ids))
        self.register_buffer("lookup", lookup, persistent=False)
        self._handles = [emb.register_forward_hook(self._embedding_hook)]
        if head is not None:
            self._handles.append(head.register_forward_hook(self._head_hook))
        self._emb, self._head = emb, head

    def forward(self, which: str) -> torch.Tensor:
        """The rows (``"input"`` or ``"output"``). The hooks read them through this call, so wrappers that gather
        parameters around a module's forward (FSDP, ZeRO-3) see them used."""
        rows = self.input_rows if which == "input" or self.tied else self.output_rows
        return rows * 1.0

    def _embedding_hook(self, module, args, output):
        input_ids = args[0]
        index = self.lookup.to(input_ids.device)[input_ids]
        hit = index >= 0
        table = self("input")
        if not bool(hit.any()):
            return output + 0.0 * table.sum().to(output.dtype)  # keep the rows in the graph (DDP)
        rows = table.to(output.dtype)[index.clamp(min=0)]
        return torch.where(hit.unsqueeze(-1), rows, output)

    def _head_hook(self, module, args, output):
        hidden = args[0]
        rows = self("output")
        logits = hidden.to(rows.dtype) @ rows.t()  # (..., n)
        bias = getattr(module, "bias", None)
        if bias is not None:
            logits = logits + bias[self.ids].to(logits.dtype)
        output = output.clone()
        output[..., self.ids] = logits.to(output.dtype)
        return output

    @torch.no_grad()
    def merge(self) -> None:
        """Copy the trained rows into the embedding matrices (the hooks keep working; the result is the same)."""
        self._emb.weight[self.ids] = self.input_rows.to(self._emb.weight.dtype)
        if self.output_rows is not None:
            self._head.weight[self.ids] = self.output_rows.to(self._head.weight.dtype)

    def remove(self) -> None:
        """Merge, then remove the hooks."""
        self.merge()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def token_row_ids(model, which: str) -> list[int]:
    if which == "none":
        return []
    if which == "signal":
        return sorted(model.tokens.all_signal_ids)
    return list(model.tokens.all_added_ids)


def apply_trainable(model, trainable: Trainable) -> TokenRows | None:
    """Freeze everything, then unfreeze what ``trainable`` names. Returns the token-rows module (or None)."""
    model.requires_grad_(False)
    if trainable.input_projectors:
        if not len(model.input_projectors):
            raise ValueError("this run trains the input projectors, but the model has none")
        model.input_projectors.requires_grad_(True)
    if trainable.output_projectors:
        if not len(model.output_projectors):
            raise ValueError("this run trains the output projectors, but the model has none (no decoders)")
        model.output_projectors.requires_grad_(True)
    if trainable.lora:
        names = [n for n, _ in model.language_model.named_parameters() if "lora_" in n]
        if not names:
            raise ValueError("this run trains LoRA, but the language model has no adapter (set `lora:` or llm.lora)")
        for name, param in model.language_model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
    if trainable.cross_attention and model.cross_attention is None:
        raise ValueError(
            "this run trains the gated cross-attention blocks, but the model has none (set cross_attention.every)"
        )
    if trainable.cross_attention is not False and model.cross_attention is not None:
        model.cross_attention.requires_grad_(True)
    ids = token_row_ids(model, trainable.token_rows)
    rows = TokenRows(model.language_model, ids) if ids else None
    for param in model.parameters():  # trainable weights in float32 (mixed precision autocasts the compute)
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return rows
