import pytest

from latentkit.backbone import build_backbone
from latentkit.config import ModelSection, TrainSection
from latentkit.errors import ConfigError
from latentkit.optim import build_optimizer, freeze_and_group, trainable_parameters
from latentkit.registry import get_method


@pytest.fixture
def parts():
    backbone = build_backbone(ModelSection())
    method_cls = get_method("sft")
    method = method_cls(method_cls.Config())
    method.setup(backbone)
    return backbone, method


def test_frozen_vision_and_per_module_learning_rates(parts):
    backbone, method = parts
    groups = freeze_and_group(
        backbone,
        method,
        freeze=["vision"],
        module_lr={"lm_head": 0.5},
        trainable=trainable_parameters(backbone, method),
    )
    assert "vision" not in groups
    assert not any(p.requires_grad for p in backbone.vision().parameters())
    optimizer = build_optimizer(groups, TrainSection(lr=0.1, module_lr={"lm_head": 0.5}, weight_decay=0.01))
    by_id = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    assert by_id[id(backbone.lm_head.weight)]["lr"] == 0.5
    embeddings = backbone.decoder().embed_tokens.weight
    assert by_id[id(embeddings)]["lr"] == 0.1 and by_id[id(embeddings)]["group"] == "embeddings"
    norm = backbone.decoder().norm.weight
    assert by_id[id(norm)]["weight_decay"] == 0.0 and by_id[id(embeddings)]["weight_decay"] == 0.01
    trainable = [p for p in backbone.model.parameters() if p.requires_grad]
    assert sorted(map(id, trainable)) == sorted(by_id)  # every trainable parameter is in exactly one group


def test_unknown_group_and_nothing_to_train(parts):
    backbone, method = parts
    with pytest.raises(ConfigError, match="unknown module group 'visoin'.*vision"):
        freeze_and_group(backbone, method, freeze=["visoin"], module_lr={}, trainable=[])
    everything = ["vision", "embeddings", "language_model", "lm_head"]
    groups = freeze_and_group(backbone, method, everything, {}, trainable_parameters(backbone, method))
    with pytest.raises(ConfigError, match="nothing to train"):
        build_optimizer(groups, TrainSection())


def test_a_later_stage_unfreezes_what_an_earlier_stage_froze(parts):
    backbone, method = parts
    vision = list(backbone.vision().parameters())
    trainable = [p for p in trainable_parameters(backbone, method) if p is not backbone.lm_head.weight]
    backbone.lm_head.weight.requires_grad_(False)  # frozen by construction (as LoRA freezes base weights)
    first = freeze_and_group(backbone, method, ["vision"], {}, trainable)
    assert "vision" not in first and not any(p.requires_grad for p in vision)
    second = freeze_and_group(backbone, method, ["embeddings"], {}, trainable)
    assert all(p.requires_grad for p in vision) and {id(p) for p in second["vision"]} == {
        id(p) for p in vision
    }
    assert "embeddings" not in second and not backbone.decoder().embed_tokens.weight.requires_grad
    assert not backbone.lm_head.weight.requires_grad  # never made trainable by a stage


def test_one_owned_module_freezes_alone_and_keeps_the_method_learning_rate():
    backbone = build_backbone(ModelSection(preset="tiny-qwen2.5-vl"))
    method_cls = get_method("latentum")  # two owned modules: quantizer and pixel_decoder
    method = method_cls(method_cls.Config())
    method.setup(backbone)
    every = trainable_parameters(backbone, method)
    groups = freeze_and_group(backbone, method, ["vision", "method.quantizer"], {"method": 0.5}, every)
    assert not any(p.requires_grad for p in method.modules["quantizer"].parameters())
    assert all(p.requires_grad for p in method.modules["pixel_decoder"].parameters())
    assert {id(p) for p in groups["method"]} == {id(p) for p in method.modules["pixel_decoder"].parameters()}
    optimizer = build_optimizer(groups, TrainSection(lr=0.1, module_lr={"method": 0.5}))
    assert {g["lr"] for g in optimizer.param_groups if g["group"] == "method"} == {0.5}
    # the next stage's freeze list decides again: the whole method group, then nothing of it
    freeze_and_group(backbone, method, ["method"], {}, every)
    assert not any(p.requires_grad for p in method.modules.parameters())
    freeze_and_group(backbone, method, [], {}, every)
    assert all(p.requires_grad for p in method.modules.parameters())
    with pytest.raises(ConfigError, match="unknown module group 'method.quantiser'.*method.quantizer"):
        freeze_and_group(backbone, method, ["method.quantiser"], {}, every)
    with pytest.raises(ConfigError, match="unknown module group 'method.quantizer' in train.module_lr"):
        freeze_and_group(backbone, method, [], {"method.quantizer": 0.5}, every)
