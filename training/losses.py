"""Loss terms and the loss book of a step. Each term returns a *sum* over its units; ``LossBook`` divides by the
count over the whole global batch, so gradient accumulation and several processes give the same update as one big
batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.examples import IGNORE_INDEX


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy summed over supervised positions, and their count."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    count = int((shift_labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, count


def caption_distance_sum(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Distance between conditioning and caption embeddings, summed over items.

    Args:
        pred, target: (G, L, D) or (G, D).
        kind: ``l2``: per item, the mean over tokens of the Euclidean distance of each token (NExT-GPT);
            ``mse``: per item, the mean squared error.
    """
    pred, target = pred.float(), target.float().to(pred.device)
    if pred.shape != target.shape:
        raise ValueError(f"conditioning {tuple(pred.shape)} and caption embeddings {tuple(target.shape)} differ")
    if pred.dim() == 2:
        pred, target = pred.unsqueeze(1), target.unsqueeze(1)
    if kind == "l2":
        per_item = (pred - target).norm(dim=-1).mean(dim=-1)
    elif kind == "mse":
        per_item = (pred - target).pow(2).mean(dim=(-1, -2))
    else:
        raise ValueError(f"unknown distance {kind!r}")
    return per_item.sum()


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for epsilon or v prediction."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=gamma) / snr
    if getattr(scheduler.config, "prediction_type", "epsilon") == "v_prediction":
        weight = torch.clamp(snr, max=gamma) / (snr + 1)
    return weight


class LossBook:
    """The loss terms of one optimizer step: their weights, their global counts and the sums seen so far.

    Each term's loss is its sum over the global batch divided by its count over the global batch (every process and
    every micro-batch), so gradient accumulation and several processes give the update of one big batch.

    Args:
        terms: the terms, in the order they are logged (``StageObjective.terms``); the first is in every sum.
        weights: each term's weight.
        counts: (len(terms),) each term's count over the global batch.
    """

    def __init__(self, terms: list[str], weights: dict[str, float], counts: torch.Tensor):
        self.terms = terms
        self.weights = weights
        self.counts = counts
        self.sums = torch.zeros(len(terms), device=counts.device)

    def loss(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """A micro-batch's share of the step's loss, from its sums (recorded for :meth:`means`)."""
        loss = parts[self.terms[0]] * 0.0  # always a tensor: every process runs backward (DDP)
        for j, name in enumerate(self.terms):
            if name in parts and self.counts[j] > 0:
                loss = loss + self.weights[name] * parts[name] / self.counts[j]
                self.sums[j] += parts[name].detach().float()
        return loss

    def means(self, totals: torch.Tensor | None = None) -> dict[str, float]:
        """Each term's mean over the global batch (``totals``: the sums added over every process; default: this
        process's own sums)."""
        totals = self.sums if totals is None else totals
        return {n: (totals[j] / self.counts[j]).item() for j, n in enumerate(self.terms) if self.counts[j] > 0}

    def total(self, means: dict[str, float]) -> float:
        """The weighted loss of the step, from :meth:`means`."""
        return sum(self.weights[n] * v for n, v in means.items())
