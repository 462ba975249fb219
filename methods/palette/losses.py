"""Reasoning Palette's VAE objective: L = ||h - h_hat||^2 + beta * KL(q(z|h) || N(0, I)), q = N(mu, diag exp(logvar))."""

from __future__ import annotations

from torch import Tensor


def vae_terms(h: Tensor, h_hat: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """Batch means of the two terms: the squared error summed over d ([B, d] each), and the closed-form KL to
    N(0, I) summed over k ([B, k] each): 0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)."""
    recon = (h - h_hat).pow(2).sum(-1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
    return recon.mean(), kl.mean()


def vae_loss(h: Tensor, h_hat: Tensor, mu: Tensor, logvar: Tensor, beta: float) -> Tensor:
    """Per sample, the squared error summed over d plus beta times the KL summed over k, averaged over the batch."""
    recon, kl = vae_terms(h, h_hat, mu, logvar)
    return recon + beta * kl
