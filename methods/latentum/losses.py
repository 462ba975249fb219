"""LatentUM's MBAQ objective (spec "MBAQ"): the VQ loss of a product quantizer, and the behaviour KL between the
frozen VLM's next-token distributions given the original and given the quantized image features."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

KLDirection = Literal["forward", "reverse"]


def vq_loss(
    z: Tensor, z_q: Tensor, sq_distances: Tensor, commitment: float = 0.25, entropy_weight: float = 0.1
) -> Tensor:
    """z, z_q [..., C, d]: each vector's C chunks and their nearest codebook entries (gradient to the codebook);
    sq_distances [..., C, N]: squared distances of every chunk to its codebook's N entries.

    Per codebook c: mse(sg(z), z_q) + commitment * mse(z, sg(z_q)) - entropy_weight * H(p_c), p_c the mean over
    vectors of softmax(-sq_distances[..., c, :]); averaged over the C codebooks."""
    codebooks = z.shape[-2]
    z = z.reshape(-1, codebooks, z.shape[-1])
    z_q = z_q.reshape(-1, codebooks, z_q.shape[-1])
    sq_distances = sq_distances.reshape(-1, codebooks, sq_distances.shape[-1])
    codebook_term = (z.detach() - z_q).pow(2).mean(dim=(0, 2))
    commitment_term = (z - z_q.detach()).pow(2).mean(dim=(0, 2))
    mean_assignment = torch.softmax(-sq_distances, dim=-1).mean(0)  # [C, N]
    entropy = -torch.special.xlogy(mean_assignment, mean_assignment).sum(-1)
    return (codebook_term + commitment * commitment_term - entropy_weight * entropy).mean()


def behaviour_kl(
    original: Tensor, quantized: Tensor, direction: KLDirection = "forward", temperature: float = 1.0
) -> Tensor:
    """Per position [n], from logits [n, V]: KL(p || q) (`forward`) or KL(q || p) (`reverse`), with p = softmax(
    original / T) the unquantized model's distribution and q = softmax(quantized / T)."""
    log_p = F.log_softmax(original.float() / temperature, dim=-1)
    log_q = F.log_softmax(quantized.float() / temperature, dim=-1)
    first, second = (log_p, log_q) if direction == "forward" else (log_q, log_p)
    return (first.exp() * (first - second)).sum(-1)
