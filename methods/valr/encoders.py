"""VaLR's frozen vision encoders (README.md, "VaLR"): any HF vision model from a local directory (AutoModel and its
image processor: DINOv2/DINOv3, SigLIP/SigLIP2, CLIP), or a tiny preset of a real HF class with random weights
built offline. Their patch features are the alignment targets; class and register tokens are dropped.

The projector width needs only the encoder's config, so `encoder_width` reads config.json alone (an evaluation
never loads encoder weights); `load_encoder` loads the weights, once a stage needs features.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from latentkit.methods.valr.config import EncoderSpec
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    PretrainedConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from latentkit.checkpoint import model_fingerprint
from latentkit.errors import CheckpointError, DataError

PRESET_SIZE = 56  # tiny presets: 56-px inputs, 14-px patches, a 4 x 4 patch grid
PRESET_SEED = 0  # the random weights of a preset are the same in every process and session
_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
_PRESETS: dict[str, tuple[type[nn.Module], PretrainedConfig, Any]] = {
    "tiny-dinov2": (
        Dinov2Model,
        Dinov2Config(**_TINY, image_size=PRESET_SIZE, patch_size=14),
        lambda: BitImageProcessorPil(
            size={"shortest_edge": PRESET_SIZE}, crop_size={"height": PRESET_SIZE, "width": PRESET_SIZE}
        ),
    ),
    "tiny-siglip": (
        SiglipVisionModel,
        SiglipVisionConfig(**_TINY, image_size=PRESET_SIZE, patch_size=14),
        lambda: SiglipImageProcessorPil(size={"height": PRESET_SIZE, "width": PRESET_SIZE}),
    ),
    "tiny-clip": (
        CLIPVisionModel,
        CLIPVisionConfig(**_TINY, image_size=PRESET_SIZE, patch_size=14, projection_dim=32),
        lambda: CLIPImageProcessorPil(
            size={"shortest_edge": PRESET_SIZE}, crop_size={"height": PRESET_SIZE, "width": PRESET_SIZE}
        ),
    ),
}


def _vision_config(config: PretrainedConfig) -> PretrainedConfig:
    """A two-tower config (CLIP, SigLIP) holds its image tower's config as `vision_config`."""
    return getattr(config, "vision_config", None) or config


def _checkpoint_dir(spec: EncoderSpec, key: str) -> Path:
    path = Path(spec.path or "")
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{key}.path={path} holds no config.json: pass a local HF-format vision model directory"
        )
    return path


def encoder_width(spec: EncoderSpec, key: str) -> int:
    """The width of the encoder's patch features, from its config alone."""
    if spec.preset is not None:
        return _PRESETS[spec.preset][1].hidden_size
    config = AutoConfig.from_pretrained(_checkpoint_dir(spec, key), local_files_only=True)
    return _vision_config(config).hidden_size


@dataclass
class FrozenEncoder:
    """A loaded encoder: `features` maps image files to patch features [n, P, E] on a fixed patch grid."""

    name: str
    model: nn.Module
    processor: Any
    fingerprint: str  # weights and processor settings
    grid: tuple[int, int]
    width: int  # E, the patch features' size

    @torch.no_grad()
    def features(self, images: list[Path]) -> torch.Tensor:
        loaded = []
        for path in images:
            try:
                with Image.open(path) as image:
                    loaded.append(image.convert("RGB"))
            except OSError as exc:
                raise DataError(f"image {path} cannot be read ({exc}); fix or remove the file") from exc
        features, grid = patch_features(self.model, self.processor, loaded)
        if grid != self.grid:
            raise DataError(
                f"encoder {self.name} gives a {grid[0]}x{grid[1]} patch grid for {images[0]}, not {self.grid[0]}x"
                f"{self.grid[1]}: set its image processor to one fixed size (resize and crop)"
            )
        return features


def patch_features(
    model: nn.Module, processor: Any, images: list[Image.Image]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The last layer's patch tokens [n, P, E] and their (rows, columns) grid. Class and register tokens, which
    these models put before the patches, are dropped: whatever precedes the grid's P tokens."""
    inputs = processor(images=images, return_tensors="pt")
    device = next(model.parameters()).device
    tensors = {key: value.to(device) for key, value in inputs.items() if isinstance(value, torch.Tensor)}
    if "pixel_values" in tensors and tensors["pixel_values"].is_floating_point():
        tensors["pixel_values"] = tensors["pixel_values"].to(next(model.parameters()).dtype)
    hidden = model(**tensors).last_hidden_state
    if "spatial_shapes" in tensors:  # SigLIP2: patches of a native-resolution grid, padding after them
        shapes = {tuple(shape) for shape in tensors["spatial_shapes"].tolist()}
        if len(shapes) != 1:
            raise DataError(
                f"images of one batch gave patch grids {sorted(shapes)}; use one fixed image size"
            )
        rows, columns = shapes.pop()
        return hidden[:, : rows * columns], (rows, columns)
    patch = _vision_config(model.config).patch_size
    height, width = tensors["pixel_values"].shape[-2:]
    rows, columns = height // patch, width // patch
    return hidden[:, hidden.shape[1] - rows * columns :], (rows, columns)


def load_encoder(spec: EncoderSpec, key: str) -> FrozenEncoder:
    """The encoder's weights and processor, in eval mode; its patch grid from one probe image."""
    if spec.preset is not None:
        model_class, config, make_processor = _PRESETS[spec.preset]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PRESET_SEED)
            model = model_class(config)
        processor = make_processor()
        weights = hashlib.sha256()
        for name, value in sorted(model.state_dict().items()):
            weights.update(name.encode())
            weights.update(value.detach().cpu().numpy().tobytes())
        weights_key = f"{spec.preset}:{weights.hexdigest()[:16]}"
    else:
        path = _checkpoint_dir(spec, key)
        if not (path / "preprocessor_config.json").is_file():
            raise CheckpointError(
                f"{key}.path={path} holds no preprocessor_config.json: save the encoder's image processor beside it"
            )
        loaded = AutoModel.from_pretrained(path, local_files_only=True)
        model = getattr(loaded, "vision_model", loaded)  # a two-tower checkpoint: its image tower
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
        weights_key = model_fingerprint(path, None)
    model.eval().requires_grad_(False)
    settings = json.dumps(processor.to_dict(), sort_keys=True, default=str)
    fingerprint = hashlib.sha256(f"{weights_key}:{settings}".encode()).hexdigest()[:16]
    _, grid = patch_features(model, processor, [Image.new("RGB", (PRESET_SIZE * 4, PRESET_SIZE * 4))])
    return FrozenEncoder(
        spec.name, model, processor, fingerprint, grid, _vision_config(model.config).hidden_size
    )
