"""The trainer through the Python API, in one process: the training progress a loss is told (also after a
resume), per-stage settings (steps, lr, mixed precision, freezing), several trainings in one process, and a
method's frozen auxiliaries (never optimised, wrapped or saved)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from helpers import FAST, metrics
from latentkit.methods.sft import SFT, SFTConfig
from latentkit.methods.sft.method import sft_loss
from safetensors.torch import load_file
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from latentkit import registry
from latentkit.backbone import build_backbone, load_auxiliary_model
from latentkit.config import LatentkitConfig, ModelSection, TrainSection, build_config, raw_config
from latentkit.errors import CheckpointError, ConfigError
from latentkit.layout import inputs_embeds
from latentkit.losses import weighted_next_token_ce
from latentkit.optim import build_optimizer, freeze_and_group, trainable_parameters
from latentkit.registry import LossOutput, StageProgress
from latentkit.trainer import train

pytestmark = pytest.mark.slow


class Interrupted(Exception):
    pass


class TwoStages(SFT):
    """SFT in two stages that records, per loss call, the progress it is told and its compute dtype."""

    stages = ("first", "second")
    seen: ClassVar[list[tuple[str, int, int, float, torch.dtype]]] = []
    fail_at: ClassVar[tuple[str, int] | None] = None

    def loss(self, backbone, batch, stage: str, progress: StageProgress) -> LossOutput:
        if (stage, progress.step) == self.fail_at:
            raise Interrupted
        mask = self.mask(batch, stage)
        hidden = backbone.forward(inputs_embeds(backbone, batch), batch.position_ids, mask).last_hidden_state
        # The residual stream stays float32 under autocast; matmuls such as the logits' run in its dtype.
        dtype = backbone.logits(hidden[:, :1]).dtype
        self.seen.append((stage, progress.step, progress.total_steps, progress.fraction, dtype))
        loss, _ = weighted_next_token_ce(backbone, hidden, batch.labels, batch.loss_weight)
        return LossOutput(loss)


class AuxProbeConfig(SFTConfig):
    encoder_path: Path | None = None


def tiny_encoder() -> Dinov2Model:
    config = Dinov2Config(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        image_size=28,
        patch_size=14,
    )
    return Dinov2Model(config)


class AuxProbe(SFT):
    """SFT plus a trainable head on the features of a frozen DINOv2 auxiliary."""

    Config = AuxProbeConfig
    config: AuxProbeConfig
    instances: ClassVar[list[AuxProbe]] = []

    def setup(self, backbone) -> None:
        super().setup(backbone)
        self.modules["head"] = nn.Linear(8, 1)
        self.initial_head = self.modules["head"].weight.detach().clone()
        path = self.config.encoder_path
        encoder = tiny_encoder() if path is None else load_auxiliary_model(path, "method.encoder_path")
        self.add_auxiliary("encoder", encoder)
        self.instances.append(self)

    def loss(self, backbone, batch, stage: str, progress: StageProgress) -> LossOutput:
        out = sft_loss(self, backbone, batch, stage)
        image = torch.linspace(0, 1, 3 * 28 * 28, device=batch.input_ids.device).reshape(1, 3, 28, 28)
        features = self.auxiliaries["encoder"](pixel_values=image).pooler_output
        return LossOutput(out.loss + self.modules["head"](features).pow(2).mean(), out.metrics)


class ThenRL(TwoStages):
    """Its second stage is an RL stage: a kind this trainer has no loop for yet."""

    stage_kinds: ClassVar[dict[str, str]] = {"second": "rl"}


@pytest.fixture(scope="module", autouse=True)
def test_methods():
    names = {"two-stages": TwoStages, "aux-probe": AuxProbe, "then-rl": ThenRL}
    for name, cls in names.items():
        registry.register(name, cls)
    yield
    for name in names:
        registry._registered.pop(name)


def config(tmp_path: Path, method: str, name: str, *overrides: str) -> LatentkitConfig:
    items = [f"run.method={method}", f"run.output_dir={tmp_path}", f"run.name={name}", *FAST, *overrides]
    raw, where = raw_config(None, [*items, "data.synth.n_train=8"])
    return build_config(registry.get_method(method).Config, raw, where)


def test_progress_steps_lr_and_precision_per_stage_with_resume(tmp_path):
    per_stage = [
        "train.stages.second.steps=5",
        "train.stages.second.lr=1e-3",
        "train.stages.second.mixed_precision=bf16",
    ]
    run = config(tmp_path, "two-stages", "run", "train.steps=3", "train.checkpoint_every=2", *per_stage)
    TwoStages.seen.clear()
    TwoStages.fail_at = ("second", 2)
    with pytest.raises(Interrupted):
        train(run)
    TwoStages.fail_at = None
    train(run, resume=True)  # a second training in the same process: accelerate's state was reset

    f32, bf16 = torch.float32, torch.bfloat16
    assert TwoStages.seen == [
        ("first", 0, 3, 0.0, f32),
        ("first", 1, 3, 1 / 3, f32),
        ("first", 2, 3, 2 / 3, f32),
        ("second", 0, 5, 0.0, bf16),
        ("second", 1, 5, 0.2, bf16),
        ("second", 2, 5, 0.4, bf16),  # resumed from the step-2 checkpoint of the stage's own steps
        ("second", 3, 5, 0.6, bf16),
        ("second", 4, 5, 0.8, bf16),
    ]
    records = metrics(tmp_path / "run")
    steps = [(m["stage"], m["step"]) for m in records if "loss" in m]
    assert steps == [("first", 1), ("first", 2), ("first", 3), ("second", 1), ("second", 2)] + [
        ("second", 3),
        ("second", 4),
        ("second", 5),
    ]
    assert {"event": "resume", "stage": "second", "step": 2} in records
    # With two warm-up steps the lr after the first step is the stage's peak lr.
    first_lr = {m["stage"]: m["lr"] for m in reversed(records) if m.get("step") == 1 and "lr" in m}
    assert first_lr == {"first": pytest.approx(2e-3), "second": pytest.approx(1e-3)}
    saved = build_config(SFTConfig, raw_config(tmp_path / "run" / "config.yaml", [])[0]).train.stages
    assert saved["first"].steps == 3 and saved["first"].lr == 2e-3 and saved["first"].mixed_precision == "no"
    assert (
        saved["second"].steps == 5
        and saved["second"].lr == 1e-3
        and saved["second"].mixed_precision == "bf16"
    )


def test_trainings_with_other_mixed_precision_in_one_process(tmp_path):
    TwoStages.seen.clear()
    train(config(tmp_path, "two-stages", "plain", "train.steps=1"))
    # Global bf16 with one stage back in float32: the stage's setting wins over accelerate's autocast.
    train(
        config(
            tmp_path,
            "two-stages",
            "bf16",
            "train.steps=1",
            "train.mixed_precision=bf16",
            "train.stages.first.mixed_precision=no",
        )
    )
    assert [(stage, dtype) for stage, *_, dtype in TwoStages.seen] == [
        ("first", torch.float32),
        ("second", torch.float32),
        ("first", torch.float32),
        ("second", torch.bfloat16),
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.stages.secnd.lr=1e-3"],
            r"train\.stages\.secnd: 'secnd' is not a stage of two-stages \(valid stages: first, second\)",
        ),
        (["train.stages.second.freeze=[visoin]"], "unknown module group 'visoin'"),
        (
            ["train.stages.second.mixed_precision=fp16"],
            "train.stages.second.mixed_precision=fp16 needs train.mixed_precision=fp16",
        ),
    ],
)
def test_bad_stage_settings_fail_before_training(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(config(tmp_path, "two-stages", "bad", *overrides))
    assert not (tmp_path / "bad" / "stages").exists()


def test_frozen_auxiliary_is_never_trained_wrapped_or_saved(tmp_path):
    torch.manual_seed(0)
    encoder_dir = tmp_path / "encoder"
    tiny_encoder().save_pretrained(encoder_dir)
    original = load_auxiliary_model(encoder_dir, "method.encoder_path").state_dict()
    AuxProbe.instances.clear()
    train(
        config(
            tmp_path,
            "aux-probe",
            "aux",
            "train.steps=2",
            "train.checkpoint_every=1",
            f"method.encoder_path={encoder_dir}",
        )
    )

    method = AuxProbe.instances[-1]
    encoder = method.auxiliaries["encoder"]
    assert not encoder.training and all(not p.requires_grad and p.grad is None for p in encoder.parameters())
    assert encoder.state_dict().keys() == original.keys()
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, original[key]), key
    run = tmp_path / "aux"
    checkpoint = load_file(
        str(run / "stages" / "sft" / "checkpoints" / "step-00000001" / "model.safetensors")
    )
    assert {"method_modules.head.weight", "method_modules.head.bias"} <= checkpoint.keys()
    assert not [key for key in checkpoint if not key.startswith(("model.", "method_modules."))]
    owned = load_file(str(run / "final" / "method_modules.safetensors"))
    assert owned.keys() == {"head.weight", "head.bias"}
    assert not torch.equal(owned["head.weight"], method.initial_head)


def test_auxiliaries_stay_out_of_the_optimizer_and_bad_paths_name_the_key(tmp_path):
    backbone = build_backbone(ModelSection(preset="tiny-causal-lm"))
    method = AuxProbe(AuxProbeConfig())
    method.setup(backbone)
    groups = freeze_and_group(backbone, method, [], {}, trainable_parameters(backbone, method))
    optimized = {
        id(p) for group in build_optimizer(groups, TrainSection()).param_groups for p in group["params"]
    }
    assert id(method.modules["head"].weight) in optimized
    assert not optimized & {id(p) for p in method.auxiliaries.parameters()}
    with pytest.raises(CheckpointError, match="method.encoder_path=.*no config.json"):
        load_auxiliary_model(tmp_path / "absent", "method.encoder_path")


def test_a_stage_kind_without_a_loop_is_refused_before_training(tmp_path, monkeypatch):
    assert ThenRL.stage_kind("first") == "supervised" and ThenRL.stage_kind("second") == "rl"
    from latentkit import trainer

    monkeypatch.setattr(trainer, "STAGE_LOOPS", {"supervised": trainer.STAGE_LOOPS["supervised"]})
    with pytest.raises(ConfigError, match="'second' of then-rl is a 'rl' stage"):
        train(config(tmp_path, "then-rl", "both", "train.steps=1"))
    assert not (tmp_path / "both").exists()  # refused before anything was written
    run = train(config(tmp_path, "then-rl", "first-only", "train.steps=1", "train.stage=first"))
    assert (run / "stages" / "first" / "final").is_dir()


def test_eval_every_needs_an_evaluator_when_the_trainer_is_called_directly(tmp_path):
    with pytest.raises(ConfigError, match="train.eval_every is set but no evaluator"):
        train(config(tmp_path, "two-stages", "no-evaluator", "train.eval_every=1"))
    assert not (tmp_path / "no-evaluator").exists()
