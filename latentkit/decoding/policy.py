"""The decoding policy: per row and step, what the row feeds next (`latentkit.decoding.actions`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from latentkit.backbone import Backbone
from latentkit.decoding.actions import LM_HEAD, Proposal, Step, Token
from latentkit.decoding.trajectory import Trajectory
from latentkit.layout import Layout

Head = Callable[[torch.Tensor], torch.Tensor]  # post-norm hidden states [n, D] -> logits [n, V]


@dataclass(frozen=True)
class RowView:
    """What a policy sees of one row: the step, its index in the batch, its length (prompt included) and the
    trajectory so far (read-only by convention)."""

    step: int
    row: int
    length: int
    trajectory: Trajectory


class DecodingPolicy:
    """Plain decoding: feed the proposed token. Subclasses override `decide` and, if they need them,
    `heads` (extra output heads by name), `begin` (fresh per-row state) and `end` (record extras)."""

    def heads(self, backbone: Backbone) -> Mapping[str, Head]:
        return {LM_HEAD: backbone.logits}

    def begin(self, backbone: Backbone, prompts: list[Layout]) -> None:
        return None

    def decide(self, proposal: Proposal, view: RowView) -> Step:
        return Step(Token(proposal.token))

    def end(self, trajectories: list[Trajectory]) -> None:
        return None
