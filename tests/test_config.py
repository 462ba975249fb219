from pathlib import Path

import pytest
from latentkit.methods.sft import SFTConfig

from latentkit.config import build_config, parse_override, raw_config, save_config
from latentkit.errors import ConfigError


def resolve(tmp_path: Path, yaml_text: str | None, overrides: list[str]):
    config_file = None
    if yaml_text is not None:
        config_file = tmp_path / "c.yaml"
        config_file.write_text(yaml_text)
    raw, where = raw_config(config_file, overrides)
    return build_config(SFTConfig, raw, where)


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    config = resolve(
        tmp_path, "train:\n  lr: 0.5\n  steps: 7\nmethod:\n  observation_weight: 3\n", ["train.lr=1e-4"]
    )
    assert config.train.lr == 1e-4  # CLI beats YAML
    assert config.train.steps == 7  # YAML beats default
    assert config.train.batch_size == 8  # default
    assert isinstance(config.method, SFTConfig) and config.method.observation_weight == 3


def test_override_values_are_parsed_as_yaml(tmp_path):
    config = resolve(
        tmp_path, None, ["train.freeze=[vision, embeddings]", "model.lora.enabled=true", "data.limit=5"]
    )
    assert config.train.freeze == ["vision", "embeddings"]
    assert config.model.lora.enabled is True
    assert config.data.limit == 5


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("train.lrr=1", "train.lr"),
        ("trian.lr=1", "train"),
        ("method.observation_wieght=2", "method.observation_weight"),
    ],
)
def test_unknown_key_suggests_closest(tmp_path, override, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean {suggestion}"):
        resolve(tmp_path, None, [override])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml.*did you mean model\.preset"):
        resolve(tmp_path, "model:\n  presett: x\n", [])


def test_bad_value_names_key(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size"):
        resolve(tmp_path, None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="train.schedule"):
        resolve(tmp_path, None, ["train.schedule=exponential"])


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        raw_config(tmp_path / "missing.yaml", [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        raw_config(bad, [])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_saved_config_round_trips(tmp_path):
    config = resolve(tmp_path, None, ["train.lr=0.25", "run.name=r"])
    save_config(config, tmp_path / "config.yaml")
    again = resolve(tmp_path, (tmp_path / "config.yaml").read_text(), [])
    assert again == config


def test_shipped_configs_are_valid():
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*/*.yaml")):
        if path.parent.name == "accelerate":
            continue
        raw, where = raw_config(path, [])
        from latentkit.registry import get_method

        build_config(get_method(raw["run"]["method"]).Config, raw, where)
