"""What a decoding policy tells the engine a row does next (docs/design.md, "Decoding").

Each step the engine proposes, per live row, a token sampled from the row's current output head; the policy
answers with a `Step`: feed a token (the proposal or one it forces), feed continuous vectors (latent steps, a
prefix, projected image codes), or finish. A step may first rewind the row to an earlier length (the cache
past it is hidden, the trajectory cut), choose the head for the next proposal, and attach per-token extras
that reach the backbone's layers through `Backbone.forward(extras=...)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from latentkit.layout import Kind

LM_HEAD = "lm"


@dataclass(frozen=True)
class Token:
    """Feed token `id`. `forced`: the policy chose it, so it is not a sample (no log-prob is an action)."""

    id: int
    forced: bool = False
    kind: int = int(Kind.TEXT)
    emit: bool = True  # part of the text the row writes


@dataclass(frozen=True)
class Embeddings:
    """Feed vectors [n, D]. `placeholder` is the token id recorded at their positions (so a replay can name
    them); `log_prob` [n] is the density the policy declares for them, or None when they are not actions.
    `positions`: their rotary positions, [n] or M-RoPE's (temporal, height, width) [3, n], e.g. an image's 2-D
    grid; None: the row's next n positions. The row then continues one past the largest of the last one's.
    `caption`: how `latentkit generate` shows the run of vectors instead of their nearest tokens."""

    vectors: torch.Tensor
    kind: int
    placeholder: int
    log_prob: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    caption: str | None = None


@dataclass(frozen=True)
class Finish:
    """End the row now, feeding nothing; `reason` becomes the trajectory's finish reason."""

    reason: str = "policy"


@dataclass(frozen=True)
class Step:
    action: Token | Embeddings | Finish
    rewind_to: int | None = None  # drop the row's positions from this index on (prompt included) first
    head: str = LM_HEAD  # the head whose logits propose the row's next token
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)  # per fed position, [n] each


@dataclass(frozen=True)
class Proposal:
    """What the engine offers a live row: a token sampled from `head`, its log-prob, and the post-norm last
    hidden state it came from (the state a latent step feeds back)."""

    token: int
    log_prob: float
    hidden: torch.Tensor
    head: str
