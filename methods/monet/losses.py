"""Monet's alignment losses (arXiv 2511.21395, stages 2 and 3)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

CosineAxis = Literal["hidden", "token"]


def alignment_loss(
    students: list[torch.Tensor], teachers: list[torch.Tensor], axis: CosineAxis = "hidden"
) -> torch.Tensor:
    """Mean of 1 - cos(h_teacher, h_student) over layers and tokens; each item is one sample's [layers, n, D].

    `hidden`: cosine over the hidden dimension (the paper), averaged over every (layer, token) of the batch.
    `token`: the official code's `cosine_similarity` without `dim` on [layers, n, D], i.e. over the token axis,
    averaged over (layer, channel) per sample, then over samples.
    """
    pairs = [(s, t.to(s.dtype)) for s, t in zip(students, teachers, strict=True) if s.shape[1] > 0]
    if not pairs:
        return students[0].new_zeros(()) if students else torch.zeros(())
    for student, teacher in pairs:
        if student.shape != teacher.shape:
            raise ValueError(
                f"alignment: student {list(student.shape)} and teacher {list(teacher.shape)} differ"
            )
    if axis == "hidden":
        student = torch.cat([s for s, _ in pairs], dim=1).float()
        teacher = torch.cat([t for _, t in pairs], dim=1).float()
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    per_sample = [(1.0 - F.cosine_similarity(s.float(), t.float(), dim=1)).mean() for s, t in pairs]
    return torch.stack(per_sample).mean()


def latent_only_proxy(latents: torch.Tensor, leaf: torch.Tensor, align: torch.Tensor) -> torch.Tensor:
    """Paper eq. 9: g = dL_align/d(latents) (detached); proxy = sum <latents, g>.

    `leaf` is a detached copy of `latents` that forward 2 read (added to them with zero value), so g is read off
    it; `latents` keep forward 1's graph, so the alignment gradient reaches the weights only through them.
    """
    if not align.requires_grad:
        return latents.sum() * 0.0
    (gradient,) = torch.autograd.grad(align, leaf, retain_graph=True, allow_unused=True)
    if gradient is None:
        return latents.sum() * 0.0
    return (latents * gradient.detach().to(latents.dtype)).sum()
