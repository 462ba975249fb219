"""Attention structure as column intervals (FlashMask-style): the one mask description shared by
the reference attention path and the kernels.

Key column j is hidden from query rows ``[s1, e1) ∪ [s2, e2)`` (an interval is empty when s >= e);
with ``causal``, rows i < j are hidden too. Row indices are absolute positions 0..Nk-1; queries
may be only the last Nq positions (KV-cache decoding). Memory is O(Nk) per sample; a dense mask
exists only when a reference path calls :meth:`MaskSpec.to_dense`.

A row whose every column is hidden (e.g. a left-padding row) is *fully masked*: attention
implementations return zeros for such rows, not NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "MaskSpec",
    "causal_mask",
    "full_mask",
    "hide_spans_outside_latents",
    "packed_documents",
    "with_padding",
]


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on tensors is ambiguous
class MaskSpec:
    """``causal`` plus ``intervals`` int32 [B, Nk, 4] = (s1, e1, s2, e2) of hidden rows per key column."""

    causal: bool
    intervals: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.intervals, torch.Tensor):
            raise TypeError(f"MaskSpec.intervals must be a torch.Tensor, got {type(self.intervals).__name__}")
        if self.intervals.dtype != torch.int32:
            raise ValueError(f"MaskSpec.intervals must have dtype torch.int32, got {self.intervals.dtype}")
        if self.intervals.dim() != 3 or self.intervals.shape[-1] != 4:
            raise ValueError(
                f"MaskSpec.intervals must have shape [B, Nk, 4], got {list(self.intervals.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.intervals.shape[0]

    @property
    def num_keys(self) -> int:
        return self.intervals.shape[1]

    def to_dense(self, num_queries: int | None = None) -> torch.Tensor:
        """Bool [B, 1, Nq, Nk], True = may attend; queries are the last Nq rows (default Nq = Nk)."""
        nk = self.num_keys
        nq = nk if num_queries is None else num_queries
        if not 0 <= nq <= nk:
            raise ValueError(f"num_queries must be in [0, {nk}] (the number of keys), got {nq}")
        device = self.intervals.device
        rows = torch.arange(nk - nq, nk, device=device, dtype=torch.int32).view(1, 1, nq, 1)
        s1, e1, s2, e2 = (self.intervals[..., k].unsqueeze(1).unsqueeze(1) for k in range(4))
        hidden = ((rows >= s1) & (rows < e1)) | ((rows >= s2) & (rows < e2))
        if self.causal:
            cols = torch.arange(nk, device=device, dtype=torch.int32).view(1, 1, 1, nk)
            hidden = hidden | (cols > rows)
        return ~hidden

    def to(self, device: torch.device | str) -> MaskSpec:
        return MaskSpec(self.causal, self.intervals.to(device))

    def select(self, batch_index: torch.Tensor | slice) -> MaskSpec:
        """The given batch rows (a slice, or a 1-D index / bool tensor)."""
        if isinstance(batch_index, torch.Tensor):
            batch_index = batch_index.reshape(-1).to(self.intervals.device)
        return MaskSpec(self.causal, self.intervals[batch_index])

    def truncate(self, num_keys: int) -> MaskSpec:
        """The first ``num_keys`` columns, with row bounds clipped to ``num_keys``."""
        if not 0 <= num_keys <= self.num_keys:
            raise ValueError(f"num_keys must be in [0, {self.num_keys}], got {num_keys}")
        return MaskSpec(self.causal, self.intervals[:, :num_keys].clamp(0, num_keys).contiguous())


def _empty(batch_size: int, num_keys: int) -> torch.Tensor:
    return torch.zeros(batch_size, num_keys, 4, dtype=torch.int32)


def causal_mask(batch_size: int, num_keys: int, device: torch.device | str | None = None) -> MaskSpec:
    """Plain causal attention."""
    return MaskSpec(True, _empty(batch_size, num_keys).to(device))


def full_mask(batch_size: int, num_keys: int, device: torch.device | str | None = None) -> MaskSpec:
    """Bidirectional attention, nothing hidden."""
    return MaskSpec(False, _empty(batch_size, num_keys).to(device))


def with_padding(spec: MaskSpec, key_is_valid: torch.Tensor) -> MaskSpec:
    """Hide padding columns (``key_is_valid`` False, bool [B, Nk]) from every row; left or right padding.

    Rows with no valid column left (e.g. left-padding rows under causality) are fully masked.
    """
    if key_is_valid.dtype != torch.bool or tuple(key_is_valid.shape) != (spec.batch_size, spec.num_keys):
        raise ValueError(
            f"key_is_valid must be bool [{spec.batch_size}, {spec.num_keys}], "
            f"got {key_is_valid.dtype} {list(key_is_valid.shape)}"
        )
    pad = torch.tensor([0, spec.num_keys, 0, 0], dtype=torch.int32, device=spec.intervals.device)
    is_pad = ~key_is_valid.to(spec.intervals.device).unsqueeze(-1)
    return MaskSpec(spec.causal, torch.where(is_pad, pad, spec.intervals))


def packed_documents(
    document_lengths: list[list[int]],
    num_keys: int,
    causal: bool = True,
    device: torch.device | str | None = None,
) -> MaskSpec:
    """Documents packed back to back from position 0 in each batch row; each attends only within itself.

    A document's columns are hidden from all rows after it (trailing padding rows included, which are
    therefore fully masked); without ``causal`` also from the rows before it. Columns after the last
    document are padding, hidden from every row.
    """
    intervals = _empty(len(document_lengths), num_keys)
    valid = torch.zeros(len(document_lengths), num_keys, dtype=torch.bool)
    for b, lengths in enumerate(document_lengths):
        if any(n < 0 for n in lengths) or sum(lengths) > num_keys:
            raise ValueError(
                f"packed_documents: sample {b} has document lengths {lengths}; they must be >= 0 and sum "
                f"to at most num_keys={num_keys}"
            )
        start = 0
        for n in lengths:
            end = start + n
            intervals[b, start:end, 0] = end
            intervals[b, start:end, 1] = num_keys
            if not causal:
                intervals[b, start:end, 3] = start
            start = end
        valid[b, :start] = True
    return with_padding(MaskSpec(causal, intervals), valid).to(device)


def hide_spans_outside_latents(
    blocks: list[list[tuple[int, int, int, int]]],
    num_keys: int,
    key_is_valid: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> MaskSpec:
    """Causal attention in which each span is seen after itself only by its latent block.

    ``blocks[b]`` lists (span_start, span_end, latent_start, latent_end) half-open spans of sample b, in
    sequence order, each span followed by the latent block that stands for it. A span's key columns are
    hidden from rows [span_end, latent_start) and [latent_end, Nk): its own rows see it causally, its latent
    block sees it, and every row after the block sees it only through the latents.
    """
    intervals = _empty(len(blocks), num_keys)
    for b, sample_blocks in enumerate(blocks):
        previous_end = 0
        for i, (span_s, span_e, lat_s, lat_e) in enumerate(sample_blocks):
            if not previous_end <= span_s < span_e <= lat_s < lat_e <= num_keys:
                raise ValueError(
                    f"hide_spans_outside_latents: sample {b}, block {i} has span [{span_s}, {span_e}), latent "
                    f"[{lat_s}, {lat_e}); need {previous_end} <= span_start < span_end <= latent_start "
                    f"< latent_end <= num_keys={num_keys} (blocks in order, non-overlapping)"
                )
            intervals[b, span_s:span_e] = torch.tensor([span_e, lat_s, lat_e, num_keys], dtype=torch.int32)
            previous_end = lat_e
    spec = MaskSpec(True, intervals)
    if key_is_valid is not None:
        spec = with_padding(spec, key_is_valid.cpu())
    return spec.to(device)
