"""The `latentkit` command. Heavy modules (torch, transformers) are imported inside commands, so --help is fast."""

from __future__ import annotations

import sys

import click
import typer
from latentkit.cli import benchmarks, compare, data, diagnose, env, evaluate, generate, methods, train

app = typer.Typer(
    help="latentkit: train and compare latent-reasoning methods for vision-language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("train")(train.train_command)
app.add_typer(methods.app, name="methods")
app.add_typer(data.app, name="data")
app.command("eval")(evaluate.eval_command)
app.command("generate")(generate.generate_command)
app.command("compare")(compare.compare_command)
app.command("diagnose")(diagnose.diagnose_command)
app.add_typer(benchmarks.app, name="benchmarks")
app.command("env")(env.env_command)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of errors.")) -> None:
    """latentkit: train and compare latent-reasoning methods for vision-language models."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2 (--debug shows the traceback)."""
    from latentkit.errors import LatentkitError

    args = sys.argv[1:] if argv is None else argv
    try:
        code = app(args=args, standalone_mode=False, prog_name="latentkit")
    except LatentkitError as exc:
        if "--debug" in args:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except click.exceptions.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Abort:
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)
