"""`latentkit env`: versions and devices, to paste into bug reports."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import typer

PACKAGES = (
    "latentkit",
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "datasets",
    "triton",
    "safetensors",
    "flash-attn",
    "wandb",
)


def env_command() -> None:
    """Print versions and devices."""
    import torch

    typer.echo(f"python: {platform.python_version()} ({platform.platform()})")
    for name in PACKAGES:
        try:
            typer.echo(f"{name}: {version(name)}")
        except PackageNotFoundError:
            typer.echo(f"{name}: not installed")
    typer.echo(f"cpu threads: {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            typer.echo(f"cuda:{index}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        typer.echo("cuda: not available")
