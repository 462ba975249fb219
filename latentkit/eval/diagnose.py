"""`latentkit diagnose`: do a latent method's latents matter? (DESIGN.md, "Who uses it" 3; specs/monet.md,
"Results to know": collapse, trigger rate, constant-latent accuracy.)

Greedy answers to a benchmark under several latent decodings, all through `answer_samples` as `eval` does:
as generated (the method's own K), forced (every answer opens with a latent block), latents replaced by
zeros / a constant / noise / the dataset mean, and a test-time K sweep. Writes `<benchmark>-<split>.json`,
`.md` and `.png`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentkit.decoding import SamplingParams
from latentkit.errors import ConfigError
from latentkit.eval.answer import answer_samples
from latentkit.eval.benchmarks import get_benchmark
from latentkit.eval.model import EvalModel
from latentkit.eval.runner import load_eval_set, score_answer
from latentkit.eval.scorers import Scorer, get_scorer
from latentkit.latent import Constant, ContinuousPolicy, DatasetMean, Intervention, Noise, Zeros
from latentkit.records import write_json
from latentkit.registry import Method
from latentkit.segments import Sample

Latents = list[list[torch.Tensor]]  # per answer, its latent blocks ([k, D] each)

READING_GUIDE = (
    "How to read this: *trigger rate* is the fraction of answers that opened at least one latent block. "
    "*Cross-input cosine* is the mean cosine similarity between latents (same step index) of different "
    "questions: near 1 means the latents do not depend on the input (collapse). Each intervention decodes as "
    "the baseline but replaces every latent before the model reads it; an accuracy equal to the baseline's "
    "(and few changed answers) means the latents are causally weak: the answer does not use what they carry. "
    "The K sweep changes the number of latent steps per block at test time."
)


@dataclass(frozen=True)
class DiagnoseOptions:
    benchmark: str
    data: Path | None = None
    split: str = "test"
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int | None = None  # default: the benchmark's
    k_sweep: tuple[int, ...] = (1, 2, 4, 8, 12, 16)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens < 2:
            raise ConfigError(
                f"--max-new-tokens must be at least 2 (a start token and one latent), got {self.max_new_tokens}"
            )
        if not self.k_sweep or min(self.k_sweep) < 1:
            raise ConfigError(f"--k-sweep needs K values of at least 1, got {list(self.k_sweep)}")


def parse_k_sweep(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--k-sweep must be comma-separated integers such as 1,2,4,8, got {text!r}"
        ) from None


def continuous_policy(method: Method) -> ContinuousPolicy:
    policy = method.decoding_policy()
    if not isinstance(policy, ContinuousPolicy):
        raise ConfigError(
            f"method {method.name!r} does not decode with continuous steps; diagnose needs a method whose "
            "decoding policy emits them (a latentkit.latent.ContinuousPolicy), such as monet"
        )
    return policy


# --- measures -----------------------------------------------------------------------------------------------
def cross_input_cosine(latents: Latents) -> tuple[float | None, int]:
    """Collapse score: mean cosine similarity over pairs of latents from different answers, and the pair count.

    Step index j pairs the j-th latent of every block; indices are pooled, weighted by their pair counts.
    Over unit vectors u owned by answers s, the cross pairs sum to (|sum u|^2 - sum_s |sum_{i in s} u_i|^2) / 2.
    """
    depth = max((block.shape[0] for blocks in latents for block in blocks), default=0)
    total, pairs = 0.0, 0
    for j in range(depth):
        per_answer = [
            torch.nn.functional.normalize(
                torch.stack([b[j] for b in blocks if b.shape[0] > j]).double(), dim=-1
            )
            for blocks in latents
            if any(b.shape[0] > j for b in blocks)
        ]
        if not per_answer:
            continue
        everything = torch.cat(per_answer).sum(0).square().sum()
        within = sum(float(units.sum(0).square().sum()) for units in per_answer)
        counts = [units.shape[0] for units in per_answer]
        total += (float(everything) - within) / 2
        pairs += (sum(counts) ** 2 - sum(c * c for c in counts)) // 2
    return (total / pairs if pairs else None), pairs


def _vectors(latents: Latents) -> torch.Tensor:
    return torch.cat([block for blocks in latents for block in blocks]).float()


def step_means(latents: Latents) -> torch.Tensor:
    """The mean latent at each step index within a block: [max block length, D]."""
    depth = max(block.shape[0] for blocks in latents for block in blocks)
    return torch.stack(
        [
            torch.stack([b[j] for blocks in latents for b in blocks if b.shape[0] > j]).mean(0)
            for j in range(depth)
        ]
    )


def latent_statistics(latents: Latents) -> dict[str, Any]:
    vectors = _vectors(latents)
    cosine, pairs = cross_input_cosine(latents)
    return {
        "cross_input_cosine": cosine,
        "pairs": pairs,
        "latents": int(vectors.shape[0]),
        "mean_norm": float(vectors.norm(dim=-1).mean()),
        "mean_rms": float(vectors.square().mean(dim=-1).sqrt().mean()),
    }


# --- decoding -------------------------------------------------------------------------------------------------
@dataclass
class ConditionRun:
    """Every sample answered under one decoding: extracted answers, correctness, latent block lengths."""

    name: str
    extracted: list[str | None]
    correct: list[bool]
    block_lengths: list[list[int]]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def triggered(self) -> list[bool]:
        return [bool(lengths) for lengths in self.block_lengths]

    def summary(self) -> dict[str, Any]:
        triggered = self.triggered
        return {
            "accuracy": self.accuracy,
            "trigger_rate": sum(triggered) / len(triggered),
            "mean_blocks": sum(len(lengths) for lengths in self.block_lengths) / len(triggered),
            "mean_latent_steps": sum(sum(lengths) for lengths in self.block_lengths) / len(triggered),
        }

    def accuracy_where(self, triggered: bool) -> float | None:
        picked = [c for c, t in zip(self.correct, self.triggered) if t == triggered]
        return sum(picked) / len(picked) if picked else None


class _Runner:
    """Runs conditions over the samples; runs without an intervention are kept by (K, force) and reused."""

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
        self.done: dict[tuple[int, bool], tuple[ConditionRun, Latents]] = {}

    def run(
        self, name: str, k: int, force: bool, intervention: Intervention | None = None
    ) -> tuple[ConditionRun, Latents]:
        if intervention is None and (k, force) in self.done:
            run, latents = self.done[(k, force)]
            self.log(f"{name:<14} K={k:<3} force={str(force).lower():<5} same decoding as {run.name}")
            return ConditionRun(name, run.extracted, run.correct, run.block_lengths), latents
        began = time.perf_counter()
        policy = self.base.varied(k=k, force=force, intervention=intervention)
        answers = answer_samples(self.method, self.samples, self.params, self.batch_size, policy=policy)
        kind = self.base.kind
        latents: Latents = [
            [block.float().cpu() for t in answer.trajectories for block in t.blocks(kind)]
            for answer in answers
        ]
        scores = [score_answer(answer, self.scorer) for answer in answers]
        lengths = [[int(block.shape[0]) for block in blocks] for blocks in latents]
        run = ConditionRun(name, [s.extracted for s in scores], [s.correct for s in scores], lengths)
        if intervention is None:
            self.done[(k, force)] = (run, latents)
        summary = run.summary()
        self.log(
            f"{name:<14} K={k:<3} force={str(force).lower():<5} accuracy {summary['accuracy']:.3f}  "
            f"trigger rate {summary['trigger_rate']:.2f}  ({time.perf_counter() - began:.1f}s)"
        )
        return run, latents


def default_output_dir(model: EvalModel) -> Path:
    return (model.run_dir if model.run_dir is not None else model.model_dir) / "diagnose"


def output_paths(out_dir: Path, options: DiagnoseOptions) -> dict[str, Path]:
    stem = f"{options.benchmark}-{options.split}"
    return {suffix: out_dir / f"{stem}.{suffix}" for suffix in ("json", "md", "png")}


def diagnose(
    model: EvalModel,
    options: DiagnoseOptions,
    out_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run every condition, write the JSON, Markdown and PNG reports; return the report and their paths."""
    base = continuous_policy(model.method)
    benchmark = get_benchmark(options.benchmark)
    out_dir = Path(out_dir) if out_dir is not None else default_output_dir(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_set = load_eval_set(
        benchmark, model.config, model.run_dir, options.data, options.split, options.limit, out_dir
    )
    params = SamplingParams(
        max_new_tokens=options.max_new_tokens or benchmark.max_new_tokens, seed=options.seed
    )
    runner = _Runner(
        model.method, eval_set.samples, get_scorer(eval_set.scorer), params, options.batch_size, base, log
    )
    generated, generated_latents = runner.run("generated", base.k, base.force)
    forced, forced_latents = runner.run("forced", base.k, True)
    # Without a single generated latent, replacing latents changes nothing: the later conditions force them.
    force = base.force or not any(generated.triggered)
    baseline, reference = (forced, forced_latents) if force else (generated, generated_latents)
    stats = latent_statistics(reference)
    interventions: list[Intervention] = [
        Zeros(),
        Constant(torch.full((model.backbone.hidden_size,), stats["mean_rms"])),
        Noise(options.seed),
        DatasetMean(step_means(reference)),
    ]
    replaced = [runner.run(i.name, base.k, force, i)[0] for i in interventions]
    sweep = [runner.run(f"k={k}", k, force)[0] for k in options.k_sweep]
    report = {
        "model": model.describe(),
        "benchmark": benchmark.name,
        "benchmark_version": benchmark.version,
        "split": options.split,
        "scorer": eval_set.scorer,
        "chance_level": eval_set.chance_level,
        "num_samples": len(eval_set.samples),
        "data": eval_set.source,
        "decoding": {
            "k": base.k,
            "force": base.force,
            "policy": type(base).__name__,
            "greedy": True,
            "max_new_tokens": params.max_new_tokens,
            "batch_size": options.batch_size,
            "seed": options.seed,
        },
        "generated": {
            **generated.summary(),
            "accuracy_triggered": generated.accuracy_where(True),
            "accuracy_untriggered": generated.accuracy_where(False),
        },
        "forced": forced.summary(),
        "latents_forced": force,  # interventions and the K sweep decode with forced latent blocks
        "collapse": {**stats, "latents_from": baseline.name},
        "interventions": {
            "baseline": baseline.name,
            "baseline_accuracy": baseline.accuracy,
            "conditions": {run.name: _compared(run, baseline) for run in replaced},
        },
        "k_sweep": [{"k": k, **run.summary()} for k, run in zip(options.k_sweep, sweep)],
        "per_sample": _per_sample(eval_set.samples, [generated, forced, *replaced, *sweep]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    paths = output_paths(out_dir, options)
    write_json(paths["json"], report)
    paths["md"].write_text(markdown_report(report), encoding="utf-8")
    plot_report(report, paths["png"])
    return report, paths


def _compared(run: ConditionRun, baseline: ConditionRun) -> dict[str, Any]:
    changed = sum(a != b for a, b in zip(run.extracted, baseline.extracted)) / len(run.extracted)
    return {**run.summary(), "delta": run.accuracy - baseline.accuracy, "changed": changed}


def _per_sample(samples: Sequence[Sample], runs: list[ConditionRun]) -> list[dict[str, Any]]:
    return [
        {
            "sample_id": sample.sample_id,
            "gold": sample.answer or "",
            "answers": {
                run.name: {
                    "extracted": run.extracted[index],
                    "correct": run.correct[index],
                    "latent_blocks": len(run.block_lengths[index]),
                    "latent_steps": sum(run.block_lengths[index]),
                }
                for run in runs
            },
        }
        for index, sample in enumerate(samples)
    ]


# --- reports --------------------------------------------------------------------------------------------------
def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def markdown_report(report: dict[str, Any]) -> str:
    model, decoding, generated = report["model"], report["decoding"], report["generated"]
    collapse, interventions = report["collapse"], report["interventions"]
    lines = [
        f"# latentkit diagnose: {report['benchmark']} ({report['split']})",
        "",
        (
            f"Model: {model['method']} `{model['model_dir']}` ({model['backbone']}); "
            f"{report['num_samples']} samples, scorer {report['scorer']}, chance {_number(report['chance_level'])}; "
            f"greedy, K={decoding['k']}, max {decoding['max_new_tokens']} new tokens."
        ),
        "",
        READING_GUIDE,
        "",
        "## As generated",
        "",
        *_table(
            ["accuracy", "trigger rate", "blocks / answer", "accuracy (triggered)", "accuracy (untriggered)"],
            [
                [
                    _number(generated["accuracy"]),
                    _number(generated["trigger_rate"], 2),
                    _number(generated["mean_blocks"], 2),
                    _number(generated["accuracy_triggered"]),
                    _number(generated["accuracy_untriggered"]),
                ]
            ],
        ),
        "",
        f"## Collapse (latents of the {collapse['latents_from']} answers)",
        "",
        *_table(
            ["cross-input cosine", "mean norm", "latents", "pairs"],
            [
                [
                    _number(collapse["cross_input_cosine"]),
                    _number(collapse["mean_norm"], 2),
                    str(collapse["latents"]),
                    str(collapse["pairs"]),
                ]
            ],
        ),
        "",
        f"## Interventions (baseline: {interventions['baseline']})",
        "",
    ]
    if report["latents_forced"] and not decoding["force"]:
        lines += [
            "No generated answer opened a latent block, so the interventions and the K sweep force one.",
            "",
        ]
    rows = [
        ["generated", _number(generated["accuracy"]), "", "", _number(generated["trigger_rate"], 2)],
        [
            "forced",
            _number(report["forced"]["accuracy"]),
            "",
            "",
            _number(report["forced"]["trigger_rate"], 2),
        ],
    ]
    for name, result in interventions["conditions"].items():
        rows.append(
            [
                name,
                _number(result["accuracy"]),
                f"{result['delta']:+.3f}",
                _number(result["changed"], 2),
                _number(result["trigger_rate"], 2),
            ]
        )
    lines += _table(["condition", "accuracy", "Δ vs baseline", "changed", "trigger rate"], rows)
    lines += ["", "## Test-time K", ""]
    lines += _table(
        ["K", "accuracy", "trigger rate"],
        [[str(p["k"]), _number(p["accuracy"]), _number(p["trigger_rate"], 2)] for p in report["k_sweep"]],
    )
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Left: accuracy per condition (generated dashed, chance dotted); right: accuracy against test-time K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = {
        "generated": report["generated"]["accuracy"],
        "forced": report["forced"]["accuracy"],
        **{name: r["accuracy"] for name, r in report["interventions"]["conditions"].items()},
    }
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    bars = left.bar(range(len(conditions)), [100 * a for a in conditions.values()], color="tab:blue")
    left.bar_label(bars, fmt="%.1f", fontsize=8)
    left.axhline(100 * report["generated"]["accuracy"], color="black", linestyle="dashed", label="generated")
    if report["chance_level"] is not None:
        left.axhline(100 * report["chance_level"], color="gray", linestyle="dotted", label="chance")
    left.set_xticks(range(len(conditions)), list(conditions), rotation=20)
    left.set_ylabel("accuracy (%)")
    left.set_ylim(0, 105)
    left.set_title(
        f"{report['benchmark']}: latents replaced (baseline {report['interventions']['baseline']})"
    )
    left.legend(fontsize=8)
    ks = [p["k"] for p in report["k_sweep"]]
    right.plot(ks, [100 * p["accuracy"] for p in report["k_sweep"]], marker="o")
    right.axvline(
        report["decoding"]["k"], color="black", linestyle="dashed", linewidth=0.8, label="method's K"
    )
    right.set_xticks(ks)
    right.set_xlabel("latent steps per block (K)" + (" — forced" if report["latents_forced"] else ""))
    right.set_ylabel("accuracy (%)")
    right.set_ylim(0, 105)
    right.set_title("test-time K")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
