"""The latent engine shared by every method that feeds hidden states back as inputs (Monet, VaLR, Coconut-style
plugins): `fill_latents` for training layouts, `LatentPolicy` for decoding, interventions for diagnostics.
Nothing method-specific lives here.
"""

from latentkit.latent.decode import (
    Constant,
    ContinuousPolicy,
    DatasetMean,
    Identity,
    Intervention,
    LatentPolicy,
    LatentTokens,
    MomentMatchedNoise,
    Noise,
    NormMatchedNoise,
    RepeatFirst,
    Transplant,
    Zeros,
    varied_policy,
)
from latentkit.latent.fill import FilledLatents, fill_latents, fill_latents_reference, slot_positions

__all__ = [
    "Constant",
    "ContinuousPolicy",
    "DatasetMean",
    "FilledLatents",
    "Identity",
    "Intervention",
    "LatentPolicy",
    "LatentTokens",
    "MomentMatchedNoise",
    "Noise",
    "NormMatchedNoise",
    "RepeatFirst",
    "Transplant",
    "Zeros",
    "fill_latents",
    "fill_latents_reference",
    "slot_positions",
    "varied_policy",
]
