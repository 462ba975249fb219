"""Reasoning Palette's `method:` config section (arXiv 2512.17206). The paper has no public code and no appendix:
every choice it does not state is a knob here, marked "ours", with the default we chose."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from latentkit.methods.palette.schedules import Schedule
from pydantic import Field, PositiveInt, model_validator

from latentkit.config import StrictModel

PrefixMode = Literal["latent", "noise_prefix", "raw_noise", "none"]


class PaletteSeeds(StrictModel):
    init: int = 0  # the VAE's initial weights; `noise_prefix` re-creates its untrained decoder from this seed
    warmup: int = 0  # z of stage warmup, drawn per (sample, step)
    prefix: int = 0  # z of the prompt prefix at inference, drawn per (sample, draw)


class PaletteConfig(StrictModel):
    # k: the size of z (ours; the paper states only its VL setting, 1024 = 8 x 128 with the transformer decoder).
    latent_size: int = Field(32, gt=0)
    # The KL weight (ours): the squared error is summed over d and mean embeddings vary little between samples, so
    # a beta near 1 collapses q(z|h) onto the prior.
    beta: float = Field(1e-3, ge=0.0)
    # Ours: fit h standardized per dimension by the training corpus's mean and spread, so the squared error is of
    # order d, not of the embeddings' tiny between-sample differences; the decoder's output is mapped back. Off
    # (the paper's literal loss on raw h) the tiny default's encoder learned a mu that hardly moves with the input.
    standardize_input: bool = True
    # Hidden layer widths of the encoder and decoder MLPs, SiLU between layers (ours); None: two layers of the
    # model's hidden size.
    encoder_widths: list[PositiveInt] | None = None
    decoder_widths: list[PositiveInt] | None = None
    # mlp: one z decodes to one vector (the text models). transformer: z (latent_size = prefix_tokens * k') is
    # reshaped into prefix_tokens vectors that a small GPT-style decoder turns into prefix_tokens embeddings (VL).
    prefix_decoder: Literal["mlp", "transformer"] = "mlp"
    prefix_tokens: int = Field(8, gt=0)  # transformer: vectors per z (the paper's 8)
    decoder_width: int = Field(256, gt=0)  # transformer: model width (ours)
    decoder_layers: int = Field(2, gt=0)  # transformer: depth (ours)
    decoder_heads: int = Field(4, gt=0)  # transformer: attention heads (ours)
    # L, in draws of z (each decodes to 1 vector, or prefix_tokens with the transformer): 1 in warm-up SFT,
    # 4 or 8 at inference and in RL (the paper).
    train_prefix_length: int = Field(1, gt=0)
    # Where the warm-up's z comes from: the prior (the paper), or q(z | h) of the sample being trained on (ours), so
    # that the model learns to read its answer's strategy from the prefix; steering needs a model that does.
    warmup_latents: Literal["prior", "posterior"] = "prior"
    test_prefix_length: int = Field(4, gt=0)
    prefix_sampling: Literal["independent", "repeated"] = (
        "independent"  # each z_l its own draw, or one z L times
    )
    # What the prompt carries: D(z) (latent), D0(z) of the untrained decoder (noise_prefix, the paper's baseline),
    # Gaussian vectors not routed through a decoder (raw_noise), or nothing (none).
    prefix: PrefixMode = "latent"
    # raw_noise's standard deviation per coordinate (ours); None: the RMS of the token-embedding table's entries.
    raw_noise_std: float | None = Field(None, gt=0.0)
    # Domain steering: a Gaussian fitted to one domain's encoded latents (`fit_domain`); z is drawn from it
    # instead of the prior. None: the prior N(0, I).
    domain: Path | None = None
    domain_covariance: Literal["full", "diagonal"] = "diagonal"  # what `fit_domain` fits (ours)
    # What makes a domain when the run fits them (at the start of stage warmup, one Gaussian per value, into
    # stages/vae/domains/<value>.safetensors): `dataset` (the sub-dataset) or `metadata.<field>`; None: none.
    domain_by: str | None = "dataset"
    observation_tags: tuple[str, str] = ("<observation>", "</observation>")
    seeds: PaletteSeeds = PaletteSeeds()
    # Stage rl (an RL stage, settings in `train.rl`): at progress tau, round(rho(tau) * G) rollouts of each group
    # get a prefix of `rl_prefix_length` fresh draws of z (the paper's L = 8); the rest roll out without one.
    rl_schedule: Schedule = "two_phase"
    rl_prefix_length: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> PaletteConfig:
        if self.prefix_decoder == "transformer":
            if self.latent_size % self.prefix_tokens:
                raise ValueError(
                    f"latent_size={self.latent_size} is not a multiple of prefix_tokens={self.prefix_tokens}; "
                    "the transformer decoder reshapes z into prefix_tokens vectors"
                )
            if self.decoder_width % self.decoder_heads:
                raise ValueError(
                    f"decoder_width={self.decoder_width} is not a multiple of decoder_heads={self.decoder_heads}"
                )
        if self.domain_by not in (None, "dataset") and not (
            self.domain_by.startswith("metadata.") and len(self.domain_by) > len("metadata.")
        ):
            raise ValueError(f"domain_by={self.domain_by!r} must be dataset, metadata.<field> or null")
        if self.domain is not None and self.prefix != "latent":
            raise ValueError(
                f"domain steering draws the z of a latent prefix; prefix={self.prefix!r} has none"
            )
        return self

    @property
    def vectors_per_latent(self) -> int:
        """How many prefix embeddings one z decodes to."""
        return self.prefix_tokens if self.prefix_decoder == "transformer" else 1
