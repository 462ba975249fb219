"""Answering benchmark samples with a trained method: prompts, batched generation, optional auxiliary images.

With `aux_images="dataset"` the sample's own auxiliary images act as a zoom tool: when the model emits the
vision-start token (what `sft` learns to do before an auxiliary image), generation pauses, the next auxiliary
image of that sample is appended, and generation continues. Real benchmarks carry no auxiliary images, so
there the request is answered by closing the image and going on without one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from latentkit.backbone import Backbone
from latentkit.decoding import DecodingPolicy, SamplingParams, Trajectory, decode
from latentkit.layout import Kind, LayoutBuilder
from latentkit.registry import Method
from latentkit.segments import Sample

AuxImages = Literal["none", "dataset"]
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Answer:
    """One generated answer to one sample (several per sample for pass@k)."""

    sample: Sample
    text: str
    finish_reason: str
    aux_images_used: int
    extras: dict[str, object]
    trajectories: list[Trajectory] = field(default_factory=list)  # one per generation round, in order
    prompt_info: dict[str, object] = field(default_factory=dict)  # the method's account of its prompt vectors


@dataclass
class _Pending:
    sample: Sample
    builder: LayoutBuilder
    pieces: list[str]
    aux_used: int = 0
    tokens: int = 0
    rounds: list[Trajectory] = field(default_factory=list)


def answer_samples(
    method: Method,
    samples: Sequence[Sample],
    params: SamplingParams,
    batch_size: int,
    aux_images: AuxImages = "none",
    on_batch: Callable[[list[Answer]], None] | None = None,
    policy: DecodingPolicy | None = None,
    draws: Sequence[int] | None = None,
) -> list[Answer]:
    """Answers in `samples` order, generated `batch_size` prompts at a time; `on_batch` sees each batch's.

    `policy` replaces the method's own decoding policy (e.g. latents with an intervention, for diagnostics).
    `draws` numbers each row's answer among its question's (`Method.prompt`; default all 0).
    """
    draws = list(draws) if draws is not None else [0] * len(samples)
    if len(draws) != len(samples):
        raise ValueError(f"{len(draws)} draws for {len(samples)} samples")
    answers: list[Answer] = []
    for start in range(0, len(samples), batch_size):
        batch_samples = list(samples[start : start + batch_size])
        batch_draws = draws[start : start + batch_size]
        batch = _answer_batch(method, batch_samples, batch_draws, params, aux_images, policy)
        if on_batch is not None:
            on_batch(batch)
        answers.extend(batch)
    return answers


def _answer_batch(
    method: Method,
    samples: list[Sample],
    draws: list[int],
    params: SamplingParams,
    aux_images: AuxImages,
    policy: DecodingPolicy | None,
) -> list[Answer]:
    backbone = method.backbone
    use_tool = aux_images == "dataset" and backbone.supports_images
    tool_stop = (backbone.chat.vision_start,) if use_tool else ()
    tool_token = backbone.token_id(backbone.chat.vision_start) if use_tool else None
    pending = [_Pending(sample, method.prompt(sample, draw), []) for sample, draw in zip(samples, draws)]
    infos = [method.prompt_info(sample, draw) for sample, draw in zip(samples, draws)]
    answers: list[Answer | None] = [None] * len(samples)
    active = list(range(len(samples)))
    round_index = 0
    while active:
        # Rows continue with different budgets left; a round runs the smallest and longer rows go on after it.
        step_params = replace(
            params,
            max_new_tokens=min(params.max_new_tokens - pending[row].tokens for row in active),
            stop_strings=params.stop_strings + tool_stop,
            seed=params.seed + round_index,
        )
        items = [pending[row] for row in active]
        layouts = [item.builder.build(item.sample.sample_id, item.sample.dataset) for item in items]
        generations = decode(backbone, layouts, step_params, policy or method.decoding_policy())
        still_active = []
        for row, generation in zip(active, generations):
            item = pending[row]
            item.rounds.append(generation)
            item.tokens += generation.steps  # latent steps use the budget too, though they emit no token
            has_budget = item.tokens < params.max_new_tokens
            asks_for_image = generation.finish_reason == "stop" and generation.token_ids[-1:] == [tool_token]
            if asks_for_image and has_budget:
                _append_aux_image(backbone, item, generation)
                still_active.append(row)
            elif generation.finish_reason == "length" and has_budget:
                generation.extend(item.builder, len(item.sample.segments))
                item.pieces.append(generation.text)
                still_active.append(row)
            else:
                item.pieces.append(generation.text)
                text = "".join(item.pieces)
                answers[row] = Answer(
                    item.sample,
                    text,
                    generation.finish_reason,
                    item.aux_used,
                    _merged_extras(item.rounds),
                    item.rounds,
                    infos[row],
                )
        active = still_active
        round_index += 1
    return [answer for answer in answers if answer is not None]


def _merged_extras(rounds: list[Trajectory]) -> dict[str, object]:
    """The policy's extras over every round: numbers summed, other values from the last round."""
    merged: dict[str, object] = {}
    for trajectory in rounds:
        for key, value in trajectory.extras.items():
            previous = merged.get(key)
            summable = isinstance(value, int | float) and not isinstance(value, bool)
            merged[key] = previous + value if summable and isinstance(previous, int | float) else value
    return merged


def _append_aux_image(backbone: Backbone, item: _Pending, generation: Trajectory) -> None:
    """Continue after the request: the trace so far, then the sample's next auxiliary image (or none left)."""
    segment_index = len(item.sample.segments)
    generation.extend(item.builder, segment_index, len(generation) - 1)
    item.pieces.append(generation.text)
    aux = item.sample.aux_images
    if item.aux_used < len(aux):
        item.builder.add_image(aux[item.aux_used], Kind.AUX_IMAGE, segment_index)
        item.pieces.append(IMAGE_PLACEHOLDER)
        item.aux_used += 1
    else:
        item.builder.add_token(backbone.chat.vision_start, Kind.TEXT, segment_index)
        item.builder.add_token(backbone.chat.vision_end, Kind.TEXT, segment_index)
