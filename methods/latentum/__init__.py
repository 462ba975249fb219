"""`latentum`: LatentUM, interleaved reasoning over discrete codes of the model's own image features (arXiv 2604.02097)."""

from latentkit.methods.latentum.config import LatentumConfig, QuantizerConfig
from latentkit.methods.latentum.method import Latentum

__all__ = ["Latentum", "LatentumConfig", "QuantizerConfig"]
