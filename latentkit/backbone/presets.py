"""Tiny presets of the real architectures, built offline from configs with random weights."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PretrainedConfig, PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from latentkit.backbone.tokenizer import build_tokenizer

TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
# head_dim 16 -> 8 rotary frequencies theta^(-i/8), split in order over (temporal, height, width). With the
# real models' theta 1e4 the width axis got 0.003-0.0003 rad per column, so attention could not tell a tiny
# image's columns apart; theta 4 gives height 0.71-0.5 and width 0.42-0.30 rad per merged patch.
MROPE = {"rope_type": "default", "rope_theta": 4.0, "mrope_section": [2, 3, 3]}
VISION = {"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}


def _vl_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
    }


def _qwen2_5_vl(tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    from transformers import Qwen2_5_VLConfig

    vision = dict(VISION, hidden_size=32, intermediate_size=64, out_hidden_size=TEXT["hidden_size"])
    vision.update(window_size=56, fullatt_block_indexes=[1])
    ids = _vl_token_ids(tokenizer)
    text = dict(TEXT, vocab_size=len(tokenizer), rope_parameters=MROPE, **ids)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def _qwen2_vl(tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    from transformers import Qwen2VLConfig

    vision = dict(VISION, embed_dim=32, hidden_size=TEXT["hidden_size"], mlp_ratio=2)
    ids = _vl_token_ids(tokenizer)
    text = dict(TEXT, vocab_size=len(tokenizer), rope_parameters=MROPE, **ids)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)


def _causal_lm(tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    from transformers import Qwen2Config

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        **TEXT,
    )


PRESETS: dict[str, tuple[str, Callable[[PreTrainedTokenizerFast], PretrainedConfig]]] = {
    "tiny-qwen2.5-vl": ("qwen2_5_vl", _qwen2_5_vl),
    "tiny-qwen2-vl": ("qwen2_vl", _qwen2_vl),
    "tiny-causal-lm": ("causal_lm", _causal_lm),
}


def tiny_image_processor(min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=VISION["patch_size"],
        temporal_patch_size=VISION["temporal_patch_size"],
        merge_size=VISION["spatial_merge_size"],
    )


def preset_parts(name: str) -> tuple[str, PretrainedConfig, PreTrainedTokenizerFast]:
    family, make_config = PRESETS[name]
    tokenizer = build_tokenizer()
    return family, make_config(tokenizer), tokenizer
