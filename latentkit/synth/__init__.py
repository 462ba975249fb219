"""Synthetic tasks generated deterministically from a seed into canonical records (specs/benchmarks.md)."""

from latentkit.synth.zoom import SynthInfo, chance_level, generate_synth_zoom

__all__ = ["SynthInfo", "chance_level", "generate_synth_zoom"]
