"""The command line and run loading the LatentUM benchmarks share: trained runs, `--split` and `--limit`, and each
run loaded (`latentkit.load`) with its data folder and the first `limit` samples of the split."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import latentkit as lk
from latentkit.eval.model import EvalModel
from latentkit.records import load_split
from latentkit.segments import Sample


@dataclass
class LoadedRun:
    path: Path
    model: EvalModel
    data: Path  # the run's dataset folder: data.path, or the embedded task generated into the run
    samples: list[Sample]  # the first `limit` samples of the split


def run_parser(doc: str, several: bool) -> argparse.ArgumentParser:
    """A parser described by `doc`'s first line, taking one run (`run`) or several (`runs`), `--split`, `--limit`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if several:
        parser.add_argument("runs", nargs="+", type=Path)
    else:
        parser.add_argument("run", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=64, help="samples of the split")
    return parser


def load_run(path: Path, split: str, limit: int) -> LoadedRun:
    model = lk.load(path)
    data = Path(model.config.data.path or path / "data" / model.config.data.task)
    return LoadedRun(path, model, data, load_split(data, split).samples[:limit])


def load_runs(args: argparse.Namespace) -> Iterator[LoadedRun]:
    """The parsed runs loaded one at a time (one model in memory at once)."""
    for path in args.runs if hasattr(args, "runs") else [args.run]:
        yield load_run(path, args.split, args.limit)
