from pathlib import Path

import pytest
from latentkit.methods.sft import SFTConfig

from latentkit.config import (
    StageOverrides,
    build_config,
    effective_train,
    parse_override,
    raw_config,
    resolve_stages,
    save_config,
    selected_stages,
)
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
        if path.parent.name in ("accelerate", "suites"):
            continue
        raw, where = raw_config(path, [])
        from latentkit.registry import get_method

        build_config(get_method(raw["run"]["method"]).Config, raw, where)


def test_shipped_suites_are_valid(tmp_path):
    from latentkit.suite import load_suite, plan

    for path in sorted((Path(__file__).resolve().parents[1] / "configs" / "suites").glob("*.yaml")):
        assert plan(load_suite(path), tmp_path)  # every run resolves to a valid config


def test_stage_overrides_lay_over_the_global_train_section(tmp_path):
    overrides = [
        "train.lr=0.1",
        "train.stages.b.lr=0.2",
        "train.stages.b.freeze=[]",
        "train.stages.b.mixed_precision=no",
    ]
    train = resolve(
        tmp_path, "train:\n  mixed_precision: bf16\n  stages:\n    b:\n      steps: 9\n", overrides
    ).train
    a, b = effective_train(train, "a"), effective_train(train, "b")
    assert (a.lr, a.steps, a.freeze, a.mixed_precision) == (0.1, 300, None, "bf16")
    assert (b.lr, b.steps, b.freeze, b.mixed_precision) == (0.2, 9, [], "no")
    assert b.batch_size == a.batch_size == 8 and b.stages == train.stages

    filled = resolve_stages(train, "m", ["a", "b"]).stages
    assert filled["a"] == StageOverrides(**a.model_dump(include=set(StageOverrides.model_fields)))
    assert filled["b"].steps == 9 and filled["b"].lr == 0.2
    assert resolve_stages(resolve_stages(train, "m", ["a", "b"]), "m", ["a", "b"]).stages == filled


def test_bad_stage_overrides(tmp_path):
    with pytest.raises(ConfigError, match="did you mean train.stages.b.lr"):
        resolve(tmp_path, None, ["train.stages.b.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key 'train.stages.b.checkpoint_every'"):
        resolve(tmp_path, None, ["train.stages.b.checkpoint_every=5"])
    with pytest.raises(ConfigError, match="train.stages.b.steps"):
        resolve(tmp_path, None, ["train.stages.b.steps=0"])
    train = resolve(tmp_path, None, ["train.stages.warmpu.lr=1"]).train
    with pytest.raises(
        ConfigError,
        match=r"train.stages.warmpu: 'warmpu' is not a stage of m \(valid stages: warmup, latent\)",
    ):
        resolve_stages(train, "m", ["warmup", "latent"])
    with pytest.raises(ConfigError, match="train.stage='x' is not a stage of m: warmup, latent"):
        resolve_stages(resolve(tmp_path, None, ["train.stage=x"]).train, "m", ["warmup", "latent"])
    with pytest.raises(ConfigError, match="train.until='x' is not a stage of m: warmup, latent"):
        resolve_stages(resolve(tmp_path, None, ["train.until=x"]).train, "m", ["warmup", "latent"])
    with pytest.raises(ConfigError, match="are both set; set one"):
        resolve_stages(
            resolve(tmp_path, None, ["train.until=latent", "train.stage=warmup"]).train,
            "m",
            ["warmup", "latent"],
        )


def test_selected_stages_are_one_stage_a_prefix_or_all(tmp_path):
    stages = ["warmup", "distill", "latent", "vlpo"]
    assert selected_stages(resolve(tmp_path, None, []).train, stages) == stages
    assert selected_stages(resolve(tmp_path, None, ["train.until=distill"]).train, stages) == [
        "warmup",
        "distill",
    ]
    assert selected_stages(resolve(tmp_path, None, ["train.stage=latent"]).train, stages) == ["latent"]
