"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (gloo) with latentkit's `sft` training module, through
`accelerator.prepare` and the shipped configs. Skipped where DeepSpeed is not installed (the optional extra
`deepspeed`; CI does not install it). The engine itself, below latentkit's trainer; the trainer under ZeRO-2 and ZeRO-3
is tested in test_deepspeed_trainer.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, free_port

pytest.importorskip("deepspeed")


def cpu_config(tmp_path, stage: int):
    """The shipped ZeRO config on two CPU processes, in float32."""
    config = yaml.safe_load((REPO / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml").read_text())
    config.update(num_processes=2, mixed_precision="no", use_cpu=False)
    config.pop("gpu_ids", None)
    path = tmp_path / f"zero{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_steps_the_sft_module_on_two_processes(tmp_path, stage):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    command = [
        *launch,
        "--config_file",
        str(cpu_config(tmp_path, stage)),
        "tests/deepspeed_step.py",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"process"')]
    assert sorted(r["process"] for r in reports) == [0, 1]
    for report in reports:
        assert report["processes"] == 2 and report["engine"] == "DeepSpeedEngine"
        assert report["zero_stage"] == stage
        assert report["changed"] and report["same_on_every_process"]
        assert report["losses"][1] < report["losses"][0]
    if stage == 2:  # each process keeps half of the master weights and optimizer state
        halves = [r["optimizer_partition_elements"] for r in reports]
        assert sum(halves) - reports[0]["optimized_elements"] in range(2 * 2)  # padded to an even split
        assert halves[0] == halves[1]
    else:  # parameters are shards outside the forward
        assert all(r["local_elements_outside_forward"] == 0 for r in reports)
