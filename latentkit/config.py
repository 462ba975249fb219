"""Run configuration: pydantic models, YAML files and dotted `key=value` overrides (CLI > YAML > defaults).

Unknown keys are errors that name the closest valid key; the resolved config is saved with every run.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from latentkit.errors import ConfigError, writing


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are rejected, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class RunSection(StrictModel):
    method: str = "sft"
    name: str | None = None  # default: "<method>-<preset or model dir name>"
    output_dir: Path = Path("runs")
    seed: int = 0


class LoraSection(StrictModel):
    enabled: bool = False
    r: int = Field(8, gt=0)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class ModelSection(StrictModel):
    preset: str | None = "tiny-qwen2.5-vl"
    path: Path | None = None  # a local HF-format checkpoint directory; takes precedence over `preset`
    # inferred from config.json when None
    family: Literal["qwen2_5_vl", "qwen2_vl", "causal_lm"] | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_backend: Literal["sdpa", "triton", "flex"] = "sdpa"
    gradient_checkpointing: bool = False
    image_min_pixels: int = Field(28 * 28, gt=0)
    image_max_pixels: int = Field(112 * 112, gt=0)
    lora: LoraSection = LoraSection()


class SynthSection(StrictModel):
    n_train: int = Field(512, gt=0)
    n_val: int = Field(32, ge=0)
    n_test: int = Field(64, ge=0)
    seed: int = 0
    # default: the task's first variant (synth-zoom open|mc, synth-maze plan|yesno)
    variant: str | None = None
    knobs: dict[str, Any] = {}  # difficulty and size knobs of the task (`latentkit data synth --help`)


class DataSection(StrictModel):
    path: Path | None = None  # None: the embedded synthetic task, generated into the run directory
    task: Literal["synth-zoom", "synth-maze", "synth-moves", "synth-arith"] = "synth-zoom"
    split: str = "train"
    synth: SynthSection = SynthSection()
    on_bad_record: Literal["error", "skip"] = "error"
    allow_outside_paths: bool = False  # image paths may point outside the dataset folder
    latent_marker: str = "<abs_vis_token></abs_vis_token>"
    require_observation_after_aux: bool = True
    max_length: int = Field(2048, gt=8)  # longer samples are dropped (and counted) before a stage trains
    limit: int | None = Field(None, gt=0)
    cache_dir: Path | None = None  # the parsed-record cache; None: <run.output_dir>/.cache/records
    num_proc: int = Field(1, ge=1)  # processes that parse and validate records when the cache is built
    # sub-dataset (sub-folder of data.path) -> sampling weight; empty: every sample once per epoch
    mix: dict[str, Annotated[float, Field(ge=0)]] = {}
    group_by_length: bool = False  # batch samples of similar length together (less padding)
    layout_cache_mb: int = Field(1024, ge=0)  # built layouts kept per process for reuse; 0: off


class WandbSection(StrictModel):
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "latentkit"


class EvalSection(StrictModel):
    """Evaluation during training (`train.eval_every`): accuracy on a benchmark split, logged with the metrics."""

    benchmark: str | None = None  # default: the embedded synthetic task (data.task)
    data: Path | None = None  # benchmark files; synthetic tasks default to the run's own data
    split: str = "val"
    limit: int | None = Field(64, gt=0)
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int | None = Field(None, gt=0)  # default: the benchmark's
    aux_images: Literal["none", "dataset"] = "none"


Schedule = Literal["linear", "cosine", "constant"]
# YAML reads a bare `no` (e.g. `train.mixed_precision=no`) as false.
MixedPrecision = Annotated[
    Literal["no", "bf16", "fp16"], BeforeValidator(lambda value: "no" if value is False else value)
]


class RewardSpec(StrictModel):
    """One reward function of an RL stage: a built-in name (`latentkit.rl.rewards`) or the dotted path of any
    function with TRL's signature (`package.module:function`), its weight in the sum, and keyword arguments."""

    name: str = Field(min_length=1)
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict)


class RLSection(StrictModel):
    """`train.rl`: the settings of RL stages (names follow TRL's GRPOConfig where the meaning is the same)."""

    num_generations: int = Field(8, ge=1)  # G: rollouts per prompt (a group)
    num_iterations: int = Field(1, ge=1)  # mu: PPO-style updates per rollout batch
    estimator: Literal["grpo", "rloo", "dr_grpo"] = "grpo"  # group advantages
    epsilon: float = Field(0.2, ge=0.0)  # clip low
    epsilon_high: float = Field(0.3, ge=0.0)  # clip high
    dual_clip: float | None = Field(3.0, gt=1.0)  # cap of the loss where the advantage is negative; None: off
    beta: float = Field(0.01, ge=0.0)  # KL coefficient (k3, to the frozen reference); 0: no reference
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_completion_length: int = Field(96, gt=0)
    # DAPO's dynamic sampling: groups whose rewards are all equal (no advantage) are dropped and refilled with
    # fresh prompts, for at most `max_resample_rounds` more rounds; then the step goes on with what it has.
    dynamic_sampling: bool = False
    max_resample_rounds: int = Field(3, ge=1)
    rewards: list[RewardSpec] = [RewardSpec(name="accuracy")]
    # The scorer behind the accuracy reward; None: each synthetic task's own (other data must name one).
    scorer: str | None = None


class StageOverrides(StrictModel):
    """`train.stages.<stage>`: the `train` keys one stage may set for itself; an unset key keeps the global value."""

    steps: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    grad_accum: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    module_lr: dict[str, float] | None = None
    freeze: list[str] | None = None
    warmup_steps: int | None = Field(None, ge=0)
    schedule: Schedule | None = None
    mixed_precision: MixedPrecision | None = None


class TrainSection(StrictModel):
    # run only this stage (its predecessors' outputs must exist in the run directory)
    stage: str | None = None
    # run the stages up to and including this one (e.g. Monet's SFT stages without its RL stage: until=latent)
    until: str | None = None
    steps: int = Field(300, gt=0)  # optimizer steps per stage
    batch_size: int = Field(8, gt=0)  # per process, per micro-step
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-3, gt=0)
    # module group (vision, embeddings, language_model, lm_head, method) -> lr
    module_lr: dict[str, float] = {}
    freeze: list[str] | None = None  # None: the vision tower, when the model has one
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(10, ge=0)
    schedule: Schedule = "linear"
    max_grad_norm: float | None = 1.0
    mixed_precision: MixedPrecision = "no"
    # FSDP2: the dtype gradients are reduce-scattered in (the shards and the optimizer stay float32)
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    checkpoint_every: int = Field(50, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(5, gt=0)
    num_workers: int = Field(0, ge=0)
    progress: bool = True
    wandb: WandbSection = WandbSection()
    # optimizer steps between evaluations (and at the end); None: off
    eval_every: int | None = Field(None, gt=0)
    eval: EvalSection = EvalSection()
    stages: dict[str, StageOverrides] = {}  # per-stage overrides of the keys above
    rl: RLSection = RLSection()  # RL stages only; `batch_size` is then prompts per process per step


def effective_train(train: TrainSection, stage: str) -> TrainSection:
    """The `train` settings of one stage: the global values with `train.stages.<stage>` laid over them."""
    overrides = train.stages.get(stage, StageOverrides())
    return train.model_copy(update=overrides.model_dump(exclude_none=True))


def resolve_stages(train: TrainSection, method: str, stages: Sequence[str]) -> TrainSection:
    """Check the stage names in `train`; fill `train.stages` with every stage's effective values (saved with the run)."""
    valid = ", ".join(stages)
    for key in ("stage", "until"):
        if getattr(train, key) not in (None, *stages):
            raise ConfigError(f"train.{key}={getattr(train, key)!r} is not a stage of {method}: {valid}")
    if train.stage is not None and train.until is not None:
        raise ConfigError(
            f"train.stage={train.stage!r} and train.until={train.until!r} are both set; set one (stage: that stage "
            "alone; until: every stage up to it)"
        )
    for name in train.stages:
        if name not in stages:
            raise ConfigError(
                f"train.stages.{name}: {name!r} is not a stage of {method} (valid stages: {valid})"
            )
    keys = set(StageOverrides.model_fields)
    filled = {
        stage: StageOverrides(**effective_train(train, stage).model_dump(include=keys)) for stage in stages
    }
    return train.model_copy(update={"stages": filled})


def selected_stages(train: TrainSection, stages: Sequence[str]) -> list[str]:
    """The stages a run trains, in order: `train.stage` alone, those up to `train.until`, or all."""
    if train.stage is not None:
        return [train.stage]
    if train.until is not None:
        return list(stages[: list(stages).index(train.until) + 1])
    return list(stages)


class LatentkitConfig(StrictModel):
    """The whole run config; `method` is replaced by the chosen method's own Config model."""

    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    method: StrictModel = StrictModel()


@functools.cache
def config_model_for(method_config: type[BaseModel]) -> type[LatentkitConfig]:
    """The run-config model whose `method:` section is `method_config`."""
    return type(
        f"LatentkitConfig_{method_config.__name__}",
        (LatentkitConfig,),
        {"__annotations__": {"method": method_config}, "method": Field(default_factory=method_config)},
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so numbers, booleans and lists work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.lr=1e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"config file {path} not found (pass an existing YAML file, e.g. configs/sft/tiny.yaml)"
        )
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise ConfigError(f"config file {path} is not valid YAML: {first_line}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections (run, model, data, train, method)"
        )
    return loaded


def apply_override(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def check_keys(model: type[BaseModel], raw: dict[str, Any], where: str, prefix: str = "") -> None:
    """Reject unknown keys anywhere in `raw`, suggesting the closest valid dotted key."""
    fields = model.model_fields
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys here: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {dotted!r} in {where}: {hint}")
        annotation = fields[key].annotation
        if not isinstance(value, dict):
            continue
        if _is_model(annotation):
            check_keys(annotation, value, where, f"{dotted}.")
        elif get_origin(annotation) is dict and _is_model(item_type := get_args(annotation)[1]):
            for name, item in value.items():  # a mapping of sections, e.g. train.stages.<stage>
                if isinstance(item, dict):
                    check_keys(item_type, item, where, f"{dotted}.{name}.")


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _one_line(exc: ValidationError, where: str) -> str:
    problem = exc.errors()[0]
    location = ".".join(str(part) for part in problem["loc"])
    return f"invalid config value for {location!r} in {where}: {problem['msg']}"


def build_config(
    method_config: type[BaseModel], raw: dict[str, Any], where: str = "the config"
) -> LatentkitConfig:
    model = config_model_for(method_config)
    check_keys(model, raw, where)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, where)) from exc


def raw_config(config_file: Path | None, overrides: list[str]) -> tuple[dict[str, Any], str]:
    """Merge YAML and overrides into one raw mapping; also return a description of where it came from."""
    raw = read_yaml(config_file) if config_file is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
    sources = [str(config_file)] if config_file is not None else []
    if overrides:
        sources.append("command-line overrides")
    return raw, " + ".join(sources) or "the defaults"


def save_config(config: LatentkitConfig, path: Path) -> None:
    with writing(path):
        path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
