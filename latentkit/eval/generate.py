"""Batched generation for evaluation: left padding, KV cache, greedy or sampled decoding, stop strings.

One forward per step for the whole batch. What goes into the model after each sampled token is decided by a
`StepFunction`: the default feeds the token's embedding; methods with latent decoding (Monet, VaLR) plug in
their own step function, which may feed a hidden state instead of a token (DESIGN.md, "Latent engine").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from transformers import DynamicCache

from latentkit.backbone import Backbone
from latentkit.errors import ConfigError
from latentkit.layout import Layout, collate, inputs_embeds
from latentkit.masks import causal_mask, with_padding

FinishReason = Literal["eos", "stop", "length"]
# Enough trailing tokens to hold any stop string once decoded; the text is re-checked in full on a hit.
_STOP_WINDOW_TOKENS = 16


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


@dataclass
class Generation:
    """One sequence's output: `token_ids` as sampled (stop text included), `text` cut before any stop string."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    extras: dict[str, object] = field(default_factory=dict)  # filled by step functions (latents, triggers)
    steps: int = 0  # decoding steps used, latent steps (which emit no token) included


@dataclass
class DecodeState:
    """What a step function sees: the step, finished rows, and the tokens sampled so far per row."""

    step: int
    finished: torch.Tensor  # bool [B]
    token_ids: list[list[int]]


@dataclass(frozen=True)
class StepOutput:
    """`next_embeds` [B, D] go into the next forward; `emitted` [B] is the token to append (-1: none)."""

    next_embeds: torch.Tensor
    emitted: torch.Tensor


class StepFunction(Protocol):
    """Decides, from the sampled tokens and the last post-norm hidden states, what the model reads next."""

    def __call__(
        self, backbone: Backbone, sampled: torch.Tensor, hidden: torch.Tensor, state: DecodeState
    ) -> StepOutput: ...

    def finish(self, generations: list[Generation]) -> None: ...


class TokenStep:
    """Plain decoding: append the sampled token and read its embedding next."""

    def __call__(
        self, backbone: Backbone, sampled: torch.Tensor, hidden: torch.Tensor, state: DecodeState
    ) -> StepOutput:
        return StepOutput(backbone.embed(sampled), sampled)

    def finish(self, generations: list[Generation]) -> None:
        return None


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Token ids [B] from logits [B, V]: argmax when greedy, else temperature -> top-k -> top-p -> multinomial."""
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    scores = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
        drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= params.top_p
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stop_tokens(backbone: Backbone) -> set[int]:
    """End of turn and end of text both end a generation."""
    ids = {backbone.token_id(backbone.chat.im_end)}
    if backbone.tokenizer.eos_token_id is not None:
        ids.add(int(backbone.tokenizer.eos_token_id))
    return ids


def left_pad(
    layouts: Sequence[Layout], backbone: Backbone
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt embeddings [B, L, D], position ids ([B, L] or [3, B, L]) and validity [B, L], left-padded."""
    batch = collate(list(layouts), pad_id=backbone.token_id(backbone.chat.pad)).to(backbone.device)
    embeds = inputs_embeds(backbone, batch)
    positions, valid = batch.position_ids.clone(), batch.valid.clone()
    length = embeds.shape[1]
    for row, layout in enumerate(layouts):
        shift = length - len(layout)
        embeds[row] = torch.roll(embeds[row], shift, dims=0)
        positions[..., row, :] = torch.roll(positions[..., row, :], shift, dims=-1)
        valid[row] = torch.roll(valid[row], shift, dims=0)
    return embeds, positions, valid


@torch.no_grad()
def generate(
    backbone: Backbone,
    layouts: Sequence[Layout],
    params: SamplingParams,
    step_function: StepFunction | None = None,
) -> list[Generation]:
    """Continue every prompt layout; all rows decode together, one forward per step, with a KV cache."""
    step_function = step_function or TokenStep()
    generator = None
    if params.temperature > 0.0:
        generator = torch.Generator(device=backbone.device).manual_seed(params.seed)
    embeds, positions, valid = left_pad(layouts, backbone)
    size = embeds.shape[0]
    next_position = positions.amax(dim=-1).reshape(-1, size).amax(dim=0) + 1  # [B]
    cache = DynamicCache(config=backbone.hf_model().config)
    out = backbone.forward(embeds, positions, with_padding(causal_mask(size, valid.shape[1]), valid), cache)
    eos = torch.tensor(sorted(stop_tokens(backbone)), device=backbone.device)
    finished = torch.zeros(size, dtype=torch.bool, device=backbone.device)
    token_ids: list[list[int]] = [[] for _ in range(size)]
    reasons: list[FinishReason] = ["length"] * size
    texts: list[str | None] = [None] * size
    steps_used = torch.zeros(size, dtype=torch.long, device=backbone.device)
    for step in range(params.max_new_tokens):
        hidden = out.last_hidden_state[:, -1]
        sampled = sample_next(backbone.logits(hidden), params, generator)
        state = DecodeState(step, finished.clone(), token_ids)
        decided = step_function(backbone, sampled, hidden, state)
        steps_used += ~finished
        emitted = decided.emitted.masked_fill(finished, -1)
        is_eos = torch.isin(emitted, eos).tolist()
        for row, token in enumerate(emitted.tolist()):
            if token < 0:
                continue
            token_ids[row].append(token)
            if is_eos[row]:
                finished[row], reasons[row] = True, "eos"
            elif params.stop_strings:
                stopped = _cut_at_stop(backbone, token_ids[row], params.stop_strings)
                if stopped is not None:
                    finished[row], reasons[row], texts[row] = True, "stop", stopped
        if bool(finished.all()) or step + 1 == params.max_new_tokens:
            break
        valid = torch.cat([valid, torch.ones(size, 1, dtype=torch.bool, device=valid.device)], dim=1)
        step_positions = next_position + step
        step_positions = (
            step_positions.view(1, size, 1).expand(3, size, 1)
            if positions.dim() == 3
            else step_positions[:, None]
        )
        mask = with_padding(causal_mask(size, valid.shape[1]), valid)
        out = backbone.forward(decided.next_embeds[:, None].to(embeds.dtype), step_positions, mask, out.cache)
    generations = []
    for row in range(size):
        ids = token_ids[row][:-1] if reasons[row] == "eos" else token_ids[row]
        text = (
            texts[row]
            if texts[row] is not None
            else backbone.tokenizer.decode(ids, skip_special_tokens=False)
        )
        generations.append(Generation(token_ids[row], text, reasons[row], steps=int(steps_used[row])))
    step_function.finish(generations)
    return generations


def _cut_at_stop(backbone: Backbone, ids: list[int], stop_strings: tuple[str, ...]) -> str | None:
    """The text before the first stop string, or None when no stop string has appeared yet."""
    tail = backbone.tokenizer.decode(ids[-_STOP_WINDOW_TOKENS:], skip_special_tokens=False)
    if not any(stop in tail for stop in stop_strings):
        return None
    text = backbone.tokenizer.decode(ids, skip_special_tokens=False)
    return text[: min(text.index(stop) for stop in stop_strings if stop in text)]
