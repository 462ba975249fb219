"""Optional LoRA through peft, and saving a (possibly LoRA-wrapped) model in plain HF format."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel


def apply_lora(
    model: PreTrainedModel, r: int, alpha: float, dropout: float, target_modules: list[str]
) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    return get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def unwrap_lora(model: nn.Module) -> nn.Module:
    """The HF model, under a LoRA wrapper if there is one."""
    return model.get_base_model() if is_lora(model) else model


def save_model(model: nn.Module, path: Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """Plain HF weights: a LoRA model is merged in a copy (the live model keeps training bit-exactly);
    `state_dict` (full weights of a sharded model) is written in place of the live ones."""
    if state_dict is not None:
        model.save_pretrained(path, state_dict=dict(state_dict), safe_serialization=True)
        return
    if is_lora(model):
        model.save_pretrained(path / "adapter")
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path, safe_serialization=True)
