"""Teacher-forced answer scoring for a method's channel check (`Method.latent_channel`): on each sample's gold
response, the answer's first mention after the last auxiliary image (or latent block) is scored token by token,
each token the argmax given the gold prefix."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latentkit.backbone import Backbone
from latentkit.layout import Batch, Kind, Layout
from latentkit.masks import MaskSpec
from latentkit.segments import Sample


def answer_span(layout: Layout, answer_ids: list[list[int]], after: int) -> tuple[int, int] | None:
    """[start, end) of the first occurrence, at or after `after`, of any tokenisation of the answer."""
    ids = layout.input_ids.tolist()
    for start in range(after, len(ids)):
        for candidate in answer_ids:
            if candidate and ids[start : start + len(candidate)] == candidate:
                return start, start + len(candidate)
    return None


def answer_ids(backbone: Backbone, sample: Sample) -> list[list[int]]:
    """The gold answer's tokenisations, with and without a leading space."""
    answer = sample.answer or ""
    encode = backbone.tokenizer.encode
    return [encode(text, add_special_tokens=False) for text in (f" {answer}", answer)]


def after_aux(layout: Layout) -> int:
    """The first position after the last auxiliary image or latent block."""
    ends = [image.end + 1 for image in layout.images if image.kind == Kind.AUX_IMAGE]
    ends += [latent.end + 1 for latent in layout.latents]
    return max(ends)


def answer_spans(
    backbone: Backbone, layouts: Sequence[Layout], samples: Sequence[Sample]
) -> list[tuple[int, int] | None]:
    """Each sample's answer span after its last auxiliary image or latent block (None: not found)."""
    return [
        answer_span(layout, answer_ids(backbone, s), after_aux(layout)) for layout, s in zip(layouts, samples)
    ]


def forced_correct(
    backbone: Backbone,
    layouts: Sequence[Layout],
    embeds: torch.Tensor,
    mask: MaskSpec,
    spans: Sequence[tuple[int, int] | None],
    batch: Batch,
) -> list[bool | None]:
    """Per sample: is every answer token the argmax given the gold prefix (None: no answer span)."""
    out = backbone.forward(embeds, batch.position_ids, mask)
    logits = backbone.logits(out.last_hidden_state)
    correct: list[bool | None] = []
    for b, (layout, span) in enumerate(zip(layouts, spans)):
        if span is None:
            correct.append(None)
            continue
        start, end = span
        predicted = logits[b, start - 1 : end - 1].argmax(-1)
        correct.append(bool(torch.equal(predicted.cpu(), layout.input_ids[start:end])))
    return correct
