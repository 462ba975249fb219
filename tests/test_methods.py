"""Every registered method x every tiny backbone: a training step gives a finite loss and reaches every
trainable parameter (the backbone's and the method's own), never its frozen auxiliaries, and the method generates; and the SFT formula (weighted next-token CE) on a small case
computed independently."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from latentkit.backbone import PRESETS, build_backbone
from latentkit.checkpoint import load_final_weights, save_final
from latentkit.config import ModelSection
from latentkit.decoding import SamplingParams
from latentkit.errors import ConfigError
from latentkit.eval.answer import answer_samples
from latentkit.layout import Kind, collate
from latentkit.optim import freeze_and_group, trainable_parameters
from latentkit.records import load_split
from latentkit.registry import StageContext, StageProgress, get_method, list_methods
from latentkit.synth.zoom import generate_synth_zoom
from latentkit.trainer import TrainModule


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoom")
    generate_synth_zoom(root, n_train=4, n_val=0, n_test=0)
    return load_split(root, "train").samples


def text_only(sample):
    return dataclasses.replace(sample, segments=tuple(s for s in sample.segments if s.image is None))


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("name", [info.name for info in list_methods()])
def test_training_step_reaches_every_trainable_parameter(name, preset, samples, tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset=preset))
    method_cls = get_method(name)
    method = method_cls(method_cls.Config())
    try:
        method.setup(backbone)
    except ConfigError as error:
        # a method built on image features (latentum) refuses a text-only backbone, in one line
        assert not backbone.supports_images and "\n" not in str(error), f"{name} on {preset}: {error}"
        return
    batch_samples = samples[:2] if backbone.supports_images else [text_only(s) for s in samples[:2]]
    every = trainable_parameters(backbone, method)
    module = TrainModule(backbone, method)
    for stage in method.stages:
        # No train.freeze: only what the method's stage itself never trains is frozen.
        groups = freeze_and_group(backbone, method, list(method.stage_freeze(stage)), {}, every)
        trainable = [p for params in groups.values() for p in params]
        stage_dir = tmp_path / "stages" / stage
        context = StageContext(
            tmp_path,
            stage_dir,
            batch_samples,
            0,
            1,
            lambda: None,
            lambda event: None,
            lambda earlier: load_final_weights(module, tmp_path / "stages" / earlier / "final"),
            progress=False,
        )
        method.prepare_stage(stage, context)
        batch = collate([method.layout(s, stage) for s in batch_samples], backbone.tokenizer.pad_token_id)
        for parameter in trainable:
            parameter.grad = None
        out = module(batch, stage, StageProgress(0, 1))
        assert torch.isfinite(out.loss)
        out.loss.backward()
        missing = [
            n
            for n, p in backbone.model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.any())
        ]
        assert not missing, f"{name}/{stage} on {preset}: no gradient for {missing[:5]}"
        owned = [
            n
            for n, p in method.modules.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.isfinite().all())
        ]
        assert not owned, f"{name}/{stage} on {preset}: no finite gradient for method modules {owned[:5]}"
        frozen = [
            n for n, p in method.auxiliaries.named_parameters() if p.requires_grad or p.grad is not None
        ]
        assert not frozen, f"{name}/{stage} on {preset}: auxiliary parameters {frozen[:5]} are trained"
        save_final(backbone, method, stage, stage_dir / "final")
    answers = answer_samples(method, batch_samples, SamplingParams(max_new_tokens=3), batch_size=2)
    assert [a.sample.sample_id for a in answers] == [s.sample_id for s in batch_samples]
    assert all(a.finish_reason in ("eos", "length") for a in answers)


def test_sft_labels_weights_and_loss_match_an_independent_computation(samples):
    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset="tiny-causal-lm"))
    method_cls = get_method("sft")
    method = method_cls(method_cls.Config(observation_weight=3.0, train_observation_tags=False))
    method.setup(backbone)
    sample = text_only(samples[0])
    layout = method.layout(sample, "sft")

    answer = sample.answer
    observation = next(s.text for s in sample.segments if s.kind == "observation")
    trained = backbone.tokenizer.decode([t for t in layout.labels.tolist() if t >= 0])
    assert trained.endswith(f"{observation} The answer is \\boxed{{{answer}}}.<|im_end|>")
    assert "<observation>" not in trained and "user" not in trained
    heavy = backbone.tokenizer.decode(layout.input_ids[layout.loss_weight == 3.0].tolist())
    assert heavy == observation
    assert set(layout.loss_weight[layout.kinds == int(Kind.TEXT)].tolist()) <= {0.0, 1.0}

    batch = collate([layout], backbone.tokenizer.pad_token_id)
    loss = method.loss(backbone, batch, "sft", StageProgress(0, 1)).loss.detach()
    with torch.no_grad():
        logits = backbone.model(input_ids=layout.input_ids[None]).logits[0].double()
    numerator = denominator = 0.0
    for position in range(1, len(layout)):
        weight = float(layout.loss_weight[position])
        if layout.labels[position] >= 0:
            ce = -F.log_softmax(logits[position - 1], dim=-1)[layout.input_ids[position]]
            numerator += weight * float(ce)
            denominator += weight
    assert float(loss) == pytest.approx(numerator / denominator, rel=1e-5)


def test_sft_without_aux_images_drops_them(samples):
    backbone = build_backbone(ModelSection())
    method_cls = get_method("sft")
    with_aux = method_cls(method_cls.Config())
    without = method_cls(method_cls.Config(aux_images=False))
    with_aux.setup(backbone)
    without.setup(backbone)
    a, b = with_aux.layout(samples[0], "sft"), without.layout(samples[0], "sft")
    assert [slot.kind for slot in a.images] == [Kind.IMAGE, Kind.AUX_IMAGE]
    assert [slot.kind for slot in b.images] == [Kind.IMAGE]
    assert int((b.kinds == int(Kind.AUX_IMAGE)).sum()) == 0


def test_sft_default_trains_observation_tags_and_the_request_for_an_auxiliary_image(samples):
    backbone = build_backbone(ModelSection())
    method = get_method("sft")(get_method("sft").Config())
    method.setup(backbone)
    layout = method.layout(samples[0], "sft")
    targets = layout.labels[layout.labels >= 0].tolist()
    for token in ("<observation>", "</observation>", backbone.chat.vision_start):
        assert backbone.token_id(token) in targets, token
    assert backbone.token_id(backbone.chat.image_pad) not in targets
    assert backbone.token_id(backbone.chat.vision_end) not in targets
