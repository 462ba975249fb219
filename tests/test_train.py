"""The trainer end to end through the CLI: learning, exact resume after SIGKILL, two processes."""

from __future__ import annotations

import math
import socket
import subprocess
import sys

import pytest
import torch
from helpers import REPO, final_weights, kill_when, latentkit, metrics, train_args

from latentkit.config import TrainSection
from latentkit.optim import lr_factor
from latentkit.trainer import micro_batch_schedule

pytestmark = pytest.mark.slow


def test_loss_falls_and_run_directory_layout(tmp_path):
    latentkit(*train_args(tmp_path, "learn", "train.steps=40", "train.checkpoint_every=20"))
    run = tmp_path / "learn"
    losses = [m["loss"] for m in metrics(run) if "loss" in m]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert (run / "config.yaml").is_file()
    assert (run / "stages" / "sft" / "checkpoints" / "step-00000020" / "trainer_state.json").is_file()
    for folder in (run / "stages" / "sft" / "final", run / "final"):
        assert {"model.safetensors", "config.json", "tokenizer.json", "latentkit_method.json"} <= {
            p.name for p in folder.iterdir()
        }


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    steps, every = 60, 10
    latentkit(*train_args(tmp_path, "straight", f"train.steps={steps}", f"train.checkpoint_every={every}"))

    args = train_args(tmp_path, "killed", f"train.steps={steps}", f"train.checkpoint_every={every}")
    kill_when(args, tmp_path / "killed" / "stages" / "sft" / "checkpoints" / "step-00000020")
    assert not (tmp_path / "killed" / "final").exists()

    latentkit(*args, "--resume")
    resumed = [m for m in metrics(tmp_path / "killed") if m.get("event") == "resume"]
    assert resumed and 20 <= resumed[0]["step"] < steps
    straight, killed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert straight.keys() == killed.keys()
    for name in straight:
        assert torch.equal(straight[name], killed[name]), name


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_with_gloo(tmp_path):
    # A port of its own: two launches on the default port would join each other's process group.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    launch += ["--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), "-m", "latentkit"]
    args = train_args(tmp_path, "ddp", "train.steps=6", "train.checkpoint_every=3", "train.batch_size=1")
    result = subprocess.run(
        [*launch, *args], capture_output=True, text=True, cwd=REPO, check=False, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("record cache:") == 1  # built by the main process, read by the other
    latentkit(
        *train_args(tmp_path, "single", "train.steps=6", "train.checkpoint_every=3", "train.batch_size=2")
    )
    two, one = metrics(tmp_path / "ddp"), metrics(tmp_path / "single")
    # Each step the two processes together see exactly the samples the single process sees.
    assert [m["tokens"] for m in two] == [m["tokens"] for m in one]
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=0.05)
    state = (
        tmp_path / "ddp" / "stages" / "sft" / "checkpoints" / "step-00000003" / "trainer_state.json"
    ).read_text()
    assert '"num_processes": 2' in state
    assert {
        p.name for p in (tmp_path / "ddp" / "stages" / "sft" / "checkpoints" / "step-00000003").glob("rng-*")
    } == {
        "rng-0.safetensors",
        "rng-1.safetensors",
    }


def test_micro_batch_schedule_shards_the_global_batch():
    single = micro_batch_schedule(
        10, seed=0, stage_index=0, start_step=0, steps=3, batch_size=4, accum=1, rank=0, world=1
    )
    ranks = [
        micro_batch_schedule(
            10, seed=0, stage_index=0, start_step=0, steps=3, batch_size=2, accum=1, rank=r, world=2
        )
        for r in (0, 1)
    ]
    assert [ranks[0][s] + ranks[1][s] for s in range(3)] == single
    resumed = micro_batch_schedule(
        10, seed=0, stage_index=0, start_step=2, steps=3, batch_size=4, accum=1, rank=0, world=1
    )
    assert resumed == single[2:]
    first_epoch = [i for batch in single for i in batch][:10]
    assert sorted(first_epoch) == list(range(10))


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
        (
            "cosine",
            [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))],
        ),
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_lr_schedule(schedule, expected):
    config = TrainSection(steps=6, warmup_steps=2, schedule=schedule)
    assert [lr_factor(step, config) for step in range(6)] == pytest.approx(expected)


def test_rng_state_round_trips_without_pickle(tmp_path):
    import random

    import numpy as np

    from latentkit.checkpoint import _load_rng_state, _save_rng_state
    from latentkit.errors import CheckpointError

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    _save_rng_state(tmp_path / "rng-0.safetensors")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    _load_rng_state(tmp_path / "rng-0.safetensors")
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    with pytest.raises(CheckpointError, match="older latentkit"):
        _load_rng_state(tmp_path / "rng-1.safetensors")
