"""`valr`: vision-aligned latent segments before every reasoning step (arXiv 2602.04476)."""

from latentkit.methods.valr.config import ValrConfig
from latentkit.methods.valr.method import Valr

__all__ = ["Valr", "ValrConfig"]
