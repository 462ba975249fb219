"""`monet`: latent visual thoughts distilled from auxiliary images in three SFT stages (arXiv 2511.21395)."""

from latentkit.methods.monet.config import MonetConfig
from latentkit.methods.monet.method import Monet

__all__ = ["Monet", "MonetConfig"]
