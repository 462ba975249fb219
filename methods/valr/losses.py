"""VaLR's alignment (README.md, "VaLR"): a latent segment's K hidden states as a sqrt(K) x sqrt(K) grid, upsampled
to an encoder's patch grid, projected, and compared to the encoder's patch features by cosine (REPA)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def grid_side(k: int) -> int:
    """The side of the square grid K latents form; a K that is not a perfect square is an error."""
    side = math.isqrt(k)
    if side * side != k:
        raise ValueError(
            f"K={k} latents do not form a square grid; use a perfect square (1, 4, 9, 16, 25, ...)"
        )
    return side


def grid_upsample(latents: Tensor, grid: tuple[int, int]) -> Tensor:
    """[N, K, D] latents, read row-major as a sqrt(K) x sqrt(K) grid, bilinearly resized (align_corners=False) to
    `grid` = (H, W): [N, H*W, D] in row-major patch order."""
    count, k, dim = latents.shape
    side = grid_side(k)
    image = latents.transpose(1, 2).reshape(count, dim, side, side)
    resized = F.interpolate(image, size=grid, mode="bilinear", align_corners=False)
    return resized.reshape(count, dim, grid[0] * grid[1]).transpose(1, 2)


def repa_loss(predicted: Tensor, target: Tensor) -> Tensor:
    """[N, P, E] each: minus the mean, over patches and rows, of the cosine over the last dimension."""
    return -F.cosine_similarity(predicted, target.to(predicted.dtype), dim=-1).mean()
