"""`latentkit data synth`: write a built-in synthetic task as canonical records (+ PNG images)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Datasets: generate the built-in synthetic tasks.", no_args_is_help=True)


@app.command("synth")
def synth_command(
    out: Path = typer.Option(..., "--out", help="Output folder (splits, images/, synth_info.json)."),
    task: str = typer.Option(
        "synth-zoom", "--task", help="synth-zoom, synth-maze, synth-moves or synth-arith."
    ),
    variant: str = typer.Option(
        None, "--variant", help="zoom: open|mc, maze: plan|yesno, arith: open (default: the first listed)."
    ),
    n: int = typer.Option(512, "--n", help="Number of training records."),
    n_val: int = typer.Option(32, "--n-val", help="Number of validation records."),
    n_test: int = typer.Option(64, "--n-test", help="Number of test records."),
    seed: int = typer.Option(0, "--seed"),
    knob: list[str] = typer.Option(
        None, "--knob", help="Task knob name=value, repeatable, e.g. --knob grid_size=5 --knob max_moves=6."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Write into a folder that is not empty (files of the same names are replaced).",
    ),
) -> None:
    """Generate a synthetic task deterministically from a seed."""
    from latentkit.errors import ConfigError
    from latentkit.synth import get_synth_task

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: pass a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"--out {out} is not empty: pass a new or empty folder, or --overwrite to replace what is there"
        )

    synth_task = get_synth_task(task)
    chosen = synth_task.check_variant(variant or synth_task.default_variant)
    knobs = synth_task.parse_knobs(knob or [])
    info = synth_task.generate(out, n_train=n, n_val=n_val, n_test=n_test, seed=seed, variant=chosen, **knobs)
    typer.echo(
        f"wrote {task} ({chosen}) to {out}: {info.counts} "
        f"(chance level {info.chance_level:.3f}, scorer {synth_task.scorers[chosen]})"
    )
