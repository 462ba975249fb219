"""Backbone adapters (`qwen2_5_vl`, `qwen2_vl`, `causal_lm`), tiny presets, and loading from local checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from latentkit.backbone.base import BACKBONE_FILE, Backbone, BackboneOutput, ChatFormat, ImageInput
from latentkit.backbone.causal_lm import CausalLMBackbone
from latentkit.backbone.presets import PRESETS, preset_parts, tiny_image_processor
from latentkit.backbone.qwen_vl import Qwen2VLBackbone, QwenVLBackbone
from latentkit.config import ModelSection
from latentkit.errors import CheckpointError, ConfigError

FAMILIES: dict[str, type[Backbone]] = {
    "qwen2_5_vl": QwenVLBackbone,
    "qwen2_vl": Qwen2VLBackbone,
    "causal_lm": CausalLMBackbone,
}
_MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl", "qwen2_vl": "qwen2_vl"}

__all__ = [
    "FAMILIES",
    "PRESETS",
    "Backbone",
    "BackboneOutput",
    "ChatFormat",
    "ImageInput",
    "build_backbone",
    "enable_activation_checkpointing",
    "load_auxiliary_model",
]


def _model_class(family: str):
    from transformers import (
        AutoModelForCausalLM,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    return {
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "causal_lm": AutoModelForCausalLM,
    }[family]


def _family_of_checkpoint(path: Path) -> str:
    marker = path / BACKBONE_FILE
    if marker.is_file():
        return json.loads(marker.read_text())["family"]
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{path} holds no config.json: pass a local HF-format checkpoint directory as model.path"
        )
    model_type = json.loads(config_file.read_text()).get("model_type", "")
    return _MODEL_TYPES.get(model_type, "causal_lm")


def _wrap(family: str, model, tokenizer, section: ModelSection, image_processor=None) -> Backbone:
    cls = FAMILIES[family]
    if issubclass(cls, QwenVLBackbone):
        if image_processor is None:
            image_processor = tiny_image_processor(section.image_min_pixels, section.image_max_pixels)
        return cls(model, tokenizer, image_processor, section.attn_backend)
    return cls(model, tokenizer, section.attn_backend)


def build_backbone(section: ModelSection) -> Backbone:
    """A backbone from `model.path` (a local HF checkpoint) or else `model.preset` (tiny, random weights)."""
    dtype = getattr(torch, section.dtype)
    if section.path is not None:
        backbone = load_checkpoint(section.path, section, family=section.family)
    else:
        if section.preset not in PRESETS:
            raise ConfigError(
                f"unknown model.preset {section.preset!r}: choose one of {', '.join(PRESETS)} or set model.path"
            )
        family, config, tokenizer = preset_parts(section.preset)
        model_class = _model_class(family)
        # Auto classes build from a config with from_config; concrete model classes with _from_config.
        make = getattr(model_class, "from_config", None) or model_class._from_config
        model = make(config, dtype=dtype)
        backbone = _wrap(family, model, tokenizer, section)
        backbone.source = section.preset
    if section.gradient_checkpointing:
        enable_activation_checkpointing(backbone.model)
    return backbone


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """HF's per-layer checkpointing, which the latent fill switches off around its KV-cached forwards (a
    recomputed cached forward would append its keys to the cache a second time)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = path / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        # AutoTokenizer swaps in the model type's class (qwen2 -> Qwen2Tokenizer), which rebuilds the
        # pre-tokenizer and sets an unk token: a saved tokenizer.json would then tokenize differently.
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_checkpoint(path: Path, section: ModelSection, family: str | None = None) -> Backbone:
    """A backbone from a local HF-format directory (never the hub)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"model.path {path} is not a directory: pass a local HF-format checkpoint directory"
        )
    family = family or _family_of_checkpoint(path)
    dtype = getattr(torch, section.dtype)
    model = _model_class(family).from_pretrained(path, local_files_only=True, dtype=dtype)
    tokenizer = _load_tokenizer(path)
    image_processor = None
    if issubclass(FAMILIES[family], QwenVLBackbone):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil.from_pretrained(
            path,
            local_files_only=True,
            size={"shortest_edge": section.image_min_pixels, "longest_edge": section.image_max_pixels},
        )
    backbone = _wrap(family, model, tokenizer, section, image_processor)
    backbone.source = str(path)
    return backbone


def load_auxiliary_model(path: Path, key: str, dtype: str = "float32") -> torch.nn.Module:
    """An HF model from a local directory (e.g. a DINOv2 or SigLIP vision encoder) for `Method.add_auxiliary`;
    `key` is the config key that named the path."""
    from transformers import AutoModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{key}={path} holds no config.json: pass a local HF-format model directory")
    return AutoModel.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype))
