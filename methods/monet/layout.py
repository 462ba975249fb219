"""Monet's sequences (arXiv 2511.21395): stage 1 inline auxiliary images; stage 2 each auxiliary image followed by
start, K slots, end, under the controlled mask; stage 3 each auxiliary image replaced by start, K slots, end.
"""

from __future__ import annotations

import torch
from latentkit.methods.monet.config import MonetConfig

from latentkit.backbone import Backbone
from latentkit.chat import ResponseWeights, render_chat
from latentkit.layout import Batch, Kind, Layout, LayoutBuilder
from latentkit.masks import MaskSpec, hide_spans_outside_latents
from latentkit.segments import Sample, Segment


def teacher_layout(backbone: Backbone, sample: Sample, config: MonetConfig) -> Layout:
    """Stage 1 (interleaved SFT): auxiliary images inline, observation x2, observation tags and image tokens not
    targets; the auxiliary image's vision-start token is one only with `train_aux_vision_start`."""

    def on_aux_image(builder: LayoutBuilder, segment: Segment, segment_index: int) -> None:
        assert segment.image is not None
        builder.add_image(
            segment.image, Kind.AUX_IMAGE, segment_index, start_is_target=config.train_aux_vision_start
        )

    builder = LayoutBuilder(backbone)
    weights = ResponseWeights(config.warmup_observation_weight, config.observation_tags, False)
    render_chat(builder, sample, on_aux_image, weights)
    return builder.build(sample.sample_id, sample.dataset)


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


def stage2_blocks(layout: Layout, start_sees_image: bool = True) -> list[tuple[int, int, int, int]]:
    """(image start, image end, latent start, latent end) per auxiliary image.

    The image span runs from vision-start through vision-end. **Decision**: the rows that may see the image are
    the K slots and, with `start_sees_image`, the start token (whose hidden state is the first latent); the end
    token is the first row after them, so no row outside the latent block carries the image forward.
    """
    aux = [slot for slot in layout.images if slot.kind == Kind.AUX_IMAGE]
    if len(aux) != len(layout.latents):
        raise ValueError(
            f"sample {layout.sample_id}: {len(aux)} auxiliary images but {len(layout.latents)} latent blocks"
        )
    return [
        (image.start - 1, image.end + 1, latent.start + (not start_sees_image), latent.end)
        for image, latent in zip(aux, layout.latents)
    ]


def stage2_mask(batch: Batch, start_sees_image: bool = True) -> MaskSpec:
    """Controlled attention of stage 2 (arXiv 2511.21395, stage 2)."""
    blocks = [stage2_blocks(layout, start_sees_image) for layout in batch.layouts]
    return hide_spans_outside_latents(blocks, batch.input_ids.shape[1], batch.valid, batch.input_ids.device)


def observation_positions(layout: Layout, close_tag_id: int) -> torch.Tensor:
    """From each `<observation>` token up to, not including, `</observation>` (the teacher's positions)."""
    is_observation = (layout.kinds == int(Kind.OBSERVATION)) & (layout.input_ids != close_tag_id)
    return is_observation.nonzero().squeeze(-1)
