"""The backbone interface every method acts through: tokens, embeddings, images, positions, forward, save.

A method never forks a modeling file: it writes into `inputs_embeds`, chooses a `MaskSpec`, and reads the
post-norm hidden states returned here. Logits are computed only where a caller asks (`logits`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from latentkit.kernels.dispatch import AttentionBackend, prepare_mask
from latentkit.kernels.hf import ATTN_IMPLEMENTATION, register
from latentkit.masks import MaskSpec

BACKBONE_FILE = "latentkit_backbone.json"


@dataclass(frozen=True)
class ChatFormat:
    """ChatML turn markers (Qwen2/2.5-VL, Qwen2/3; added as special tokens to other causal LMs)."""

    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    image_pad: str = "<|image_pad|>"
    pad: str = "<|endoftext|>"

    def special_tokens(self) -> list[str]:
        return [self.pad, self.im_start, self.im_end, self.vision_start, self.vision_end, self.image_pad]

    def template(self) -> str:
        """A Jinja chat template that renders messages as `latentkit.chat.render_chat` renders a sample: no
        default system turn, one image placeholder per image (a processor repeats it per image token)."""
        names = ("im_start", "im_end", "vision_start", "vision_end", "image_pad")
        return "".join(f"{{%- set {name} = {getattr(self, name)!r} -%}}" for name in names) + _CHAT_TEMPLATE


_CHAT_TEMPLATE = r"""
{%- for message in messages -%}
{{- im_start + message['role'] + '\n' -}}
{%- if message['content'] is string -%}
{{- message['content'] -}}
{%- else -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'image' -%}
{{- vision_start + image_pad + vision_end -}}
{%- elif item['type'] == 'text' -%}
{{- item['text'] -}}
{%- else -%}
{{- raise_exception('latentkit models take text and image content, not ' + item['type']) -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- im_end + '\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- im_start + 'assistant\n' -}}
{%- endif -%}
"""


@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image: patches and its (t, h, w) patch grid before merging."""

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    num_tokens: int


@dataclass
class BackboneOutput:
    last_hidden_state: torch.Tensor  # post-norm: the vector fed to lm_head
    hidden_states: tuple[torch.Tensor, ...] | None  # embedding output + every layer; the last one post-norm
    cache: object | None


class Backbone:
    """Adapter over one HF model family. Subclasses set `family` and the family-specific pieces."""

    family: ClassVar[str]
    chat: ClassVar[ChatFormat] = ChatFormat()

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, attn_backend: AttentionBackend
    ):
        register()
        self.model = model
        self.tokenizer = tokenizer
        self.attn_backend: AttentionBackend = attn_backend
        self.source = ""  # preset name or checkpoint path, for run names and fingerprints
        self._use_latentkit_attention()
        self.add_tokens(self.chat.special_tokens())
        # latentkit renders every model's chats itself (ChatML); the saved template renders them the same way
        self.tokenizer.chat_template = self.chat.template()

    def hf_model(self) -> nn.Module:
        """The HF model class instance (the LoRA wrapper's base model, if LoRA is on)."""
        from latentkit.backbone.lora import unwrap_lora

        return unwrap_lora(self.model)

    # --- family-specific pieces --------------------------------------------------------------------------
    def decoder(self) -> nn.Module:
        """The decoder stack (embeddings, layers, final norm) that takes inputs_embeds."""
        raise NotImplementedError

    def module_groups(self) -> dict[str, nn.Module]:
        """Named parameter groups for freezing and per-module learning rates."""
        raise NotImplementedError

    def _use_latentkit_attention(self) -> None:
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)

    @property
    def supports_images(self) -> bool:
        return False

    def preprocess_image(self, image: Image.Image) -> ImageInput:
        raise ValueError(f"the {self.family} backbone takes no images; use a vision-language model")

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"the {self.family} backbone takes no images; use a vision-language model")

    def vision_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Per image [image tokens, `vision_feature_size`]: what the projector turns into LM-space embeddings."""
        raise ValueError(f"the {self.family} backbone takes no images; use a vision-language model")

    def project_vision_features(self, features: torch.Tensor) -> torch.Tensor:
        """The projector: pre-projector features [n, `vision_feature_size`] -> LM input embeddings [n, D]."""
        raise ValueError(f"the {self.family} backbone takes no images; use a vision-language model")

    @property
    def vision_feature_size(self) -> int:
        """The width of one image token's pre-projector features."""
        raise ValueError(f"the {self.family} backbone takes no images; use a vision-language model")

    @property
    def image_token_pixels(self) -> int:
        """The side, in pixels of the processed image, of the square one image token covers."""
        raise ValueError(f"the {self.family} backbone takes no images; use a vision-language model")

    def vision_pixels(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Per image [3, H, W]: the RGB image the vision tower sees (after the processor's resize), in [0, 1]."""
        raise ValueError(f"the {self.family} backbone takes no images; use a vision-language model")

    def position_ids(self, input_ids: torch.Tensor, image_grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Positions of one unpadded sequence: [N] for text LMs, [3, N] (M-RoPE) for Qwen-VL."""
        return torch.arange(input_ids.shape[0])

    # --- shared ------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def num_layers(self) -> int:
        return len(self.decoder().layers)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        # an unknown token maps to the unk id, but the unk token itself (Qwen2's is <|endoftext|>) is known
        if token_id is None or (
            token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token
        ):
            raise KeyError(f"token {token!r} is not in the vocabulary; add it with Backbone.add_tokens")
        return int(token_id)

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add special tokens (no-op for known ones); grow the embeddings when the vocabulary outgrows them."""
        missing = [t for t in tokens if t not in self.tokenizer.get_vocab()]
        if missing:
            self.tokenizer.add_special_tokens(
                {"additional_special_tokens": missing}, replace_extra_special_tokens=False
            )
        if len(self.tokenizer) > self.model.get_input_embeddings().num_embeddings:
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        return [self.token_id(t) for t in tokens]

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: MaskSpec,
        cache: object | None = None,
        output_hidden_states: bool = False,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> BackboneOutput:
        """Run the decoder on embeddings [B, Nq, D]; with a cache, the queries are the last Nq of Nk positions.

        `extras`: per-token tensors [B, Nq] passed as keyword arguments to every decoder layer (HF layers take
        and ignore unknown keywords), read by a method's layer wrapper (e.g. expert routing), no global state.
        """
        prepared = prepare_mask(mask, inputs_embeds.shape[1], self.attn_backend, inputs_embeds.device)
        out = self.decoder()(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask={"full_attention": prepared, "sliding_attention": prepared},
            cache=cache,
            use_cache=cache is not None,
            output_hidden_states=output_hidden_states,
            **(extras or {}),
        )
        hidden_states = None
        if output_hidden_states:
            hidden_states = (*out.hidden_states[:-1], out.last_hidden_state)
        return BackboneOutput(out.last_hidden_state, hidden_states, out.cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def save(self, path: Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """HF format (safetensors weights, config, tokenizer with chat template, processor) plus the family;
        `state_dict`: the model's full weights when the live ones are sharded."""
        path.mkdir(parents=True, exist_ok=True)
        self._save_model(path, state_dict)
        self.tokenizer.save_pretrained(path)
        (path / BACKBONE_FILE).write_text(json.dumps({"family": self.family, "source": self.source}) + "\n")

    def _save_model(self, path: Path, state_dict: Mapping[str, torch.Tensor] | None) -> None:
        from latentkit.backbone.lora import save_model

        save_model(self.model, path, state_dict)
