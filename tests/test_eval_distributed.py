"""`latentkit eval` on a chosen device and dtype, and shared by the processes of `accelerate launch`: two CPU
processes (gloo) write what one process writes, resume exactly, and fail together."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, free_port, latentkit, launch_command, train_args
from latentkit.cli.app import main

from latentkit.eval.model import load_eval_model

TWO_PROCESSES = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
# 10 test samples in batches of 2: five batches, three for the first process and two for the second.
EVAL = ["--benchmark", "synth-zoom", "--max-new-tokens", "12", "--batch-size", "2", "--no-progress"]
RUN_SPECIFIC = ("created", "results")  # when the summary was written, and where its JSONL is


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    latentkit(*train_args(out, "sft", "data.synth.n_test=10", "train.steps=2"))
    return out / "sft"


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory) -> Path:
    """The eval in one process."""
    out = tmp_path_factory.mktemp("one") / "zoom.jsonl"
    latentkit("eval", "--run", str(run), "--out", str(out), *EVAL)
    return out


def launch(*args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of the CLI on two processes; a hang fails the test at the timeout."""
    command = launch_command(TWO_PROCESSES, *args)
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False, timeout=300)


def summary(results: Path) -> dict:
    written = json.loads(results.with_name(results.stem + ".summary.json").read_text())
    return {key: value for key, value in written.items() if key not in RUN_SPECIFIC}


def outputs(results: Path) -> list[tuple[str, str]]:
    return [(r["sample_id"], r["output"]) for r in map(json.loads, results.read_text().splitlines())]


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(run, reference, tmp_path):
    out = tmp_path / "zoom.jsonl"
    result = launch("eval", "--run", str(run), "--out", str(out), *EVAL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval: 2 processes answered 6 + 4 samples" in result.stderr
    assert out.read_bytes() == reference.read_bytes()
    assert summary(out) == summary(reference)
    assert result.stdout.count("wrote ") == 1  # the main process reports


# A user's script under `accelerate launch`: each process writes the summary it got to a file of its own.
API_SCRIPT = """
import json, sys
from accelerate import PartialState
import latentkit
from latentkit.decoding import SamplingParams

model = latentkit.load(sys.argv[1], device="cpu")
sampling = SamplingParams(max_new_tokens=12)
summary = latentkit.evaluate(model, "synth-zoom", sys.argv[2], batch_size=2, sampling=sampling)
with open(f"{sys.argv[2]}.returned-{PartialState().process_index}", "w") as handle:
    json.dump(summary, handle)
"""


@pytest.mark.slow
def test_the_python_api_splits_over_a_launch_too(run, reference, tmp_path):
    script, out = tmp_path / "evaluate.py", tmp_path / "zoom.jsonl"
    script.write_text(API_SCRIPT)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    command = [*launcher, "--config_file", str(TWO_PROCESSES), str(script), str(run), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_bytes() == reference.read_bytes()
    returned = [json.loads(Path(f"{out}.returned-{index}").read_text()) for index in (0, 1)]
    assert returned[0] == returned[1]  # every process gets the summary
    assert {k: v for k, v in returned[0].items() if k not in RUN_SPECIFIC} == summary(reference)


@pytest.mark.slow
def test_resume_on_two_processes_is_exact(run, reference, tmp_path):
    out = tmp_path / "zoom.jsonl"
    kept = reference.read_text().splitlines(keepends=True)[:3]  # mid-batch, then a line torn by a kill
    out.write_text("".join(kept) + '{"sample_id": "synth-zoom-te')
    result = launch("eval", "--run", str(run), "--out", str(out), *EVAL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval: 2 processes answered 4 + 4 samples" in result.stderr  # batch 1 again, its sample 3 written
    assert out.read_bytes() == reference.read_bytes()
    assert summary(out) == summary(reference)


def break_image_data(path: Path) -> None:
    """Scramble a PNG's pixel data but keep every chunk's checksum: loading the records (which verifies the
    files) accepts it, decoding it when the sample is answered fails."""
    data, position, rewritten = path.read_bytes(), 8, b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        if kind == b"IDAT":
            body = body[:2] + b"\xff" * (len(body) - 2)
        rewritten += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        position += 12 + length
    path.write_bytes(data[:8] + rewritten)


@pytest.mark.slow
def test_a_failure_on_one_process_stops_both_and_the_eval_resumes(run, reference, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(run / "data" / "synth-zoom", data)
    image = data / "images" / "synth-zoom-test-000006.png"  # batch 3: the second process, second round
    intact = image.read_bytes()
    break_image_data(image)
    out = tmp_path / "zoom.jsonl"
    args = ("eval", "--run", str(run), "--data", str(data), "--out", str(out), *EVAL)
    result = launch(*args)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all(str(image) in line and "cannot be read" in line for line in errors)
    assert outputs(out) == outputs(reference)[:4]  # the first round, complete
    image.write_bytes(intact)
    result = launch(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert outputs(out) == outputs(reference)


@pytest.mark.slow
def test_diagnose_refuses_several_processes_in_one_line(run):
    result = launch("diagnose", "--run", str(run), "--benchmark", "synth-zoom")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and errors
    assert all("diagnose runs in one process" in line for line in errors)


def test_bad_device_is_one_line_and_exit_2(tmp_path, capsys):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cases = {
        ("eval", "--device", "tpu7"): "--device 'tpu7' is not a device: use cpu, cuda",
        ("eval", "--device", f"cuda:{gpus}"): f"--device 'cuda:{gpus}' is not available on this machine",
        ("diagnose", "--device", "cpu:3"): "--device 'cpu:3' is not available",
    }
    for (command, *device), message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--run", str(tmp_path), "--benchmark", "synth-zoom", *device])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], (device, lines)


def test_the_model_is_loaded_in_the_runs_dtype_on_the_device(run, tmp_path):
    copy = tmp_path / "bf16"
    copy.mkdir()
    (copy / "final").symlink_to(run / "final")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["dtype"] = "bfloat16"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    for directory, dtype in ((run, torch.float32), (copy, torch.bfloat16)):
        model = load_eval_model(run=directory, device="cpu")
        tensors = [*model.backbone.model.parameters(), *model.method.modules.parameters()]
        assert {t.dtype for t in tensors if t.is_floating_point()} == {dtype}
        assert {t.device.type for t in tensors} == {"cpu"}
        assert model.describe()["dtype"] == str(dtype).removeprefix("torch.")
