"""Answering every sample under one decoding condition, and comparing a condition with the baseline.

A condition is a variation of the method's own `ContinuousPolicy` (test-time K, forcing, an intervention on
every latent) or of the inputs (the question image swapped or blanked), decoded greedily through
`answer_samples` exactly as `latentkit eval` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from latentkit.decoding import SamplingParams, Trajectory
from latentkit.eval.answer import answer_samples
from latentkit.eval.diagnose.measures import Latents
from latentkit.eval.runner import score_answer
from latentkit.eval.scorers import Scorer
from latentkit.eval.stats import paired_comparison, wilson_interval
from latentkit.latent import ContinuousPolicy, Intervention
from latentkit.registry import Method
from latentkit.segments import Sample

BLANK_GREY = (128, 128, 128)


@dataclass
class ConditionRun:
    """Every sample answered under one condition: extracted answers, correctness, latent blocks, and the
    trajectories of each answer (one per generation round)."""

    name: str
    extracted: list[str | None]
    correct: list[bool]
    latents: Latents
    trajectories: list[list[Trajectory]]

    @property
    def block_lengths(self) -> list[list[int]]:
        return [[int(block.shape[0]) for block in blocks] for blocks in self.latents]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def triggered(self) -> list[bool]:
        return [bool(blocks) for blocks in self.latents]

    def renamed(self, name: str) -> ConditionRun:
        return replace(self, name=name)

    def summary(self) -> dict[str, Any]:
        triggered, lengths = self.triggered, self.block_lengths
        return {
            "accuracy": self.accuracy,
            "interval": wilson_interval(sum(self.correct), len(self.correct)).to_json(),
            "trigger_rate": sum(triggered) / len(triggered),
            "mean_blocks": sum(len(blocks) for blocks in lengths) / len(triggered),
            "mean_latent_steps": sum(sum(blocks) for blocks in lengths) / len(triggered),
        }

    def accuracy_where(self, triggered: bool) -> float | None:
        picked = [c for c, t in zip(self.correct, self.triggered) if t == triggered]
        return sum(picked) / len(picked) if picked else None


def compared(run: ConditionRun, baseline: ConditionRun) -> dict[str, Any]:
    """A condition's summary with its accuracy difference to the baseline, the exact McNemar p-value on the
    same samples, and the fraction of samples whose extracted answer changed."""
    paired = paired_comparison(baseline.correct, run.correct)
    changed = sum(a != b for a, b in zip(run.extracted, baseline.extracted)) / len(run.extracted)
    return {
        **run.summary(),
        "delta": paired.delta,
        "p_value": paired.p_value,
        "baseline_only_correct": paired.baseline_only,
        "condition_only_correct": paired.condition_only,
        "changed": changed,
    }


class Runner:
    """Runs conditions over the samples; runs of the method's own policy without an intervention are kept
    by (K, force) and reused."""

    def __init__(
        self,
        method: Method,
        samples: list[Sample],
        scorer: Scorer,
        params: SamplingParams,
        batch_size: int,
        base: ContinuousPolicy,
        log: Callable[[str], None],
    ):
        self.method, self.samples, self.scorer, self.params = method, samples, scorer, params
        self.batch_size, self.base, self.log = batch_size, base, log
        self.done: dict[tuple[int | None, bool], ConditionRun] = {}

    def run(
        self,
        name: str,
        k: int | None,
        force: bool,
        intervention: Intervention | None = None,
        samples: list[Sample] | None = None,
    ) -> ConditionRun:
        """`samples` replaces the inputs (same keys, same order); such runs are never reused."""
        reusable = intervention is None and samples is None
        if reusable and (k, force) in self.done:
            run = self.done[(k, force)]
            self.log(f"{name:<20} K={k_text(k):<3} force={str(force).lower():<5} same decoding as {run.name}")
            return run.renamed(name)
        began = time.perf_counter()
        policy = self.base.varied(k=k, force=force, intervention=intervention)
        answers = answer_samples(
            self.method, samples or self.samples, self.params, self.batch_size, policy=policy
        )
        kind = self.base.kind
        latents = [
            [block.float().cpu() for t in answer.trajectories for block in t.blocks(kind)]
            for answer in answers
        ]
        scores = [score_answer(answer, self.scorer) for answer in answers]
        run = ConditionRun(
            name,
            [s.extracted for s in scores],
            [s.correct for s in scores],
            latents,
            [answer.trajectories for answer in answers],
        )
        if reusable:
            self.done[(k, force)] = run
        summary = run.summary()
        self.log(
            f"{name:<20} K={k_text(k):<3} force={str(force).lower():<5} accuracy {summary['accuracy']:.3f}  "
            f"trigger rate {summary['trigger_rate']:.2f}  ({time.perf_counter() - began:.1f}s)"
        )
        return run


def k_text(k: int | None) -> str:
    """K as the reports show it: None is the policy's own block length."""
    return "own" if k is None else str(k)


def derangement(n: int, seed: int) -> list[int]:
    """A fixed permutation without fixed points (n >= 2): a seeded shuffle, each element sent to the next."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    target = [0] * n
    for position, element in enumerate(order):
        target[element] = order[(position + 1) % n]
    return target


def identical(run: ConditionRun, baseline: ConditionRun) -> bool:
    """Same answers and bit-identical latents."""
    return run.extracted == baseline.extracted and all(
        len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
        for a, b in zip(run.latents, baseline.latents)
    )


def with_images(sample: Sample, images: Sequence[Path]) -> Sample:
    """The sample with its question images replaced, in order."""
    replacements = iter(images)
    segments = tuple(
        replace(segment, image=next(replacements)) if segment.kind == "image" else segment
        for segment in sample.segments
    )
    return replace(sample, segments=segments)


def swapped_images(samples: list[Sample], donors: list[int]) -> list[Sample]:
    """Every sample asks its own question about sample donors[i]'s images (as many as it has, cycled)."""
    result = []
    for sample, donor in zip(samples, donors):
        theirs = samples[donor].images
        result.append(with_images(sample, [theirs[j % len(theirs)] for j in range(len(sample.images))]))
    return result


def blanked_images(samples: list[Sample], folder: Path) -> list[Sample]:
    """Every question image replaced by a uniform grey image of the same size (written under `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    result = []
    for index, sample in enumerate(samples):
        blanks = []
        for j, image in enumerate(sample.images):
            with Image.open(image) as original:
                size = original.size
            blank = folder / f"{index}-{j}.png"
            Image.new("RGB", size, BLANK_GREY).save(blank)
            blanks.append(blank)
        result.append(with_images(sample, blanks))
    return result
