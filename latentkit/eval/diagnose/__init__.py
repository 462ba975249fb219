"""`latentkit diagnose`: do a latent method's latents matter? The battery (`battery`), its decoding
conditions (`conditions`), the geometry of the latents (`measures`), linear probes (`probes`), replayed
hidden states and attention (`hidden`) and the Markdown/PNG report (`report`)."""

from latentkit.eval.diagnose.battery import (
    DiagnoseOptions,
    continuous_policy,
    default_output_dir,
    diagnose,
    output_paths,
    parse_k_sweep,
)
from latentkit.eval.diagnose.measures import (
    Latents,
    between_input_fraction,
    cross_input_cosine,
    latent_statistics,
    relative_change,
    retrieval_top1,
    step_means,
)
from latentkit.eval.diagnose.report import READING_GUIDE, markdown_report, plot_report

__all__ = [
    "READING_GUIDE",
    "DiagnoseOptions",
    "Latents",
    "between_input_fraction",
    "continuous_policy",
    "cross_input_cosine",
    "default_output_dir",
    "diagnose",
    "latent_statistics",
    "markdown_report",
    "output_paths",
    "parse_k_sweep",
    "plot_report",
    "relative_change",
    "retrieval_top1",
    "step_means",
]
