"""Loaders for the real benchmarks, reading the files as users download them (README.md, "Real benchmarks").

Importing this package registers every loader's benchmark.
"""

from latentkit.eval.loaders import gsm8k, hrbench, mme_realworld, visualpuzzles, vsp, vstar

__all__ = ["gsm8k", "hrbench", "mme_realworld", "visualpuzzles", "vsp", "vstar"]
