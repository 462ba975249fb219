"""Losses shared by methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentkit.backbone import Backbone
from latentkit.layout import IGNORE_INDEX


def weighted_next_token_ce(
    backbone: Backbone, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """sum(w * ce) / sum(w) over target tokens (Monet, arXiv 2511.21395, stage 1); the hidden state at t predicts t+1.

    Logits are computed only at target positions, never for the whole sequence.
    """
    targets, target_weights = labels[:, 1:], weights[:, 1:]
    selected = targets != IGNORE_INDEX
    logits = backbone.logits(hidden[:, :-1][selected]).float()
    ce = F.cross_entropy(logits, targets[selected], reduction="none")
    w = target_weights[selected].to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1e-8), int(selected.sum())
