"""Latent fill: each latent slot's input is the post-norm last hidden state of the position before it
(docs/design.md, "Decoding"; README.md, "Monet").

Batched with a KV cache. Every sample's sequence is cut at its slot positions into chunks
`[0, p1), [p1, p2), ..., [p(S-1), pS)`; step k runs chunk k of every sample in one forward (padded to the
longest), so a batch needs as many forwards as its longest sample has slots. Chunks sit back to back in the
cache with their padding after them, and the caller's `MaskSpec` (over sequence positions) is re-expressed
over cache indices, which keeps the sequence order of each sample's real tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import DynamicCache

from latentkit.backbone import Backbone
from latentkit.masks import MaskSpec

# How the fill's gradient flows: `full` through the whole feedback chain (each latent back into every earlier
# latent's forward); `truncated` each latent keeps the graph of the forward that produced it, with the earlier
# latents it read as constants; `none` no gradient into the fill.
Feedback = Literal["full", "truncated", "none"]


@dataclass
class FilledLatents:
    """`values[b, i]` is the input written into slot `positions[b, i]` (-1 and zeros past a sample's slots)."""

    values: torch.Tensor  # [B, S, D]
    positions: torch.Tensor  # long [B, S]

    def write(self, embeds: torch.Tensor) -> torch.Tensor:
        """`embeds` with every slot replaced by its latent (out of place, so gradients flow into the values)."""
        index = self.positions.clamp_min(0).unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
        present = (self.positions >= 0).unsqueeze(-1)
        original = embeds.gather(1, index)
        return embeds.scatter(1, index, torch.where(present, self.values.to(embeds.dtype), original))


def slot_positions(latent_slots: list[list[tuple[int, int]]]) -> list[list[int]]:
    """(start token, end token) pairs of each sample -> the positions of the K slots between them."""
    return [[p for start, end in blocks for p in range(start + 1, end)] for blocks in latent_slots]


def _check_slots(slots: list[list[int]], lengths: list[int]) -> None:
    for b, positions in enumerate(slots):
        if positions != sorted(set(positions)) or (
            positions and not 1 <= positions[0] <= positions[-1] < lengths[b]
        ):
            raise ValueError(
                f"latent fill: sample {b} has slot positions {positions}; they must be increasing and within "
                f"[1, {lengths[b]})"
            )


def _gather_positions(position_ids: torch.Tensor, b: int, index: torch.Tensor) -> torch.Tensor:
    return position_ids[..., b, :].index_select(-1, index)


def fill_latents(
    backbone: Backbone,
    embeds: torch.Tensor,
    position_ids: torch.Tensor,
    mask: MaskSpec,
    slots: list[list[int]],
    lengths: list[int],
    feedback: Feedback = "full",
) -> FilledLatents:
    """Fill `slots` (per sample, increasing positions) of right-padded `embeds` [B, N, D] by hidden-state feedback.

    `mask` covers the N positions; `lengths` are the samples' real lengths. Under the caller's grad mode, the
    latents keep the graph `feedback` says (through the cache); `none` runs without gradient.
    """
    size, _, dim = embeds.shape
    _check_slots(slots, lengths)
    device = embeds.device
    steps = max((len(s) for s in slots), default=0)
    values = embeds.new_zeros(size, steps, dim)
    positions = torch.full((size, steps), -1, dtype=torch.long, device=device)
    if steps == 0:
        return FilledLatents(values, positions)
    bounds = [[0, *s] for s in slots]  # chunk k of sample b is [bounds[b][k], bounds[b][k + 1])
    chunk_lengths = [
        max(bounds[b][k + 1] - bounds[b][k] if k < len(slots[b]) else 0 for b in range(size))
        for k in range(steps)
    ]
    offsets = [0]
    for length in chunk_lengths:
        offsets.append(offsets[-1] + length)
    total = offsets[-1]
    cache_spec = _cache_mask(mask, bounds, offsets, total)
    with (
        _cache_kept(backbone.hf_model()),
        torch.set_grad_enabled(torch.is_grad_enabled() and feedback != "none"),
    ):
        fed = _run_chunks(
            backbone, embeds, position_ids, cache_spec, slots, bounds, chunk_lengths, offsets, feedback
        )
    for b in range(size):
        if fed[b]:
            values[b, : len(fed[b])] = torch.stack(fed[b])
            positions[b, : len(fed[b])] = torch.tensor(slots[b], device=device)
    return FilledLatents(values, positions)


@contextmanager
def _cache_kept(model: nn.Module) -> Iterator[None]:
    """HF layers drop the KV cache under gradient checkpointing in training; the fill needs it, so it runs without."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


def _run_chunks(
    backbone: Backbone,
    embeds: torch.Tensor,
    position_ids: torch.Tensor,
    cache_spec: MaskSpec,
    slots: list[list[int]],
    bounds: list[list[int]],
    chunk_lengths: list[int],
    offsets: list[int],
    feedback: Feedback,
) -> list[list[torch.Tensor]]:
    size, _, dim = embeds.shape
    device = embeds.device
    cache = DynamicCache(config=backbone.hf_model().config)
    fed: list[list[torch.Tensor]] = [[] for _ in range(size)]
    for k in range(len(chunk_lengths)):
        length = chunk_lengths[k]
        chunk = embeds.new_zeros(size, length, dim)
        chunk_positions = position_ids.new_zeros((*position_ids.shape[:-2], size, length))
        last = torch.zeros(size, dtype=torch.long, device=device)
        for b in range(size):
            if k >= len(slots[b]):
                continue
            start, end = bounds[b][k], bounds[b][k + 1]
            rows = torch.arange(start, end, device=device)
            chunk[b, : end - start] = embeds[b, start:end]
            if k > 0:
                chunk[b, 0] = fed[b][k - 1].detach() if feedback == "truncated" else fed[b][k - 1]
            chunk_positions[..., b, : end - start] = _gather_positions(position_ids, b, rows)
            last[b] = end - start - 1
        out = backbone.forward(chunk, chunk_positions, cache_spec.truncate(offsets[k + 1]), cache)
        cache = out.cache
        hidden = out.last_hidden_state[torch.arange(size, device=device), last]
        for b in range(size):
            if k < len(slots[b]):
                fed[b].append(hidden[b])
    return fed


def _cache_mask(mask: MaskSpec, bounds: list[list[int]], offsets: list[int], total: int) -> MaskSpec:
    """The sequence-position mask over the chunked cache: column c holding position t takes t's intervals, with
    each row bound moved to the cache index of that position (positions never cached map to `total`)."""
    size = len(bounds)
    intervals = torch.zeros(size, total, 4, dtype=torch.int32)
    intervals[..., 1] = total  # padding columns: hidden from every row
    source = mask.intervals.cpu()
    for b in range(size):
        if len(bounds[b]) == 1:
            continue  # a sample without slots is never run
        cached_until = bounds[b][-1]  # positions >= the last slot are never run through the cache
        cache_index = torch.full((source.shape[1] + 1,), total, dtype=torch.int32)
        columns = []
        for k in range(len(bounds[b]) - 1):
            start, end = bounds[b][k], bounds[b][k + 1]
            cache_index[start:end] = torch.arange(offsets[k], offsets[k] + end - start, dtype=torch.int32)
            columns.append(torch.arange(offsets[k], offsets[k] + end - start))
        index = torch.cat(columns)
        bounds_of = source[b, :cached_until].long().clamp(0, source.shape[1])
        intervals[b, index] = cache_index[bounds_of]
    return MaskSpec(mask.causal, intervals.to(mask.intervals.device))


def fill_latents_reference(
    backbone: Backbone,
    embeds: torch.Tensor,
    position_ids: torch.Tensor,
    mask: MaskSpec,
    slots: list[list[int]],
    feedback: Feedback = "full",
) -> list[torch.Tensor]:
    """One sample and one slot at a time, no cache: a full forward over the prefix for every slot (tests only).

    Each step's input is the prefix with the latents so far written in (detached under `truncated`).
    """
    filled = []
    with torch.set_grad_enabled(torch.is_grad_enabled() and feedback != "none"):
        for b, positions in enumerate(slots):
            sample = embeds[b : b + 1]
            values = []
            for p in positions:
                prefix_positions = position_ids[..., b : b + 1, :p]
                out = backbone.forward(
                    sample[:, :p], prefix_positions, mask.select(torch.tensor([b])).truncate(p)
                )
                latent = out.last_hidden_state[0, p - 1]
                written = latent.detach() if feedback == "truncated" else latent
                sample = torch.cat([sample[:, :p], written[None, None], sample[:, p + 1 :]], dim=1)
                values.append(latent)
            filled.append(torch.stack(values) if values else embeds.new_zeros(0, embeds.shape[-1]))
    return filled
