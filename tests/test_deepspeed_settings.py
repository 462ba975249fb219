"""What the trainer refuses to run under DeepSpeed, decided from the launch's settings before anything trains: these
run without DeepSpeed installed."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize("stage", ["0", "1", "3"])
def test_zero_stages_other_than_2_are_refused(deepspeed_launch, stage):
    deepspeed_launch.setattr("accelerate.utils.is_deepspeed_available", lambda: True)
    deepspeed_launch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)
    with pytest.raises(
        ConfigError, match=f"ZeRO stage {stage}, which latentkit's trainer does not drive"
    ) as error:
        deepspeed_plugin()
    assert "deepspeed_zero2.yaml" in str(error.value) and "\n" not in str(error.value)


def test_zero_stage_2_reads_the_launch_settings(deepspeed_launch):
    deepspeed_launch.setattr("accelerate.utils.is_deepspeed_available", lambda: True)
    deepspeed_launch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    plugin = deepspeed_plugin()
    assert plugin.zero_stage == 2
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 2
