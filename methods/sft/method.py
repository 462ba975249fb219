"""Interleaved chain-of-thought SFT: auxiliary images inline where the records put them, causal attention,
cross-entropy on assistant tokens with a configurable weight on observation tokens.

Other methods reuse it (Monet's warm-up stage is this with observation_weight=2) by subclassing or by
calling `sft_layout` / `sft_loss`.
"""

from __future__ import annotations

from pydantic import Field

from latentkit.backbone import Backbone
from latentkit.chat import ResponseWeights, drop_aux_image, inline_aux_image, render_chat
from latentkit.config import StrictModel
from latentkit.layout import Batch, Layout, LayoutBuilder, inputs_embeds
from latentkit.losses import weighted_next_token_ce
from latentkit.registry import LossOutput, Method, StageProgress
from latentkit.segments import Sample


class SFTConfig(StrictModel):
    observation_weight: float = Field(1.0, ge=0.0)
    aux_images: bool = True  # False: drop auxiliary images from the reasoning (text-only trace baseline)
    observation_tags: tuple[str, str] = ("<observation>", "</observation>")
    train_observation_tags: bool = True  # a model that generates must learn to open and close observations


def sft_layout(backbone: Backbone, sample: Sample, config: SFTConfig, prompt_only: bool = False) -> Layout:
    builder = LayoutBuilder(backbone)
    weights = ResponseWeights(
        config.observation_weight, config.observation_tags, config.train_observation_tags
    )
    on_aux_image = inline_aux_image if config.aux_images else drop_aux_image
    render_chat(builder, sample, on_aux_image, weights, prompt_only=prompt_only)
    return builder.build(sample.sample_id, sample.dataset)


def sft_loss(method: Method, backbone: Backbone, batch: Batch, stage: str) -> LossOutput:
    hidden = backbone.forward(inputs_embeds(backbone, batch), batch.position_ids, method.mask(batch, stage))
    loss, targets = weighted_next_token_ce(
        backbone, hidden.last_hidden_state, batch.labels, batch.loss_weight
    )
    return LossOutput(loss, {"target_tokens": float(targets)})


class SFT(Method):
    Config = SFTConfig
    stages = ("sft",)
    config: SFTConfig

    def setup(self, backbone: Backbone) -> None:
        super().setup(backbone)
        backbone.add_tokens(list(self.config.observation_tags))

    def layout(self, sample: Sample, stage: str) -> Layout:
        return sft_layout(self.backbone, sample, self.config)

    def loss(self, backbone: Backbone, batch: Batch, stage: str, progress: StageProgress) -> LossOutput:
        return sft_loss(self, backbone, batch, stage)
