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
from latentkit.eval.diagnose.forced import answer_spans, forced_correct
from latentkit.latent import FilledLatents
from latentkit.layout import Batch, Layout, collate, inputs_embeds
from latentkit.masks import MaskSpec
from latentkit.segments import Sample

DUMMIES = ("zeros", "dataset_mean", "swap", "noise")
CONDITIONS = ("with_aux", "oracle", *DUMMIES)
Fill = Callable[[Batch, torch.Tensor, MaskSpec], FilledLatents]


@torch.no_grad()
def with_aux_correct(
    backbone: Backbone,
    samples: list[Sample],
    config: MonetConfig,
    mask_of: Callable[[Batch], MaskSpec],
    batch_size: int,
) -> list[bool | None]:
    """The warm-up model (held by `backbone`) on the stage-1 sequence under its own mask (`mask_of`)."""
    correct: list[bool | None] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        layouts = [teacher_layout(backbone, sample, config) for sample in chunk]
        batch = collate(layouts, backbone.tokenizer.pad_token_id).to(backbone.device)
        embeds = inputs_embeds(backbone, batch)
        correct += forced_correct(
            backbone, layouts, embeds, mask_of(batch), answer_spans(backbone, layouts, chunk), batch
        )
    return correct


@torch.no_grad()
def latent_conditions(
    backbone: Backbone, samples: list[Sample], config: MonetConfig, fill: Fill, batch_size: int, seed: int = 0
) -> dict[str, list[bool | None]]:
    """The distill model (held by `backbone`) in its own layout: its filled latents (`oracle`) and the dummies.

    Two passes over the samples, a batch at a time: the first fills every sample's latents (the dataset mean
    needs them all), the second scores every condition on each batch."""
    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    own: list[torch.Tensor] = []
    slot_positions: list[torch.Tensor] = []  # per batch, where its latents go
    for chunk in chunks:
        _, batch, mask, embeds = _stage2_inputs(backbone, chunk, config)
        filled = fill(batch, embeds, mask)
        own += [filled.values[b, : int((row >= 0).sum())] for b, row in enumerate(filled.positions)]
        slot_positions.append(filled.positions)
    mean = torch.cat(own).mean(0)
    generator = torch.Generator().manual_seed(seed)
    # The swap gives each sample the next one's latents (its own when their block counts differ).
    donors = [own[(i + 1) % len(own)] for i in range(len(own))]
    replaced = {
        "oracle": own,
        "zeros": [torch.zeros_like(v) for v in own],
        "dataset_mean": [mean.expand_as(v) for v in own],
        "swap": [d if d.shape == v.shape else v for v, d in zip(own, donors)],
        "noise": [_norm_matched_noise(v, generator) for v in own],
    }
    results: dict[str, list[bool | None]] = {name: [] for name in replaced}
    index = 0
    for chunk, positions in zip(chunks, slot_positions):
        layouts, batch, mask, embeds = _stage2_inputs(backbone, chunk, config)
        spans = answer_spans(backbone, layouts, chunk)
        for name, values in replaced.items():
            written = embeds.new_zeros(len(chunk), positions.shape[1], embeds.shape[-1])
            for b, row in enumerate(values[index : index + len(chunk)]):
                written[b, : row.shape[0]] = row
            latents = FilledLatents(written, positions).write(embeds)
            results[name] += forced_correct(backbone, layouts, latents, mask, spans, batch)
        index += len(chunk)
    return results


def _stage2_inputs(
    backbone: Backbone, chunk: list[Sample], config: MonetConfig
) -> tuple[list[Layout], Batch, MaskSpec, torch.Tensor]:
    layouts = [latent_layout(backbone, sample, config, keep_aux_images=True) for sample in chunk]
    batch = collate(layouts, backbone.tokenizer.pad_token_id).to(backbone.device)
    return layouts, batch, stage2_mask(batch, config.start_sees_image), inputs_embeds(backbone, batch)


def _norm_matched_noise(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(values.shape, generator=generator).to(values)
    return noise / noise.norm(dim=-1, keepdim=True) * values.norm(dim=-1, keepdim=True)
