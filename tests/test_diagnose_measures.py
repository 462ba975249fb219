"""Diagnose's measures, probes and condition helpers on small cases computed by hand or by brute force."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from latentkit.eval.diagnose import between_input_fraction, latent_statistics, relative_change, retrieval_top1
from latentkit.eval.diagnose.channel import channel_summary
from latentkit.eval.diagnose.conditions import derangement, swapped_images
from latentkit.eval.diagnose.probes import categorical_attributes, ridge_probe, variance_explained
from latentkit.segments import Sample, Segment


def test_between_input_fraction_by_hand():
    t = torch.tensor
    latents = [[t([[1.0, 0.0], [0.0, 2.0]])], [t([[3.0, 0.0], [0.0, 0.0]])]]
    # step 0: mean (2, 0), centred 1 + 1 of raw 1 + 9; step 1: mean (0, 1), centred 1 + 1 of raw 4
    pooled, per_step = between_input_fraction(latents)
    assert per_step == [pytest.approx(0.2), pytest.approx(0.5)]
    assert pooled == pytest.approx(4 / 14)
    same = [[t([[2.0, 1.0]])], [t([[2.0, 1.0]])]]
    assert between_input_fraction(same)[0] == 0.0  # every input the same latent: collapse


def test_high_raw_cosine_can_hide_an_input_dependent_part():
    """A large shared mean plus a small part that is + or - e by input: raw cosine near 1, the between-input
    fraction is the small part's share, and the centred latents point exactly opposite."""
    shared, e = torch.tensor([10.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    latents = [[(shared + sign * e)[None]] for sign in (1, -1, 1, -1)]
    stats = latent_statistics(latents)
    assert stats["cross_input_cosine"] > 0.98
    assert stats["between_input_fraction"] == pytest.approx(1 / 101)
    # centred: +e, -e, +e, -e; cross pairs: 2 of +1, 4 of -1
    assert stats["centred_cosine"] == pytest.approx((2 - 4) / 6)


def test_relative_change_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(5, 3, generator=generator)
    changed = reference + 0.1 * torch.randn(5, 3, generator=generator)
    pairs = [
        float((reference[s] - reference[t]).square().sum()) for s, t in itertools.permutations(range(5), 2)
    ]
    moved = float((changed - reference).square().sum(-1).mean())
    assert relative_change(reference, changed) == pytest.approx(moved / (sum(pairs) / len(pairs)))
    assert relative_change(reference, reference) == 0.0
    assert relative_change(reference, reference[[1, 2, 3, 4, 0]]) == pytest.approx(1.0, abs=0.6)
    assert relative_change(reference[:1], reference[:1]) is None


def test_retrieval_top1():
    generator = torch.Generator().manual_seed(0)
    oracles = torch.randn(6, 8, generator=generator)
    assert retrieval_top1(oracles + 0.01, oracles) == 1.0
    assert retrieval_top1(oracles[[1, 2, 3, 4, 5, 0]], oracles) == 0.0
    # a large shared offset hides the match for the raw cosine, not for the centred one
    offset = 100 * torch.ones(8)
    shifted = oracles + offset + 0.01 * torch.randn(6, 8, generator=generator)
    assert retrieval_top1(shifted, oracles + offset, centre=True) == 1.0


def test_derangement_has_no_fixed_point():
    for n in (2, 3, 7, 64):
        target = derangement(n, seed=1)
        assert sorted(target) == list(range(n)) and all(t != i for i, t in enumerate(target))
        assert target == derangement(n, seed=1)
    with pytest.raises(ValueError):
        derangement(1, 0)


def test_swapped_images_take_the_donors():
    samples = [
        Sample(str(i), "d", (Segment("image", "user", image=Path(f"{i}.png")), Segment("text", "user", "q")))
        for i in range(3)
    ]
    swapped = swapped_images(samples, [2, 0, 1])
    assert [s.images for s in swapped] == [(Path("2.png"),), (Path("0.png"),), (Path("1.png"),)]
    assert [s.segments[1] for s in swapped] == [s.segments[1] for s in samples]


def encoded(n: int, classes: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Labels written linearly into 32-dimensional features (class direction + small noise)."""
    generator = torch.Generator().manual_seed(seed)
    labels = [str(i % classes) for i in range(n)]
    directions = torch.randn(classes, 32, generator=generator)
    features = torch.stack([directions[int(label)] for label in labels])
    return features + 0.05 * torch.randn(n, 32, generator=generator), labels


def test_probe_reads_a_linearly_encoded_attribute():
    features, labels = encoded(60, 3, seed=0)
    probe = ridge_probe(features, labels, seed=0)
    assert probe.accuracy == 1.0 and probe.majority <= 0.34 and (probe.classes, probe.samples) == (3, 60)
    assert variance_explained(features, labels) > 0.95


def test_probe_of_an_unencoded_attribute_stays_near_the_majority():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(120, 32, generator=generator)
    labels = ["a" if v else "b" for v in (torch.rand(120, generator=generator) < 0.7).tolist()]
    probe = ridge_probe(features, labels, seed=0)
    assert probe.accuracy <= probe.majority + 0.1
    assert variance_explained(features, labels) < 0.1
    assert ridge_probe(features[:3], labels[:3]) is None  # too few samples
    assert ridge_probe(features, ["a"] * 120) is None  # one class


def test_variance_explained_by_hand():
    features = torch.tensor([[0.0], [2.0], [10.0], [12.0]])
    # class means 1 and 11, overall 6: between 2 * 25 + 2 * 25 = 100; total 36 + 16 + 16 + 36 = 104
    assert variance_explained(features, ["x", "x", "y", "y"]) == pytest.approx(100 / 104)


def test_categorical_attributes_skip_identifiers_and_constants():
    samples = [
        Sample(
            str(i),
            "d",
            (),
            answer=str(i),
            metadata={
                "sample_id": str(i),
                "answer": str(i),
                "colour": "red" if i % 2 else "blue",
                "variant": "open",
                "index": i,
                "steps": [1, 2],
            },
        )
        for i in range(6)
    ]
    assert categorical_attributes(samples) == {"colour": ["blue", "red"] * 3}


def test_channel_summary_by_hand():
    results = {
        "with_aux": [True, True, True, True, True, True, True, True, True, False],  # 0.9
        "oracle": [True, True, True, True, True, True, True, True, False, None],  # 8 of 9
        "zeros": [False, False, True, False, False, False, False, False, False, False],  # 0.1
        "swap": [True, False, True, False, False, False, False, False, False, False],  # 0.2
    }
    summary = channel_summary(results, chance=0.1)
    oracle = 8 / 9
    assert summary["conditions"]["oracle"]["accuracy"] == pytest.approx(oracle)
    assert summary["conditions"]["oracle"]["samples"] == 9
    # zeros vs oracle on the 9 samples scored in both: the oracle alone is right on 7, zeros alone on none
    zeros = summary["conditions"]["zeros"]
    assert zeros["delta_vs_oracle"] == pytest.approx(1 / 9 - oracle)
    assert zeros["p_vs_oracle"] == pytest.approx(2 / 2**7)
    assert summary["dummy_ceiling"] == pytest.approx(0.1 + (oracle - 0.1) / 2)
    assert summary["carries"] and summary["needed"] and summary["valid"]
    weak_oracle = dict(results, oracle=[True, False, False, False, False, False, False, False, False, False])
    assert not channel_summary(weak_oracle, chance=0.1)["carries"]
    read_anyway = dict(results, zeros=[True] * 8 + [False, False])
    verdict = channel_summary(read_anyway, chance=0.1)
    assert verdict["carries"] and not verdict["needed"] and not verdict["valid"]
    with pytest.raises(ValueError, match="needs 'with_aux' and 'oracle'"):
        channel_summary({"oracle": [True]}, chance=None)
