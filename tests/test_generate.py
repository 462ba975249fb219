"""Batched generation: equal to one-at-a-time greedy decoding, KV cache exact, sampling filters, stop strings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentkit.backbone import Backbone, build_backbone
from latentkit.config import ModelSection
from latentkit.errors import ConfigError
from latentkit.eval.generate import DecodeState, SamplingParams, StepOutput, generate, sample_next
from latentkit.eval.runner import pass_at_k
from latentkit.layout import Layout
from latentkit.masks import causal_mask
from latentkit.registry import get_method
from latentkit.segments import Sample, Segment

QUESTIONS = [
    "What colour?",
    "What is the shape of the object at row two, column three of the grid?",
    "Count.",
    "Which object is closest to the top left corner of the canvas, and what colour is it?",
]


@pytest.fixture(scope="module", params=["tiny-qwen2.5-vl", "tiny-causal-lm"])
def backbone(request) -> Backbone:
    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset=request.param))
    backbone.model.eval()
    return backbone


def make_samples(tmp: Path, with_images: bool) -> list[Sample]:
    samples = []
    for index, question in enumerate(QUESTIONS):
        segments = [Segment("text", "system", "You are a helpful assistant.")]
        if with_images:
            path = tmp / f"image{index}.png"
            # Different sizes give different numbers of image tokens, so prompts differ in length twice over.
            Image.new("RGB", (28 * (1 + index % 3), 56), (40 * index, 90, 200)).save(path)
            segments.append(Segment("image", "user", image=path))
        segments.append(Segment("text", "user", question))
        samples.append(Sample(f"s{index}", "test", tuple(segments), answer="red"))
    return samples


def prompts(backbone: Backbone, tmp: Path) -> list[Layout]:
    method = get_method("sft")(get_method("sft").Config())
    method.setup(backbone)
    return [
        method.prompt(s).build(s.sample_id, s.dataset) for s in make_samples(tmp, backbone.supports_images)
    ]


def test_batched_greedy_equals_one_at_a_time(backbone, tmp_path):
    layouts = prompts(backbone, tmp_path)
    assert len({len(layout) for layout in layouts}) == len(
        layouts
    )  # mixed lengths: left padding is exercised
    params = SamplingParams(max_new_tokens=10)
    batched = generate(backbone, layouts, params)
    for layout, generation in zip(layouts, batched):
        alone = generate(backbone, [layout], params)[0]
        assert generation.token_ids == alone.token_ids
        assert generation.text == alone.text
        assert len(generation.token_ids) == 10 and generation.finish_reason == "length"


class RecordingStep:
    """Feeds tokens like plain decoding and records the hidden state the generator hands over."""

    def __init__(self) -> None:
        self.hidden: list[torch.Tensor] = []

    def __call__(self, backbone, sampled, hidden, state: DecodeState) -> StepOutput:
        self.hidden.append(hidden.clone())
        return StepOutput(backbone.embed(sampled), sampled)

    def finish(self, generations) -> None:
        return None


def test_kv_cache_hidden_states_match_a_full_forward(backbone, tmp_path):
    layout = prompts(backbone, tmp_path)[1]
    recorder = RecordingStep()
    generation = generate(backbone, [layout], SamplingParams(max_new_tokens=5), recorder)[0]
    # Recompute without a cache: the prompt plus the generated tokens, one forward over everything.
    from latentkit.layout import collate, inputs_embeds

    batch = collate([layout], backbone.token_id(backbone.chat.pad))
    prompt_embeds = inputs_embeds(backbone, batch)
    new_ids = torch.tensor([generation.token_ids[:-1]])
    embeds = torch.cat([prompt_embeds, backbone.embed(new_ids)], dim=1)
    last = batch.position_ids.max()
    steps = torch.arange(1, new_ids.shape[1] + 1) + last
    extra = steps.view(1, 1, -1).expand(3, 1, -1) if batch.position_ids.dim() == 3 else steps.view(1, -1)
    positions = torch.cat([batch.position_ids, extra], dim=-1)
    with torch.no_grad():
        full = backbone.forward(embeds, positions, causal_mask(1, embeds.shape[1])).last_hidden_state[0]
    expected = full[len(layout) - 1 :]
    assert torch.allclose(torch.cat(recorder.hidden), expected, atol=1e-5)


def test_stop_strings_cut_the_text(backbone, tmp_path):
    layout = prompts(backbone, tmp_path)[0]
    free = generate(backbone, [layout], SamplingParams(max_new_tokens=12))[0]
    stop = free.text[3:6]
    assert stop
    stopped = generate(backbone, [layout], SamplingParams(max_new_tokens=12, stop_strings=(stop,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]


def test_sampling_is_seeded_and_top_k_one_is_greedy(backbone, tmp_path):
    layouts = prompts(backbone, tmp_path)[:2]
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7)
    first = [g.token_ids for g in generate(backbone, layouts, sampled)]
    again = [g.token_ids for g in generate(backbone, layouts, sampled)]
    assert first == again
    greedy = [g.token_ids for g in generate(backbone, layouts, SamplingParams(max_new_tokens=6))]
    top1 = SamplingParams(max_new_tokens=6, temperature=1.5, top_k=1, seed=3)
    assert [g.token_ids for g in generate(backbone, layouts, top1)] == greedy


def test_sample_next_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    top_k = sample_next(logits, SamplingParams(temperature=1.0, top_k=2), generator)
    assert set(top_k.tolist()) == {0, 1}
    # top_p 0.7: 0.5 alone is not enough, 0.5 + 0.3 reaches it, so tokens 0 and 1 remain.
    top_p = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.7), generator)
    assert set(top_p.tolist()) == {0, 1}
    assert abs((top_p == 0).float().mean().item() - 0.5 / 0.8) < 0.05
    assert sample_next(logits[:1], SamplingParams(), None).tolist() == [0]


@pytest.mark.parametrize(
    "bad",
    [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"stop_strings": ("",)}],
)
def test_bad_sampling_parameters_are_named(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        SamplingParams(**bad)


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (5, 2, 2), (10, 3, 4), (4, 0, 2), (4, 4, 3), (6, 5, 2)])
def test_pass_at_k_matches_the_binomial_formula(n, c, k):
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="pass@3"):
        pass_at_k(2, 1, 3)
