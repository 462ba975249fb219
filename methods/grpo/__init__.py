"""`grpo`: SFT, then GRPO-family RL on plain text traces (the baseline of latent methods' RL)."""

from latentkit.methods.grpo.method import GRPO, GRPOConfig

__all__ = ["GRPO", "GRPOConfig"]
