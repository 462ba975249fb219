"""The RL losses and Palette's schedules pinned by independent computations: numbers by hand (in the comments) and
plain-Python loops, never the torch expression under test."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch
from latentkit.methods.palette.schedules import palette_rho, prefixed_count

from latentkit.rl import aggregate, gaussian_logprob, group_advantages, k3_kl, masked_mean, policy_loss

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# --- group_advantages ------------------------------------------------------------------------------------------
def advantages_by_loop(rewards: list[float], group_size: int, estimator: str) -> list[float]:
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / len(group)
        for i, r in enumerate(group):
            if estimator == "grpo":
                out.append((r - mean) / (statistics.stdev(group) + 1e-6))
            elif estimator == "rloo":
                others = group[:i] + group[i + 1 :]
                out.append(r - sum(others) / len(others))
            else:
                out.append(r - mean)
    return out


def test_grpo_by_hand_with_the_unbiased_std_and_a_flat_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    # group 1: mean 0.5, deviations +-0.5, unbiased variance 4 * 0.25 / 3 = 1/3 (the biased one would be 1/4)
    a = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-6)
    expected = [
        a,
        -a,
        -a,
        a,
        0.0,
        0.0,
        0.0,
        0.0,
    ]  # group 2: all equal, so 0 (std 0, the 1e-6 keeps it finite)
    assert group_advantages(rewards, 4, "grpo").tolist() == pytest.approx(expected, abs=1e-12)


def test_rloo_and_dr_grpo_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0], dtype=torch.float64)
    # G = 2: [1, 0] -> 1 - 0, 0 - 1; [0, 1] -> -1, 1; [3, 1] -> 2, -2
    assert group_advantages(rewards, 2, "rloo").tolist() == pytest.approx([1, -1, -1, 1, 2, -2])
    # G = 3: [1, 0, 0] -> 1 - 0, 0 - 1/2, 0 - 1/2; [1, 3, 1] -> 1 - 2, 3 - 1, 1 - 2
    assert group_advantages(rewards, 3, "rloo").tolist() == pytest.approx([1, -0.5, -0.5, -1, 2, -1])
    # G = 3, minus the group mean (1/3 and 5/3)
    expected = [2 / 3, -1 / 3, -1 / 3, -2 / 3, 4 / 3, -2 / 3]
    assert group_advantages(rewards, 3, "dr_grpo").tolist() == pytest.approx(expected)
    assert group_advantages(rewards, 1, "dr_grpo").tolist() == [0.0] * 6


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "dr_grpo"])
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_advantages_equal_a_plain_python_loop(estimator, group_size):
    rng = random.Random(group_size)
    rewards = [rng.choice([0.0, 0.1, 0.9, 1.0]) + rng.random() for _ in range(4 * group_size)]
    out = group_advantages(torch.tensor(rewards, dtype=torch.float64), group_size, estimator)
    assert out.tolist() == pytest.approx(advantages_by_loop(rewards, group_size, estimator), abs=1e-12)


@pytest.mark.parametrize(
    "shape, group_size, estimator, message",
    [
        ((6,), 4, "grpo", r"N a multiple of group_size=4, got shape \[6\]"),
        ((2, 4), 4, "grpo", r"rewards must be 1-D \[N\]"),
        ((4,), 0, "dr_grpo", "group_size must be >= 1, got 0"),
        ((4,), 1, "rloo", "'rloo' needs group_size >= 2"),
        ((4,), 1, "grpo", "'grpo' needs group_size >= 2"),
        ((4,), 2, "ppo", "unknown advantage estimator 'ppo'"),
    ],
)
def test_group_advantages_refuses_bad_arguments(shape, group_size, estimator, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(torch.zeros(shape), group_size, estimator)


# --- policy_loss -----------------------------------------------------------------------------------------------
# clip 0.2 low / 0.3 high (ratio kept in [0.8, 1.3]), dual clip 3. old_logp = 0, so ratio = exp(logp) is chosen.
RATIOS = [
    [
        1.1,
        1.5,
        0.5,
    ],  # A = +2: inside -> -2.2; above 1.3, clip binds -> -2 * 1.3 = -2.6; below -> -1.0 (unclipped)
    [0.5, 5.0, 1.5],  # A = -1: below 0.8, clip binds -> 0.8; 5 -> capped at 3 (5 without dual); masked
    [1.2, 9.0, 1.0],  # A = -0.5: inside -> 0.6; masked; masked
    [2.0, 2.0, 2.0],  # A = +1: fully masked
]
ADVANTAGES = [2.0, -1.0, -0.5, 1.0]
MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]]


def batch(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    logp = torch.tensor(RATIOS, dtype=torch.float64).log().requires_grad_(requires_grad)
    return logp, torch.zeros(4, 3, dtype=torch.float64), torch.tensor(ADVANTAGES, dtype=torch.float64)


@pytest.mark.parametrize(
    "aggregation, dual_clip, expected",
    [
        # masked losses: seq 0 [-2.2, -2.6, -1.0] (sum -5.8), seq 1 [0.8, 3.0] (sum 3.8), seq 2 [0.6]; 6 positions
        ("token-mean", 3.0, -1.4 / 6),
        ("seq-mean-token-mean", 3.0, (-5.8 / 3 + 3.8 / 2 + 0.6 / 1) / 3),  # seq 3 has no position: left out
        ("seq-mean-token-sum-norm", 3.0, -1.4 / (4 * 3)),  # B * T = 4 rows * 3 padded positions
        # without the dual clip seq 1 is [0.8, 5.0] (sum 5.8): total 0.6
        ("token-mean", None, 0.6 / 6),
        ("seq-mean-token-mean", None, (-5.8 / 3 + 5.8 / 2 + 0.6 / 1) / 3),
        ("seq-mean-token-sum-norm", None, 0.6 / 12),
    ],
)
def test_policy_loss_by_hand(aggregation, dual_clip, expected):
    logp, old_logp, advantages = batch()
    mask = torch.tensor(MASK, dtype=torch.bool)
    loss, metrics = policy_loss(logp, old_logp, advantages, mask, 0.2, 0.3, dual_clip, aggregation)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 6)  # seq 0 position 1, seq 1 position 0
    assert metrics["dual_clip_fraction"].item() == pytest.approx(
        1 / 6 if dual_clip else 0.0
    )  # seq 1 position 1
    assert metrics["ratio_mean"].item() == pytest.approx((1.1 + 1.5 + 0.5 + 0.5 + 5.0 + 1.2) / 6)
    assert not any(value.requires_grad for value in metrics.values())


def test_policy_loss_gradient_has_the_sign_of_minus_a_inside_the_clip_range_and_is_zero_where_clipped():
    logp, old_logp, advantages = batch(requires_grad=True)
    loss, _ = policy_loss(logp, old_logp, advantages, torch.tensor(MASK), 0.2, 0.3, 3.0, "token-mean")
    loss.backward()
    # d(-A * ratio)/d logp = -A * ratio where the unclipped branch binds, / 6 masked positions; 0 elsewhere
    expected = [
        [
            -2 * 1.1 / 6,
            0.0,
            -2 * 0.5 / 6,
        ],  # inside: -; clipped above: 0; below (unclipped binds for A > 0): -
        [0.0, 0.0, 0.0],  # clipped below; dual-capped; masked
        [0.5 * 1.2 / 6, 0.0, 0.0],  # inside: + (A < 0); masked; masked
        [0.0, 0.0, 0.0],  # masked
    ]
    assert logp.grad.tolist() == [pytest.approx(row, abs=1e-12) for row in expected]


def surrogate_by_loop(ratios, advantages, mask, clip_low, clip_high, dual_clip, aggregation) -> float:
    rows = []
    for r_row, a, m_row in zip(ratios, advantages, mask):
        row = []
        for r, m in zip(r_row, m_row):
            if m:
                value = max(-a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high))
                if a < 0 and dual_clip is not None:
                    value = min(value, -a * dual_clip)
                row.append(value)
        rows.append(row)
    if aggregation == "token-mean":
        return sum(map(sum, rows)) / sum(map(len, rows))
    if aggregation == "seq-mean-token-mean":
        means = [sum(row) / len(row) for row in rows if row]
        return sum(means) / len(means)
    return sum(map(sum, rows)) / (len(ratios) * len(ratios[0]))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_policy_loss_equals_a_plain_python_loop(aggregation, dual_clip):
    rng = random.Random(7)
    rows, length = 6, 5
    ratios = [[math.exp(rng.uniform(-1.5, 1.5)) for _ in range(length)] for _ in range(rows)]
    advantages = [rng.uniform(-2, 2) for _ in range(rows)]
    mask = [[j < rng.randint(0, length) for j in range(length)] for _ in range(rows)]
    mask[0] = [True] * length
    loss, _ = policy_loss(
        torch.tensor(ratios, dtype=torch.float64).log(),
        torch.zeros(rows, length, dtype=torch.float64),
        torch.tensor(advantages, dtype=torch.float64),
        torch.tensor(mask),
        0.2,
        0.28,
        dual_clip,
        aggregation,
    )
    expected = surrogate_by_loop(ratios, advantages, mask, 0.2, 0.28, dual_clip, aggregation)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_an_empty_mask_gives_zero(aggregation):
    logp, old_logp, advantages = batch()
    loss, metrics = policy_loss(logp, old_logp, advantages, torch.zeros(4, 3), 0.2, 0.3, 3.0, aggregation)
    assert loss.item() == 0.0
    assert all(value.item() == 0.0 for value in metrics.values())


def test_masked_mean_and_aggregate():
    values = torch.tensor([[1.0, 2.0, 30.0], [4.0, 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum-norm").item() == pytest.approx(7 / 6)


@pytest.mark.parametrize(
    "shapes, dual_clip, aggregation, message",
    [
        (((2, 3), (2, 3), (2,), (2, 4)), None, "token-mean", r"must share one shape \[B, T\]"),
        (((2, 3), (3, 3), (2,), (2, 3)), None, "token-mean", r"must share one shape \[B, T\]"),
        (
            ((2, 3), (2, 3), (2, 1), (2, 3)),
            None,
            "token-mean",
            r"advantages must be \[B\] = \[2\], got \[2, 1\]",
        ),
        (((2, 3), (2, 3), (2,), (2, 3)), 1.0, "token-mean", "dual_clip must be > 1"),
        (((2, 3), (2, 3), (2,), (2, 3)), None, "seq-sum", "unknown aggregation 'seq-sum'"),
    ],
)
def test_policy_loss_refuses_bad_arguments(shapes, dual_clip, aggregation, message):
    logp, old_logp, advantages, mask = (torch.zeros(shape) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        policy_loss(logp, old_logp, advantages, mask, 0.2, 0.3, dual_clip, aggregation)


# --- k3_kl and gaussian_logprob --------------------------------------------------------------------------------
def test_k3_kl_by_hand_nonnegative_and_zero_at_equality():
    ln2 = math.log(2.0)
    logp = torch.tensor([0.0, ln2, -1.3], dtype=torch.float64)
    ref = torch.tensor([ln2, 0.0, -1.3], dtype=torch.float64)
    # d = ref - logp: ln 2 -> 2 - ln 2 - 1; -ln 2 -> 1/2 + ln 2 - 1; 0 -> 0
    assert k3_kl(logp, ref).tolist() == pytest.approx([1 - ln2, ln2 - 0.5, 0.0], abs=1e-15)
    rng = random.Random(3)
    pairs = [(rng.uniform(-5, 0), rng.uniform(-5, 0)) for _ in range(50)]
    out = k3_kl(torch.tensor([p for p, _ in pairs]), torch.tensor([r for _, r in pairs]))
    assert (out >= 0).all()
    assert out.tolist() == pytest.approx(
        [math.exp(r - p) - (r - p) - 1 for p, r in pairs], rel=1e-5, abs=1e-6
    )


def test_gaussian_logprob_by_hand():
    z = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])  # [B=1, T=2, D=2]
    mu = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])
    # ||z - mu||^2 = 5 and 25; / (2 * 2^2) = 8
    assert gaussian_logprob(z, mu, 2.0).tolist() == [[-5 / 8, -25 / 8]]
    # the full log-density's ratio: the constant -D/2 log(2 pi sigma^2) cancels, so it is (-5 + 8) / 8 for
    # z = (1, 2) under mu = (0, 0) against mu = (3, 4) (squared distances 5 and 8)
    delta = gaussian_logprob(z[0, 0], mu[0, 0], 2.0) - gaussian_logprob(z[0, 0], mu[0, 1], 2.0)
    assert delta.item() == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="sigma must be > 0, got 0"):
        gaussian_logprob(z, mu, 0)


# --- Palette schedules -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "progress, schedule, rho",
    [
        (0.0, "two_phase", 1.0),
        (0.49, "two_phase", 1.0),
        (0.5, "two_phase", 0.0),
        (1.0, "two_phase", 0.0),
        (0.0, "linear", 1.0),
        (0.25, "linear", 0.75),
        (1.0, "linear", 0.0),
        (0.0, "constant", 1.0),
        (0.7, "constant", 1.0),
        (1.0, "constant", 1.0),
    ],
)
def test_palette_rho_table(progress, schedule, rho):
    assert palette_rho(progress, schedule) == rho


@pytest.mark.parametrize(
    "group_size, rho, count",
    [
        (8, 1.0, 8),
        (8, 0.0, 0),
        (8, 0.5, 4),
        (8, 0.3, 2),  # 2.4
        (8, 0.3125, 3),  # 2.5: half up (round would give 2)
        (6, 0.75, 5),  # 4.5 (round would give 4)
        (4, 0.625, 3),  # 2.5
        (2, 0.25, 1),  # 0.5
        (5, 0.7, 4),  # 3.5
        (1, 0.4, 0),
    ],
)
def test_prefixed_count_table(group_size, rho, count):
    assert prefixed_count(group_size, rho) == count


def test_schedules_refuse_bad_arguments():
    for progress in (-0.1, 1.1, math.nan):
        with pytest.raises(ValueError, match="progress must be in"):
            palette_rho(progress, "linear")
    with pytest.raises(ValueError, match="unknown palette schedule 'cosine'"):
        palette_rho(0.5, "cosine")
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        prefixed_count(0, 0.5)
    for rho in (-0.1, 1.5):
        with pytest.raises(ValueError, match="rho must be in"):
            prefixed_count(8, rho)
