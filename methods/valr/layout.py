"""VaLR's sequences: stage `sft` is plain CoT SFT; stage `align` puts a latent segment (start token, K slots, end
token) before every reasoning step, with the auxiliary images dropped (the latents stand for them)."""

from __future__ import annotations

from latentkit.methods.sft.method import SFTConfig, sft_layout
from latentkit.methods.valr.config import ValrConfig
from latentkit.methods.valr.steps import Steps

from latentkit.backbone import Backbone
from latentkit.chat import ResponseWeights, drop_aux_image, render_chat
from latentkit.layout import Layout, LayoutBuilder
from latentkit.segments import Sample


def plain_layout(backbone: Backbone, sample: Sample, config: ValrConfig) -> Layout:
    sft = SFTConfig(aux_images=config.sft_aux_images, observation_tags=config.observation_tags)
    return sft_layout(backbone, sample, sft)


def latent_layout(backbone: Backbone, steps: Steps, config: ValrConfig) -> Layout:
    """Latent segment j opens step j. Its start and end tokens are targets (the model learns to open a segment
    before a step; decoding forces the end), its K slots are not."""
    start, slot, end = config.latent_tokens
    opens = set(steps.starts)

    def before_segment(builder: LayoutBuilder, index: int) -> None:
        if index in opens:
            builder.add_latent(start, slot, end, config.num_latents, index, train_start=True, train_end=True)

    builder = LayoutBuilder(backbone)
    weights = ResponseWeights(1.0, config.observation_tags, True)
    render_chat(builder, steps.sample, drop_aux_image, weights, before_segment=before_segment)
    sample = steps.sample
    return builder.build(sample.sample_id, sample.dataset)
