"""The order in which a stage draws its samples: a pure function of (seed, stage, position), so a resumed run
draws exactly what an uninterrupted one does.

Each epoch is a seeded shuffle of the samples that are kept (those within `data.max_length`). With `data.mix`,
an epoch instead holds each sub-dataset's share of the kept count by weight, drawn from that sub-dataset's own
stream of shuffles (a small sub-dataset repeats, a large one is spread over several epochs). With
`data.group_by_length`, each run of `group_size` positions is sorted by length, longest first, so that the
micro-batches cut from it hold samples of similar length (the megabatch grouping of HF's LengthGroupedSampler).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch

from latentkit.errors import DataError

GROUP_BATCHES = 50  # micro-batch rounds sorted together by length (as HF's LengthGroupedSampler)


def epoch_permutation(num_samples: int, seed: int, stage_index: int, epoch: int) -> list[int]:
    """The seeded shuffle of one epoch (the formula every run so far has used, so their orders stay the same)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + stage_index * 7919 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def _shuffle(size: int, *parts: object) -> list[int]:
    seed = int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()


def mix_weights(mix: Mapping[str, float], sources: Sequence[str], where: str) -> dict[str, float]:
    """`data.mix` checked against the sub-datasets present: every one has a weight, no other name, some > 0."""
    present = sorted(set(sources))
    unknown = sorted(set(mix) - set(present))
    if unknown:
        raise DataError(
            f"data.mix names {unknown[0]!r}, which is not a sub-dataset of {where} (its sub-datasets: "
            f"{', '.join(present)}); fix the name"
        )
    missing = [name for name in present if name not in mix]
    if missing:
        raise DataError(
            f"data.mix has no weight for sub-dataset {missing[0]!r} of {where}: give every sub-dataset a weight "
            f"(0 leaves one out): {', '.join(present)}"
        )
    if not any(mix[name] > 0 for name in present):
        raise DataError("data.mix weights are all 0: give at least one sub-dataset a positive weight")
    return {name: float(mix[name]) for name in present}


def apportion(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """`total` split by weight, rounded by largest remainder (ties by name), so the counts sum to `total`."""
    scale = sum(weights.values())
    exact = {name: total * weight / scale for name, weight in weights.items()}
    counts = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(weights, key=lambda name: (counts[name] - exact[name], name))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


class SampleOrder:
    """Positions of a stage's sample stream -> dataset indices.

    `kept`: the dataset indices that may be drawn. `sources` (per dataset index) and `mix` weight sub-datasets;
    `lengths` (per dataset index) and `group_size` group positions by length."""

    def __init__(
        self,
        kept: Sequence[int],
        seed: int,
        stage_index: int,
        *,
        sources: Sequence[str] | None = None,
        mix: Mapping[str, float] | None = None,
        lengths: Sequence[int] | None = None,
        group_size: int | None = None,
    ) -> None:
        if not kept:
            raise DataError("no samples to draw from (every one was dropped)")
        self.kept, self.seed, self.stage_index = list(kept), seed, stage_index
        self.lengths, self.group_size = lengths, group_size
        self.counts: dict[str, int] = {}
        self.streams: dict[str, list[int]] = {}
        if mix:
            if sources is None:
                raise DataError("data.mix needs the sub-dataset of every sample")
            for index in self.kept:
                self.streams.setdefault(sources[index], []).append(index)
            weights = {name: weight for name, weight in mix.items() if weight > 0}
            empty = [name for name in weights if name not in self.streams]
            if empty:
                raise DataError(
                    f"data.mix gives sub-dataset {empty[0]!r} a weight, but none of its samples is left (all "
                    "longer than data.max_length?); raise data.max_length or give it weight 0"
                )
            self.counts = apportion(len(self.kept), weights)
        self._epochs: dict[int, list[int]] = {}

    def indices(self, positions: range) -> list[int]:
        size = len(self.kept)
        return [self.epoch(position // size)[position % size] for position in positions]

    def epoch(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # a schedule walks epochs in order: the oldest is done with
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = self._grouped(self._draw(epoch))
        return self._epochs[epoch]

    def _draw(self, epoch: int) -> list[int]:
        if not self.counts:
            return [
                self.kept[i] for i in epoch_permutation(len(self.kept), self.seed, self.stage_index, epoch)
            ]
        drawn = []
        for name, count in sorted(self.counts.items()):
            stream = self.streams[name]
            shuffles: dict[int, list[int]] = {}
            for position in range(epoch * count, (epoch + 1) * count):
                cycle, offset = divmod(position, len(stream))
                if cycle not in shuffles:
                    shuffles[cycle] = _shuffle(
                        len(stream), "mix-source", self.seed, self.stage_index, name, cycle
                    )
                drawn.append(stream[shuffles[cycle][offset]])
        return [drawn[i] for i in _shuffle(len(drawn), "mix-epoch", self.seed, self.stage_index, epoch)]

    def _grouped(self, order: list[int]) -> list[int]:
        if self.lengths is None or self.group_size is None:
            return order
        lengths, size = self.lengths, self.group_size
        chunks = [order[start : start + size] for start in range(0, len(order), size)]
        return [index for chunk in chunks for index in sorted(chunk, key=lambda i: -lengths[i])]
