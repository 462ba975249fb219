"""The RL stage end to end: `--method grpo` (SFT, then GRPO) on both backbone families, its metrics, a resumed
RL stage that repeats the uninterrupted one's rollouts and weights exactly, and two processes with gloo."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, final_weights, latentkit, metrics, train_args
from test_train import free_port

from latentkit.config import RLSection
from latentkit.rl.loop import rollout_seed, scorer_of

ARITH = ["--method", "grpo", "model.preset=tiny-causal-lm", "data.task=synth-arith"]
RL = [
    "train.stages.sft.steps=2",
    "train.stages.grpo.steps=3",
    "train.stages.grpo.lr=1e-3",
    "train.batch_size=2",
    "train.checkpoint_every=1",
    "train.rl.num_generations=3",
    "train.rl.max_completion_length=8",
]


def rl_metrics(run: Path) -> list[dict]:
    return [m for m in metrics(run) if m.get("stage") == "grpo" and "loss" in m]


@pytest.fixture(scope="module")
def arith(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rl")
    latentkit(*train_args(out, "arith", *ARITH, *RL))
    return out / "arith"


def test_grpo_runs_sft_then_rl_with_its_metrics(arith):
    logged = rl_metrics(arith)
    assert [m["step"] for m in logged] == [1, 2, 3]
    for record in logged:
        assert {
            "reward",
            "reward_std",
            "kl",
            "clip_fraction",
            "ratio_mean",
            "completion_length",
        } <= record.keys()
        assert {"reward/accuracy/mean", "rollout_time", "update_time", "entropy"} <= record.keys()
        assert record["entropy"] > 0  # sampled at temperature 1 from an untrained model
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first update's policy is the reference
    assert (arith / "final" / "model.safetensors").is_file()
    assert not any("reference" in key for key in final_weights(arith))  # the reference is never saved


def test_a_resumed_rl_stage_repeats_the_rollouts_and_weights(arith, tmp_path):
    copy = tmp_path / "arith"
    shutil.copytree(arith, copy)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    saved["run"]["output_dir"] = str(tmp_path)
    (copy / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    # Cut the run back to "killed after the RL stage's step-2 checkpoint".
    grpo = copy / "stages" / "grpo"
    shutil.rmtree(grpo / "final")
    shutil.rmtree(copy / "final")
    for checkpoint in grpo.glob("checkpoints/step-00000003"):
        shutil.rmtree(checkpoint)
    lines = (copy / "metrics.jsonl").read_text().splitlines(keepends=True)
    (copy / "metrics.jsonl").write_text(
        "".join(line for line in lines if '"step": 3' not in line or '"grpo"' not in line)
    )
    latentkit(*train_args(tmp_path, "arith", *ARITH, *RL), "--resume")
    resumed = rl_metrics(copy)[-1]
    straight = rl_metrics(arith)[-1]
    assert (
        resumed["reward"] == straight["reward"]
        and resumed["completion_length"] == straight["completion_length"]
    )
    a, b = final_weights(arith), final_weights(copy)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_grpo_on_the_vision_language_backbone(tmp_path):
    zoom = ["--method", "grpo", "data.synth.n_test=4", *RL, "train.stages.grpo.steps=1"]
    latentkit(*train_args(tmp_path, "vl", *zoom))
    assert [m["step"] for m in rl_metrics(tmp_path / "vl")] == [1]


@pytest.mark.slow
def test_two_processes_shard_the_prompts(tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    launch += ["--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), "-m", "latentkit"]
    args = train_args(tmp_path, "ddp", *ARITH, *RL, "train.batch_size=1", "train.stages.grpo.steps=2")
    result = subprocess.run(
        [*launch, *args], capture_output=True, text=True, cwd=REPO, check=False, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in rl_metrics(tmp_path / "ddp")] == [1, 2]


def test_rollout_seeds_and_scorers():
    assert rollout_seed(0, 1, 2, 0) == rollout_seed(0, 1, 2, 0) != rollout_seed(0, 1, 2, 1)
    from latentkit.segments import Sample

    arith = Sample("x", "synth-arith", (), answer="3", metadata={"variant": "open"})
    assert scorer_of(arith, RLSection()) == "numeric"
    assert scorer_of(arith, RLSection(scorer="exact")) == "exact"
    with pytest.raises(Exception, match="set train.rl.scorer"):
        scorer_of(Sample("y", "my-data", (), answer="3"), RLSection())


def test_dynamic_sampling_drops_uninformative_groups_and_stops_at_its_bound(tmp_path):
    """An untrained model is nearly always wrong: its all-equal groups are dropped and refilled, for at most
    `max_resample_rounds` rounds, and the step goes on with what it has, without crashing or hanging."""
    dynamic = [
        "train.rl.dynamic_sampling=true",
        "train.rl.max_resample_rounds=2",
        "train.stages.grpo.steps=1",
    ]
    latentkit(*train_args(tmp_path, "dyn", *ARITH, *RL, *dynamic))
    (record,) = rl_metrics(tmp_path / "dyn")
    assert record["reward"] == 0.0  # the first round: every group all wrong
    rounds = record["resample_rounds"]
    assert record["kept_groups"] <= 2 and (record["kept_groups"] == 2 or rounds == 2)
    # Every group of every round is either kept or dropped (refill rounds of batch 2: kept ones stop counting).
    assert record["kept_groups"] + record["dropped_groups"] <= 2 * (1 + rounds)
    assert record["dropped_groups"] >= 2


def test_group_selection_keeps_whole_groups_with_an_advantage():
    from latentkit.rl.loop import Rollouts, informative_groups, joined, select_groups

    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # groups of 2: equal, mixed, equal
    rollouts = Rollouts(
        samples=list("abcdef"),
        trajectories=list("ABCDEF"),
        rewards=rewards,
        advantages=torch.arange(6.0),
        old_log_probs=[torch.tensor([float(i)]) for i in range(6)],
        ref_log_probs=None,
        metrics={},
    )
    assert informative_groups(rollouts, 2) == [1]
    kept = select_groups(rollouts, [1], 2)
    assert kept.samples == ["c", "d"] and kept.advantages.tolist() == [2.0, 3.0]
    both = joined([kept, select_groups(rollouts, [0], 2)], {"x": 1.0})
    assert both.samples == ["c", "d", "a", "b"] and both.rewards.tolist() == [0.0, 1.0, 1.0, 1.0]
