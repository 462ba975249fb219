"""`sft`: plain interleaved chain-of-thought SFT (the baseline, and Monet's stage 1)."""

from latentkit.methods.sft.method import SFT, SFTConfig

__all__ = ["SFT", "SFTConfig"]
