"""Monet's VLPO (latent steps as Gaussian actions) and the RL hooks it rides on: rollouts declare each latent's
log N(z; mu, sigma^2 I), the replayed forward recomputes it from the state before the latent, the switch
`latent_actions=false` leaves text-only GRPO, and the latent-necessity re-roll runs without latents."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import final_weights, kill_when, latentkit, metrics, train_args
from test_decoding import make_samples

from latentkit.backbone import Backbone, build_backbone
from latentkit.config import ModelSection, RewardSpec, RLSection
from latentkit.decoding import SamplingParams, decode
from latentkit.registry import StageProgress, get_method
from latentkit.rl.loop import REROLL_SEED, decode_group_prompts, generate_rollouts
from latentkit.rl.losses import clip_fraction, policy_loss
from latentkit.rl.rewards import accuracy_reward

SIGMA = 1.5
RECEIVED: list[list[bool | None]] = []


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset="tiny-qwen2.5-vl"))
    backbone.model.eval()
    return backbone


def monet(backbone: Backbone, **config):
    cls = get_method("monet")
    method = cls(cls.Config(decode_force=True, num_latents=3, latent_sigma=SIGMA, **config))
    method.setup(backbone)
    return method


def rollouts(method, tmp_path, seed: int = 11):
    layouts = [
        method.prompt(s).build(s.sample_id, s.dataset) for s in make_samples(tmp_path, with_images=True)
    ]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed)
    trajectories = decode(method.backbone, layouts, params, method.rollout_policy(seed), record_hidden=True)
    return trajectories, params


def test_sampled_latents_are_actions_whose_density_replays(backbone, tmp_path):
    """z = mu + sigma * eps; the rollout records -|z - mu|^2 / (2 sigma^2) with mu the state before z, and
    `log_probs` recomputes exactly that from the replayed forward, with gradient."""
    method = monet(backbone, rollout_latents="sample")
    trajectories, params = rollouts(method, tmp_path)
    replayed = method.log_probs(backbone, trajectories, params)
    for trajectory, log_probs in zip(trajectories, replayed):
        latents = sorted(trajectory.vectors)
        assert len(latents) == 3 and all(trajectory.is_action[i] for i in latents)
        for i in latents:
            mu = trajectory.decision_hidden[i]
            expected = -float(((trajectory.vectors[i] - mu) ** 2).sum()) / (2 * SIGMA**2)
            assert trajectory.log_probs[i] == pytest.approx(expected, rel=1e-5)
            assert float(log_probs[i].detach()) == pytest.approx(expected, rel=1e-3, abs=1e-4)
            assert (trajectory.vectors[i] - mu).norm() > 1.0  # a sample, not the mean
        assert log_probs.requires_grad
        torch.testing.assert_close(
            log_probs.detach(), torch.tensor(trajectory.log_probs), atol=1e-3, rtol=1e-3
        )


def test_mean_rollouts_give_the_latent_term_no_gradient_at_the_sampling_policy(backbone, tmp_path):
    """The paper's setting feeds z = mu: log p = 0 at rollout, and the latent positions' surrogate has zero
    gradient until the policy moves away from the one that sampled (ratio 1, d/dmu |z - mu|^2 = 0 at z = mu)."""
    method = monet(backbone)
    trajectories, params = rollouts(method, tmp_path)
    assert all(t.log_probs[i] == 0.0 and t.is_action[i] for t in trajectories for i in t.vectors)
    log_probs = torch.nn.utils.rnn.pad_sequence(
        method.log_probs(backbone, trajectories, params), batch_first=True
    )
    continuous = torch.nn.utils.rnn.pad_sequence([t.is_continuous for t in trajectories], batch_first=True)
    loss, _ = policy_loss(
        log_probs,
        log_probs.detach(),
        torch.tensor([1.0, -1.0, 0.5, -0.5]),
        continuous,
        0.2,
        0.3,
        3.0,
        "token-mean",
    )
    backbone.model.zero_grad()
    loss.backward()
    grads = [p.grad.abs().max() for p in backbone.model.parameters() if p.grad is not None]
    assert max(grads) < 1e-5


def test_without_latent_actions_only_tokens_are_actions(backbone, tmp_path):
    """`latent_actions=false` (the ablation, text-only GRPO): latents are fed but are not actions."""
    method = monet(backbone, latent_actions=False)
    trajectories, params = rollouts(method, tmp_path)
    replayed = method.log_probs(backbone, trajectories, params)
    for trajectory, log_probs in zip(trajectories, replayed):
        assert trajectory.vectors and not any(trajectory.is_action[i] for i in trajectory.vectors)
        assert all(float(log_probs[i].detach()) == 0.0 for i in trajectory.vectors)
        tokens = [i for i, a in enumerate(trajectory.is_action) if a]
        assert tokens and all(float(log_probs[i].detach()) != 0.0 for i in tokens)


def test_rollout_noise_is_seeded(backbone, tmp_path):
    method = monet(backbone, rollout_latents="sample")
    first, _ = rollouts(method, tmp_path, seed=4)
    again, _ = rollouts(method, tmp_path, seed=4)
    other, _ = rollouts(method, tmp_path, seed=5)
    assert all(torch.equal(a.vectors[i], b.vectors[i]) for a, b in zip(first, again) for i in a.vectors)
    assert not torch.equal(first[0].vectors[min(first[0].vectors)], other[0].vectors[min(other[0].vectors)])


def record_necessity(prompts, completions, completion_ids, *, correct_without_latents, **kwargs):
    RECEIVED.append(list(correct_without_latents))
    return [0.0] * len(completions)


def test_the_latent_necessity_reroll_runs_without_latents(backbone, tmp_path):
    """With a `latent_necessity` reward, every rollout gets a re-roll of its prompt with the latents removed
    (blocks of k = 0, its own seed stream), and rewards read its verdicts as `correct_without_latents`."""
    method = monet(backbone)
    samples = list(make_samples(tmp_path, with_images=True))[:2]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=9)
    progress = StageProgress(0, 10)
    free = decode_group_prompts(
        method, samples, 2, replace(params, seed=9 ^ REROLL_SEED), progress, latents=False
    )
    assert all(not t.vectors for t in free)
    assert all(
        t.input_ids[:2] == [backbone.token_id("<abs_vis_token>"), backbone.token_id("</abs_vis_token>")]
        for t in free
    )
    expected = accuracy_reward(
        [""] * 4,
        [t.text for t in free],
        [t.token_ids for t in free],
        answer=["red"] * 4,
        scorer=["exact"] * 4,
    )
    rl = RLSection(
        num_generations=2,
        rewards=[RewardSpec(name="latent_necessity"), RewardSpec(name=f"{__name__}:record_necessity")],
        scorer="exact",
        beta=0.0,
    )
    RECEIVED.clear()
    out = generate_rollouts(method, samples, rl, params, progress, None)
    assert RECEIVED == [[v >= 1.0 for v in expected]]
    assert out.metrics["accuracy_without_latents"] == pytest.approx(sum(expected) / 4)
    assert all(t.vectors for t in out.trajectories)  # the rollouts themselves keep their latents


def test_clip_fraction_counts_binding_positions_under_a_sub_mask():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]]))
    old = torch.zeros(2, 3)
    advantages = torch.tensor([1.0, -1.0])
    # A > 0 binds where ratio > 1.3 (1.5); A < 0 binds where ratio < 0.8 (0.5).
    everywhere = torch.ones(2, 3, dtype=torch.bool)
    assert float(clip_fraction(logp, old, advantages, everywhere, 0.2, 0.3)) == pytest.approx(2 / 6)
    first_column = torch.tensor([[True, False, False], [True, False, False]])
    assert float(clip_fraction(logp, old, advantages, first_column, 0.2, 0.3)) == pytest.approx(1 / 2)
    assert float(clip_fraction(logp, old, advantages, torch.zeros(2, 3, dtype=torch.bool), 0.2, 0.3)) == 0.0


@pytest.mark.slow
def test_a_vlpo_stage_killed_mid_way_resumes_to_the_same_rollouts_and_weights(tmp_path):
    """SIGKILL during stage vlpo (sampled latents: rollout noise seeded per step), then `--resume`: the steps
    after the checkpoint roll out what the uninterrupted run did and end at the same weights."""
    vlpo = [
        "--method", "monet", "method.num_latents=2", "method.rollout_latents=sample", "train.steps=1",
        "train.stages.vlpo.steps=8", "train.stages.vlpo.batch_size=2", "train.checkpoint_every=2",
        "train.rl.num_generations=2", "train.rl.max_completion_length=24", "train.log_every=1",
    ]  # fmt: skip
    latentkit(*train_args(tmp_path, "straight", *vlpo))
    args = train_args(tmp_path, "killed", *vlpo)
    kill_when(args, tmp_path / "killed" / "stages" / "vlpo" / "checkpoints" / "step-00000004")
    latentkit(*args, "--resume")
    resumed = [m for m in metrics(tmp_path / "killed") if m.get("event") == "resume"]
    assert resumed and resumed[0]["stage"] == "vlpo" and 4 <= resumed[0]["step"] < 8

    def rollouts(run: str) -> dict[int, tuple[float, float, float]]:
        logged = [m for m in metrics(tmp_path / run) if m.get("stage") == "vlpo" and "loss" in m]
        return {m["step"]: (m["reward"], m["completion_length"], m["loss"]) for m in logged}

    straight, killed = rollouts("straight"), rollouts("killed")
    assert all(killed[step] == straight[step] for step in range(resumed[0]["step"] + 1, 9))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
