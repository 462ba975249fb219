"""Sampling settings and the token distribution a decoding step samples from.

`policy_log_probs` is the one definition of "the sampling policy" used at sampling time and by replay:
temperature, then top-k, then top-p, then log-softmax. Greedy decoding (temperature 0) takes the argmax and
reports the model's own log-probability (temperature 1, no filters), so a greedy rollout still scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentkit.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """`temperature` 0 is greedy; `top_k` 0 and `top_p` 1 disable those filters."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": (self.max_new_tokens >= 1, "at least 1"),
            "temperature": (self.temperature >= 0.0, ">= 0 (0 = greedy)"),
            "top_p": (0.0 < self.top_p <= 1.0, "in (0, 1]"),
            "top_k": (self.top_k >= 0, ">= 0 (0 = off)"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ConfigError(f"sampling {name}={getattr(self, name)!r} is invalid; it must be {rule}")
        if any(not stop for stop in self.stop_strings):
            raise ConfigError("sampling stop_strings holds an empty string; every --stop must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def policy_log_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities [..., V] of the distribution tokens are sampled from (-inf where a filter drops one)."""
    scores = logits.float()
    if params.greedy:
        return scores.log_softmax(dim=-1)
    scores = scores / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= params.top_p
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return scores.log_softmax(dim=-1)


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B] from logits [B, V] and their log-probabilities under the sampling policy [B]."""
    log_probs = policy_log_probs(logits, params)
    if params.greedy:
        ids = logits.argmax(dim=-1)
    else:
        ids = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(-1)
    return ids, log_probs.gather(-1, ids[:, None]).squeeze(-1)
