"""`latentkit suite`: train and evaluate a grid of runs (methods x ablations x seeds) and compare them.

A suite file names its runs; each is a method with overrides. A run with `steps_of: <run>` is
*compute-matched*: it trains for the same total number of optimizer steps as that run, split evenly over its
own stages, so a baseline never loses on budget alone. Every run is trained once per seed (`run.seed`; the
data stay the same), evaluated on the suite's benchmark, and all of them are compared: per run a Wilson
interval over the questions, per run group the mean over seeds with a t-interval. Rerunning a suite resumes it:
finished runs are kept, interrupted ones resume from their checkpoints, evaluations skip answered questions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from latentkit.config import StrictModel, effective_train, read_yaml, selected_stages
from latentkit.errors import ConfigError
from latentkit.registry import get_method


class SuiteRun(StrictModel):
    method: str
    overrides: list[str] = Field(
        default_factory=list
    )  # `key=value`, as on the `latentkit train` command line
    steps_of: str | None = None  # compute-matched: the total optimizer steps of this other run


class Suite(StrictModel):
    benchmark: str = "synth-zoom"
    split: str = "test"
    limit: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0])
    overrides: list[str] = Field(default_factory=list)  # every run's (stage keys go in a run's own overrides)
    runs: dict[str, SuiteRun]


def load_suite(path: Path) -> Suite:
    from latentkit.config import check_keys

    raw = read_yaml(path)
    check_keys(Suite, raw, str(path))
    try:
        suite = Suite.model_validate(raw)
    except ValueError as exc:
        raise ConfigError(f"suite file {path} is invalid: {str(exc).splitlines()[-1].strip()}") from None
    for name, run in suite.runs.items():
        if run.steps_of is not None and run.steps_of not in suite.runs:
            raise ConfigError(f"suite run {name!r}: steps_of={run.steps_of!r} names no run of {path}")
        if run.steps_of is not None and suite.runs[run.steps_of].steps_of is not None:
            raise ConfigError(f"suite run {name!r}: steps_of must name a run that is not matched itself")
    if not suite.seeds:
        raise ConfigError(f"suite file {path}: seeds is empty; give at least one seed")
    return suite


def run_overrides(suite: Suite, name: str, seed: int, output_dir: Path) -> list[str]:
    run = suite.runs[name]
    common = [f"run.method={run.method}", f"run.name={name}-seed{seed}", f"run.output_dir={output_dir}"]
    return [*suite.overrides, *run.overrides, *common, f"run.seed={seed}"]


def total_steps(suite: Suite, name: str, output_dir: Path) -> int:
    """The optimizer steps a (not matched) run takes over the stages it trains (`train.stage`, `train.until`)."""
    return config_steps(_config(run_overrides(suite, name, 0, output_dir), suite.runs[name].method))


def config_steps(config) -> int:
    chosen = selected_stages(config.train, get_method(config.run.method).stages)
    return sum(effective_train(config.train, stage).steps for stage in chosen)


def matched_steps(total: int, stages: tuple[str, ...]) -> list[str]:
    """`total` optimizer steps split as evenly as possible over `stages` (earlier stages take the remainder)."""
    base, extra = divmod(total, len(stages))
    if base == 0:
        raise ConfigError(
            f"{total} matched steps cannot cover {len(stages)} stages; give the reference more steps"
        )
    return [f"train.stages.{stage}.steps={base + (index < extra)}" for index, stage in enumerate(stages)]


def plan(suite: Suite, output_dir: Path) -> list[tuple[str, int, list[str]]]:
    """(run name, seed, overrides) for every run of the grid, compute-matched steps filled in."""
    planned = []
    for seed in suite.seeds:
        for name, run in suite.runs.items():
            overrides = run_overrides(suite, name, seed, output_dir)
            if run.steps_of is not None:
                stages = get_method(run.method).stages
                overrides += matched_steps(total_steps(suite, run.steps_of, output_dir), stages)
            planned.append((name, seed, overrides))
    return planned


def _config(overrides: list[str], method: str):
    from latentkit.api import resolve_config

    return resolve_config({"run": {"method": method}}, overrides)


def run_suite(suite: Suite, out_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate and compare every run of the grid; return the comparison."""
    from latentkit.api import load, train
    from latentkit.decoding import SamplingParams
    from latentkit.eval.benchmarks import get_benchmark
    from latentkit.eval.compare import compare
    from latentkit.eval.runner import EvalOptions, evaluate

    benchmark = get_benchmark(suite.benchmark)
    runs_dir = out_dir / "runs"
    directories, budgets = [], {}
    for name, seed, overrides in plan(suite, runs_dir):
        config = _config(overrides, suite.runs[name].method)
        budgets[name] = config_steps(config)
        directory = runs_dir / config.run.name
        if not (directory / "final").is_dir():
            log(f"suite: training {directory.name}")
            train(config, resume=(directory / "config.yaml").is_file())
        options = EvalOptions(
            suite.benchmark,
            split=suite.split,
            limit=suite.limit,
            batch_size=suite.batch_size,
            sampling=SamplingParams(max_new_tokens=benchmark.max_new_tokens),
        )
        summary = evaluate(load(directory), options, progress=False)
        log(f"suite: {directory.name} {suite.benchmark} accuracy {summary['accuracy']:.3f}")
        directories.append(directory)
    result = compare(directories, out_dir / "comparison")
    result["runs"] = [
        {"run": name, "method": run.method, "steps": budgets[name], "steps_of": run.steps_of}
        for name, run in suite.runs.items()
    ]
    with open(out_dir / "comparison" / "comparison.md", "a", encoding="utf-8") as handle:
        handle.write(budget_table(result["runs"], suite.seeds))
    return result


def budget_table(runs: list[dict[str, Any]], seeds: list[int]) -> str:
    """The suite's runs with their optimizer steps, naming the compute-matched baselines."""
    lines = [
        "",
        f"Runs of the suite (seeds {', '.join(map(str, seeds))}):",
        "",
        "| run | method | optimizer steps | compute-matched to |",
        "|---|---|---|---|",
    ]
    for run in runs:
        lines.append(f"| {run['run']} | {run['method']} | {run['steps']} | {run['steps_of'] or '—'} |")
    return "\n".join(lines) + "\n"
