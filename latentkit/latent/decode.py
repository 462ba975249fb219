"""Latent decoding: the per-row state machine of docs/design.md ("Decoding") as a policy of the decoding
engine. Text -> on a sampled start token, K latent steps (the post-norm last hidden state fed back as the next
input) -> the end token -> text. The latents live in each row's trajectory (continuous positions of kind
`Kind.LATENT`), so a rollout replays exactly.

Slot convention (README.md, "Monet": where the public code is wrong): the start token keeps its embedding; the K slots after it
read h(start), h(slot 1), ..., h(slot K-1); then the end token, as in training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar, runtime_checkable

import torch

from latentkit.backbone import Backbone
from latentkit.decoding import DecodingPolicy, Embeddings, Proposal, RowView, Step, Token, Trajectory
from latentkit.layout import Kind, Layout
from latentkit.rl.losses import gaussian_logprob
from latentkit.segments import SampleKey


@dataclass(frozen=True)
class LatentTokens:
    start: int
    end: int
    slot: int  # the token id recorded at latent positions: the training layout's slot token


class Intervention(Protocol):
    """Replaces a latent before the model reads it (diagnostics). `step` is its index inside its block; `key`
    is the (dataset, sample_id) of the row's sample, for replacements that depend on the sample (another
    sample's latents, an oracle). A policy calls it once per continuous input, in the order it feeds them."""

    name: str

    def __call__(self, latent: torch.Tensor, step: int, key: SampleKey) -> torch.Tensor: ...


@dataclass
class Identity:
    """The latent unchanged: decoding through the intervention path must reproduce the baseline exactly."""

    name: str = "identity"

    def __call__(self, latent: torch.Tensor, step: int, key: SampleKey) -> torch.Tensor:
        return latent


@dataclass
class Zeros:
    name: str = "zeros"

    def __call__(self, latent: torch.Tensor, step: int, key: SampleKey) -> torch.Tensor:
        return torch.zeros_like(latent)


@dataclass
class Constant:
    """The same vector for every input and step."""

    vector: torch.Tensor
    name: str = "constant"

    def __call__(self, latent: torch.Tensor, step: int, key: SampleKey) -> torch.Tensor:
        return self.vector.to(latent)


@dataclass
class Noise:
    """Gaussian noise with the latent's own root-mean-square, so only the content changes, not the scale."""

    seed: int = 0
    name: str = "noise"
    generator: torch.Generator | None = None

    def __call__(self, latent: torch.Tensor, step: int, key: SampleKey) -> torch.Tensor:
        noise = _gaussian(self, latent)
        return noise * latent.float().pow(2).mean().sqrt().to(latent)


@dataclass
class NormMatchedNoise:
    """A uniformly random direction scaled to the latent's own Euclidean norm."""

    seed: int = 0
    name: str = "norm_matched_noise"
    generator: torch.Generator | None = None

    def __call__(self, latent: torch.Tensor, step: int, key: SampleKey) -> torch.Tensor:
        direction = _gaussian(self, latent).float()
        return (direction / direction.norm() * latent.float().norm()).to(latent)


@dataclass
class MomentMatchedNoise:
    """Gaussian noise standardised over the hidden dimension, then given the latent's own mean and standard
    deviation over that dimension (its per-vector first two moments)."""

    seed: int = 0
    name: str = "moment_matched_noise"
    generator: torch.Generator | None = None

    def __call__(self, latent: torch.Tensor, step: int, key: SampleKey) -> torch.Tensor:
        noise, source = _gaussian(self, latent).float(), latent.float()
        standard = (noise - noise.mean()) / noise.std()
        return (standard * source.std() + source.mean()).to(latent)


def _gaussian(owner: Noise | NormMatchedNoise | MomentMatchedNoise, latent: torch.Tensor) -> torch.Tensor:
    if owner.generator is None:
        owner.generator = torch.Generator().manual_seed(owner.seed)
    return torch.randn(latent.shape, generator=owner.generator).to(latent)


@dataclass
class DatasetMean:
    """The mean latent at each step index over a set of generations (`means` [K, D]; later steps use the last)."""

    means: torch.Tensor
    name: str = "dataset_mean"

    def __call__(self, latent: torch.Tensor, step: int, key: SampleKey) -> torch.Tensor:
        return self.means[min(step, self.means.shape[0] - 1)].to(latent)


@dataclass
class RepeatFirst:
    """Every step of a block is fed the block's first latent (the model's own, unchanged)."""

    name: str = "repeat_first"
    firsts: dict[SampleKey, torch.Tensor] = field(default_factory=dict, repr=False)

    def __call__(self, latent: torch.Tensor, step: int, key: SampleKey) -> torch.Tensor:
        if step == 0:
            self.firsts[key] = latent
        return self.firsts[key]


@dataclass
class Transplant:
    """Latents given per sample, block by block: `blocks[key]` holds the sample's blocks ([k, D] each). Step j
    of the row's b-th block is fed `blocks[key][b][j - shift]` (past the given blocks or steps, the last one);
    its first `shift` steps keep the model's own input. `shift=0` feeds latents as inputs (e.g. another
    sample's, a swap); `shift=1` feeds hidden states taken *at* latent slots (e.g. an oracle's), which the
    latent engine's feedback gives to the next slot, while the first slot keeps h(start). A sample without
    blocks is an error."""

    blocks: Mapping[SampleKey, Sequence[torch.Tensor]]
    shift: int = 0
    name: str = "transplant"
    opened: dict[SampleKey, int] = field(default_factory=dict, repr=False)  # blocks begun per sample

    def __call__(self, latent: torch.Tensor, step: int, key: SampleKey) -> torch.Tensor:
        given = self.blocks.get(key)
        if not given:
            raise KeyError(f"{self.name}: no latents given for sample {key}")
        if step == 0:
            self.opened[key] = self.opened.get(key, 0) + 1
        if step < self.shift:
            return latent
        block = given[min(self.opened[key], len(given)) - 1]
        return block[min(step - self.shift, block.shape[0] - 1)].to(latent)


@runtime_checkable
class ContinuousPolicy(Protocol):
    """A policy that emits continuous steps and can be varied for diagnostics: test-time K, forcing, and an
    intervention on every continuous input. `latentkit diagnose` works on any method whose policy is one."""

    k: int | None
    force: bool
    kind: int  # the segment kind of its continuous positions

    # `k` = 0 means blocks hold no continuous step (a latent method's start and end markers only); None, a block
    # as long as the policy makes it (e.g. an imagined image's whole grid); an intervention is called with each
    # row's sample key (`Intervention`).

    def varied(
        self, k: int | None = None, force: bool | None = None, intervention: Intervention | None = None
    ) -> ContinuousPolicy: ...


P = TypeVar("P", bound=ContinuousPolicy)


def varied_policy(policy: P, k: int | None, force: bool | None, intervention: Intervention | None) -> P:
    """`ContinuousPolicy.varied` for a dataclass policy: `k` and `force` kept where None, the intervention
    replaced (None: none)."""
    return replace(
        policy,  # type: ignore[type-var]
        k=policy.k if k is None else k,
        force=policy.force if force is None else force,
        intervention=intervention,
    )


@dataclass
class LatentPolicy(DecodingPolicy):
    """Knobs: `k` latent steps per block (0: the start token is followed at once by the end token), `force` (the first generated token is the start token, so every
    answer uses latents), `stop_at_end` (a block ends early when the model samples the end token), and an
    `intervention` replacing each latent before the model reads it.

    Latents as actions (RL): with `action_sigma` set, a latent step's input z is a sample of N(mu, sigma^2 I), mu
    the hidden state it is fed back from, and each step declares its log-density (`gaussian_logprob`) so the
    trajectory marks it an action. `sample_actions` feeds z = mu + sigma * eps (eps from `noise_seed`); otherwise
    the mean itself (log-density 0)."""

    tokens: LatentTokens
    k: int
    force: bool = False
    stop_at_end: bool = True
    intervention: Intervention | None = None
    kind: int = int(Kind.LATENT)
    action_sigma: float | None = None
    sample_actions: bool = False
    noise_seed: int = 0
    forced_rows: list[bool] = field(default_factory=list, init=False, repr=False)
    row_keys: list[SampleKey] = field(default_factory=list, init=False, repr=False)
    noise: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"latent steps per block must be at least 0, got k={self.k}")
        if self.action_sigma is not None and self.action_sigma <= 0:
            raise ValueError(f"action_sigma must be > 0, got {self.action_sigma}")
        if self.sample_actions and self.action_sigma is None:
            raise ValueError("sample_actions needs action_sigma (the Gaussian the latents are sampled from)")

    def varied(
        self, k: int | None = None, force: bool | None = None, intervention: Intervention | None = None
    ) -> LatentPolicy:
        return varied_policy(self, k, force, intervention)

    def begin(self, backbone: Backbone, prompts: list[Layout]) -> None:
        self.forced_rows = [False] * len(prompts)
        self.row_keys = [prompt.key for prompt in prompts]
        self.noise = torch.Generator().manual_seed(self.noise_seed) if self.sample_actions else None

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
        latent, log_prob = proposal.hidden, None
        if self.action_sigma is not None:
            mean = latent
            if self.noise is not None:
                eps = torch.randn(mean.shape, generator=self.noise).to(mean)
                latent = mean + self.action_sigma * eps
            log_prob = gaussian_logprob(latent.float(), mean.float(), self.action_sigma)[None]
        if self.intervention is not None:
            latent = self.intervention(latent, open_block, self.row_keys[view.row])
        return Step(Embeddings(latent[None], self.kind, self.tokens.slot, log_prob))

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
