"""`palette`: Reasoning Palette, a VAE of reasoning strategies decoded into latent prompt prefixes (arXiv 2512.17206)."""

from latentkit.methods.palette.config import PaletteConfig
from latentkit.methods.palette.method import Palette

__all__ = ["Palette", "PaletteConfig"]
