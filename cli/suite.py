"""`latentkit suite`: train, evaluate and compare a grid of runs (methods x ablations x seeds)."""

from __future__ import annotations

from pathlib import Path

import typer


def suite_command(
    suite_file: Path = typer.Argument(..., help="Suite YAML (e.g. configs/suites/monet-baselines.yaml)."),
    out: Path = typer.Option(..., "--out", help="Folder for runs/ and comparison/ (rerun to resume)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the runs and their overrides, run nothing."),
) -> None:
    """Run every method x ablation x seed of a suite, evaluate each, and compare them with intervals."""
    from latentkit.suite import load_suite, plan, run_suite

    suite = load_suite(suite_file)
    if dry_run:
        for name, seed, overrides in plan(suite, out / "runs"):
            typer.echo(f"{name} seed {seed}: latentkit train {' '.join(overrides)}")
        return
    run_suite(suite, out, log=typer.echo)
    typer.echo((out / "comparison" / "comparison.md").read_text(encoding="utf-8"))
    typer.echo(f"wrote {out / 'comparison'}")
