"""`latentkit train`: train a method (all its stages, or one with --stage)."""

from __future__ import annotations

from pathlib import Path

import typer


def train_command(
    overrides: list[str] = typer.Argument(
        None, help="Dotted config overrides, e.g. train.lr=1e-4 data.path=/data"
    ),
    method: str = typer.Option(None, "--method", "-m", help="Method name (see `latentkit methods list`)."),
    config: Path = typer.Option(
        None, "--config", "-c", help="YAML config file (e.g. configs/sft/tiny.yaml)."
    ),
    stage: str = typer.Option(None, "--stage", help="Run only this stage of the method."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its last checkpoint."),
) -> None:
    """Train a method. With no config: the tiny Qwen2.5-VL preset on the embedded synthetic task."""
    from latentkit.cli.app import INTERRUPTED

    from latentkit.api import train
    from latentkit.interrupt import TrainingInterrupted

    extra = list(overrides or [])
    if method is not None:
        extra.append(f"run.method={method}")
    if stage is not None:
        extra.append(f"train.stage={stage}")
    try:
        train(config, extra, resume=resume)
    except TrainingInterrupted as exc:  # typer would swallow it (a KeyboardInterrupt) without a word
        typer.echo(f"interrupted: {exc}", err=True)
        raise SystemExit(INTERRUPTED) from None
