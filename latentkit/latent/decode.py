"""Latent decoding: the per-sequence state machine of DESIGN.md ("Latent engine") as a `StepFunction` of the
evaluation generator. Text -> on a sampled start token, K latent steps (the post-norm last hidden state fed
back as the next input) -> the end token -> text.

Slot convention (specs/monet.md, **Decision**): the start token keeps its embedding; the K slots after it
read h(start), h(slot 1), ..., h(slot K-1); then the end token, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from latentkit.backbone import Backbone
from latentkit.eval.generate import DecodeState, Generation, StepOutput


@dataclass(frozen=True)
class LatentTokens:
    start: int
    end: int


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


@dataclass
class RowLatents:
    """What one generated sequence did in latent mode."""

    blocks: list[torch.Tensor] = field(default_factory=list)  # one [k, D] tensor per latent block (as fed)
    forced: bool = False

    @property
    def triggered(self) -> bool:
        return bool(self.blocks)


class LatentStep:
    """`StepFunction` for latent decoding. Knobs: `k` latent steps per block, `force` (the first generated token
    is the start token, so every answer uses latents), `stop_at_end` (a block ends early when the model samples
    the end token), and an `intervention` replacing each latent. Every finished row is kept in `rows`.
    """

    def __init__(
        self,
        tokens: LatentTokens,
        k: int,
        force: bool = False,
        stop_at_end: bool = True,
        intervention: Intervention | None = None,
    ):
        if k < 1:
            raise ValueError(f"latent steps per block must be at least 1, got k={k}")
        self.tokens, self.k, self.force = tokens, k, force
        self.stop_at_end, self.intervention = stop_at_end, intervention
        self.rows: list[RowLatents] = []
        self._live: list[RowLatents] = []
        self._block: list[list[torch.Tensor] | None] = []  # latents of the open block, None in text mode

    def __call__(
        self, backbone: Backbone, sampled: torch.Tensor, hidden: torch.Tensor, state: DecodeState
    ) -> StepOutput:
        if state.step == 0:
            self._live = [RowLatents() for _ in range(sampled.shape[0])]
            self._block = [None] * sampled.shape[0]
        sampled = sampled.clone()
        latent_rows: dict[int, torch.Tensor] = {}
        for row in range(sampled.shape[0]):
            if bool(state.finished[row]):
                continue
            block = self._block[row]
            if block is None:
                if self.force and state.step == 0 and int(sampled[row]) != self.tokens.start:
                    sampled[row] = self.tokens.start
                    self._live[row].forced = True
                if int(sampled[row]) == self.tokens.start:
                    self._block[row] = []
                continue
            ends_early = self.stop_at_end and block and int(sampled[row]) == self.tokens.end
            if len(block) == self.k or ends_early:
                sampled[row] = self.tokens.end
                self._live[row].blocks.append(torch.stack(block).float().cpu())
                self._block[row] = None
                continue
            latent = hidden[row] if self.intervention is None else self.intervention(hidden[row], len(block))
            block.append(latent)
            latent_rows[row] = latent
        next_embeds = backbone.embed(sampled)
        emitted = sampled
        if latent_rows:
            rows = torch.tensor(list(latent_rows), device=sampled.device)
            next_embeds = next_embeds.index_copy(
                0, rows, torch.stack(list(latent_rows.values())).to(next_embeds.dtype)
            )
            emitted = sampled.index_fill(0, rows, -1)
        return StepOutput(next_embeds, emitted)

    def finish(self, generations: list[Generation]) -> None:
        for row, generation in enumerate(generations):
            record, open_block = self._live[row], self._block[row]
            if open_block:  # cut off by the token budget inside a block
                record.blocks.append(torch.stack(open_block).float().cpu())
            generation.extras["latent_blocks"] = len(record.blocks)
            generation.extras["latent_steps"] = sum(int(block.shape[0]) for block in record.blocks)
            self.rows.append(record)
