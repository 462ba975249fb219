"""Stage `language` (spec "Training", stage A): the chat with every target image given as projector(z_q), the MBAQ
decode of its codes, a share of them replaced by random entries; CE on the assistant's text. The quantizer is
frozen; question images are read as usual."""

from __future__ import annotations

import torch
from latentkit.methods.latentum.quantizer import MBAQ
from latentkit.methods.latentum.targets import (
    codes_to_inputs,
    image_features,
    image_kinds,
    is_target,
    write_images,
)
from torch import Tensor

from latentkit.backbone import Backbone
from latentkit.layout import Batch, inputs_embeds
from latentkit.losses import weighted_next_token_ce
from latentkit.masks import MaskSpec
from latentkit.registry import LossOutput


def noisy_codes(codes: Tensor, entries: int, share: float, generator: torch.Generator) -> Tensor:
    """codes long [n, C] with each sub-code, independently with probability `share`, replaced by an entry drawn
    uniformly from its codebook's `entries` (drawn on the CPU from `generator`, so a seed fixes them)."""
    replace = torch.rand(codes.shape, generator=generator) < share
    random = torch.randint(entries, codes.shape, generator=generator)
    return torch.where(replace.to(codes.device), random.to(codes.device), codes)


def language_loss(
    backbone: Backbone,
    quantizer: MBAQ,
    batch: Batch,
    mask: MaskSpec,
    code_noise: float,
    generator: torch.Generator,
) -> LossOutput:
    if batch.pixel_values is None:
        embeds = inputs_embeds(backbone, batch)
        replaced = 0.0
    else:
        images, changed, total = [], 0, 0
        for features, kind in zip(image_features(backbone, batch), image_kinds(batch), strict=True):
            if not is_target(kind):
                images.append(backbone.project_vision_features(features))
                continue
            codes = quantizer.encode(features.detach())
            noisy = noisy_codes(codes, quantizer.quantizer.entries, code_noise, generator)
            changed, total = changed + int((noisy != codes).sum()), total + codes.numel()
            with torch.no_grad():
                images.append(codes_to_inputs(backbone, quantizer, noisy))
        embeds = write_images(backbone.embed(batch.input_ids), batch, images)
        replaced = changed / max(total, 1)
    hidden = backbone.forward(embeds, batch.position_ids, mask).last_hidden_state
    loss, targets = weighted_next_token_ce(backbone, hidden, batch.labels, batch.loss_weight)
    return LossOutput(
        loss, {"ce": float(loss.detach()), "codes_changed": replaced, "targets": float(targets)}
    )
