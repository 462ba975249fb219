"""RL for latent reasoning: losses, rewards and the rollout-update loop."""

from latentkit.rl.losses import (
    aggregate,
    gaussian_logprob,
    group_advantages,
    k3_kl,
    masked_mean,
    policy_loss,
)

__all__ = [
    "aggregate",
    "gaussian_logprob",
    "group_advantages",
    "k3_kl",
    "masked_mean",
    "policy_loss",
]
