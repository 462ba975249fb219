"""CLI behaviour: one-line errors with exit code 2 for user mistakes, listing and data commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import FAST
from latentkit.cli.app import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["train", "--bogus"], ["no such option: --bogus", "see latentkit train --help"]),
        (["--bogus"], ["no such option: --bogus", "see latentkit --help"]),
        (["bogus"], ["no such command 'bogus'", "see latentkit --help"]),
        (["methods", "bogus"], ["no such command 'bogus'", "see latentkit methods --help"]),
        (["methods", "list", "--bogus"], ["--bogus", "see latentkit methods list --help"]),
        (["eval", "--benchmark", "synth-zoom", "--batch-size", "x"], ["invalid value for '--batch-size'"]),
        (["data", "synth", "--n", "x"], ["invalid value for '--n'", "see latentkit data synth --help"]),
        (["eval"], ["missing option '--benchmark'", "see latentkit eval --help"]),
        (["train", "--stage"], ["option '--stage' requires an argument"]),
        (["train", "--method", "nope"], ["unknown method 'nope'", "valid methods: ", "sft"]),
    ],
)
def test_command_line_errors_are_one_line_and_exit_2(capsys, args, fragments):
    code, out, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, *fragments)
    assert not out and "Traceback" not in err


def test_command_line_errors_stay_one_line_with_debug(capsys):
    code, _, err = run_cli(capsys, "--debug", "train", "--bogus")
    assert_one_line_error(code, err, "no such option: --bogus")


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["methods", "list", "--help"]])
def test_help_exits_0(capsys, args):
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "Usage: latentkit" in out and not err


@pytest.mark.parametrize("args", [[], ["methods"]])
def test_a_group_without_its_command_shows_its_help_and_exits_2(capsys, args):
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and "Usage: latentkit" in out and "Commands" in out and not err


def test_console_script_prints_one_line_for_a_bad_option(tmp_path):
    """The installed `latentkit` script (typer's own error handling would print a usage block or a traceback)."""
    script = Path(sys.executable).with_name("latentkit")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "latentkit"]
    result = subprocess.run(
        [*command, "train", "--bogus"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.splitlines() == ["error: no such option: --bogus; see latentkit train --help"]


def test_bad_config_key(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", f"run.output_dir={tmp_path}", "train.lrr=1")
    assert_one_line_error(code, err, "train.lrr", "did you mean train.lr")


def test_unknown_method(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--method", "monnet", f"run.output_dir={tmp_path}")
    assert_one_line_error(code, err, "monnet", "valid methods: ", "sft")


def test_unknown_stage_in_stage_settings(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "train", "--method", "monet", f"run.output_dir={tmp_path}", "train.stages.distil.lr=1"
    )
    assert_one_line_error(
        code,
        err,
        "train.stages.distil",
        "not a stage of monet",
        "valid stages: warmup, distill, latent, vlpo",
    )
    assert not tmp_path.joinpath("monet-tiny-qwen2.5-vl").exists()


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "nope.yaml"))
    assert_one_line_error(code, err, "nope.yaml", "not found")


def test_missing_data_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", f"run.output_dir={tmp_path}", f"data.path={tmp_path / 'absent'}")
    assert_one_line_error(code, err, "absent", "data.path=")


def test_malformed_record(capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    record = {
        "data": [
            {"role": "system", "content": [{"type": "text", "text": "s"}]},
            {
                "role": "user",
                "content": [{"type": "image", "image": "missing.png"}, {"type": "text", "text": "q"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
        ],
        "metadata": {"sample_id": "x"},
    }
    (data / "train.json").write_text(json.dumps([record]))
    code, _, err = run_cli(capsys, "train", f"run.output_dir={tmp_path}", f"data.path={data}")
    assert_one_line_error(
        code, err, "train.json", "record 0", "data[1].content[0].image", "on_bad_record=skip"
    )


def test_resume_without_run_and_restart_of_finished_run(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", f"run.output_dir={tmp_path}", "run.name=none", "--resume")
    assert_one_line_error(code, err, "cannot resume", "config.yaml")
    finished = tmp_path / "done" / "stages" / "sft"
    finished.mkdir(parents=True)
    code, _, err = run_cli(capsys, "train", f"run.output_dir={tmp_path}", "run.name=done")
    assert_one_line_error(code, err, "already exists", "--resume")


def test_unknown_stage(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", f"run.output_dir={tmp_path}", "--stage", "distill")
    assert_one_line_error(code, err, "distill", "sft")


def test_methods_list(capsys):
    code, out, _ = run_cli(capsys, "methods", "list", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["sft"]["stages"] == ["sft"]
    code, out, _ = run_cli(capsys, "methods", "list")
    assert code == 0 and out.splitlines()[0].split() == ["name", "stages", "source"]


def test_data_synth(capsys, tmp_path):
    code, out, _ = run_cli(
        capsys, "data", "synth", "--task", "synth-zoom", "--n", "3", "--out", str(tmp_path / "z")
    )
    assert code == 0 and "chance level" in out
    assert len(json.loads((tmp_path / "z" / "train.json").read_text())) == 3
    code, _, err = run_cli(capsys, "data", "synth", "--task", "synth-nope", "--out", str(tmp_path / "y"))
    assert_one_line_error(code, err, "synth-nope", "synth-zoom")


def test_debug_shows_traceback(tmp_path):
    from latentkit.errors import RegistryError

    with pytest.raises(RegistryError):
        main(["--debug", "train", "--method", "nope", f"run.output_dir={tmp_path}"])


def test_env(capsys):
    code, out, _ = run_cli(capsys, "env")
    assert code == 0 and "torch:" in out and "transformers:" in out


def test_train_in_process_writes_resolved_config(capsys, tmp_path):
    code, out, _ = run_cli(
        capsys, "train", f"run.output_dir={tmp_path}", "run.name=cfg", "train.steps=1", *FAST
    )
    assert code == 0 and "run finished" in out
    saved = (tmp_path / "cfg" / "config.yaml").read_text()
    assert "steps: 1" in saved and "method: sft" in saved
    assert yaml.safe_load(saved)["train"]["stages"]["sft"]["steps"] == 1  # every stage's effective values
