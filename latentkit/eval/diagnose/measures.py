"""Geometry of the latents: the raw cross-input cosine (the collapse score as the field reports it), its
centred counterpart, how far latents move when the input changes, and top-1 retrieval against an oracle.

`Latents` holds, per answered sample, its latent blocks ([k, D] each). Step index j pairs the j-th latent of
every block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

Latents = list[list[torch.Tensor]]  # per answer, its latent blocks ([k, D] each)


def _depth(latents: Latents) -> int:
    return max((block.shape[0] for blocks in latents for block in blocks), default=0)


def _at_step(latents: Latents, j: int) -> list[torch.Tensor]:
    """Per answer with a latent at step j, its latents there ([m, D], one per block long enough)."""
    return [
        torch.stack([b[j] for b in blocks if b.shape[0] > j]).double()
        for blocks in latents
        if any(b.shape[0] > j for b in blocks)
    ]


def cross_input_cosine(latents: Latents) -> tuple[float | None, int]:
    """Collapse score: mean cosine similarity over pairs of latents from different answers, and the pair count.

    Step index j pairs the j-th latent of every block; indices are pooled, weighted by their pair counts.
    Over unit vectors u owned by answers s, the cross pairs sum to (|sum u|^2 - sum_s |sum_{i in s} u_i|^2) / 2.
    """
    total, pairs = 0.0, 0
    for j in range(_depth(latents)):
        per_answer = [torch.nn.functional.normalize(v, dim=-1) for v in _at_step(latents, j)]
        everything = torch.cat(per_answer).sum(0).square().sum()
        within = sum(float(units.sum(0).square().sum()) for units in per_answer)
        counts = [units.shape[0] for units in per_answer]
        total += (float(everything) - within) / 2
        pairs += (sum(counts) ** 2 - sum(c * c for c in counts)) // 2
    return (total / pairs if pairs else None), pairs


def step_means(latents: Latents) -> torch.Tensor:
    """The mean latent at each step index within a block: [max block length, D]."""
    return torch.stack([torch.cat(_at_step(latents, j)).mean(0) for j in range(_depth(latents))]).float()


def centred(latents: Latents) -> Latents:
    """Every latent minus the mean latent of its step index (over all answers and blocks)."""
    means = step_means(latents)
    return [[block - means[: block.shape[0]].to(block) for block in blocks] for blocks in latents]


def between_input_fraction(latents: Latents) -> tuple[float | None, list[float | None]]:
    """The share of the latents' second moment that varies between inputs: with mu_j the mean latent at step
    j, sum ||x - mu_j||^2 / sum ||x||^2 over every latent x (at its step j); pooled, and per step index.
    0: every input gets the same latent (true collapse); a raw cosine of c between vectors of equal norm
    leaves a fraction of about 1 - c."""
    per_step, centred_total, raw_total = [], 0.0, 0.0
    for j in range(_depth(latents)):
        vectors = torch.cat(_at_step(latents, j))
        raw = float(vectors.square().sum())
        spread = float((vectors - vectors.mean(0)).square().sum())
        per_step.append(spread / raw if raw > 0 else None)
        centred_total, raw_total = centred_total + spread, raw_total + raw
    return (centred_total / raw_total if raw_total > 0 else None), per_step


def latent_statistics(latents: Latents) -> dict[str, Any]:
    """The collapse section of the report: raw and centred similarity, norms."""
    vectors = torch.cat([block for blocks in latents for block in blocks]).float()
    cosine, pairs = cross_input_cosine(latents)
    fraction, per_step = between_input_fraction(latents)
    centred_cosine, _ = cross_input_cosine(centred(latents))
    return {
        "cross_input_cosine": cosine,
        "pairs": pairs,
        "between_input_fraction": fraction,
        "between_input_fraction_per_step": per_step,
        "centred_cosine": centred_cosine,
        "latents": int(vectors.shape[0]),
        "mean_norm": float(vectors.norm(dim=-1).mean()),
        "mean_rms": float(vectors.square().mean(dim=-1).sqrt().mean()),
    }


@dataclass(frozen=True)
class Aligned:
    """The first latent block of the same samples under several runs, cut to a common number of steps and
    flattened: `matrices[r]` is [len(indices), steps * D]."""

    indices: list[int]
    steps: int
    matrices: list[torch.Tensor]


def aligned_first_blocks(runs: list[Latents], skip: int = 0) -> Aligned:
    """Samples whose first block has more than `skip` steps in every run; steps `skip`, ... of each, cut to
    the shortest."""
    indices = [i for i in range(len(runs[0])) if all(r[i] and r[i][0].shape[0] > skip for r in runs)]
    if not indices:
        return Aligned([], 0, [torch.zeros(0, 0) for _ in runs])
    steps = min(r[i][0].shape[0] - skip for r in runs for i in indices)
    matrices = [torch.stack([r[i][0][skip : skip + steps].flatten() for i in indices]).double() for r in runs]
    return Aligned(indices, steps, matrices)


def relative_change(reference: torch.Tensor, changed: torch.Tensor) -> float | None:
    """How far latents move, in units of how far apart different inputs' latents are:
    mean_s ||changed_s - reference_s||^2 / mean_{s != t} ||reference_s - reference_t||^2 (rows = samples).
    0: unchanged; about 1: as different as another input's latents. The denominator is 2n/(n-1) times the
    centred variance, so it measures change against the across-input spread, not against the norm."""
    n = reference.shape[0]
    if n < 2:
        return None
    spread = 2 * n / (n - 1) * float((reference - reference.mean(0)).square().sum(-1).mean())
    moved = float((changed - reference).square().sum(-1).mean())
    return moved / spread if spread > 0 else None


def retrieval_top1(latents: torch.Tensor, oracles: torch.Tensor, centre: bool = False) -> float:
    """Fraction of samples whose latent (row) is most cosine-similar to its own oracle (same row) among all
    samples' oracles; `centre` first subtracts each set's mean row. Chance is 1 / n."""
    if centre:
        latents, oracles = latents - latents.mean(0), oracles - oracles.mean(0)
    similarity = (
        torch.nn.functional.normalize(latents, dim=-1) @ torch.nn.functional.normalize(oracles, dim=-1).T
    )
    return float((similarity.argmax(-1) == torch.arange(latents.shape[0])).double().mean())
