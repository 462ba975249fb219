"""Monet's `method:` config section (arXiv 2511.21395; defaults are the paper's)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from latentkit.config import StrictModel
from latentkit.latent.fill import Feedback


class MonetConfig(StrictModel):
    latent_tokens: tuple[str, str, str] = (
        "<abs_vis_token>",
        "<abs_vis_token_pad>",
        "</abs_vis_token>",
    )  # start, slot, end
    observation_tags: tuple[str, str] = ("<observation>", "</observation>")
    num_latents: int = Field(8, gt=0)  # K latent slots per auxiliary image in training
    warmup_observation_weight: float = Field(2.0, ge=0.0)  # stage 1
    observation_weight: float = Field(4.0, ge=0.0)  # stages 2 and 3
    alignment_weight: float = Field(
        2.0, ge=0.0
    )  # alpha of stage 2 (the official code's effective value is 4)
    target_alignment_weight: float = Field(2.0, ge=0.0)  # stage 3
    # Ablation switches (stage 2): the paper's latent-only backprop, the observation alignment itself, and the
    # official code's cosine over the token axis instead of the hidden axis.
    latent_only_backprop: bool = True
    observation_alignment: bool = True
    cosine_axis: Literal["hidden", "token"] = "hidden"
    # Ours, not the paper's: the alignments' cosine after subtracting the targets' mean over the training samples
    # (per layer; in stage 3 also per latent slot). The raw targets share a large input-independent part (cross-input
    # cosine near 1), so the uncentred cosine is nearly satisfied by latents that carry nothing of the input.
    alignment_centre: bool = False
    train_observation_tags: bool = True  # stages 2-3; stage 1 ignores the tags (spec)
    # Choices the spec leaves open. Stage 1: whether the auxiliary image's vision-start token is a target. The spec's
    # labels ignore image tokens, and a Monet model never asks for an image (it opens a latent block instead).
    train_aux_vision_start: bool = False
    # Stage 2's controlled mask: whether the start token's row sees the auxiliary image (its hidden state is the
    # first latent); the K slot rows always do.
    start_sees_image: bool = True
    # Gradient through forward 1 (the latent fill) in stages 2 and 3: `full` ordinary backprop through the whole
    # feedback chain (the spec); `truncated` each latent through the forward that produced it, the latents it read
    # held constant (the official code); `none` no gradient into the fill (stage 2's latent-only alignment then
    # trains nothing).
    fill_gradient: Feedback = "full"
    cache_batch_size: int = Field(8, gt=0)  # batch of the teacher and target passes
    decode_latents: int | None = Field(None, gt=0)  # test-time K (default num_latents)
    # End a latent block early when the model samples the end token there (the official inference). Off by default:
    # training never targets a token at the first K-1 slots, so that choice is noise (measured: blocks of 1 latent).
    decode_stop_at_end: bool = False
    decode_force: bool = False  # every answer opens with a latent block
    # Stage vlpo (an RL stage, settings in `train.rl`): VLPO. A latent step's input z counts as a sample of
    # N(mu, sigma^2 I), mu the post-norm hidden state it is fed back from, so its ratio joins the token ratios.
    # Off: the latents are inputs, not actions, which is text-only GRPO (what the released code runs): the ablation.
    latent_actions: bool = True
    latent_sigma: float = Field(10.0, gt=0.0)
    rollout_latents: Literal["mean", "sample"] = (
        "mean"  # rollouts feed mu (the paper) or z = mu + sigma * eps
    )
