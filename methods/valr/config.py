"""VaLR's `method:` config section (arXiv 2602.04476). The paper has no public code: every choice it does not state
is a knob here, marked "ours", with the default we chose."""

from __future__ import annotations

from typing import Literal

from latentkit.methods.valr.losses import grid_side
from pydantic import Field, field_validator, model_validator

from latentkit.config import StrictModel
from latentkit.latent.fill import Feedback

StepRule = Literal["lines", "sentences", "markers", "aux_images"]
EncoderPreset = Literal["tiny-dinov2", "tiny-siglip", "tiny-clip"]
LayerChoice = Literal["front", "middle", "last"]


class EncoderSpec(StrictModel):
    """One frozen vision encoder: a local HF checkpoint (AutoModel + its image processor) or a tiny preset."""

    path: str | None = None
    preset: EncoderPreset | None = None
    # Width of the projector psi's hidden layers (ours: REPA's 3-layer SiLU MLP); None: the language model's
    # hidden size. The 7B config uses 2048.
    projector_hidden: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> EncoderSpec:
        if (self.path is None) == (self.preset is None):
            raise ValueError("an encoder needs exactly one of path (a local HF model directory) or preset")
        return self

    @property
    def name(self) -> str:
        return self.preset or self.path.rstrip("/").rsplit("/", 1)[-1]  # type: ignore[union-attr]


class ValrConfig(StrictModel):
    latent_tokens: tuple[str, str, str] = ("<latent>", "<latent_pad>", "</latent>")  # start, slot, end
    observation_tags: tuple[str, str] = ("<observation>", "</observation>")
    num_latents: int = Field(4, gt=0)  # K per segment, a perfect square (a grid); the paper's 16 at 7B
    # How the response is cut into steps (each gets a latent segment before it). Under every rule an auxiliary
    # image's place also starts a step, whose target is that image; other steps target the question image.
    step_rule: StepRule = "lines"
    step_marker: str = r"Step \d+[:.]"  # `markers`: a regex; a step starts at each match
    alignment_weight: float = Field(0.5, ge=0.0)  # lambda; 0 is the no-alignment ablation
    # The layer whose hidden states at the K latent positions are aligned: an index (1 = the first decoder
    # layer's output) or front (a quarter of the way) / middle / last. The paper: layer 12 of 28.
    align_layer: int | LayerChoice = "middle"
    encoders: list[EncoderSpec] = Field(default_factory=lambda: [EncoderSpec(preset="tiny-dinov2")])
    feature_cache: bool = (
        True  # encoder features computed once per stage run (False: the encoders run each step)
    )
    feature_dtype: Literal["float16", "float32"] = "float16"
    fill_gradient: Feedback = "full"  # gradient through the Coconut recurrence (ours: full backprop)
    sft_aux_images: bool = (
        False  # stage sft: the auxiliary images inline (False: a text-only trace, as in align)
    )
    cache_batch_size: int = Field(8, gt=0)
    decode_latents: int | None = Field(None, gt=0)  # test-time K (default num_latents)
    decode_force: bool = False  # every answer opens with a latent segment

    @field_validator("num_latents")
    @classmethod
    def _square(cls, value: int) -> int:
        grid_side(value)
        return value

    @field_validator("align_layer")
    @classmethod
    def _layer(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("align_layer must be >= 1 (a decoder layer's output) or front/middle/last")
        return value

    @model_validator(mode="after")
    def _distinct_encoders(self) -> ValrConfig:
        names = [encoder.name for encoder in self.encoders]
        if len(set(names)) != len(names):
            raise ValueError(f"encoders {names} repeat a name; each encoder is listed once")
        if self.alignment_weight > 0 and not self.encoders:
            raise ValueError("alignment_weight > 0 needs at least one encoder (or set alignment_weight=0)")
        return self
