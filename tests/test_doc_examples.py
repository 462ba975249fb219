"""Every `latentkit ...` command shown in the README and docs parses: its command and options exist, its values
have the right types, and a `train` command's config file and overrides build a valid run config. (Paths such
as /ckpt/... are not opened: this checks what a reader would type, not their files.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from latentkit.cli.app import app

from latentkit.api import resolve_config

REPO = Path(__file__).resolve().parents[1]
SHELL = ("bash", "sh", "console")


def shell_blocks(text: str) -> list[str]:
    """The contents of the fenced blocks whose language is a shell."""
    blocks, current, language = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                if language in SHELL:
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def shown_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `latentkit`) of every command line in a shell block; `\\` continuations joined."""
    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in shell_blocks(doc.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                # `[--variant open]` is usage notation for an optional part: check it as if given
                lexer = shlex.shlex(re.sub(r"\[(-[^]]*)\]", r"\1", line), posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                command: list[str] = []
                for word in [*lexer, ";"]:
                    if word in (";", "&&", "||", "|", "&"):
                        if command[:1] == ["latentkit"] and len(command) > 1:
                            found.append((f"{doc.name}: {shlex.join(command)}", command[1:]))
                        command = []
                    else:
                        command.append(word)
    return found


COMMANDS = shown_commands()
PLUGIN_EXAMPLES = {"sft-probe", "mymethod"}  # docs/plugins.md's example plugins: a reader installs them first


def parse(argv: list[str]) -> tuple[str, dict]:
    """The leaf command's name and parsed parameters, through the real click parser (nothing runs)."""
    command = typer.main.get_command(app)
    names = []
    while True:
        context = command.make_context(" ".join(["latentkit", *names]), list(argv), resilient_parsing=False)
        if not hasattr(command, "commands"):
            return " ".join(names), context.params
        name, command, argv = command.resolve_command(context, [*context._protected_args, *context.args])
        names.append(name)


def test_the_docs_show_commands():
    assert len(COMMANDS) > 20
    assert {words[0] for _, words in COMMANDS} >= {"train", "eval", "compare", "diagnose", "generate"}


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_shown_command_parses(where, argv):
    name, params = parse(argv)
    if name != "train" or params["method"] in PLUGIN_EXAMPLES:
        return
    overrides = list(params["overrides"] or [])
    if params["method"] is not None:
        overrides.append(f"run.method={params['method']}")
    config = params["config"]
    resolve_config(REPO / config if config is not None else None, overrides)


def python_blocks(text: str) -> list[str]:
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None and line[3:].strip() == "python":
                current = []
            elif current is not None:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch):
    """The README's Python blocks, run as written in a folder holding the runs they name and a star.png."""
    from helpers import latentkit
    from PIL import Image, ImageDraw

    fast = ["train.steps=1", "train.progress=false", "data.synth.n_train=8", "data.synth.n_test=4"]
    latentkit("train", "--method", "sft", f"run.output_dir={tmp_path / 'runs'}", *fast)
    arith = ["model.preset=tiny-causal-lm", "data.task=synth-arith"]
    latentkit("train", "--method", "sft", f"run.output_dir={tmp_path / 'runs'}", *fast, *arith)
    star = Image.new("RGB", (56, 56), (225, 225, 225))
    ImageDraw.Draw(star).polygon(
        [(28, 6), (34, 22), (50, 22), (37, 32), (42, 48), (28, 38)], fill=(220, 30, 30)
    )
    star.save(tmp_path / "star.png")
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 3
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own examples
    assert namespace["summary"]["accuracy"] >= 0  # the last block evaluated its model
