"""Freezing, per-module learning rates, AdamW and warmup + linear/cosine schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from latentkit.backbone import Backbone
from latentkit.config import TrainSection
from latentkit.errors import ConfigError
from latentkit.registry import Method

# More specific groups first: "language_model" also contains the embeddings.
GROUP_ORDER = ("vision", "embeddings", "lm_head", "method", "language_model")


def module_groups(backbone: Backbone, method: Method) -> dict[str, nn.Module]:
    return {**backbone.module_groups(), "method": method.modules}


def owned_module_groups(method: Method) -> dict[str, nn.Module]:
    """`method.<name>`: one of the method's own modules, which `train.freeze` (and `stage_freeze`) may freeze alone;
    its parameters stay in the `method` group for learning rates."""
    return {f"method.{name}": module for name, module in method.modules.items()}


def frozen_groups(backbone: Backbone, freeze: list[str] | None) -> list[str]:
    """`train.freeze`; unset: the vision tower when the backbone has one (a text-only model freezes nothing)."""
    if freeze is not None:
        return freeze
    return ["vision"] if "vision" in backbone.module_groups() else []


def check_module_groups(
    backbone: Backbone, method: Method, freeze: list[str] | None, module_lr: dict[str, float]
) -> None:
    groups = module_groups(backbone, method)
    freezable = {**groups, **owned_module_groups(method)}
    for name in frozen_groups(backbone, freeze):
        if name not in freezable:
            raise ConfigError(f"unknown module group {name!r} in train.freeze; valid: {', '.join(freezable)}")
    for name in module_lr:
        if name not in groups:
            raise ConfigError(f"unknown module group {name!r} in train.module_lr; valid: {', '.join(groups)}")


def trainable_parameters(backbone: Backbone, method: Method) -> list[nn.Parameter]:
    """The parameters trainable before any stage freezes groups (LoRA has already frozen the base weights)."""
    return [p for module in (backbone.model, method.modules) for p in module.parameters() if p.requires_grad]


def freeze_and_group(
    backbone: Backbone,
    method: Method,
    freeze: list[str] | None,
    module_lr: dict[str, float],
    trainable: list[nn.Parameter],
) -> dict[str, list[nn.Parameter]]:
    """Make `trainable` minus the named groups trainable, so a stage unfreezes what an earlier stage froze;
    return the trainable parameters by group (each parameter in exactly one)."""
    check_module_groups(backbone, method, freeze, module_lr)
    groups = module_groups(backbone, method)
    owner: dict[int, str] = {}
    for name in sorted(groups, key=GROUP_ORDER.index):
        for parameter in groups[name].parameters():
            owner.setdefault(id(parameter), name)
    allowed = {id(p) for p in trainable}
    for module in (backbone.model, method.modules):
        for parameter in module.parameters():
            parameter.requires_grad_(id(parameter) in allowed)
    owned = owned_module_groups(method)
    for name in frozen_groups(backbone, freeze):
        for parameter in owned[name].parameters() if name in owned else groups[name].parameters():
            if name in owned or owner[id(parameter)] == name:
                parameter.requires_grad_(False)
    by_group: dict[str, list[nn.Parameter]] = {name: [] for name in groups}
    seen: set[int] = set()
    for module in (backbone.model, method.modules):
        for parameter in module.parameters():
            if parameter.requires_grad and id(parameter) not in seen:
                seen.add(id(parameter))
                by_group[owner.get(id(parameter), "language_model")].append(parameter)
    return {name: params for name, params in by_group.items() if params}


def build_optimizer(groups: dict[str, list[nn.Parameter]], config: TrainSection) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    param_groups = []
    for name, params in groups.items():
        lr = config.module_lr.get(name, config.lr)
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for subset, weight_decay in ((decay, config.weight_decay), (no_decay, 0.0)):
            if subset:
                param_groups.append({"params": subset, "lr": lr, "weight_decay": weight_decay, "group": name})
    if not param_groups:
        raise ConfigError("nothing to train: every parameter is frozen (check train.freeze and model.lora)")
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=config.betas)


def lr_factor(step: int, config: TrainSection) -> float:
    """Linear warmup to 1, then linear or cosine decay to 0 at `steps` (or constant)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if config.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainSection
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
