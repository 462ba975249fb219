"""latentkit's trainer under DeepSpeed ZeRO-2 on two CPU processes (gloo), through `latentkit train` launched with
configs/accelerate/deepspeed_zero2_cpu_2proc.yaml: results match DDP, a killed run resumes exactly from the engine's
checkpoints, and `final/` loads with plain transformers. Skipped where DeepSpeed is not installed (CI)."""

from __future__ import annotations

import signal
import subprocess
import time

import psutil
import pytest
import torch
from helpers import REPO, accelerate_launch, final_weights, launch_command, metrics, train_args

from latentkit.checkpoint import verify_checkpoint

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

ZERO2 = REPO / "configs" / "accelerate" / "deepspeed_zero2_cpu_2proc.yaml"
DDP = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a)
    den = sum(float((b[k].double() ** 2).sum()) for k in a)
    return (num / den) ** 0.5


def test_zero2_sft_matches_ddp_and_final_loads_in_transformers(tmp_path):
    # accumulation and clipping are the engine's: it divides the loss by 2 and clips in its step
    settings = ["train.steps=4", "train.grad_accum=2", "train.batch_size=1", "train.checkpoint_every=2"]
    accelerate_launch(ZERO2, *train_args(tmp_path, "zero2", *settings, "train.max_grad_norm=0.5"))
    accelerate_launch(DDP, *train_args(tmp_path, "ddp", *settings, "train.max_grad_norm=0.5"))
    run = tmp_path / "zero2"
    checkpoint = run / "stages" / "sft" / "checkpoints" / "step-00000002"
    assert verify_checkpoint(checkpoint) is None
    partitions = sorted(p.name for p in (checkpoint / "deepspeed" / "state").glob("zero_pp_rank_*"))
    assert partitions == [  # each process wrote its part of the optimizer state
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    zero = [m for m in metrics(run) if "loss" in m]
    ddp = [m for m in metrics(tmp_path / "ddp") if "loss" in m]
    assert [m["loss"] for m in zero] == pytest.approx([m["loss"] for m in ddp], rel=1e-5)
    assert [m["grad_norm"] for m in zero] == pytest.approx([m["grad_norm"] for m in ddp], rel=1e-4)
    assert [m["lr"] for m in zero] == [m["lr"] for m in ddp]
    difference = relative_difference(final_weights(run), final_weights(tmp_path / "ddp"))
    print(f"ZeRO-2 against DDP, relative difference of the final weights: {difference:.2e}")
    assert 0 < difference < 1e-5  # the weights moved by the same steps, up to summation order

    from transformers import Qwen2_5_VLForConditionalGeneration

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        run / "final", local_files_only=True, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    [embedding] = [v for k, v in final_weights(run).items() if k.endswith("embed_tokens.weight")]
    assert torch.equal(model.get_input_embeddings().weight, embedding)


def test_zero2_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    settings = ["train.steps=8", "train.checkpoint_every=2", "train.batch_size=1", "train.grad_accum=2"]
    accelerate_launch(ZERO2, *train_args(tmp_path, "straight", *settings))

    args = train_args(tmp_path, "killed", *settings)
    process = subprocess.Popen(launch_command(ZERO2, *args), cwd=REPO, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "stages" / "sft" / "checkpoints" / "step-00000002"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    # The training processes first (the launcher starts them in sessions of their own), then the launcher.
    for child in psutil.Process(process.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert not (tmp_path / "killed" / "stages" / "sft" / "final").exists()

    accelerate_launch(ZERO2, *args, "--resume")
    resumed = [m for m in metrics(tmp_path / "killed") if m.get("event") == "resume"]
    assert resumed and 2 <= resumed[0]["step"] < 8
    straight, killed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert straight.keys() == killed.keys()
    for name in straight:
        assert torch.equal(straight[name], killed[name]), name
    losses = {m["step"]: m["loss"] for m in metrics(tmp_path / "straight") if "loss" in m}
    after = {m["step"]: m["loss"] for m in metrics(tmp_path / "killed") if "loss" in m}
    assert after == losses  # the resumed steps repeat the uninterrupted run's losses exactly


def test_zero2_monet_sft_stages_one_engine_per_stage_equal_ddp(tmp_path):
    # three stages, each with its own engine and optimizer; the caches run on the module outside the engine
    monet = [
        "--method",
        "monet",
        "method.num_latents=2",
        "data.synth.n_train=11",
        "train.steps=2",
        "train.checkpoint_every=1",
        "train.batch_size=1",
        "train.until=latent",  # stage vlpo (RL) runs with DDP
    ]
    accelerate_launch(ZERO2, *train_args(tmp_path, "zero2", *monet))
    accelerate_launch(DDP, *train_args(tmp_path, "ddp", *monet))
    run = tmp_path / "zero2"
    assert {m["cache"] for m in metrics(run) if m.get("event") == "cache_built"} == {"teacher", "targets"}
    stages = [m["stage"] for m in metrics(run) if "loss" in m]
    assert stages == ["warmup", "warmup", "distill", "distill", "latent", "latent"]
    zero = [m["loss"] for m in metrics(run) if "loss" in m]
    ddp = [m["loss"] for m in metrics(tmp_path / "ddp") if "loss" in m]
    assert zero == pytest.approx(ddp, rel=1e-5)
    difference = relative_difference(final_weights(run), final_weights(tmp_path / "ddp"))
    print(f"Monet under ZeRO-2 against DDP, relative difference of the final weights: {difference:.2e}")
    assert difference < 1e-5
