"""The latent engine shared by every method that feeds hidden states back as inputs (Monet, VaLR, Coconut-style
plugins): `fill_latents` for training layouts, `LatentPolicy` for decoding, interventions for diagnostics.
Nothing method-specific lives here.
"""

from latentkit.latent.decode import (
    Constant,
    ContinuousPolicy,
    DatasetMean,
    Intervention,
    LatentPolicy,
    LatentTokens,
    Noise,
    Zeros,
)
from latentkit.latent.fill import FilledLatents, fill_latents, fill_latents_reference, slot_positions

__all__ = [
    "Constant",
    "ContinuousPolicy",
    "DatasetMean",
    "FilledLatents",
    "Intervention",
    "LatentPolicy",
    "LatentTokens",
    "Noise",
    "Zeros",
    "fill_latents",
    "fill_latents_reference",
    "slot_positions",
]
