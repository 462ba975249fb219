"""Monet's latent-channel check, teacher-forced: can K latents carry what the auxiliary image gave?

On each sample's gold response, the answer's first mention after the (last) auxiliary image is scored token by
token (argmax given the gold prefix). Conditions:
- `with_aux`: the warm-up model with the auxiliary images inline (the with-crops reference);
- `oracle`: the distill model in its own layout, each auxiliary image visible only to its latents, which it fills
  (the stage-2 targets);
- dummies, the same with the latents replaced: `zeros`, `dataset_mean` (their mean over the samples), `swap`
  (the next sample's) and `noise` (Gaussian, each vector's norm kept).
The channel can carry the answer when the oracle approaches `with_aux` and the dummies fall toward chance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from latentkit.methods.monet.config import MonetConfig
from latentkit.methods.monet.layout import latent_layout, stage2_mask, teacher_layout

from latentkit.backbone import Backbone
from latentkit.latent import FilledLatents
from latentkit.layout import Batch, Kind, Layout, collate, inputs_embeds
from latentkit.masks import MaskSpec, causal_mask, with_padding
from latentkit.segments import Sample

DUMMIES = ("zeros", "dataset_mean", "swap", "noise")
CONDITIONS = ("with_aux", "oracle", *DUMMIES)
Fill = Callable[[Batch, torch.Tensor, MaskSpec], FilledLatents]


def answer_span(layout: Layout, answer_ids: list[list[int]], after: int) -> tuple[int, int] | None:
    """[start, end) of the first occurrence, at or after `after`, of any tokenisation of the answer."""
    ids = layout.input_ids.tolist()
    for start in range(after, len(ids)):
        for candidate in answer_ids:
            if candidate and ids[start : start + len(candidate)] == candidate:
                return start, start + len(candidate)
    return None


def forced_correct(
    backbone: Backbone, layouts: list[Layout], embeds: torch.Tensor, mask: MaskSpec, spans, batch: Batch
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


def _answer_ids(backbone: Backbone, sample: Sample) -> list[list[int]]:
    answer = sample.answer or ""
    encode = backbone.tokenizer.encode
    return [encode(text, add_special_tokens=False) for text in (f" {answer}", answer)]


def _after_aux(layout: Layout) -> int:
    """The first position after the last auxiliary image or latent block."""
    ends = [image.end + 1 for image in layout.images if image.kind == Kind.AUX_IMAGE]
    ends += [latent.end + 1 for latent in layout.latents]
    return max(ends)


@torch.no_grad()
def with_aux_correct(
    backbone: Backbone, samples: list[Sample], config: MonetConfig, batch_size: int
) -> list[bool | None]:
    """The warm-up model (held by `backbone`) on the stage-1 sequence, causal attention."""
    correct: list[bool | None] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        layouts = [teacher_layout(backbone, sample, config) for sample in chunk]
        batch = collate(layouts, backbone.tokenizer.pad_token_id).to(backbone.device)
        length = batch.input_ids.shape[1]
        mask = with_padding(causal_mask(len(layouts), length, batch.input_ids.device), batch.valid)
        spans = [answer_span(l, _answer_ids(backbone, s), _after_aux(l)) for l, s in zip(layouts, chunk)]
        correct += forced_correct(backbone, layouts, inputs_embeds(backbone, batch), mask, spans, batch)
    return correct


@torch.no_grad()
def latent_conditions(
    backbone: Backbone, samples: list[Sample], config: MonetConfig, fill: Fill, batch_size: int, seed: int = 0
) -> dict[str, list[bool | None]]:
    """The distill model (held by `backbone`) in its own layout: its filled latents (`oracle`) and the dummies."""
    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    prepared = []
    for chunk in chunks:
        layouts = [latent_layout(backbone, sample, config, keep_aux_images=True) for sample in chunk]
        batch = collate(layouts, backbone.tokenizer.pad_token_id).to(backbone.device)
        mask = stage2_mask(batch, config.start_sees_image)
        embeds = inputs_embeds(backbone, batch)
        prepared.append((chunk, layouts, batch, mask, embeds, fill(batch, embeds, mask)))
    own = [
        filled.values[b, : int((filled.positions[b] >= 0).sum())]
        for *_, filled in prepared
        for b in range(filled.values.shape[0])
    ]
    mean = torch.cat(own).mean(0)
    generator = torch.Generator().manual_seed(seed)
    replaced = {
        "oracle": own,
        "zeros": [torch.zeros_like(v) for v in own],
        "dataset_mean": [mean.expand_as(v) for v in own],
        "swap": [
            own[(i + 1) % len(own)] if own[(i + 1) % len(own)].shape == v.shape else v
            for i, v in enumerate(own)
        ],
        "noise": [_norm_matched_noise(v, generator) for v in own],
    }
    results: dict[str, list[bool | None]] = {name: [] for name in replaced}
    for name, values in replaced.items():
        index = 0
        for chunk, layouts, batch, mask, embeds, filled in prepared:
            rows = values[index : index + len(chunk)]
            index += len(chunk)
            written = filled.values.clone()
            for b, row in enumerate(rows):
                written[b, : row.shape[0]] = row
            spans = [answer_span(l, _answer_ids(backbone, s), _after_aux(l)) for l, s in zip(layouts, chunk)]
            results[name] += forced_correct(
                backbone, layouts, FilledLatents(written, filled.positions).write(embeds), mask, spans, batch
            )
    return results


def _norm_matched_noise(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(values.shape, generator=generator).to(values)
    return noise / noise.norm(dim=-1, keepdim=True) * values.norm(dim=-1, keepdim=True)
