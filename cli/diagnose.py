"""`latentkit diagnose`: trigger rate, raw and centred latent similarity, probes, accuracy with latents or inputs
replaced (with intervals and paired tests), PRISM's gap, attention mass, and a test-time K sweep."""

from __future__ import annotations

from pathlib import Path

import typer


def diagnose_command(
    benchmark: str = typer.Option(
        ..., "--benchmark", "-b", help="Benchmark name (see `latentkit benchmarks list`)."
    ),
    run: Path = typer.Option(None, "--run", help="A training run directory (its final/ model is diagnosed)."),
    checkpoint: Path = typer.Option(
        None, "--checkpoint", help="A model directory (e.g. runs/x/stages/latent/final)."
    ),
    data: Path = typer.Option(
        None, "--data", help="Benchmark files (file or folder); synthetic tasks default to the run's."
    ),
    split: str = typer.Option("test", "--split"),
    limit: int = typer.Option(None, "--limit", help="Only the first N samples."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per generation batch."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Default: the benchmark's."),
    k_sweep: str = typer.Option("1,2,4,8,12,16", "--k-sweep", help="Test-time K values, comma-separated."),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the noise replacements, the swap derangements and the probe folds."
    ),
    out: Path = typer.Option(
        None, "--out", help="Folder for <benchmark>-<split>.{json,md,png} (default: <run>/diagnose)."
    ),
    device: str = typer.Option(
        None, "--device", help="cpu, cuda, cuda:N or mps (default: cuda when there is one, else cpu)."
    ),
) -> None:
    """Measure whether a latent method's latents matter (greedy decoding, one line per condition)."""
    from transformers.utils import logging

    from latentkit.eval.benchmarks import get_benchmark
    from latentkit.eval.diagnose import DiagnoseOptions, diagnose, parse_k_sweep
    from latentkit.eval.model import load_eval_model
    from latentkit.eval.processes import close_processes

    get_benchmark(benchmark)
    options = DiagnoseOptions(
        benchmark, data, split, limit, batch_size, max_new_tokens, parse_k_sweep(k_sweep), seed
    )
    logging.disable_progress_bar()
    try:
        model = load_eval_model(run, checkpoint, device=device)
        _, paths = diagnose(model, options, out, log=lambda line: typer.echo(line, err=True))
    finally:
        close_processes()
    typer.echo(paths["md"].read_text(encoding="utf-8"))
    typer.echo(f"wrote {paths['json']}, {paths['md']} and {paths['png']}")
