"""Loss terms. Each returns a *sum* over its units; the trainer divides by the count over the whole global batch,
so gradient accumulation and several processes give the same update as one big batch.
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
