"""Rendering a `Sample` into a `LayoutBuilder` in the backbone's chat format (ChatML), segment by segment.

What happens at an auxiliary image is the method's choice (`on_aux_image`): inline it (SFT, Monet stage 1),
replace it by a latent block (Monet stages 2-3), or drop it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from latentkit.layout import Kind, LayoutBuilder
from latentkit.segments import Sample, Segment

AuxImageHandler = Callable[[LayoutBuilder, Segment, int], None]
InsertHandler = Callable[[LayoutBuilder, int], None]


def inline_aux_image(builder: LayoutBuilder, segment: Segment, segment_index: int) -> None:
    """The image inline; its vision-start token is a target, so the model learns when to ask for a closer look."""
    assert segment.image is not None
    builder.add_image(segment.image, Kind.AUX_IMAGE, segment_index, start_is_target=True)


def drop_aux_image(builder: LayoutBuilder, segment: Segment, segment_index: int) -> None:
    """The reasoning goes on in text without looking closer (the no-auxiliary-image baseline)."""


@dataclass(frozen=True)
class ResponseWeights:
    """Loss weights of assistant tokens; observation tags are not targets unless asked (Monet, arXiv 2511.21395, stage 1)."""

    observation: float = 1.0
    observation_tags: tuple[str, str] = ("<observation>", "</observation>")
    train_observation_tags: bool = False


def render_chat(
    builder: LayoutBuilder,
    sample: Sample,
    on_aux_image: AuxImageHandler,
    weights: ResponseWeights,
    prompt_only: bool = False,
    after_images: InsertHandler | None = None,
    before_segment: InsertHandler | None = None,
) -> None:
    """Append the conversation; with `prompt_only`, stop after the assistant header (for generation).

    `after_images` is called once, right after the question's last image (or, without one, before the first
    user segment's content), to place vectors such as prompt embeddings. `before_segment` is called with each
    segment's index before its content (after its turn's header), e.g. to open a latent segment before a step.
    """
    chat = builder.backbone.chat
    open_tag, close_tag = weights.observation_tags
    images = [i for i, s in enumerate(sample.segments) if s.kind == "image"]
    users = [i for i, s in enumerate(sample.segments) if s.role == "user"]
    insert_after = images[-1] if images else None
    insert_before = None if images or not users else users[0]
    role = None
    for index, segment in enumerate(sample.segments):
        if segment.role != role:
            if role is not None:
                _close_turn(builder, role, index)
            role = segment.role
            builder.add_token(chat.im_start, Kind.TEXT, index)
            builder.add_text(f"{role}\n", Kind.TEXT, index)
            if prompt_only and role == "assistant":
                return
        if after_images is not None and index == insert_before:
            after_images(builder, index)
        if before_segment is not None:
            before_segment(builder, index)
        train = role == "assistant"
        if segment.kind == "text":
            builder.add_text(segment.text, Kind.TEXT, index, train=train)
        elif segment.kind == "observation":
            tags_trained = train and weights.train_observation_tags
            builder.add_token(open_tag, Kind.OBSERVATION, index, train=tags_trained)
            builder.add_text(segment.text, Kind.OBSERVATION, index, train=train, weight=weights.observation)
            builder.add_token(close_tag, Kind.OBSERVATION, index, train=tags_trained)
        elif segment.kind == "image":
            assert segment.image is not None
            builder.add_image(segment.image, Kind.IMAGE, index)
            if after_images is not None and index == insert_after:
                after_images(builder, index)
        else:
            on_aux_image(builder, segment, index)
    if role is not None:
        _close_turn(builder, role, len(sample.segments))
    if prompt_only:
        builder.add_token(chat.im_start, Kind.TEXT, len(sample.segments))
        builder.add_text("assistant\n", Kind.TEXT, len(sample.segments))


def _close_turn(builder: LayoutBuilder, role: str, index: int) -> None:
    # The assistant learns to end its turn; the newline after the end marker is formatting only.
    builder.add_token(builder.backbone.chat.im_end, Kind.TEXT, index, train=role == "assistant")
    builder.add_text("\n", Kind.TEXT, index)
