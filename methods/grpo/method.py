"""`grpo`: stage `sft` (chain-of-thought SFT; a text-only trace by default, so the model never asks for an image
it cannot get at test time), then stage `grpo`, an RL stage (`latentkit.rl`): rollouts, rewards, group
advantages, clipped updates with a KL to the frozen SFT model. The estimator (GRPO, RLOO, Dr. GRPO) and every
other RL setting is `train.rl`; this method only names the stages. On any backbone."""

from __future__ import annotations

from typing import ClassVar

from latentkit.methods.sft.method import SFT, SFTConfig

from latentkit.registry import StageKind


class GRPOConfig(SFTConfig):
    aux_images: bool = False  # stage sft: drop auxiliary images from the trace


class GRPO(SFT):
    Config = GRPOConfig
    stages = ("sft", "grpo")
    stage_kinds: ClassVar[dict[str, StageKind]] = {"grpo": "rl"}
