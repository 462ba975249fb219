"""FSDP2 on two CPU processes (gloo): sharding happens, the paths outside the training forward work on sharded
weights, results match an unsharded run (SFT, Monet, LatentUM with its experts), and a killed run resumes exactly
from sharded checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    MONET_SFT_SHORT,
    REPO,
    accelerate_launch,
    assert_loads_in_transformers,
    assert_monet_sft_ran,
    final_weights,
    kill_launch_when,
    latentkit,
    metrics,
    relative_difference,
    train_args,
)
from safetensors.torch import load_file

from latentkit.checkpoint import verify_checkpoint

pytestmark = pytest.mark.slow

FSDP = REPO / "configs" / "accelerate" / "fsdp_cpu_2proc.yaml"
DDP = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"


def assert_sharded(run: Path) -> dict:
    """Every parameter is a DTensor and each of the two processes holds about half of the elements."""
    [event] = [m for m in metrics(run) if m.get("event") == "sharded"]
    assert event["dtensors"] == event["parameters"] > 0
    held = event["elements_per_process"]
    assert len(held) == 2 and sum(held) == event["elements"]
    assert all(0.4 < part / event["elements"] < 0.6 for part in held), held
    return event


def test_sft_shards_evaluates_and_matches_one_process(tmp_path):
    common = [
        "train.steps=4",
        "train.checkpoint_every=2",
        "data.synth.n_val=4",
        "train.eval_every=2",
        "train.eval.limit=4",
        "train.eval.max_new_tokens=4",
    ]
    accelerate_launch(FSDP, *train_args(tmp_path, "fsdp", *common, "train.batch_size=1"))
    latentkit(*train_args(tmp_path, "single", *common, "train.batch_size=2"))
    run = tmp_path / "fsdp"
    assert_sharded(run)
    checkpoint = run / "stages" / "sft" / "checkpoints" / "step-00000002"
    assert verify_checkpoint(checkpoint) is None
    shards = sorted(p.name for p in (checkpoint / "sharded").glob("*.distcp"))
    assert shards == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]  # each process wrote its own shard of model and optimizer
    assert not (checkpoint / "model.safetensors").exists()
    evals = [m for m in metrics(run) if any(k.startswith("eval/") for k in m)]
    assert [m["step"] for m in evals] == [2, 4]  # periodic eval on sharded weights, no process left waiting
    two = [m["loss"] for m in metrics(run) if "loss" in m]
    one = [m["loss"] for m in metrics(tmp_path / "single") if "loss" in m]
    assert two == pytest.approx(one, rel=1e-3)
    # The two processes average their own micro-batch losses; one process averages over both: Adam turns that
    # rounding into small weight differences, as under DDP.
    assert relative_difference(final_weights(run), final_weights(tmp_path / "single")) < 2e-3
    assert_loads_in_transformers(run)


def test_monet_pipeline_sharded_with_activation_checkpointing_equals_ddp(tmp_path):
    # accelerate's activation checkpointing, applied as the backbone's own: the latent fill switches it off
    # around its KV-cached forwards (a recomputed cached forward would append to the cache twice).
    checkpointing = tmp_path / "fsdp_ac.yaml"
    text = FSDP.read_text().replace(
        "fsdp_activation_checkpointing: false", "fsdp_activation_checkpointing: true"
    )
    checkpointing.write_text(text)
    accelerate_launch(checkpointing, *train_args(tmp_path, "fsdp", *MONET_SFT_SHORT))
    accelerate_launch(DDP, *train_args(tmp_path, "ddp", *MONET_SFT_SHORT))
    run = tmp_path / "fsdp"
    assert_sharded(run)
    assert_monet_sft_ran(run)
    assert relative_difference(final_weights(run), final_weights(tmp_path / "ddp")) < 1e-5
    assert_loads_in_transformers(run)


def test_latentum_stages_sharded_with_the_experts_equal_ddp(tmp_path):
    # MoME calls the generation-branch copies from hooks inside the decoder layers, and MBAQ's dead-code resets (the
    # codebooks' data initialisation) write in the forward: both must give what two unsharded processes give.
    stages = ("quantizer", "language", "vision", "pixels")
    latentum = [
        "--method",
        "latentum",
        "data.synth.n_train=8",
        *(f"train.stages.{s}.steps=2" for s in stages),
    ]
    accelerate_launch(FSDP, *train_args(tmp_path, "fsdp", *latentum))
    accelerate_launch(DDP, *train_args(tmp_path, "ddp", *latentum))
    run = tmp_path / "fsdp"
    assert_sharded(run)
    assert [m["stage"] for m in metrics(run) if "loss" in m] == [s for s in stages for _ in range(2)]
    sharded, unsharded = (
        load_file(str(tmp_path / r / "final" / "method_modules.safetensors")) for r in ("fsdp", "ddp")
    )
    quantizer = [k for k in sharded if k.startswith("quantizer.")]
    assert all(torch.equal(sharded[k], unsharded[k]) for k in quantizer)
    # The rest differs by reduction order only, which Adam's first steps magnify (a lost reset gave 1.0 for MBAQ)
    assert relative_difference(sharded, unsharded) < 1e-4
    assert relative_difference(final_weights(run), final_weights(tmp_path / "ddp")) < 1e-5
    assert_loads_in_transformers(run)


def test_resume_after_sigkill_matches_uninterrupted_sharded_run(tmp_path):
    # bf16 compute on float32 master shards: the shards, the optimizer state and final/ stay float32.
    settings = [
        "train.steps=10",
        "train.checkpoint_every=2",
        "train.batch_size=1",
        "train.mixed_precision=bf16",
    ]
    accelerate_launch(FSDP, *train_args(tmp_path, "straight", *settings))

    args = train_args(tmp_path, "killed", *settings)
    kill_launch_when(FSDP, args, tmp_path / "killed" / "stages" / "sft" / "checkpoints" / "step-00000002")
    assert not (tmp_path / "killed" / "stages" / "sft" / "final").exists()

    accelerate_launch(FSDP, *args, "--resume")
    resumed = [m for m in metrics(tmp_path / "killed") if m.get("event") == "resume"]
    assert resumed and 2 <= resumed[0]["step"] < 10
    straight, killed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert straight.keys() == killed.keys()
    for name in straight:
        assert torch.equal(straight[name], killed[name]), name
    assert {tensor.dtype for tensor in killed.values()} == {torch.float32}


@pytest.mark.parametrize("name", ["fsdp", "fsdp_cpu_2proc", "deepspeed_zero2", "deepspeed_zero3"])
def test_shipped_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    if name.startswith("fsdp"):
        assert config.distributed_type.value == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    else:
        assert config.distributed_type.value == "DEEPSPEED"
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_fsdp_version_1_is_a_one_line_error(monkeypatch):
    from latentkit.distributed import fsdp_plugin
    from latentkit.errors import ConfigError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        fsdp_plugin("no", "float32")


def test_fsdp_plugin_keeps_fp32_shards_and_takes_over_activation_checkpointing(monkeypatch):
    from latentkit.distributed import fsdp_plugin

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    plugin, checkpointing = fsdp_plugin("bf16", "float32")
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert checkpointing and not plugin.activation_checkpointing


@pytest.mark.parametrize(
    ("env", "overrides", "message"),
    [
        (
            {"ACCELERATE_USE_DEEPSPEED": "true"},
            ["--method", "monet"],
            "does not run under DeepSpeed yet: run train.until=latent, then stage vlpo with DDP",
        ),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["train.mixed_precision=fp16"], "train.mixed_precision=fp16"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["model.lora.enabled=true"], "model.lora.enabled"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["model.lora.enabled=true"], "model.lora"),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
            ["train.stages.sft.mixed_precision=bf16"],
            "train.stages.sft.mixed_precision",
        ),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
            ["--method", "monet"],
            "does not run under FSDP yet: run train.until=latent, then stage vlpo with DDP",
        ),
    ],
)
def test_unsupported_engine_settings_are_one_line_errors(tmp_path, env, overrides, message):
    result = latentkit(*train_args(tmp_path, "refused", *overrides), check=False, env=env)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
