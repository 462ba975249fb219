"""Stage `vision` (spec "Training", stage B): the sequence U ⊕ G. U is the chat with its target images read as
projector(z_q) of their clean codes; G holds one block per target image: an image-start token, then the image's
positions, each fed the MBAQ decode of its clean codes. Each G block sees U only before its image's start token
in U (and itself, causally), with position ids copied from U; G tokens take the generation branch (MoME). The hidden
state at a block's position t predicts the C sub-codes of position t + 1 through the code head; CE on the codes.

With `condition_dropout`, a sample's G blocks see none of U: the unconditional distribution guidance needs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from latentkit.methods.latentum.code_head import CodeHead
from latentkit.methods.latentum.mome import ROUTE
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
from latentkit.layout import IGNORE_INDEX, Batch, Layout, register_kind
from latentkit.masks import MaskSpec, with_padding
from latentkit.registry import LossOutput

GENERATION = register_kind("latentum_generation")  # the G blocks' tokens


@dataclass(frozen=True)
class GenerationBlock:
    understanding_start: int  # the image's start token in U
    start: int  # the block's image-start token in G
    end: int  # one past the block's last image position

    @property
    def positions(self) -> int:
        return self.end - self.start - 1


def with_generation_blocks(layout: Layout, image_start_id: int) -> Layout:
    """U ⊕ G: `layout` (U) followed by one generation block per target image, its tokens of kind GENERATION, never
    text targets, at the position ids of the image's start token and positions in U."""
    ids, kinds, positions = [layout.input_ids], [layout.kinds], [layout.position_ids]
    for slot in layout.images:
        if not is_target(slot.kind):
            continue
        count = slot.end - slot.start
        ids.append(torch.cat([torch.tensor([image_start_id]), layout.input_ids[slot.start : slot.end]]))
        kinds.append(torch.full((count + 1,), GENERATION, dtype=layout.kinds.dtype))
        positions.append(layout.position_ids[..., slot.start - 1 : slot.end])
    added = sum(len(i) for i in ids[1:])
    return replace(
        layout,
        input_ids=torch.cat(ids),
        kinds=torch.cat(kinds),
        segment_index=torch.cat([layout.segment_index, torch.full((added,), -1, dtype=torch.int32)]),
        labels=torch.cat([layout.labels, torch.full((added,), IGNORE_INDEX, dtype=torch.long)]),
        loss_weight=torch.cat([layout.loss_weight, torch.zeros(added)]),
        position_ids=torch.cat(positions, dim=-1),
    )


def generation_blocks(layout: Layout) -> list[GenerationBlock]:
    """The G blocks of a `with_generation_blocks` layout, in the order of its target images."""
    starts = [slot.start - 1 for slot in layout.images if is_target(slot.kind)]
    begin = int((layout.kinds == GENERATION).nonzero()[0]) if starts else 0
    blocks = []
    for start, slot in zip(starts, (s for s in layout.images if is_target(s.kind)), strict=True):
        end = begin + 1 + slot.end - slot.start
        blocks.append(GenerationBlock(start, begin, end))
        begin = end
    return blocks


def generation_mask(batch: Batch, unconditional: list[bool]) -> MaskSpec:
    """Causal over U ⊕ G, plus: U's columns from a block's image start on are hidden from that block and every
    earlier one (the blocks' image starts increase), a block's columns from every later block, and for an
    `unconditional` row all of U from all of G; padding hidden."""
    size, length = batch.input_ids.shape
    intervals = torch.zeros(size, length, 4, dtype=torch.int32)
    for row, layout in enumerate(batch.layouts):
        blocks = generation_blocks(layout)
        if not blocks:
            continue
        g_begin, g_end = blocks[0].start, blocks[-1].end
        for index, block in enumerate(blocks):
            following = blocks[index + 1].understanding_start if index + 1 < len(blocks) else g_begin
            intervals[row, block.understanding_start : following, :2] = torch.tensor([g_begin, block.end])
            intervals[row, block.start : block.end, :2] = torch.tensor([block.end, g_end])
        if unconditional[row]:
            intervals[row, :g_begin, :2] = torch.tensor([g_begin, g_end])
    return with_padding(MaskSpec(True, intervals), batch.valid.cpu()).to(batch.input_ids.device)


def unconditional_rows(batch: Batch, share: float, seed: int, step: int) -> list[bool]:
    """Which samples drop the condition: a pure function of (seed, step, sample key)."""
    drawn = []
    for key in batch.keys:
        digest = hashlib.sha256(repr((seed, step, key)).encode()).digest()
        drawn.append(int.from_bytes(digest[:8], "big") / 2**64 < share)
    return drawn


def vision_loss(
    backbone: Backbone,
    quantizer: MBAQ,
    head: CodeHead,
    batch: Batch,
    mask: MaskSpec,
    trained: Iterable[Tensor],
) -> LossOutput:
    """CE over every target image's C sub-codes, teacher-forced; `trained` (the generation branch and the head)
    joins the graph with zero gradient when the batch has no target image, so every process backs up the same
    parameters."""
    blocks = [generation_blocks(layout) for layout in batch.layouts]
    if not any(blocks):
        untouched = sum((p.sum() for p in trained), torch.zeros((), device=batch.input_ids.device))
        return LossOutput(0.0 * untouched, {"code_ce": 0.0, "code_accuracy": 0.0, "code_positions": 0.0})
    images, targets = [], []
    with torch.no_grad():
        for features, kind in zip(image_features(backbone, batch), image_kinds(batch), strict=True):
            if is_target(kind):
                codes = quantizer.encode(features)
                targets.append(codes)
                images.append(codes_to_inputs(backbone, quantizer, codes))
            else:
                images.append(backbone.project_vision_features(features))
    embeds = write_images(backbone.embed(batch.input_ids), batch, images)
    # G's image positions read the same decoded codes as the image in U
    code_inputs = iter(i for i, kind in zip(images, image_kinds(batch), strict=True) if is_target(kind))
    embeds = embeds.clone()
    predict_rows, predict_cols = [], []
    for row, row_blocks in enumerate(blocks):
        for block in row_blocks:
            embeds[row, block.start + 1 : block.end] = next(code_inputs).to(embeds.dtype)
            predict_rows += [row] * block.positions
            predict_cols += range(block.start, block.end - 1)
    route = batch.kinds == GENERATION
    hidden = backbone.forward(embeds, batch.position_ids, mask, extras={ROUTE: route}).last_hidden_state
    target_codes = torch.cat(targets)
    logits = head(hidden[predict_rows, predict_cols], target_codes)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), target_codes.flatten())
    accuracy = (logits.detach().argmax(-1) == target_codes).float().mean()
    return LossOutput(
        ce,
        {
            "code_ce": float(ce.detach()),
            "code_accuracy": float(accuracy),
            "code_positions": float(len(predict_rows)),
        },
    )
