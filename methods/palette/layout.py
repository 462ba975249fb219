"""Reasoning Palette's sequences. Stage `vae`: the content tokens whose mean embedding is h (no chat template).
Stage `warmup` and generation: the chat with the auxiliary images dropped and the prefix's positions right after
the question's last image, or opening the user turn's content when it has none (`render_chat`'s `after_images`)."""

from __future__ import annotations

import torch

from latentkit.backbone import Backbone
from latentkit.chat import ResponseWeights, drop_aux_image, render_chat
from latentkit.errors import DataError
from latentkit.layout import Kind, Layout, LayoutBuilder
from latentkit.segments import Sample


def content_layout(backbone: Backbone, sample: Sample) -> Layout:
    """The text of every user and assistant text or observation segment, each tokenized as the chat renders it,
    in order; never a target."""
    builder = LayoutBuilder(backbone)
    for index, segment in enumerate(sample.segments):
        if segment.role != "system" and segment.kind in ("text", "observation"):
            builder.add_text(segment.text, Kind.TEXT, index)
    if not builder.ids:
        raise DataError(f"sample {sample.sample_id} has no question or answer text to embed")
    return builder.build(sample.sample_id, sample.dataset)


def prefixed_layout(
    backbone: Backbone, sample: Sample, prefix: torch.Tensor, observation_tags: tuple[str, str]
) -> Layout:
    """The conversation with `prefix` [n, D] as its one embedding slot; the assistant's tokens are targets."""
    builder = LayoutBuilder(backbone)
    render_chat(
        builder,
        sample,
        drop_aux_image,
        ResponseWeights(1.0, observation_tags, True),
        after_images=lambda b, index: b.add_embeddings(prefix, index),
    )
    return builder.build(sample.sample_id, sample.dataset)
