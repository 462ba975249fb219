"""The GRPO family's losses as pure functions: group advantages (GRPO, RLOO, Dr. GRPO), the
clipped surrogate with dual clip and its aggregations, the k3 KL estimator, and the Gaussian log-density that
makes a latent input an action (VLPO).

Shapes: rewards and advantages [N] or [B] (one per rollout), log-probs and masks [B, T] (one per position).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

Estimator = Literal["grpo", "rloo", "dr_grpo"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def group_advantages(rewards: Tensor, group_size: int, estimator: Estimator) -> Tensor:
    """Float rewards [N], consecutive runs of `group_size` forming a group, to advantages [N].

    grpo: (r - mean) / (std + 1e-6), std unbiased (as `torch.std`); rloo: r - (sum - r) / (G - 1), the mean of
    the other members; dr_grpo: r - mean. grpo and rloo need G >= 2 (one rollout has no std and no others).
    """
    if estimator not in get_args(Estimator):
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {get_args(Estimator)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D [N] with N a multiple of group_size={group_size}, got shape {list(rewards.shape)}"
        )
    if group_size == 1 and estimator != "dr_grpo":
        raise ValueError(f"estimator {estimator!r} needs group_size >= 2 (a group of one has no baseline)")
    groups = rewards.reshape(-1, group_size)
    mean = groups.mean(-1, keepdim=True)
    if estimator == "grpo":
        advantages = (groups - mean) / (groups.std(-1, keepdim=True) + 1e-6)
    elif estimator == "rloo":
        advantages = groups - (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    else:
        advantages = groups - mean
    return advantages.reshape(-1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """sum(values where mask) / count(mask), 0 for an empty mask; `mask` bool or 0/1, broadcastable to `values`."""
    keep = mask.bool().expand_as(values)
    return torch.where(keep, values, 0).sum() / keep.sum().clamp_min(1)


def aggregate(values: Tensor, mask: Tensor, aggregation: Aggregation) -> Tensor:
    """Per-position values [B, T] under `mask` [B, T] to a scalar.

    token-mean: sum over masked positions / their count (long sequences weigh more).
    seq-mean-token-mean: the mean, over sequences with at least one masked position, of each one's masked mean.
    seq-mean-token-sum-norm (Dr. GRPO): sum over masked positions / (B * T), B the number of rows and T the padded
    length `values.shape[-1]`: a constant normaliser, so no sequence's tokens are scaled by its own length (pad
    to the configured maximum response length to keep it constant across batches).
    An empty mask gives 0.
    """
    keep = mask.bool()
    if aggregation == "token-mean":
        return masked_mean(values, keep)
    if aggregation == "seq-mean-token-mean":
        counts = keep.sum(-1)
        per_sequence = torch.where(keep, values, 0).sum(-1) / counts.clamp_min(1)
        return masked_mean(per_sequence, counts > 0)
    if aggregation == "seq-mean-token-sum-norm":
        return torch.where(keep, values, 0).sum() / values.numel()
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {get_args(Aggregation)}")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    aggregation: Aggregation,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO clipped surrogate, aggregated over `mask`, and its diagnostics.

    Per position, with A the sequence's advantage broadcast over T and ratio = exp(logp - old_logp):
    loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)), and where A < 0 with `dual_clip` set,
    min(loss, -A * dual_clip) (dual-clip PPO: a huge ratio on a bad action cannot make the loss unbounded).
    Aggregated as in `aggregate`.

    Diagnostics (detached, over masked positions): `clip_fraction`, positions where the clipped branch binds
    (A > 0 and ratio > 1 + clip_high, or A < 0 and ratio < 1 - clip_low; their gradient is 0);
    `dual_clip_fraction`, positions where the dual-clip cap binds (A < 0 and the loss exceeds -A * dual_clip);
    `ratio_mean`.
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp and mask must share one shape [B, T], got {list(logp.shape)}, "
            f"{list(old_logp.shape)}, {list(mask.shape)}"
        )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = {list(logp.shape[:1])}, got {list(advantages.shape)}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (a cap at -A * dual_clip on the ratio), got {dual_clip}")
    a = advantages.unsqueeze(-1).to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_position = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        dual_binds = (a < 0) & (per_position > -a * dual_clip)
        per_position = torch.where(dual_binds, -a * dual_clip, per_position)
    else:
        dual_binds = torch.zeros_like(mask, dtype=torch.bool)
    loss = aggregate(per_position, mask, aggregation)
    with torch.no_grad():
        metrics = {
            "clip_fraction": clip_fraction(logp, old_logp, advantages, mask, clip_low, clip_high),
            "dual_clip_fraction": masked_mean(dual_binds.to(logp.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def clip_fraction(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> Tensor:
    """The fraction of masked positions where the surrogate's clipped branch binds (A > 0 and ratio > 1 +
    clip_high, or A < 0 and ratio < 1 - clip_low), detached; `policy_loss`'s `clip_fraction` over any sub-mask
    (e.g. token and latent positions apart)."""
    with torch.no_grad():
        a = advantages.unsqueeze(-1).to(logp.dtype)
        ratio = torch.exp(logp - old_logp)
        binds = ((a > 0) & (ratio > 1.0 + clip_high)) | ((a < 0) & (ratio < 1.0 - clip_low))
        return masked_mean(binds.to(logp.dtype), mask)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """The k3 estimator of KL(policy || reference) per sampled position: exp(d) - d - 1 with d = ref_logp - logp.

    Elementwise, >= 0, and 0 exactly where the two agree.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def gaussian_logprob(z: Tensor, mu: Tensor, sigma: float) -> Tensor:
    """log N(z; mu, sigma^2 I) up to its constant: -||z - mu||^2 / (2 sigma^2), summed over the last (hidden) dim.

    The normalising constant -D/2 log(2 pi sigma^2) is left out: it cancels in ratios and in log-prob differences
    against a reference of the same sigma.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return -(z - mu).pow(2).sum(-1) / (2.0 * sigma**2)
