"""The `latentkit` command. Heavy modules (torch, transformers) are imported inside commands, so --help is fast."""

from __future__ import annotations

import errno
import sys
from typing import NoReturn

import typer
from latentkit.cli import benchmarks, compare, data, diagnose, env, evaluate, generate, methods, suite, train

# typer >= 0.29 vendors click as typer._click (pyproject.toml pins the tested range)
from typer._click.exceptions import NoArgsIsHelpError, UsageError

INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT

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
app.command("suite")(suite.suite_command)
app.command("diagnose")(diagnose.diagnose_command)
app.add_typer(benchmarks.app, name="benchmarks")
app.command("env")(env.env_command)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of errors.")) -> None:
    """latentkit: train and compare latent-reasoning methods for vision-language models."""


def main(argv: list[str] | None = None) -> None:
    """Entry point. A user error (a latentkit error, or a command line that does not parse: unknown command or
    option, bad value, missing argument) prints one line on stderr and exits 2; --debug shows the traceback
    of latentkit errors. Ctrl-C prints one line and exits 130."""
    from latentkit.errors import LatentkitError

    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = app(args=args, standalone_mode=False, prog_name="latentkit")
    except LatentkitError as exc:
        if "--debug" in args:
            raise
        _fail(str(exc))
    except NoArgsIsHelpError as exc:  # a group without its command (`latentkit methods`): its help, exit 2
        if exc.format_message():  # empty when typer's rich formatter has printed the help already
            typer.echo(exc.format_message())
        raise SystemExit(2) from None
    except UsageError as exc:
        _fail(_usage_message(exc))
    except OSError as exc:
        if "--debug" in args:
            raise
        _fail(os_error_message(exc))
    except typer.TyperException as exc:  # any other error typer's parser reports
        _fail(" ".join(exc.format_message().split()))
    if code == INTERRUPTED:  # typer turns a KeyboardInterrupt into this code
        typer.echo(
            "interrupted at once: nothing after the last checkpoint was saved (train: continue with --resume)",
            err=True,
        )
    raise SystemExit(code if isinstance(code, int) else 0)


_OS_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere (run.output_dir=..., --out ...)",
    errno.EDQUOT: "free some space or write elsewhere (run.output_dir=..., --out ...)",
    errno.EACCES: "choose a folder you may write to (run.output_dir=..., --out ...)",
    errno.EPERM: "choose a folder you may write to (run.output_dir=..., --out ...)",
    errno.EROFS: "the file system is read-only: choose another folder (run.output_dir=..., --out ...)",
    errno.ENOENT: "check that the path exists",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


def os_error_message(exc: OSError) -> str:
    """`cannot write runs/x/config.yaml: No space left on device (free some space ...)`."""
    where = f" {exc.filename}" if exc.filename is not None else ""
    hint = _OS_HINTS.get(exc.errno) if exc.errno is not None else None
    return f"cannot access{where}: {exc.strerror or exc}" + (f" ({hint})" if hint else "")


def _usage_message(exc: UsageError) -> str:
    """typer's message on one line, then where to look: `no such option: --bogus; see latentkit train --help`."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    return f"{message}; see {exc.ctx.command_path} --help" if exc.ctx is not None else message


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(2) from None
