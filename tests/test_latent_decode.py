"""Latent decoding (`LatentStep` in the batched generator) against an independent reference: the model run
without a cache over the prompt, the start token and each latent fed back by hand (DESIGN.md, "Latent engine";
specs/monet.md, slot convention: the K slots read h(start), h(slot 1), ..., h(slot K-1), then the end token)."""

from __future__ import annotations

import pytest
import torch

from latentkit.backbone import build_backbone
from latentkit.config import ModelSection
from latentkit.eval.generate import SamplingParams, generate
from latentkit.latent import Constant, DatasetMean, LatentStep, LatentTokens, Noise, Zeros
from latentkit.layout import Kind, LayoutBuilder
from latentkit.masks import causal_mask

TOKENS = ("<lat>", "</lat>")
# Different lengths, so the batch is left-padded.
PROMPTS = ["What colour is it?", "Which object sits closest to the top left corner of the whole canvas?"]


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset="tiny-qwen2.5-vl"))
    backbone.add_tokens(list(TOKENS))
    backbone.model.eval()
    return backbone


@pytest.fixture(scope="module")
def tokens(backbone) -> LatentTokens:
    return LatentTokens(*(backbone.token_id(token) for token in TOKENS))


def layouts(backbone):
    built = []
    for index, text in enumerate(PROMPTS):
        builder = LayoutBuilder(backbone)
        builder.add_text(text, Kind.TEXT, 0)
        built.append(builder.build(f"p{index}", "test"))
    assert len(built[0]) != len(built[1])
    return built


class Recording:
    """Delegates to a step function and keeps the post-norm hidden state the generator hands it at each step."""

    def __init__(self, step: LatentStep):
        self.step = step
        self.hidden: list[torch.Tensor] = []

    def __call__(self, backbone, sampled, hidden, state):
        self.hidden.append(hidden.clone())
        return self.step(backbone, sampled, hidden, state)

    def finish(self, generations) -> None:
        self.step.finish(generations)


def last_hidden(backbone, inputs: list[torch.Tensor]) -> torch.Tensor:
    """One forward without a cache over the whole input sequence; the last position's post-norm hidden state."""
    embeds = torch.stack(inputs)[None]
    n = embeds.shape[1]
    positions = torch.arange(n).view(1, 1, n).expand(3, 1, n)  # text-only M-RoPE: all three axes equal
    assert torch.equal(positions[:, 0], backbone.position_ids(torch.zeros(n, dtype=torch.long), []))
    with torch.no_grad():
        return backbone.forward(embeds, positions, causal_mask(1, n)).last_hidden_state[0, -1]


def reference_block(backbone, layout, tokens: LatentTokens, k: int, replacement: torch.Tensor | None = None):
    """Prompt, start token, then K latents each the previous last hidden state (or `replacement`), then the end
    token: the latents, the inputs so far, and the hidden states seen at each latent step and after the end."""
    with torch.no_grad():
        inputs = list(backbone.embed(layout.input_ids)) + [backbone.embed(torch.tensor(tokens.start))]
    latents, hidden = [], []
    for _ in range(k):
        h = last_hidden(backbone, inputs)
        hidden.append(h)
        latents.append(h if replacement is None else replacement)
        inputs.append(latents[-1])
    hidden.append(last_hidden(backbone, inputs))  # h(slot K): the step that emits the end token
    with torch.no_grad():
        inputs.append(backbone.embed(torch.tensor(tokens.end)))
    hidden.append(last_hidden(backbone, inputs))  # h(end): predicts the first text token after the block
    return torch.stack(latents), inputs, hidden


def test_forced_block_opens_with_start_and_emits_only_start_and_end(backbone, tokens):
    step = LatentStep(tokens, 3, force=True, stop_at_end=False)
    generations = generate(backbone, layouts(backbone), SamplingParams(max_new_tokens=7), step)
    assert len(step.rows) == 2
    for generation, row in zip(generations, step.rows):
        # steps: start, 3 latents (nothing emitted), end, 2 text tokens
        assert generation.token_ids[:2] == [tokens.start, tokens.end] and len(generation.token_ids) == 4
        assert row.forced and row.triggered
        assert row.blocks[0].shape == (3, backbone.hidden_size)
        assert generation.extras == {"latent_blocks": len(row.blocks), "latent_steps": 3 * len(row.blocks)}


def test_latents_and_continuation_equal_a_forward_without_cache(backbone, tokens):
    k = 3
    step = Recording(LatentStep(tokens, k, force=True, stop_at_end=False))
    prompts = layouts(backbone)
    generations = generate(backbone, prompts, SamplingParams(max_new_tokens=k + 4), step)
    for row, (layout, generation) in enumerate(zip(prompts, generations)):
        latents, inputs, hidden = reference_block(backbone, layout, tokens, k)
        torch.testing.assert_close(step.step.rows[row].blocks[0], latents, atol=1e-5, rtol=1e-4)
        # generator step 1 + j hands over h(start) (j = 0) or h(slot j); step k + 2 hands over h(end)
        seen = torch.stack([step.hidden[s][row] for s in range(1, k + 3)])
        torch.testing.assert_close(seen, torch.stack(hidden), atol=1e-5, rtol=1e-4)
        # the text after the block continues from the end token's embedding: greedy from h(end), then on
        first_text = int(backbone.logits(hidden[-1]).argmax())
        assert generation.token_ids[2] == first_text
        inputs.append(backbone.embed(torch.tensor(first_text)).detach())
        torch.testing.assert_close(
            step.hidden[k + 3][row], last_hidden(backbone, inputs), atol=1e-5, rtol=1e-4
        )
        assert generation.token_ids[3] == int(backbone.logits(step.hidden[k + 3][row]).argmax())


def test_zeros_intervention_is_recorded_and_read(backbone, tokens):
    k = 2
    step = Recording(LatentStep(tokens, k, force=True, stop_at_end=False, intervention=Zeros()))
    prompts = layouts(backbone)
    generate(backbone, prompts, SamplingParams(max_new_tokens=k + 3), step)
    zeros = torch.zeros(backbone.hidden_size)
    for row, layout in enumerate(prompts):
        assert torch.equal(step.step.rows[row].blocks[0], torch.zeros(k, backbone.hidden_size))
        _, _, hidden = reference_block(backbone, layout, tokens, k, replacement=zeros)
        seen = torch.stack([step.hidden[s][row] for s in range(1, k + 3)])
        torch.testing.assert_close(seen, torch.stack(hidden), atol=1e-5, rtol=1e-4)
    generated = LatentStep(tokens, k, force=True, stop_at_end=False)
    generate(backbone, prompts, SamplingParams(max_new_tokens=k + 3), generated)
    assert not torch.equal(generated.rows[0].blocks[0][1], zeros)  # the test is not vacuous


def always(token: int, vocabulary: int):
    """Logits whose argmax is `token` everywhere (stands in for a model that always predicts it)."""

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full(hidden.shape[:-1], token), vocabulary).float()

    return logits


def test_stop_at_end_ends_a_block_after_one_latent(backbone, tokens, monkeypatch):
    monkeypatch.setattr(backbone, "logits", always(tokens.end, backbone.lm_head.out_features))
    prompt = layouts(backbone)[:1]
    early = LatentStep(tokens, 4, force=True, stop_at_end=True)
    generation = generate(backbone, prompt, SamplingParams(max_new_tokens=6), early)[0]
    # start (forced), one latent, the sampled end closes the block; later end tokens are plain text
    assert [block.shape[0] for block in early.rows[0].blocks] == [1]
    assert generation.token_ids == [tokens.start, tokens.end, tokens.end, tokens.end, tokens.end]
    full = LatentStep(tokens, 4, force=True, stop_at_end=False)
    generate(backbone, prompt, SamplingParams(max_new_tokens=6), full)
    assert [block.shape[0] for block in full.rows[0].blocks] == [4]


def test_a_sampled_start_token_opens_a_block(backbone, tokens, monkeypatch):
    monkeypatch.setattr(backbone, "logits", always(tokens.start, backbone.lm_head.out_features))
    step = LatentStep(tokens, 2)
    generation = generate(backbone, layouts(backbone)[:1], SamplingParams(max_new_tokens=8), step)[0]
    assert generation.token_ids == [tokens.start, tokens.end, tokens.start, tokens.end]
    assert not step.rows[0].forced
    assert [block.shape[0] for block in step.rows[0].blocks] == [2, 2]
    assert generation.extras == {"latent_blocks": 2, "latent_steps": 4}


def test_a_block_cut_by_the_token_budget_is_kept(backbone, tokens):
    step = LatentStep(tokens, 3, force=True)
    generation = generate(backbone, layouts(backbone)[:1], SamplingParams(max_new_tokens=3), step)[0]
    assert generation.token_ids == [tokens.start]
    assert [block.shape[0] for block in step.rows[0].blocks] == [2]
    assert generation.extras == {"latent_blocks": 1, "latent_steps": 2}


def test_k_must_be_positive(tokens):
    with pytest.raises(ValueError, match="at least 1"):
        LatentStep(tokens, 0)


def test_interventions_replace_by_rule():
    latent = torch.tensor([3.0, -4.0, 0.0, 0.0])
    assert torch.equal(Zeros()(latent, 0), torch.zeros(4))
    assert torch.equal(Constant(torch.ones(4))(latent, 5), torch.ones(4))
    means = torch.arange(8.0).view(2, 4)
    assert torch.equal(DatasetMean(means)(latent, 0), means[0])
    assert torch.equal(DatasetMean(means)(latent, 7), means[1])  # later steps take the last mean
    big = torch.full((4096,), 2.0)
    first, again = Noise(seed=3)(big, 0), Noise(seed=3)(big, 0)
    assert torch.equal(first, again)
    assert float(first.square().mean().sqrt()) == pytest.approx(2.0, rel=0.05)  # the latent's own scale
