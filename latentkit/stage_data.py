"""A supervised stage's data: its micro-batches of layouts (built once and kept, within a memory bound), the
length pre-filter (samples longer than `data.max_length` are dropped and counted before the stage trains, not
found mid-run) and the sample order (`latentkit.sampling`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from latentkit.config import DataSection
from latentkit.errors import DataError
from latentkit.layout import Batch, Layout, collate
from latentkit.record_cache import CachedSamples
from latentkit.registry import Method
from latentkit.sampling import GROUP_BATCHES, SampleOrder, mix_weights
from latentkit.segments import Sample


def layout_bytes(layout: Layout) -> int:
    tensors = [layout.input_ids, layout.kinds, layout.segment_index, layout.labels, layout.loss_weight]
    tensors += [layout.position_ids, *(s.image.pixel_values for s in layout.images)]
    tensors += [s.vectors for s in layout.embeddings]
    return sum(t.numel() * t.element_size() for t in tensors)


class LayoutCache:
    """Built layouts by sample index, least recently used dropped first once they pass `limit_bytes`."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes, self.size = limit_bytes, 0
        self.entries: OrderedDict[int, tuple[Layout, int]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, index: int) -> Layout | None:
        entry = self.entries.get(index)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(index)
        return entry[0]

    def put(self, index: int, layout: Layout) -> None:
        size = layout_bytes(layout)
        if size > self.limit_bytes:
            return
        self.entries[index] = (layout, size)
        self.size += size
        while self.size > self.limit_bytes:
            _, (_, dropped) = self.entries.popitem(last=False)
            self.size -= dropped


class LayoutDataset(torch.utils.data.Dataset):
    """Deterministic micro-batches: item i is micro-batch i of the schedule, already collated. Layouts are kept in
    a `LayoutCache` of `cache_bytes`, since every epoch builds each sample's layout again."""

    def __init__(
        self,
        samples: Sequence[Sample],
        method: Method,
        stage: str,
        max_length: int,
        pad_id: int,
        cache_bytes: int = 0,
    ):
        self.samples, self.method, self.stage = samples, method, stage
        self.max_length, self.pad_id = max_length, pad_id
        self.schedule: list[list[int]] = []
        self.cache = LayoutCache(cache_bytes)

    def build(self, index: int) -> Layout:
        """Sample `index`'s layout, from the cache or built (and cached); its length is not checked."""
        layout = self.cache.get(index)
        if layout is None:
            layout = self.method.layout(self.samples[index], self.stage)
            if len(layout) <= self.max_length:
                self.cache.put(index, layout)
        return layout

    def layout(self, index: int) -> Layout:
        layout = self.build(index)
        if len(layout) > self.max_length:
            raise DataError(
                f"sample {layout.sample_id}: {len(layout)} tokens exceed data.max_length={self.max_length} "
                "(raise data.max_length or lower model.image_max_pixels)"
            )
        return layout

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, item: int) -> Batch:
        return collate([self.layout(i) for i in self.schedule[item]], self.pad_id)

    def __getstate__(self) -> dict[str, Any]:
        # A DataLoader worker gets the dataset pickled: it starts with an empty cache of its own, not a copy.
        return {**self.__dict__, "cache": LayoutCache(self.cache.limit_bytes)}


@dataclass(frozen=True)
class LengthFilter:
    kept: int
    dropped: int
    longest: int  # tokens, over every sample (dropped ones included)


class LayoutLengths(torch.utils.data.Dataset):
    """The layout lengths of some of a `LayoutDataset`'s samples, so DataLoader workers can build them."""

    def __init__(self, dataset: LayoutDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> int:
        return len(self.dataset.build(self.indices[item]))


def sample_lengths(
    dataset: LayoutDataset,
    rank: int,
    world: int,
    gather: Callable[[list[Any]], list[Any]],
    num_workers: int = 0,
) -> list[int]:
    """Every sample's layout length: each process builds every `world`-th layout (in `num_workers` DataLoader
    workers, or in-process where they also fill the layout cache), `gather` joins the parts."""
    indices = range(rank, len(dataset.samples), world)
    if num_workers:
        loader = torch.utils.data.DataLoader(
            LayoutLengths(dataset, indices), batch_size=None, num_workers=num_workers
        )
        mine = list(zip(indices, (int(length) for length in loader)))
    else:
        mine = [(index, len(dataset.build(index))) for index in indices]
    lengths = [0] * len(dataset.samples)
    for index, length in gather(mine):
        lengths[index] = length
    return lengths


def stage_order(
    dataset: LayoutDataset,
    data: DataSection,
    seed: int,
    stage_index: int,
    step_samples: int,
    rank: int,
    world: int,
    gather: Callable[[list[Any]], list[Any]],
    num_workers: int = 0,
) -> tuple[SampleOrder, LengthFilter]:
    """The stage's sample order over the samples within `data.max_length`; `step_samples`: samples per optimizer
    step over all processes (the unit `data.group_by_length` sorts within); `num_workers`: `train.num_workers`."""
    lengths = sample_lengths(dataset, rank, world, gather, num_workers)
    kept = [index for index, length in enumerate(lengths) if length <= data.max_length]
    if not kept:
        raise DataError(
            f"all {len(lengths)} samples are longer than data.max_length={data.max_length} (the shortest has "
            f"{min(lengths)} tokens): raise data.max_length or lower model.image_max_pixels"
        )
    sources, mix = None, None
    if data.mix:
        if not isinstance(dataset.samples, CachedSamples):
            raise DataError("data.mix needs records loaded through the record cache (latentkit.data)")
        sources = dataset.samples.sources
        mix = mix_weights(data.mix, sources, str(data.path or data.task))
    grouped = data.group_by_length
    order = SampleOrder(
        kept,
        seed,
        stage_index,
        sources=sources,
        mix=mix,
        lengths=lengths if grouped else None,
        group_size=step_samples * GROUP_BATCHES if grouped else None,
    )
    return order, LengthFilter(len(kept), len(lengths) - len(kept), max(lengths))
