"""Benchmark registry (docs/design.md, "Evaluation"): name -> loader (local path, split) + prompt + scorer.

A loader reads the files as users download them (README.md, "Real benchmarks" table) and returns `Sample`s whose
segments hold the prompt (system + user turns: images, then the question with its options and answer
instruction), `answer` = the gold answer the scorer compares against, `choices` for multiple choice, and
`metadata["category"]` (plus optional `metadata["subcategory"]`) for per-category accuracy. Images stored
inside the files (base64) are written once under `image_dir` so that samples can point at them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from latentkit.errors import ConfigError
from latentkit.segments import Sample

# Modules whose import registers the built-in benchmarks.
BUILTIN_MODULES = ("latentkit.eval.synthetic", "latentkit.eval.loaders")


@dataclass(frozen=True)
class EvalSet:
    """What a loader read: the samples, the scorer that judges them, chance level and the files read."""

    samples: list[Sample]
    scorer: str
    chance_level: float | None
    source: str


Loader = Callable[[Path, str, Path], EvalSet]


@dataclass(frozen=True)
class Benchmark:
    """`version` changes whenever the loader, prompt or scorer changes meaning: compare flags mismatches."""

    name: str
    version: str
    description: str
    expected_files: str  # where the downloaded files go, for error messages and the README
    loader: Loader  # (path, split, image_dir) -> EvalSet
    splits: tuple[str, ...] = ("test",)
    max_new_tokens: int = 256
    synthetic: bool = False

    def load(self, path: Path, split: str, image_dir: Path) -> EvalSet:
        if split not in self.splits:
            raise ConfigError(
                f"benchmark {self.name!r} has no split {split!r}; valid splits: {', '.join(self.splits)}"
            )
        return self.loader(Path(path), split, Path(image_dir))


_BENCHMARKS: dict[str, Benchmark] = {}
_loaded_builtins = False


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    if benchmark.name in _BENCHMARKS:
        raise ConfigError(f"benchmark {benchmark.name!r} is registered twice")
    _BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def _load_builtins() -> None:
    global _loaded_builtins
    if not _loaded_builtins:
        _loaded_builtins = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def get_benchmark(name: str) -> Benchmark:
    _load_builtins()
    if name not in _BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(sorted(_BENCHMARKS))}")
    return _BENCHMARKS[name]


def list_benchmarks() -> list[Benchmark]:
    _load_builtins()
    return [_BENCHMARKS[name] for name in sorted(_BENCHMARKS)]


def chance_from_choices(samples: list[Sample]) -> float | None:
    """Uniform guessing over each sample's options; None when any sample is open-ended."""
    if not samples or any(not sample.choices for sample in samples):
        return None
    return sum(1.0 / len(sample.choices or ()) for sample in samples) / len(samples)
