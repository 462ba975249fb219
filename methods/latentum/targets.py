"""Images as the later stages read them: question images through the vision tower and projector, target images
(the auxiliary boards of the reasoning) as MBAQ codes, decoded into LLM inputs (the spec's projector(z_q))."""

from __future__ import annotations

import torch
from latentkit.methods.latentum.quantizer import MBAQ
from torch import Tensor

from latentkit.backbone import Backbone
from latentkit.errors import ConfigError
from latentkit.layout import Batch, Kind


def is_target(kind: int) -> bool:
    """Target images are the reasoning's auxiliary images; question images are read as usual."""
    return kind == Kind.AUX_IMAGE


def image_kinds(batch: Batch) -> list[int]:
    """Each image's kind, in the order of `batch.pixel_values`'s images."""
    return [slot.kind for layout in batch.layouts for slot in layout.images]


def codes_to_inputs(backbone: Backbone, quantizer: MBAQ, codes: Tensor) -> Tensor:
    """Codes long [n, C] -> LLM input embeddings [n, D]: MBAQ's decode, through the frozen projector when MBAQ
    outputs pre-projector features."""
    decoded = quantizer.decode(codes)
    return backbone.project_vision_features(decoded) if quantizer.output == "features" else decoded


def image_features(backbone: Backbone, batch: Batch) -> list[Tensor]:
    """Every image's pre-projector features [tokens, F], in batch order."""
    assert batch.pixel_values is not None and batch.image_grid_thw is not None
    return backbone.vision_features(batch.pixel_values, batch.image_grid_thw)


def write_images(embeds: Tensor, batch: Batch, images: list[Tensor]) -> Tensor:
    """`embeds` with each image's LLM inputs [tokens, D] written at its placeholder positions."""
    positions = torch.zeros_like(batch.valid)
    for row, layout in enumerate(batch.layouts):
        for slot in layout.images:
            positions[row, slot.start : slot.end] = True
    return embeds.masked_scatter(positions.unsqueeze(-1), torch.cat(images).to(embeds.dtype))


def quantizer_trained(quantizer: MBAQ) -> bool:
    """Whether stage quantizer fitted MBAQ's codebooks: their EMA usage is all zero until it runs."""
    return bool(quantizer.quantizer.usage.any())


def check_quantizer_trained(quantizer: MBAQ, stage: str) -> None:
    """A stage that reads codes needs MBAQ's codebooks fitted."""
    if not quantizer_trained(quantizer):
        raise ConfigError(
            f"latentum stage {stage} reads images as MBAQ codes, but the quantizer was never trained (its codebook "
            "usage is all zero): run stage quantizer first (latentkit train --method latentum runs quantizer -> "
            "language -> vision -> pixels)"
        )
