"""The latent engine shared by every method that feeds hidden states back as inputs (Monet, VaLR, Coconut-style
plugins): `fill_latents` for training layouts, `LatentStep` for decoding, interventions for diagnostics.
Nothing method-specific lives here.
"""

from latentkit.latent.decode import (
    Constant,
    DatasetMean,
    Intervention,
    LatentStep,
    LatentTokens,
    Noise,
    RowLatents,
    Zeros,
)
from latentkit.latent.fill import FilledLatents, fill_latents, fill_latents_reference, slot_positions

__all__ = [
    "Constant",
    "DatasetMean",
    "FilledLatents",
    "Intervention",
    "LatentStep",
    "LatentTokens",
    "Noise",
    "RowLatents",
    "Zeros",
    "fill_latents",
    "fill_latents_reference",
    "slot_positions",
]
