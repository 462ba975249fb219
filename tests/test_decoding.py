"""The decoding engine: batched equals one at a time (plain tokens and latent blocks, rows of mixed lengths),
trajectories replay exactly as one training forward (hidden states and policy log-probs), multi-vector feeds,
rewinds, extra heads, per-token extras reaching the layers, prompt embeddings, sampling filters, stop strings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentkit.backbone import Backbone, build_backbone
from latentkit.config import ModelSection
from latentkit.decoding import (
    DecodingPolicy,
    Embeddings,
    Finish,
    SamplingParams,
    Step,
    Token,
    decode,
    policy_log_probs,
    replay_forward,
    sample_tokens,
    token_log_probs,
)
from latentkit.decoding.replay import decision_states
from latentkit.errors import ConfigError
from latentkit.eval.runner import pass_at_k
from latentkit.layout import Kind, Layout
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
    batched = decode(backbone, layouts, params)
    for layout, generation in zip(layouts, batched):
        alone = decode(backbone, [layout], params)[0]
        assert generation.token_ids == alone.token_ids
        assert generation.text == alone.text
        assert len(generation.token_ids) == 10 and generation.finish_reason == "length"


def test_kv_cache_hidden_states_match_a_full_forward(backbone, tmp_path):
    layout = prompts(backbone, tmp_path)[1]
    generation = decode(backbone, [layout], SamplingParams(max_new_tokens=5), record_hidden=True)[0]
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
    assert torch.allclose(torch.stack(generation.decision_hidden), expected, atol=1e-5)


def test_stop_strings_cut_the_text(backbone, tmp_path):
    layout = prompts(backbone, tmp_path)[0]
    free = decode(backbone, [layout], SamplingParams(max_new_tokens=12))[0]
    stop = free.text[3:6]
    assert stop
    stopped = decode(backbone, [layout], SamplingParams(max_new_tokens=12, stop_strings=(stop,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]


def test_sampling_is_seeded_and_top_k_one_is_greedy(backbone, tmp_path):
    layouts = prompts(backbone, tmp_path)[:2]
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7)
    first = [g.token_ids for g in decode(backbone, layouts, sampled)]
    again = [g.token_ids for g in decode(backbone, layouts, sampled)]
    assert first == again
    greedy = [g.token_ids for g in decode(backbone, layouts, SamplingParams(max_new_tokens=6))]
    top1 = SamplingParams(max_new_tokens=6, temperature=1.5, top_k=1, seed=3)
    assert [g.token_ids for g in decode(backbone, layouts, top1)] == greedy


def test_sampling_filters_and_their_log_probs():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    top_k, top_k_log_probs = sample_tokens(logits, SamplingParams(temperature=1.0, top_k=2), generator)
    assert set(top_k.tolist()) == {0, 1}
    # Renormalised over the kept tokens: 0.5 / 0.8 and 0.3 / 0.8.
    expected = torch.where(top_k == 0, math.log(0.5 / 0.8), math.log(0.3 / 0.8))
    torch.testing.assert_close(top_k_log_probs, expected.float())
    # top_p 0.7: 0.5 alone is not enough, 0.5 + 0.3 reaches it, so tokens 0 and 1 remain.
    top_p, _ = sample_tokens(logits, SamplingParams(temperature=1.0, top_p=0.7), generator)
    assert set(top_p.tolist()) == {0, 1}
    assert abs((top_p == 0).float().mean().item() - 0.5 / 0.8) < 0.05
    greedy, greedy_log_prob = sample_tokens(logits[:1], SamplingParams(), None)
    assert greedy.tolist() == [0] and greedy_log_prob.item() == pytest.approx(math.log(0.5))
    # temperature 2: softmax(log p / 2) is proportional to sqrt(p)
    hot = policy_log_probs(logits[:1], SamplingParams(temperature=2.0))[0].exp()
    roots = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    torch.testing.assert_close(hot, roots / roots.sum())


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


# --- trajectories, replay, policies ---------------------------------------------------------------------------
LATENT_TOKENS = ("<lat>", "<lat_pad>", "</lat>")


def latent_policy(backbone: Backbone, k: int):
    from latentkit.latent import LatentPolicy, LatentTokens

    backbone.add_tokens(list(LATENT_TOKENS))
    start, slot, end = (backbone.token_id(t) for t in LATENT_TOKENS)
    return LatentPolicy(LatentTokens(start, end, slot), k, force=True, stop_at_end=False)


class EveryOtherRowOpensLatents(DecodingPolicy):
    """Rows of even index take the latent policy (forced block first), odd rows decode plain text, so one
    batch mixes latent blocks and text at the same step."""

    def __init__(self, inner):
        self.inner = inner

    def begin(self, backbone, prompts):
        self.inner.begin(backbone, prompts)

    def decide(self, proposal, view):
        if view.row % 2:
            return Step(Token(proposal.token))
        return self.inner.decide(proposal, view)

    def end(self, trajectories):
        self.inner.end(trajectories)


def test_batched_equals_one_at_a_time_with_latent_blocks(backbone, tmp_path):
    layouts = prompts(backbone, tmp_path)
    policy = EveryOtherRowOpensLatents(latent_policy(backbone, 3))
    params = SamplingParams(max_new_tokens=9)
    batched = decode(backbone, layouts, params, policy, record_hidden=True)
    for row, (layout, trajectory) in enumerate(zip(layouts, batched)):
        # one-at-a-time: the row keeps its parity, so it decodes under the same rule
        alone = decode(backbone, [layout] if row % 2 == 0 else [layouts[0], layout], params, policy, True)[-1]
        assert trajectory.input_ids == alone.input_ids and trajectory.kinds == alone.kinds
        assert trajectory.positions == alone.positions
        torch.testing.assert_close(
            torch.tensor(trajectory.log_probs), torch.tensor(alone.log_probs), atol=1e-5, rtol=0
        )
        for index, vector in trajectory.vectors.items():
            torch.testing.assert_close(vector, alone.vectors[index], atol=1e-5, rtol=1e-4)
    assert [len(t.blocks(int(Kind.LATENT))) for t in batched] == [1, 0, 1, 0]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=9),
        SamplingParams(max_new_tokens=9, temperature=0.8, top_k=50, top_p=0.9, seed=3),
    ],
    ids=["greedy", "sampled"],
)
def test_trajectories_replay_as_one_training_forward(backbone, tmp_path, params):
    """Hidden states and token log-probs from one forward over prompt + trajectory equal those at sampling time,
    a latent block included (fp32)."""
    layouts = prompts(backbone, tmp_path)
    policy = EveryOtherRowOpensLatents(latent_policy(backbone, 3))
    trajectories = decode(backbone, layouts, params, policy, record_hidden=True)
    with torch.no_grad():
        out, batch = replay_forward(backbone, trajectories)
    for trajectory, states in zip(trajectories, decision_states(out, batch, trajectories)):
        torch.testing.assert_close(states, torch.stack(trajectory.decision_hidden), atol=2e-5, rtol=1e-4)
    replayed = token_log_probs(backbone, trajectories, params)
    for trajectory, log_probs in zip(trajectories, replayed):
        torch.testing.assert_close(log_probs, torch.tensor(trajectory.log_probs), atol=2e-5, rtol=1e-4)
        assert all(math.isfinite(value) for value in trajectory.log_probs)
    assert any(any(t.is_action) for t in trajectories)
    assert trajectories[0].vectors  # the latent block is part of what was replayed


def test_replayed_log_probs_carry_gradient(backbone, tmp_path):
    layouts = prompts(backbone, tmp_path)[:2]
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=1)
    trajectories = decode(backbone, layouts, params)
    total = sum(lp.sum() for lp in token_log_probs(backbone, trajectories, params))
    total.backward()
    grad = backbone.lm_head.weight.grad
    assert grad is not None and bool(grad.abs().sum() > 0)
    backbone.model.zero_grad(set_to_none=True)


class PrefixThenText(DecodingPolicy):
    """Feeds three continuous vectors in one step (a prefix), declaring a density for them, then text."""

    def __init__(self, backbone):
        generator = torch.Generator().manual_seed(0)
        self.prefix = torch.randn(3, backbone.hidden_size, generator=generator) * 0.02
        self.placeholder = backbone.token_id(backbone.chat.pad)

    def decide(self, proposal, view):
        if view.step == 0:
            return Step(Embeddings(self.prefix, int(Kind.TEXT), self.placeholder, torch.full((3,), -1.5)))
        return Step(Token(proposal.token))


def test_multi_vector_feeds_batch_and_replay_exactly(backbone, tmp_path):
    layouts = prompts(backbone, tmp_path)
    policy = PrefixThenText(backbone)
    params = SamplingParams(max_new_tokens=5)
    batched = decode(backbone, layouts, params, policy, record_hidden=True)
    for layout, trajectory in zip(layouts, batched):
        alone = decode(backbone, [layout], params, policy)[0]
        assert trajectory.input_ids == alone.input_ids
        assert len(trajectory) == 3 + 4 and trajectory.log_probs[:3] == [-1.5] * 3
        assert trajectory.is_action[:3] == [True] * 3
        assert trajectory.positions == list(range(trajectory.positions[0], trajectory.positions[0] + 7))
    with torch.no_grad():
        out, batch = replay_forward(backbone, batched)
    for trajectory, states in zip(batched, decision_states(out, batch, batched)):
        # positions 3.. were decided from the hidden state after the whole prefix
        torch.testing.assert_close(
            states[3:], torch.stack(trajectory.decision_hidden[3:]), atol=2e-5, rtol=1e-4
        )


class Detour(DecodingPolicy):
    """At step 1 remembers the row's length and the proposed token, writes two tokens on a side branch, then
    rewinds to the mark and feeds the remembered token (LatentUM's pattern): the result must equal a run that
    never took the detour."""

    def __init__(self, detour_token: int):
        self.detour_token = detour_token
        self.mark: dict[int, tuple[int, int]] = {}

    def decide(self, proposal, view):
        if view.step == 1:
            self.mark[view.row] = (view.length, proposal.token)
        if view.step in (1, 2):
            return Step(Token(self.detour_token, forced=True))
        if view.step == 3:
            length, token = self.mark[view.row]
            return Step(Token(token, forced=True), rewind_to=length)
        return Step(Token(proposal.token))


def test_rewind_equals_never_having_fed_the_branch(backbone, tmp_path):
    layouts = prompts(backbone, tmp_path)
    plain = decode(backbone, layouts, SamplingParams(max_new_tokens=6), record_hidden=True)
    detoured = decode(backbone, layouts, SamplingParams(max_new_tokens=8), Detour(7), record_hidden=True)
    for a, b in zip(plain, detoured):
        # plain: t0 t1 t2 ...; detour: t0, x, x, then rewound to after t0: t1 (remembered), t2, ...
        assert len(b) == 6 and b.input_ids == a.input_ids and b.positions == a.positions
        assert b.steps == 8  # the detour's steps count against the budget
        torch.testing.assert_close(
            torch.stack(b.decision_hidden[2:]), torch.stack(a.decision_hidden[2:]), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            torch.tensor(b.log_probs[2:]), torch.tensor(a.log_probs[2:]), atol=1e-5, rtol=0
        )


def test_rewinding_into_the_prompt_is_refused(backbone, tmp_path):
    class IntoPrompt(DecodingPolicy):
        def decide(self, proposal, view):
            return Step(Token(proposal.token), rewind_to=view.length - len(view.trajectory) - 1)

    with pytest.raises(ValueError, match="rewind_to"):
        decode(backbone, prompts(backbone, tmp_path)[:1], SamplingParams(max_new_tokens=3), IntoPrompt())


class SecondHead(DecodingPolicy):
    """Proposals come from a head that always picks token 5 after the first step; then the row finishes."""

    def heads(self, backbone):
        vocabulary = backbone.lm_head.out_features
        fives = lambda hidden: torch.nn.functional.one_hot(
            torch.full(hidden.shape[:-1], 5), vocabulary
        ).float()
        return {**super().heads(backbone), "fives": fives}

    def decide(self, proposal, view):
        if view.step == 0:
            return Step(Token(proposal.token), head="fives")
        if view.step == 1:
            assert proposal.head == "fives" and proposal.token == 5
            return Step(Token(proposal.token, forced=True))
        return Step(Finish("done"))


def test_a_policy_picks_the_output_head_and_can_finish(backbone, tmp_path):
    trajectory = decode(
        backbone, prompts(backbone, tmp_path)[:1], SamplingParams(max_new_tokens=6), SecondHead()
    )[0]
    assert trajectory.input_ids[1] == 5 and len(trajectory) == 2
    assert trajectory.finish_reason == "done" and trajectory.steps == 2


class FlagRecorder(torch.nn.Module):
    """Wraps a decoder layer and records the `token_flags` extra it is called with."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.seen = layer, []

    def forward(self, *args, **kwargs):
        self.seen.append(kwargs.get("token_flags"))
        return self.layer(*args, **kwargs)


class FlagEveryToken(DecodingPolicy):
    def decide(self, proposal, view):
        return Step(Token(proposal.token), extras={"token_flags": torch.tensor([view.step + 1])})


def test_per_token_extras_reach_the_layers_and_the_replay(backbone, tmp_path):
    layers = backbone.decoder().layers
    original = layers[0]
    layers[0] = recorder = FlagRecorder(original)
    try:
        layouts = prompts(backbone, tmp_path)[:2]
        trajectories = decode(backbone, layouts, SamplingParams(max_new_tokens=4), FlagEveryToken())
        decoded_flags = [flags for flags in recorder.seen if flags is not None]
        assert [f[:, -1].tolist() for f in decoded_flags] == [[1, 1], [2, 2], [3, 3]]
        recorder.seen.clear()
        with torch.no_grad():
            _, batch = replay_forward(backbone, trajectories)
        (flags,) = recorder.seen
        start = batch.prompt_lengths[0]
        assert flags[0, :start].eq(0).all() and flags[0, start : start + 4].tolist() == [1, 2, 3, 4]
    finally:
        layers[0] = original


def test_prompt_embeddings_sit_after_the_images_and_are_read(backbone, tmp_path):
    from latentkit.methods.sft.method import SFT

    class WithPrefix(SFT):
        def prompt_embeddings(self, sample, draw=0):
            return torch.full((2, self.backbone.hidden_size), 0.5)

    method = WithPrefix(SFT.Config())
    method.setup(backbone)
    sample = make_samples(tmp_path, backbone.supports_images)[1]
    layout = method.prompt(sample).build(sample.sample_id, sample.dataset)
    (slot,) = layout.embeddings
    plain = SFT(SFT.Config())
    plain.setup(backbone)
    without = plain.prompt(sample).build(sample.sample_id, sample.dataset)
    assert len(layout) == len(without) + 2
    if backbone.supports_images:
        assert slot.start == without.images[-1].end + 1  # right after the vision-end token
    with torch.no_grad():
        one = decode(backbone, [layout], SamplingParams(max_new_tokens=3), record_hidden=True)[0]
        out, batch = replay_forward(backbone, [one])
    torch.testing.assert_close(
        decision_states(out, batch, [one])[0], torch.stack(one.decision_hidden), atol=2e-5, rtol=1e-4
    )
    from latentkit.layout import collate, inputs_embeds

    embeds = inputs_embeds(backbone, collate([layout], backbone.token_id(backbone.chat.pad)))
    assert torch.equal(embeds[0, slot.start : slot.start + 2], torch.full((2, backbone.hidden_size), 0.5))


def test_a_monet_rollout_replays_exactly(backbone, tmp_path):
    """Monet's own policy (forced block of K=4 hidden-state latents): the replayed forward reproduces the
    hidden states and log-probs, and `Method.log_probs` gives them with gradient."""
    monet_cls = get_method("monet")
    monet = monet_cls(monet_cls.Config(decode_force=True, num_latents=4))
    monet.setup(backbone)
    layouts = [
        monet.prompt(s).build(s.sample_id, s.dataset)
        for s in make_samples(tmp_path, backbone.supports_images)
    ]
    params = SamplingParams(max_new_tokens=10, temperature=0.7, seed=5)
    trajectories = decode(backbone, layouts, params, monet.decoding_policy(), record_hidden=True)
    assert all([b.shape[0] for b in t.blocks(int(Kind.LATENT))] == [4] for t in trajectories)
    with torch.no_grad():
        out, batch = replay_forward(backbone, trajectories)
    for trajectory, states in zip(trajectories, decision_states(out, batch, trajectories)):
        torch.testing.assert_close(states, torch.stack(trajectory.decision_hidden), atol=2e-5, rtol=1e-4)
        # each latent is the hidden state of the position before it
        for index, vector in trajectory.vectors.items():
            torch.testing.assert_close(vector, states[index], atol=2e-5, rtol=1e-4)
    log_probs = monet.log_probs(backbone, trajectories, params)
    for trajectory, replayed in zip(trajectories, log_probs):
        assert replayed.requires_grad
        torch.testing.assert_close(
            replayed.detach(), torch.tensor(trajectory.log_probs), atol=2e-5, rtol=1e-4
        )
