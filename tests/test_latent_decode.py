"""Latent decoding (`LatentPolicy` on the decoding engine) against an independent reference: the model run
without a cache over the prompt, the start token and each latent fed back by hand (docs/design.md, "Decoding";
README.md, "Monet", slot convention: the K slots read h(start), h(slot 1), ..., h(slot K-1), then the end token)."""

from __future__ import annotations

import pytest
import torch

from latentkit.backbone import build_backbone
from latentkit.config import ModelSection
from latentkit.decoding import SamplingParams, decode
from latentkit.latent import (
    Constant,
    DatasetMean,
    Identity,
    LatentPolicy,
    LatentTokens,
    MomentMatchedNoise,
    Noise,
    NormMatchedNoise,
    RepeatFirst,
    Transplant,
    Zeros,
)
from latentkit.layout import Kind, LayoutBuilder
from latentkit.masks import causal_mask

TOKENS = ("<lat>", "</lat>", "<lat_pad>")
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


def blocks(trajectory) -> list[torch.Tensor]:
    return trajectory.blocks(int(Kind.LATENT))


def layouts(backbone):
    built = []
    for index, text in enumerate(PROMPTS):
        builder = LayoutBuilder(backbone)
        builder.add_text(text, Kind.TEXT, 0)
        built.append(builder.build(f"p{index}", "test"))
    assert len(built[0]) != len(built[1])
    return built


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
    policy = LatentPolicy(tokens, 3, force=True, stop_at_end=False)
    trajectories = decode(backbone, layouts(backbone), SamplingParams(max_new_tokens=7), policy)
    for trajectory in trajectories:
        # steps: start, 3 latents (nothing emitted), end, 2 text tokens
        assert trajectory.token_ids[:2] == [tokens.start, tokens.end] and len(trajectory.token_ids) == 4
        assert trajectory.input_ids[:5] == [tokens.start, *[tokens.slot] * 3, tokens.end]
        assert trajectory.kinds[:5] == [int(Kind.LATENT)] * 5 and trajectory.kinds[5] == int(Kind.TEXT)
        assert [block.shape for block in blocks(trajectory)] == [(3, backbone.hidden_size)]
        assert trajectory.is_action[:5] == [False] * 5 and all(trajectory.is_action[5:])  # forced, latents
        assert trajectory.extras == {"latent_blocks": 1, "latent_steps": 3, "latent_forced": True}


def test_latents_and_continuation_equal_a_forward_without_cache(backbone, tokens):
    k = 3
    policy = LatentPolicy(tokens, k, force=True, stop_at_end=False)
    prompts = layouts(backbone)
    trajectories = decode(backbone, prompts, SamplingParams(max_new_tokens=k + 4), policy, record_hidden=True)
    for layout, trajectory in zip(prompts, trajectories):
        latents, inputs, hidden = reference_block(backbone, layout, tokens, k)
        torch.testing.assert_close(blocks(trajectory)[0], latents, atol=1e-5, rtol=1e-4)
        # decision 1 + j sees h(start) (j = 0) or h(slot j); decision k + 2 sees h(end)
        seen = torch.stack(trajectory.decision_hidden[1 : k + 3])
        torch.testing.assert_close(seen, torch.stack(hidden), atol=1e-5, rtol=1e-4)
        # the text after the block continues from the end token's embedding: greedy from h(end), then on
        first_text = int(backbone.logits(hidden[-1]).argmax())
        assert trajectory.token_ids[2] == first_text
        inputs.append(backbone.embed(torch.tensor(first_text)).detach())
        after = trajectory.decision_hidden[k + 3]
        torch.testing.assert_close(after, last_hidden(backbone, inputs), atol=1e-5, rtol=1e-4)
        assert trajectory.token_ids[3] == int(backbone.logits(after).argmax())


def test_zeros_intervention_is_recorded_and_read(backbone, tokens):
    k = 2
    policy = LatentPolicy(tokens, k, force=True, stop_at_end=False, intervention=Zeros())
    prompts = layouts(backbone)
    trajectories = decode(backbone, prompts, SamplingParams(max_new_tokens=k + 3), policy, record_hidden=True)
    zeros = torch.zeros(backbone.hidden_size)
    for layout, trajectory in zip(prompts, trajectories):
        assert torch.equal(blocks(trajectory)[0], torch.zeros(k, backbone.hidden_size))
        _, _, hidden = reference_block(backbone, layout, tokens, k, replacement=zeros)
        seen = torch.stack(trajectory.decision_hidden[1 : k + 3])
        torch.testing.assert_close(seen, torch.stack(hidden), atol=1e-5, rtol=1e-4)
    generated = decode(
        backbone, prompts, SamplingParams(max_new_tokens=k + 3), policy.varied(intervention=None)
    )
    assert not torch.equal(blocks(generated[0])[0][1], zeros)  # the test is not vacuous


def always(token: int, vocabulary: int):
    """Logits whose argmax is `token` everywhere (stands in for a model that always predicts it)."""

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full(hidden.shape[:-1], token), vocabulary).float()

    return logits


def test_stop_at_end_ends_a_block_after_one_latent(backbone, tokens, monkeypatch):
    monkeypatch.setattr(backbone, "logits", always(tokens.end, backbone.lm_head.out_features))
    prompt = layouts(backbone)[:1]
    early = LatentPolicy(tokens, 4, force=True, stop_at_end=True)
    trajectory = decode(backbone, prompt, SamplingParams(max_new_tokens=6), early)[0]
    # start (forced), one latent, the sampled end closes the block; later end tokens are plain text
    assert [block.shape[0] for block in blocks(trajectory)] == [1]
    assert trajectory.token_ids == [tokens.start, tokens.end, tokens.end, tokens.end, tokens.end]
    assert trajectory.is_action[2]  # the end token was sampled, not forced
    full = decode(backbone, prompt, SamplingParams(max_new_tokens=6), early.varied(), record_hidden=False)[0]
    assert [block.shape[0] for block in blocks(full)] == [1]
    never = LatentPolicy(tokens, 4, force=True, stop_at_end=False)
    assert [
        b.shape[0] for b in blocks(decode(backbone, prompt, SamplingParams(max_new_tokens=6), never)[0])
    ] == [4]


def test_a_sampled_start_token_opens_a_block(backbone, tokens, monkeypatch):
    monkeypatch.setattr(backbone, "logits", always(tokens.start, backbone.lm_head.out_features))
    policy = LatentPolicy(tokens, 2)
    trajectory = decode(backbone, layouts(backbone)[:1], SamplingParams(max_new_tokens=8), policy)[0]
    assert trajectory.token_ids == [tokens.start, tokens.end, tokens.start, tokens.end]
    assert [block.shape[0] for block in blocks(trajectory)] == [2, 2]
    assert trajectory.extras == {"latent_blocks": 2, "latent_steps": 4, "latent_forced": False}


def test_a_block_cut_by_the_token_budget_is_kept(backbone, tokens):
    policy = LatentPolicy(tokens, 3, force=True)
    trajectory = decode(backbone, layouts(backbone)[:1], SamplingParams(max_new_tokens=3), policy)[0]
    assert trajectory.token_ids == [tokens.start]
    assert [block.shape[0] for block in blocks(trajectory)] == [2]
    assert trajectory.extras["latent_blocks"] == 1 and trajectory.extras["latent_steps"] == 2


def test_k_must_not_be_negative(tokens):
    with pytest.raises(ValueError, match="at least 0"):
        LatentPolicy(tokens, -1)


def test_k_zero_keeps_only_the_markers(backbone, tokens):
    policy = LatentPolicy(tokens, 0, force=True, stop_at_end=False)
    for trajectory in decode(backbone, layouts(backbone), SamplingParams(max_new_tokens=4), policy):
        assert trajectory.input_ids[:2] == [tokens.start, tokens.end] and not trajectory.vectors


def test_identity_reproduces_the_decoding_bit_for_bit(backbone, tokens):
    params = SamplingParams(max_new_tokens=6)
    plain = decode(backbone, layouts(backbone), params, LatentPolicy(tokens, 3, force=True))
    same = decode(
        backbone, layouts(backbone), params, LatentPolicy(tokens, 3, force=True, intervention=Identity())
    )
    for a, b in zip(plain, same):
        assert a.input_ids == b.input_ids and a.log_probs == b.log_probs
        assert a.vectors.keys() == b.vectors.keys()
        assert all(torch.equal(a.vectors[i], b.vectors[i]) for i in a.vectors)


def test_interventions_see_each_rows_sample_key(backbone, tokens):
    seen = []

    def recording(latent, step, key):
        seen.append((key, step))
        return latent

    recording.name = "recording"
    policy = LatentPolicy(tokens, 2, force=True, stop_at_end=False, intervention=recording)
    decode(backbone, layouts(backbone), SamplingParams(max_new_tokens=4), policy)
    assert sorted(seen) == [
        (("test", "p0"), 0),
        (("test", "p0"), 1),
        (("test", "p1"), 0),
        (("test", "p1"), 1),
    ]


def test_interventions_replace_by_rule():
    latent, key = torch.tensor([3.0, -4.0, 0.0, 0.0]), ("d", "s")
    assert Identity()(latent, 2, key) is latent
    assert torch.equal(Zeros()(latent, 0, key), torch.zeros(4))
    assert torch.equal(Constant(torch.ones(4))(latent, 5, key), torch.ones(4))
    means = torch.arange(8.0).view(2, 4)
    assert torch.equal(DatasetMean(means)(latent, 0, key), means[0])
    assert torch.equal(DatasetMean(means)(latent, 7, key), means[1])  # later steps take the last mean
    big = torch.full((4096,), 2.0)
    first, again = Noise(seed=3)(big, 0, key), Noise(seed=3)(big, 0, key)
    assert torch.equal(first, again)
    assert float(first.square().mean().sqrt()) == pytest.approx(2.0, rel=0.05)  # the latent's own scale


def test_matched_noise_keeps_the_latents_norm_or_moments():
    key = ("d", "s")
    latent = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 3 + 1.5
    norm_matched = NormMatchedNoise(seed=2)
    first = norm_matched(latent, 0, key)
    assert float(first.norm()) == pytest.approx(float(latent.norm()), rel=1e-5)
    assert not torch.allclose(first, latent) and not torch.allclose(first, norm_matched(latent, 1, key))
    assert torch.equal(first, NormMatchedNoise(seed=2)(latent, 0, key))  # seeded
    moment = MomentMatchedNoise(seed=2)(latent, 0, key)
    assert float(moment.mean()) == pytest.approx(float(latent.mean()), abs=1e-5)
    assert float(moment.std()) == pytest.approx(float(latent.std()), rel=1e-5)
    assert (
        float(torch.nn.functional.cosine_similarity(moment - moment.mean(), latent - latent.mean(), dim=0))
        < 0.5
    )


def test_repeat_first_feeds_each_blocks_first_latent_per_sample():
    repeat, a, b = RepeatFirst(), ("d", "a"), ("d", "b")
    x0, x1, y0, x2 = (torch.full((3,), float(v)) for v in (1, 2, 7, 9))
    assert torch.equal(repeat(x0, 0, a), x0)
    assert torch.equal(repeat(y0, 0, b), y0)  # another row, interleaved
    assert torch.equal(repeat(x1, 1, a), x0) and torch.equal(repeat(x2, 2, a), x0)
    assert torch.equal(repeat(x2, 0, a), x2)  # a new block starts from its own first latent


def test_transplant_feeds_given_blocks_by_step_and_shift():
    key, other = ("d", "a"), ("d", "b")
    given = [torch.arange(6.0).view(3, 2), torch.arange(10.0, 14.0).view(2, 2)]
    own = torch.full((2,), -1.0)
    swap = Transplant({key: given}, 0, "swap")
    assert [swap(own, j, key).tolist() for j in range(4)] == [[0, 1], [2, 3], [4, 5], [4, 5]]  # past 3: last
    assert [swap(own, j, key).tolist() for j in range(3)] == [[10, 11], [12, 13], [12, 13]]  # second block
    assert swap(own, 0, key).tolist() == [10, 11]  # a third block: the last given block
    oracle = Transplant({key: given}, 1, "oracle")
    assert torch.equal(oracle(own, 0, key), own)  # the first step keeps the model's own input
    assert [oracle(own, j, key).tolist() for j in (1, 2)] == [[0, 1], [2, 3]]
    with pytest.raises(KeyError, match="swap"):
        swap(own, 0, other)
