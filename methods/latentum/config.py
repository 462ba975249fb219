"""LatentUM's `method:` config section (spec latentum.md). The public code (SJTU-DENG-Lab/LatentUM) releases no
quantizer training: the behaviour-KL direction and temperature, the MLP shapes and the EMA/reset settings are knobs
marked "ours", with the defaults we chose. The defaults are the tiny embedded default's (configs/latentum/tiny.yaml);
the spec's sizes for a 7B model are latent_size 256 and 8 codebooks x 2048 entries (32-d chunks)."""

from __future__ import annotations

from typing import Literal

from latentkit.methods.latentum.losses import KLDirection
from pydantic import Field, PositiveInt, model_validator

from latentkit.config import StrictModel


class QuantizerConfig(StrictModel):
    """Stage `quantizer`: MBAQ trained with the VLM frozen (spec "MBAQ")."""

    latent_size: int = Field(32, gt=0)  # the down MLP's output (256 in the spec)
    codebooks: int = Field(4, gt=0)  # C, each over latent_size / C dims (8 in the spec)
    codebook_size: int = Field(64, gt=1)  # N entries per codebook (2048 in the spec)
    # The hidden width of the down and up MLPs, one hidden layer each (ours); None: the pre-projector feature size.
    width: PositiveInt | None = None
    # What the up MLP produces: LLM input embeddings in place of the projector's output (the spec), or pre-projector
    # features that the frozen projector maps (ours).
    output: Literal["embeddings", "features"] = "embeddings"
    commitment: float = Field(0.25, ge=0.0)
    entropy_weight: float = Field(0.1, ge=0.0)
    vq_weight: float = Field(1.0, ge=0.0)  # the VQ loss's weight beside the behaviour KL (ours)
    # The behaviour KL over answer tokens: KL(p_original || p_quantized) (forward) or the reverse, at temperature T.
    kl_direction: KLDirection = "forward"
    kl_temperature: float = Field(1.0, gt=0.0)
    ema_decay: float = Field(0.95, gt=0.0, lt=1.0)  # of each entry's share of assignments (ours)
    # An entry is dead, and reset to a chunk of the batch, when its EMA share is below dead_threshold / N (ours).
    dead_threshold: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0  # the quantizer's initial weights

    @model_validator(mode="after")
    def _chunks(self) -> QuantizerConfig:
        if self.latent_size % self.codebooks:
            raise ValueError(
                f"latent_size={self.latent_size} is not a multiple of codebooks={self.codebooks}; each codebook "
                "quantizes latent_size / codebooks dims"
            )
        return self


class CodeHeadConfig(StrictModel):
    """The depth head predicting an image position's C sub-codes (spec "Generation"); its shape is ours."""

    width: int = Field(64, gt=0)
    layers: int = Field(1, gt=0)
    heads: int = Field(2, gt=0)
    seed: int = 0  # the head's initial weights

    @model_validator(mode="after")
    def _heads(self) -> CodeHeadConfig:
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not a multiple of heads={self.heads}")
        return self


class GuidanceConfig(StrictModel):
    """Classifier-free guidance on the code head's logits when sampling codes (spec "Generation")."""

    scale: float = Field(3.0, ge=0.0)
    temperature: float = Field(0.9, gt=0.0)
    top_k: int = Field(50, gt=0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)


class ImagineConfig(StrictModel):
    """Interleaved decoding (`decoding.py`): the images the model imagines when it emits the image-start token."""

    # Their merged (t, h, w) grid of positions; None: the prompt's last image's (synth-maze: the question board's).
    grid: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None
    seed: int = 0  # the codes' generators, one per row, seeded by (seed, sample key)
    force: bool = False  # the first generated token is the image-start token: an image imagined at once


class LanguageConfig(StrictModel):
    """Stage `language`: target images read as MBAQ decodes of their codes, a share of them replaced at random."""

    code_noise: float = Field(
        0.15, ge=0.0, lt=1.0
    )  # the share of sub-codes replaced by uniform random entries
    seed: int = 0


class VisionConfig(StrictModel):
    """Stage `vision`: CE on the target images' codes through the generation branch and the code head."""

    # The share of samples whose generation blocks see none of the understanding sequence, so that the head also
    # learns the unconditional distribution guidance needs (ours: the released example does not say).
    condition_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0


class PixelDecoderConfig(StrictModel):
    """Stage `pixels`: the pixel decoder (ours; the paper uses SD3.5-Medium's transformer) trained with the VLM and
    MBAQ frozen. z_q on the image-token grid -> a 1x1 convolution to `width` channels -> `depth` residual blocks of
    two `kernel_size` convolutions -> a 1x1 convolution to 3 x s x s values per token, s the pixels one token spans
    -> pixel shuffle to RGB. A larger decoder is a larger width and depth."""

    width: int = Field(64, gt=0)
    depth: int = Field(2, ge=0)
    kernel_size: int = Field(3, gt=0)
    l1_weight: float = Field(0.0, ge=0.0)  # loss: pixel MSE + l1_weight * pixel L1, on RGB in [0, 1]
    seed: int = 0  # the decoder's initial weights

    @model_validator(mode="after")
    def _odd_kernel(self) -> PixelDecoderConfig:
        if self.kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size={self.kernel_size} is even; use an odd size so the convolutions keep the token grid"
            )
        return self


class LatentumConfig(StrictModel):
    quantizer: QuantizerConfig = QuantizerConfig()
    code_head: CodeHeadConfig = CodeHeadConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    imagine: ImagineConfig = ImagineConfig()
    language: LanguageConfig = LanguageConfig()
    vision: VisionConfig = VisionConfig()
    pixels: PixelDecoderConfig = PixelDecoderConfig()
    observation_tags: tuple[str, str] = ("<observation>", "</observation>")
