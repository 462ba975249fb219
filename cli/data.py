"""`latentkit data synth`: write a built-in synthetic task as canonical records with PNG images."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Datasets: generate the built-in synthetic tasks.", no_args_is_help=True)


@app.command("synth")
def synth_command(
    out: Path = typer.Option(..., "--out", help="Output folder (train/val/test .json + images/)."),
    task: str = typer.Option("synth-zoom", "--task", help="Synthetic task name."),
    n: int = typer.Option(512, "--n", help="Number of training records."),
    n_val: int = typer.Option(32, "--n-val", help="Number of validation records."),
    n_test: int = typer.Option(64, "--n-test", help="Number of test records."),
    seed: int = typer.Option(0, "--seed"),
    variant: str = typer.Option("open", "--variant", help="open (answer word) or mc (option letter)."),
) -> None:
    """Generate a synthetic task deterministically from a seed."""
    from latentkit.errors import DataError
    from latentkit.synth.zoom import generate_synth_zoom

    tasks = {"synth-zoom": generate_synth_zoom}
    if task not in tasks:
        raise DataError(f"unknown synthetic task {task!r}; valid tasks: {', '.join(tasks)}")
    if variant not in ("open", "mc"):
        raise DataError(f"unknown --variant {variant!r}; use open or mc")
    info = tasks[task](out, n_train=n, n_val=n_val, n_test=n_test, seed=seed, variant=variant)
    typer.echo(f"wrote {task} to {out}: {info.counts} (chance level {info.chance_level:.3f})")
