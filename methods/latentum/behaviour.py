"""How far MBAQ moves the frozen VLM's behaviour: the same batch with each image's projector output (original) and
with MBAQ's output (quantized) in the image positions, compared at the answer positions (those predicting a target
token of the layout: the assistant's response). `compare_behaviour` feeds the stage's loss; `quantizer_report`
sums it over batches for a benchmark."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from latentkit.methods.latentum.losses import KLDirection, behaviour_kl
from latentkit.methods.latentum.quantizer import MBAQ, Quantized
from torch import Tensor

from latentkit.backbone import Backbone
from latentkit.errors import DataError
from latentkit.layout import Batch
from latentkit.masks import MaskSpec


@dataclass
class BehaviourComparison:
    kl: Tensor  # [positions]: per answer position, with gradient through the quantized path
    agree: Tensor  # bool [positions]: the quantized model's top-1 token is the original's
    rows: Tensor  # long [positions]: each position's batch row
    quantized: Quantized


def image_positions(batch: Batch) -> Tensor:
    """bool [B, N]: the image placeholder positions, in the order of `batch.pixel_values`'s images."""
    positions = torch.zeros_like(batch.valid)
    for row, layout in enumerate(batch.layouts):
        for slot in layout.images:
            positions[row, slot.start : slot.end] = True
    return positions


def quantized_inputs(backbone: Backbone, quantizer: MBAQ, quantized: Quantized) -> Tensor:
    """MBAQ's outputs as LLM input embeddings: as they are, or through the frozen projector (`output=features`)."""
    if quantizer.output == "features":
        return backbone.project_vision_features(quantized.outputs)
    return quantized.outputs


def compare_behaviour(
    backbone: Backbone,
    quantizer: MBAQ,
    batch: Batch,
    mask: MaskSpec,
    direction: KLDirection,
    temperature: float,
) -> BehaviourComparison:
    if batch.pixel_values is None or batch.image_grid_thw is None:
        raise DataError(f"latentum quantizes image features; the samples {batch.keys} have no images")
    with torch.no_grad():
        features = torch.cat(backbone.vision_features(batch.pixel_values, batch.image_grid_thw))
        original_images = backbone.project_vision_features(features)
    quantized = quantizer(features)
    tokens = backbone.embed(batch.input_ids)
    where = image_positions(batch).unsqueeze(-1)
    answer = batch.loss_weight[:, 1:] > 0  # positions whose next token is a target

    def answer_logits(images: Tensor) -> Tensor:
        embeds = tokens.masked_scatter(where, images.to(tokens.dtype))
        hidden = backbone.forward(embeds, batch.position_ids, mask).last_hidden_state
        return backbone.logits(hidden[:, :-1][answer])

    with torch.no_grad():
        original = answer_logits(original_images)
    changed = answer_logits(quantized_inputs(backbone, quantizer, quantized))
    kl = behaviour_kl(original, changed, direction, temperature)
    agree = original.argmax(-1) == changed.detach().argmax(-1)
    return BehaviourComparison(kl, agree, answer.nonzero()[:, 0], quantized)


def code_statistics(codes: Tensor, entries: int) -> tuple[float, float]:
    """Codes long [n, C] -> (usage: the fraction of entries used at least once, perplexity: exp of the entropy of
    the codes' histogram), each averaged over the C codebooks."""
    counts = torch.nn.functional.one_hot(codes, entries).sum(0).double()  # [C, N]
    share = counts / counts.sum(-1, keepdim=True)
    entropy = -torch.special.xlogy(share, share).sum(-1)
    return float((counts > 0).double().mean()), float(entropy.exp().mean())


@dataclass(frozen=True)
class QuantizerReport:
    agreement: float  # answer positions whose top-1 token is the unquantized model's (teacher-forced)
    answer_agreement: float  # samples whose every answer position agrees
    kl: float  # the behaviour KL per answer position (its direction and temperature as given)
    usage: float  # entries used at least once, averaged over codebooks
    perplexity: float  # exp of each codebook's code entropy, averaged over codebooks
    positions: int  # answer positions compared
    samples: int


@torch.no_grad()
def quantizer_report(
    backbone: Backbone,
    quantizer: MBAQ,
    batches: Iterable[tuple[Batch, MaskSpec]],
    direction: KLDirection = "forward",
    temperature: float = 1.0,
) -> QuantizerReport:
    """Agreement, KL and code statistics of MBAQ over batches, in eval mode (no usage update, no reset)."""
    training = quantizer.training
    quantizer.eval()
    try:
        kl_sum, agreeing, positions, samples, samples_agreeing = 0.0, 0, 0, 0, 0
        codes = []
        for batch, mask in batches:
            comparison = compare_behaviour(backbone, quantizer, batch, mask, direction, temperature)
            kl_sum += float(comparison.kl.double().sum())
            agreeing += int(comparison.agree.sum())
            positions += int(comparison.agree.numel())
            disagreeing = torch.zeros(len(batch.keys), dtype=torch.long, device=comparison.agree.device)
            disagreeing.index_add_(0, comparison.rows, (~comparison.agree).long())
            samples += len(batch.keys)
            samples_agreeing += int((disagreeing == 0).sum())
            codes.append(comparison.quantized.codes)
    finally:
        quantizer.train(training)
    if positions == 0:
        raise DataError("quantizer_report: the samples have no answer tokens to compare")
    usage, perplexity = code_statistics(torch.cat(codes), quantizer.quantizer.entries)
    return QuantizerReport(
        agreeing / positions,
        samples_agreeing / samples,
        kl_sum / positions,
        usage,
        perplexity,
        positions,
        samples,
    )
