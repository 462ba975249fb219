"""Latent decoding: the per-row state machine of DESIGN.md ("Latent engine") as a policy of the decoding
engine. Text -> on a sampled start token, K latent steps (the post-norm last hidden state fed back as the next
input) -> the end token -> text. The latents live in each row's trajectory (continuous positions of kind
`Kind.LATENT`), so a rollout replays exactly.

Slot convention (specs/monet.md, **Decision**): the start token keeps its embedding; the K slots after it
read h(start), h(slot 1), ..., h(slot K-1); then the end token, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import torch

from latentkit.backbone import Backbone
from latentkit.decoding import DecodingPolicy, Embeddings, Proposal, RowView, Step, Token, Trajectory
from latentkit.layout import Kind, Layout


@dataclass(frozen=True)
class LatentTokens:
    start: int
    end: int
    slot: int  # the placeholder id recorded at latent positions (the training layout's slot token)


class Intervention(Protocol):
    """Replaces a latent before the model reads it (diagnostics); `step` is its index inside its block."""

    name: str

    def __call__(self, latent: torch.Tensor, step: int) -> torch.Tensor: ...


@dataclass
class Zeros:
    name: str = "zeros"

    def __call__(self, latent: torch.Tensor, step: int) -> torch.Tensor:
        return torch.zeros_like(latent)


@dataclass
class Constant:
    """The same vector for every input and step."""

    vector: torch.Tensor
    name: str = "constant"

    def __call__(self, latent: torch.Tensor, step: int) -> torch.Tensor:
        return self.vector.to(latent)


@dataclass
class Noise:
    """Gaussian noise with the latent's own root-mean-square, so only the content changes, not the scale."""

    seed: int = 0
    name: str = "noise"
    generator: torch.Generator | None = None

    def __call__(self, latent: torch.Tensor, step: int) -> torch.Tensor:
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(latent.shape, generator=self.generator).to(latent)
        return noise * latent.float().pow(2).mean().sqrt().to(latent)


@dataclass
class DatasetMean:
    """The mean latent at each step index over a set of generations (`means` [K, D]; later steps use the last)."""

    means: torch.Tensor
    name: str = "dataset_mean"

    def __call__(self, latent: torch.Tensor, step: int) -> torch.Tensor:
        return self.means[min(step, self.means.shape[0] - 1)].to(latent)


@runtime_checkable
class ContinuousPolicy(Protocol):
    """A policy that emits continuous steps and can be varied for diagnostics: test-time K, forcing, and an
    intervention on every continuous input. `latentkit diagnose` works on any method whose policy is one."""

    k: int
    force: bool
    kind: int  # the segment kind of its continuous positions

    def varied(
        self, k: int | None = None, force: bool | None = None, intervention: Intervention | None = None
    ) -> ContinuousPolicy: ...


@dataclass
class LatentPolicy(DecodingPolicy):
    """Knobs: `k` latent steps per block, `force` (the first generated token is the start token, so every
    answer uses latents), `stop_at_end` (a block ends early when the model samples the end token), and an
    `intervention` replacing each latent before the model reads it."""

    tokens: LatentTokens
    k: int
    force: bool = False
    stop_at_end: bool = True
    intervention: Intervention | None = None
    kind: int = int(Kind.LATENT)
    forced_rows: list[bool] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"latent steps per block must be at least 1, got k={self.k}")

    def varied(
        self, k: int | None = None, force: bool | None = None, intervention: Intervention | None = None
    ) -> LatentPolicy:
        return replace(
            self,
            k=self.k if k is None else k,
            force=self.force if force is None else force,
            intervention=intervention,
        )

    def begin(self, backbone: Backbone, prompts: list[Layout]) -> None:
        self.forced_rows = [False] * len(prompts)

    def decide(self, proposal: Proposal, view: RowView) -> Step:
        trajectory, start = view.trajectory, self.tokens.start
        open_block = _open_block(trajectory, self.tokens, self.kind)
        if open_block is None:
            if self.force and view.step == 0 and proposal.token != start:
                self.forced_rows[view.row] = True
                return Step(Token(start, forced=True, kind=self.kind))
            kind = self.kind if proposal.token == start else int(Kind.TEXT)
            return Step(Token(proposal.token, kind=kind))
        ends_early = self.stop_at_end and open_block > 0 and proposal.token == self.tokens.end
        if open_block == self.k or ends_early:
            return Step(Token(self.tokens.end, forced=not ends_early, kind=self.kind))
        latent = proposal.hidden
        if self.intervention is not None:
            latent = self.intervention(latent, open_block)
        return Step(Embeddings(latent[None], self.kind, self.tokens.slot))

    def end(self, trajectories: list[Trajectory]) -> None:
        for row, trajectory in enumerate(trajectories):
            blocks = trajectory.blocks(self.kind)
            trajectory.extras["latent_blocks"] = len(blocks)
            trajectory.extras["latent_steps"] = sum(int(block.shape[0]) for block in blocks)
            trajectory.extras["latent_forced"] = self.forced_rows[row]


def _open_block(trajectory: Trajectory, tokens: LatentTokens, kind: int) -> int | None:
    """Latents fed so far in the row's open block, or None in text mode."""
    count = 0
    for index in range(len(trajectory) - 1, -1, -1):
        if trajectory.kinds[index] != kind:
            return None
        token = trajectory.input_ids[index]
        if index in trajectory.vectors:
            count += 1
        elif token == tokens.start:
            return count
        else:
            return None
    return None
