"""Monet's sequences (specs/monet.md): stage 1 inline auxiliary images; stage 2 each auxiliary image followed by
start, K slots, end, under the controlled mask; stage 3 each auxiliary image replaced by start, K slots, end.
"""

from __future__ import annotations

import torch
from latentkit.methods.monet.config import MonetConfig
from latentkit.methods.sft import SFTConfig
from latentkit.methods.sft.method import sft_layout

from latentkit.backbone import Backbone
from latentkit.chat import ResponseWeights, render_chat
from latentkit.layout import Batch, Kind, Layout, LayoutBuilder
from latentkit.masks import MaskSpec, hide_spans_outside_latents
from latentkit.segments import Sample, Segment


def warmup_config(config: MonetConfig) -> SFTConfig:
    """Stage 1 is interleaved SFT: observation weight x2, observation tags not targets."""
    return SFTConfig(
        observation_weight=config.warmup_observation_weight,
        aux_images=True,
        observation_tags=config.observation_tags,
        train_observation_tags=False,
    )


def teacher_layout(backbone: Backbone, sample: Sample, config: MonetConfig) -> Layout:
    return sft_layout(backbone, sample, warmup_config(config))


def latent_layout(backbone: Backbone, sample: Sample, config: MonetConfig, keep_aux_images: bool) -> Layout:
    """Stage 2 (`keep_aux_images`: image, then the latent block) or stage 3 (the latent block alone).

    The model learns to open a block (stage 3, where the start token follows text) and to close it after K slots.
    """
    start, slot, end = config.latent_tokens

    def on_aux_image(builder: LayoutBuilder, segment: Segment, segment_index: int) -> None:
        if keep_aux_images:
            assert segment.image is not None
            builder.add_image(segment.image, Kind.AUX_IMAGE, segment_index)
        builder.add_latent(
            start,
            slot,
            end,
            config.num_latents,
            segment_index,
            train_start=not keep_aux_images,
            train_end=True,
        )

    builder = LayoutBuilder(backbone)
    weights = ResponseWeights(
        config.observation_weight, config.observation_tags, config.train_observation_tags
    )
    render_chat(builder, sample, on_aux_image, weights)
    return builder.build(sample.sample_id, sample.dataset)


def stage2_blocks(layout: Layout) -> list[tuple[int, int, int, int]]:
    """(image start, image end, latent start, latent end) per auxiliary image.

    The image span runs from vision-start through vision-end. **Decision**: the latent block that may see the
    image is the start token and the K slots; the end token is the first token after it, so no row outside
    the K latents carries the image forward.
    """
    aux = [slot for slot in layout.images if slot.kind == Kind.AUX_IMAGE]
    if len(aux) != len(layout.latents):
        raise ValueError(
            f"sample {layout.sample_id}: {len(aux)} auxiliary images but {len(layout.latents)} latent blocks"
        )
    return [
        (image.start - 1, image.end + 1, latent.start, latent.end)
        for image, latent in zip(aux, layout.latents)
    ]


def stage2_mask(batch: Batch) -> MaskSpec:
    """Controlled attention of stage 2 (specs/monet.md, stage 2 step 3)."""
    blocks = [stage2_blocks(layout) for layout in batch.layouts]
    return hide_spans_outside_latents(blocks, batch.input_ids.shape[1], batch.valid, batch.input_ids.device)


def observation_positions(layout: Layout, close_tag_id: int) -> torch.Tensor:
    """From each `<observation>` token up to, not including, `</observation>` (the teacher's positions)."""
    is_observation = (layout.kinds == int(Kind.OBSERVATION)) & (layout.input_ids != close_tag_id)
    return is_observation.nonzero().squeeze(-1)
