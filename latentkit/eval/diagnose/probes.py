"""Linear probes: can a task attribute (from sample metadata) or the gold answer be read linearly from a
feature vector per sample? Closed-form ridge regression to one-hot labels, k-fold cross-validated with a
fixed seed, so every sample is predicted once by a probe that never saw it; compared with the majority
class of the same training folds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from latentkit.segments import Sample

# Metadata that names or answers the sample rather than describing its input.
NOT_ATTRIBUTES = frozenset({"dataset_name", "sample_id", "answer", "choices"})
MIN_PROBE_SAMPLES = 4


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float  # held-out, over every sample
    majority: float  # the training folds' majority class, held-out
    classes: int
    samples: int
    folds: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def categorical_attributes(samples: Sequence[Sample]) -> dict[str, list[str]]:
    """Metadata fields every sample has as a scalar, with 2 or more classes and each class on average held by
    at least two samples (fewer would make it an identifier): name -> per-sample class label."""
    found: dict[str, list[str]] = {}
    keys = set.intersection(*(set(s.metadata) for s in samples)) - NOT_ATTRIBUTES if samples else set()
    for key in sorted(keys):
        values = [s.metadata[key] for s in samples]
        if not all(isinstance(v, str | int | float | bool) for v in values):
            continue
        labels = [str(v) for v in values]
        if 2 <= len(set(labels)) <= len(labels) / 2:
            found[key] = labels
    return found


def ridge_probe(
    features: torch.Tensor, labels: Sequence[Hashable], folds: int = 5, seed: int = 0, ridge: float = 1.0
) -> ProbeResult | None:
    """Held-out accuracy of a linear probe features [n, F] -> labels; None with fewer than
    `MIN_PROBE_SAMPLES` samples or one class. Per fold: features standardised with the training rows'
    mean and std, weights W = X^T (X X^T + lambda I)^-1 (Y - mean Y) (the dual form, cheap when F >> n) with
    lambda = ridge * trace(X X^T) / n_train, prediction = argmax of X W + mean Y."""
    n = features.shape[0]
    classes = sorted(set(labels), key=str)
    if n < MIN_PROBE_SAMPLES or len(classes) < 2:
        return None
    folds = min(folds, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    targets = torch.tensor([classes.index(label) for label in labels])
    x = features.double()
    right = majority_right = 0
    for fold in range(folds):
        held = order[fold::folds]
        kept = [i for i in order if i not in set(held)]
        mean, std = x[kept].mean(0), x[kept].std(0).clamp_min(1e-8)
        train, test = (x[kept] - mean) / std, (x[held] - mean) / std
        onehot = torch.nn.functional.one_hot(targets[kept], len(classes)).double()
        gram = train @ train.T
        strength = ridge * float(gram.diagonal().mean()) + 1e-12
        dual = torch.linalg.solve(
            gram + strength * torch.eye(len(kept), dtype=x.dtype), onehot - onehot.mean(0)
        )
        predicted = (test @ train.T @ dual + onehot.mean(0)).argmax(-1)
        right += int((predicted == targets[held]).sum())
        common = Counter(targets[kept].tolist()).most_common()
        top = min(label for label, count in common if count == common[0][1])
        majority_right += int((targets[held] == top).sum())
    return ProbeResult(right / n, majority_right / n, len(classes), n, folds)


def variance_explained(features: torch.Tensor, labels: Sequence[Hashable]) -> float | None:
    """Share of the features' centred variance lying between the classes' means (eta squared):
    sum_c n_c ||mu_c - mu||^2 / sum_i ||x_i - mu||^2."""
    x = features.double()
    total = float((x - x.mean(0)).square().sum())
    if total <= 0:
        return None
    between = 0.0
    for label in set(labels):
        members = x[[i for i, other in enumerate(labels) if other == label]]
        between += members.shape[0] * float((members.mean(0) - x.mean(0)).square().sum())
    return between / total
