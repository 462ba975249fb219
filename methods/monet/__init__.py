"""`monet`: latent visual thoughts distilled from auxiliary images in three SFT stages (specs/monet.md)."""

from latentkit.methods.monet.config import MonetConfig
from latentkit.methods.monet.method import Monet

__all__ = ["Monet", "MonetConfig"]
