"""Qwen2.5-VL and Qwen2-VL adapters: real transformers classes, images through the vision tower, 3-D M-RoPE."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_window_index

from latentkit.backbone.base import Backbone, ImageInput
from latentkit.kernels.dispatch import AttentionBackend
from latentkit.kernels.hf import ATTN_IMPLEMENTATION

PROCESSOR_FILE = "processor_config.json"


def mrope_position_ids(
    input_ids: torch.Tensor, image_token_id: int, image_grids: list[tuple[int, int, int]], merge_size: int
) -> torch.Tensor:
    """[3, N] (temporal, height, width) positions of one sequence, as Qwen-VL's get_rope_index for still images.

    Text advances all three by one per token; an image block of merged grid (t, h, w) starting at position p
    gets (p + t_i, p + h_i, p + w_i), and the text after it continues at p + max(t, h, w).
    """
    is_image = (input_ids == image_token_id).tolist()
    positions = torch.empty(3, len(is_image), dtype=torch.long)
    grids = iter(image_grids)
    index, next_position = 0, 0
    while index < len(is_image):
        if not is_image[index]:
            positions[:, index] = next_position
            index, next_position = index + 1, next_position + 1
            continue
        t, h, w = next(grids)
        h, w = h // merge_size, w // merge_size
        count = t * h * w
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        positions[:, index : index + count] = grid.reshape(3, count) + next_position
        index, next_position = index + count, next_position + max(t, h, w)
    return positions


class QwenVLBackbone(Backbone):
    family: ClassVar[str] = "qwen2_5_vl"
    processor_class: ClassVar[str] = "Qwen2_5_VLProcessor"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Qwen2VLImageProcessorPil,
        attn_backend: AttentionBackend,
    ):
        self.image_processor = image_processor
        super().__init__(model, tokenizer, attn_backend)
        self.image_token_id = self.token_id(self.chat.image_pad)

    def decoder(self) -> nn.Module:
        return self.hf_model().model.language_model

    def vision(self) -> nn.Module:
        return self.hf_model().model.visual

    def module_groups(self) -> dict[str, nn.Module]:
        decoder = self.decoder()
        return {
            "vision": self.vision(),
            "embeddings": decoder.embed_tokens,
            "language_model": decoder,
            "lm_head": self.hf_model().lm_head,
        }

    def _use_latentkit_attention(self) -> None:
        # The vision tower keeps its own attention (no latent structure inside an image).
        self.model.set_attn_implementation({"text_config": ATTN_IMPLEMENTATION, "vision_config": "sdpa"})

    @property
    def supports_images(self) -> bool:
        return True

    @property
    def merge_size(self) -> int:
        return int(self.vision().spatial_merge_size)

    def preprocess_image(self, image: Image.Image) -> ImageInput:
        out = self.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        t, h, w = (int(x) for x in out["image_grid_thw"][0])
        return ImageInput(out["pixel_values"], (t, h, w), t * h * w // self.merge_size**2)

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """All images' embeddings in LM space, concatenated in order: [sum of image tokens, D]."""
        vision = self.vision()
        return vision(pixel_values.to(vision.dtype), grid_thw=grid_thw).pooler_output

    @property
    def vision_feature_size(self) -> int:
        return int(self.vision().merger.hidden_size)  # merge_size**2 patches of the tower's width

    def vision_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Per image [image tokens, merge_size**2 * tower width]: the tower's last hidden states before the merger,
        each image token's merge_size x merge_size patches concatenated, in the LM's token order;
        `project_vision_features` of them is `encode_images`."""
        vision = self.vision()
        patches = vision(pixel_values.to(vision.dtype), grid_thw=grid_thw).last_hidden_state
        features = self._token_order(patches.reshape(-1, self.vision_feature_size), grid_thw)
        counts = (grid_thw.prod(-1) // self.merge_size**2).tolist()
        return list(features.split(counts))

    def _token_order(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Qwen2.5-VL's tower runs its tokens in window order; the merger's output is put back in token order."""
        vision = self.vision()
        window_index, _ = get_vision_window_index(
            grid_thw, vision.spatial_merge_size, vision.window_size, vision.patch_size
        )
        return features[torch.argsort(window_index.to(features.device))]

    def project_vision_features(self, features: torch.Tensor) -> torch.Tensor:
        merger = self.vision().merger
        return merger(features.to(self.vision().dtype).reshape(-1, features.shape[-1] // self.merge_size**2))

    @property
    def image_token_pixels(self) -> int:
        return int(self.image_processor.patch_size) * self.merge_size

    def vision_pixels(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of `preprocess_image`'s normalisation and patch layout: its rows are (h / m, w / m, m, m)
        blocks of patches, each (C, temporal copies, patch, patch) values."""
        processor, merge = self.image_processor, self.merge_size
        patch, copies = int(processor.patch_size), int(processor.temporal_patch_size)
        mean = torch.tensor(processor.image_mean, device=pixel_values.device).view(3, 1, 1)
        std = torch.tensor(processor.image_std, device=pixel_values.device).view(3, 1, 1)
        images = []
        for rows, (t, h, w) in zip(pixel_values.split(grid_thw.prod(-1).tolist()), grid_thw.tolist()):
            if t != 1:
                raise ValueError(f"vision_pixels takes still images (temporal grid 1), got grid {(t, h, w)}")
            blocks = rows.float().view(h // merge, w // merge, merge, merge, 3, copies, patch, patch)[
                :, :, :, :, :, 0
            ]
            image = blocks.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * patch, w * patch)
            images.append(image * std + mean)
        return images

    def position_ids(self, input_ids: torch.Tensor, image_grids: list[tuple[int, int, int]]) -> torch.Tensor:
        return mrope_position_ids(input_ids, self.image_token_id, image_grids, self.merge_size)

    def save(self, path: Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """Adds the image processor config and the processor class, in the layout of Qwen's own checkpoints:
        transformers builds the video processor from the image processor's config (that needs torchvision)."""
        super().save(path, state_dict)
        self.image_processor.save_pretrained(path)
        config = {"processor_class": self.processor_class}
        (path / PROCESSOR_FILE).write_text(json.dumps(config, indent=2) + "\n")


class Qwen2VLBackbone(QwenVLBackbone):
    family: ClassVar[str] = "qwen2_vl"
    processor_class: ClassVar[str] = "Qwen2VLProcessor"

    def _token_order(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return features  # Qwen2-VL's tower keeps token order
