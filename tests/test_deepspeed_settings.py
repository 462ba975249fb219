"""What the trainer accepts and refuses under DeepSpeed, decided from the launch's settings before anything trains, and
the shipped ZeRO-3 configs: these run without DeepSpeed installed."""

from __future__ import annotations

import json

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from helpers import REPO

from latentkit.distributed import deepspeed_plugin
from latentkit.errors import ConfigError


@pytest.fixture
def deepspeed_launch(monkeypatch):
    """The environment `accelerate launch --config_file <a DeepSpeed config>` gives its processes."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    return monkeypatch


def test_missing_deepspeed_names_the_extra(deepspeed_launch):
    deepspeed_launch.setattr("accelerate.utils.is_deepspeed_available", lambda: False)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[deepspeed\]"'):
        deepspeed_plugin()


@pytest.mark.parametrize("stage", ["0", "1"])
def test_zero_stages_other_than_2_and_3_are_refused(deepspeed_launch, stage):
    deepspeed_launch.setattr("accelerate.utils.is_deepspeed_available", lambda: True)
    deepspeed_launch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)
    with pytest.raises(
        ConfigError, match=f"ZeRO stage {stage}, which latentkit's trainer does not drive"
    ) as error:
        deepspeed_plugin()
    assert "deepspeed_zero3.yaml" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("stage", ["2", "3"])
def test_zero_stages_2_and_3_read_the_launch_settings(deepspeed_launch, stage):
    deepspeed_launch.setattr("accelerate.utils.is_deepspeed_available", lambda: True)
    deepspeed_launch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)
    deepspeed_launch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    deepspeed_launch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false")
    plugin = deepspeed_plugin()
    assert plugin.zero_stage == int(stage)
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == int(stage)


@pytest.mark.parametrize("flag", ["true", None])
def test_zero3_init_is_refused(deepspeed_launch, flag):
    # accelerate reads an unset zero3_init_flag as true under ZeRO-3: the model would be built partitioned
    deepspeed_launch.setattr("accelerate.utils.is_deepspeed_available", lambda: True)
    deepspeed_launch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    if flag is None:
        deepspeed_launch.delenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", raising=False)
    else:
        deepspeed_launch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", flag)
    with pytest.raises(ConfigError, match="set zero3_init_flag: false") as error:
        deepspeed_plugin()
    assert "\n" not in str(error.value)


def test_shipped_zero3_configs_build_whole_and_the_cpu_one_partitions_small_parameters():
    configs = REPO / "configs" / "accelerate"
    gpus = load_config_from_file(str(configs / "deepspeed_zero3.yaml")).deepspeed_config
    assert gpus["zero_stage"] == 3 and gpus["zero3_init_flag"] is False
    cpu = load_config_from_file(str(configs / "deepspeed_zero3_cpu_2proc.yaml")).deepspeed_config
    assert cpu["zero3_init_flag"] is False
    settings = json.loads(
        (REPO / cpu["deepspeed_config_file"]).read_text()
    )  # relative to the repository root
    assert settings["zero_optimization"]["stage"] == 3
    assert settings["zero_optimization"]["stage3_param_persistence_threshold"] == 0
