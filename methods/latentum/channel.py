"""LatentUM's channel check, teacher-forced: do the boards the model reads back carry the answer?

On each sample's gold response (the chat with its auxiliary boards inline, as stage language trains), the answer
after the last board is scored token by token (`latentkit.eval.diagnose.forced`). The boards are read as:
- `with_aux`: the vision tower's features through the projector (the model reading real images);
- `oracle`: projector(z_q) of the boards' true MBAQ codes (what a perfectly imagined board gives);
- dummies: `random_codes` (every sub-code uniform over its codebook), `constant` (every position the most
  frequent code of each codebook over these samples' boards) and `swap` (the next sample's boards, board by
  board; a sample keeps its own when the board counts or sizes differ).
The imagined channel can carry the answer when the oracle approaches `with_aux`, and it is needed when the
dummies fall toward chance."""

from __future__ import annotations

from collections.abc import Callable

import torch
from latentkit.methods.latentum.quantizer import MBAQ
from latentkit.methods.latentum.targets import (
    codes_to_inputs,
    image_features,
    image_kinds,
    is_target,
    write_images,
)
from torch import Tensor

from latentkit.backbone import Backbone
from latentkit.eval.diagnose.forced import answer_spans, forced_correct
from latentkit.layout import Batch, Layout, collate
from latentkit.masks import MaskSpec
from latentkit.segments import Sample

DUMMIES = ("random_codes", "constant", "swap")
CONDITIONS = ("with_aux", "oracle", *DUMMIES)


@torch.no_grad()
def channel_conditions(
    backbone: Backbone,
    quantizer: MBAQ,
    samples: list[Sample],
    layout_of: Callable[[Sample], Layout],
    mask_of: Callable[[Batch], MaskSpec],
    batch_size: int,
    seed: int = 0,
) -> dict[str, list[bool | None]]:
    """Per condition, whether each sample's answer is the model's top-1 given the gold prefix. Two passes: the
    first encodes every board (the constant and the swap need them all), the second scores the conditions."""
    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    boards: list[list[Tensor]] = []  # per sample, each board's true codes [positions, C]
    for chunk in chunks:
        batch = _batch(backbone, chunk, layout_of)
        features, kinds = image_features(backbone, batch), image_kinds(batch)
        for row in _rows(batch):
            boards.append([quantizer.encode(features[i]) for i in row if is_target(kinds[i])])
    every = torch.cat([codes for sample in boards for codes in sample])
    constant = every.mode(dim=0).values  # [C]
    generator = torch.Generator().manual_seed(seed)
    entries = quantizer.quantizer.entries
    donors = [boards[(i + 1) % len(boards)] for i in range(len(boards))]
    replaced = {
        "oracle": boards,
        "random_codes": [
            [torch.randint(entries, codes.shape, generator=generator).to(codes) for codes in sample]
            for sample in boards
        ],
        "constant": [[constant.expand_as(codes) for codes in sample] for sample in boards],
        "swap": [donor if _same_shapes(own, donor) else own for own, donor in zip(boards, donors)],
    }
    results: dict[str, list[bool | None]] = {name: [] for name in CONDITIONS}
    index = 0
    for chunk in chunks:
        layouts = [layout_of(sample) for sample in chunk]
        batch = collate(layouts, backbone.tokenizer.pad_token_id).to(backbone.device)
        mask, spans = mask_of(batch), answer_spans(backbone, layouts, chunk)
        features = image_features(backbone, batch)
        kinds = image_kinds(batch)
        projected = [backbone.project_vision_features(f) for f in features]
        token_embeds = backbone.embed(batch.input_ids)
        results["with_aux"] += forced_correct(
            backbone, layouts, write_images(token_embeds, batch, projected), mask, spans, batch
        )
        for name, codes_by_sample in replaced.items():
            images = list(projected)
            for b, row in enumerate(_rows(batch)):
                targets = [i for i in row if is_target(kinds[i])]
                for i, codes in zip(targets, codes_by_sample[index + b], strict=True):
                    images[i] = codes_to_inputs(backbone, quantizer, codes)
            embeds = write_images(token_embeds, batch, images)
            results[name] += forced_correct(backbone, layouts, embeds, mask, spans, batch)
        index += len(chunk)
    return results


def _batch(backbone: Backbone, chunk: list[Sample], layout_of: Callable[[Sample], Layout]) -> Batch:
    return collate([layout_of(sample) for sample in chunk], backbone.tokenizer.pad_token_id).to(
        backbone.device
    )


def _rows(batch: Batch) -> list[list[int]]:
    """Each row's image indices in the batch's image order ((sample, position) order)."""
    rows, next_index = [], 0
    for layout in batch.layouts:
        rows.append(list(range(next_index, next_index + len(layout.images))))
        next_index += len(layout.images)
    return rows


def _same_shapes(own: list[Tensor], donor: list[Tensor]) -> bool:
    return len(own) == len(donor) and all(a.shape == b.shape for a, b in zip(own, donor))
