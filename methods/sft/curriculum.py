"""`sft-curriculum`: the curriculum baseline of latent methods. Stage `crops` is interleaved SFT with the
auxiliary images inline; stage `nocrops` continues from it on the same traces with the auxiliary images
dropped. A latent method that beats `sft` only by training with crops first must also beat this."""

from __future__ import annotations

from latentkit.methods.sft.method import SFT, SFTConfig, sft_layout

from latentkit.layout import Layout
from latentkit.segments import Sample


class SFTCurriculum(SFT):
    Config = SFTConfig
    stages = ("crops", "nocrops")
    config: SFTConfig

    def layout(self, sample: Sample, stage: str) -> Layout:
        aux_images = stage == "crops"
        return sft_layout(self.backbone, sample, self.config.model_copy(update={"aux_images": aux_images}))
