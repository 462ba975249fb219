"""Evaluation during training (`train.eval_every`): greedy answers on a benchmark split, accuracy only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from latentkit.config import LatentkitConfig
from latentkit.decoding import SamplingParams
from latentkit.eval.answer import answer_samples
from latentkit.eval.benchmarks import get_benchmark
from latentkit.eval.runner import load_eval_set, score_answer
from latentkit.eval.scorers import get_scorer
from latentkit.registry import Method


def training_evaluator(
    method: Method, config: LatentkitConfig, run_dir: Path
) -> Callable[[], dict[str, float]]:
    """A function returning `{"eval/<benchmark>/accuracy": value}` for the model as it is now."""
    settings = config.train.eval
    name = settings.benchmark or config.data.task
    benchmark = get_benchmark(name)
    eval_set = load_eval_set(
        benchmark,
        config,
        run_dir,
        settings.data,
        settings.split,
        settings.limit,
        run_dir / "eval",
        data_option="train.eval.data",
    )
    scorer = get_scorer(eval_set.scorer)
    params = SamplingParams(max_new_tokens=settings.max_new_tokens or benchmark.max_new_tokens)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            answers = answer_samples(
                method, eval_set.samples, params, settings.batch_size, settings.aux_images
            )
        correct = sum(score_answer(answer, scorer).correct for answer in answers)
        return {f"eval/{name}/accuracy": correct / len(answers)}

    return evaluate
