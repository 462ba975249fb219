"""Fault injection: each test breaks something a real run meets (a changed config on resume, a damaged
checkpoint, Ctrl-C, a full disk, ...) and checks the one-line message and that nothing written is lost."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, final_weights, metrics, train_args
from latentkit.cli.app import main

import latentkit
from latentkit.checkpoint import MANIFEST_FILE, verify_checkpoint


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


# --- resume checks the whole config -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("runs")
    latentkit.train(None, [*train_args(out, "base")[1:], "train.steps=6", "train.checkpoint_every=2"])
    return out / "base"


def copy_run(trained: Path, tmp_path: Path) -> Path:
    """The trained run as if killed after its last checkpoint: no stage or run `final/`."""
    run = tmp_path / trained.name
    shutil.copytree(trained, run)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "stages" / "sft" / "final")
    config = (run / "config.yaml").read_text().replace(str(trained.parent), str(tmp_path))
    (run / "config.yaml").write_text(config)
    return run


def resume_args(run: Path, *extra: str) -> list[str]:
    return [
        *train_args(run.parent, run.name),
        "train.steps=6",
        "train.checkpoint_every=2",
        *extra,
        "--resume",
    ]


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("train.lr=1e-4", "train.lr"),
        ("train.steps=8", "train.steps"),
        ("train.batch_size=3", "train.batch_size"),
        ("train.stages.sft.warmup_steps=4", "train.stages.sft.warmup_steps"),
    ],
)
def test_resume_refuses_a_changed_train_value(trained, tmp_path, capsys, change, key):
    run = copy_run(trained, tmp_path)
    before = (run / "config.yaml").read_text()
    code, _, err = run_cli(capsys, *resume_args(run, change))
    line = one_line_error(code, err)
    assert f"{key} differs from the saved config.yaml" in line
    assert (run / "config.yaml").read_text() == before


def test_resume_allows_changing_how_a_run_is_watched(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    code, _, err = run_cli(capsys, *resume_args(run, "train.log_every=3", "train.keep_checkpoints=5"))
    assert code == 0, err
    assert [m["step"] for m in metrics(run) if m.get("event") == "resume"] == [4]


# --- checkpoints are verified before use ------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "truncated model": lambda c: _truncate(c / "model.safetensors"),
    "truncated optimizer": lambda c: _truncate(c / "optimizer.pt"),
    "garbage trainer_state": lambda c: (c / "trainer_state.json").write_text("{not json"),
    "missing trainer_state": lambda c: (c / "trainer_state.json").unlink(),
    "empty rng file": lambda c: (c / "rng-0.safetensors").write_bytes(b""),
    "no manifest (save never finished)": lambda c: (c / MANIFEST_FILE).unlink(),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_damaged_checkpoint_is_named_and_the_older_one_used(trained, tmp_path, capsys, corruption):
    run = copy_run(trained, tmp_path)
    checkpoints = run / "stages" / "sft" / "checkpoints"
    newest = checkpoints / "step-00000004"
    CORRUPTIONS[corruption](newest)
    (checkpoints / ".tmp-step-00000006").mkdir()  # a save that was killed half-way
    assert verify_checkpoint(newest) is not None
    code, _, err = run_cli(capsys, *resume_args(run))
    assert code == 0, err
    named = [line for line in err.splitlines() if str(newest) in line]
    assert len(named) == 1 and "unusable" in named[0] and "resuming from step-00000002" in named[0]
    assert [m["step"] for m in metrics(run) if m.get("event") == "resume"] == [2]
    assert (checkpoints / "corrupt-step-00000004").is_dir() and not (
        checkpoints / ".tmp-step-00000006"
    ).exists()
    straight, resumed = final_weights(trained), final_weights(run)
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_checkpoints_carry_a_manifest_written_last(trained):
    checkpoint = trained / "stages" / "sft" / "checkpoints" / "step-00000004"
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    assert set(manifest) == {p.name for p in checkpoint.iterdir()} - {MANIFEST_FILE}
    assert verify_checkpoint(checkpoint) is None


# --- Ctrl-C -------------------------------------------------------------------------------------------------------


def test_first_ctrl_c_finishes_the_step_writes_a_checkpoint_and_exits_130(tmp_path):
    args = train_args(tmp_path, "stopped", "train.steps=1000", "train.checkpoint_every=1000")
    process = subprocess.Popen(
        [sys.executable, "-m", "latentkit", *args], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    log = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert err.splitlines()[-1].startswith("interrupted: ") and "--resume" in err.splitlines()[-1]
    (checkpoint,) = (tmp_path / "stopped" / "stages" / "sft" / "checkpoints").glob("step-*")
    assert verify_checkpoint(checkpoint) is None
    last_step = max(m["step"] for m in metrics(tmp_path / "stopped") if "loss" in m)
    assert checkpoint.name == f"step-{last_step:08d}"


def test_second_ctrl_c_stops_at_once():
    from latentkit.interrupt import StopRequest

    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_outside_training_prints_one_line_and_exits_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("latentkit.registry.list_methods", interrupted)
    code, _, err = run_cli(capsys, "methods", "list")
    assert code == 130 and len(err.splitlines()) == 1 and err.startswith("interrupted at once")
