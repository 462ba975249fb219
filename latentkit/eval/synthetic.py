"""The built-in synthetic tasks as benchmarks: a folder with `<split>.json` records and `synth_info.json`.

Without --data, a run trained on the task is evaluated on its own generated data (the test split is drawn
independently of train); otherwise the task is generated with its default knobs beside the results.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from latentkit.config import LatentkitConfig
from latentkit.data import prepare_embedded_data
from latentkit.errors import DataError
from latentkit.eval.benchmarks import Benchmark, EvalSet, register_benchmark
from latentkit.records import load_split
from latentkit.synth import SYNTH_TASKS

SPLITS = ("train", "val", "test")


def _category(task: str, metadata: Mapping[str, Any]) -> str | None:
    """Per-category accuracy groups: question type (zoom), plan length in moves (maze), number of moves (moves), number of steps (arith)."""
    if task == "synth-zoom":
        return metadata.get("question_type")
    if task == "synth-maze" and "gold_plan" in metadata:
        return f"{len(metadata['gold_plan'])} moves"
    if task == "synth-moves" and "moves" in metadata:
        return f"{len(metadata['moves'])} moves"
    if task == "synth-arith" and "steps" in metadata:
        return f"{len(metadata['steps'])} steps"
    return None


def synthetic_data_dir(name: str, config: LatentkitConfig, run_dir: Path | None, work_dir: Path) -> Path:
    if run_dir is not None and config.data.path is None and config.data.task == name:
        return prepare_embedded_data(run_dir, config.data)
    root = work_dir / "data" / name
    if not (root / "synth_info.json").is_file():
        task = SYNTH_TASKS[name]
        task.generate(root, seed=0, variant=task.default_variant)
    return root


def _load(name: str, path: Path, split: str) -> EvalSet:
    info_file = path / "synth_info.json"
    if not info_file.is_file():
        raise DataError(
            f"{path} is not a {name} folder (no synth_info.json): make one with `latentkit data synth --task {name}`"
        )
    info = json.loads(info_file.read_text(encoding="utf-8"))
    if info.get("task") != name:
        raise DataError(
            f"{info_file} describes task {info.get('task')!r}, not {name!r}: pass the {name} folder"
        )
    task = SYNTH_TASKS[name]
    variant = info.get("variant", task.default_variant)
    if variant not in task.scorers:
        raise DataError(
            f"{info_file}: unknown variant {variant!r} for {name}; valid: {', '.join(task.scorers)}"
        )
    samples = [
        replace(sample, metadata={**sample.metadata, "category": _category(name, sample.metadata)})
        for sample in load_split(path, split).samples
    ]
    return EvalSet(samples, task.scorers[variant], float(info["chance_level"]), str(path / f"{split}.json"))


def _register(name: str, description: str, max_new_tokens: int) -> None:
    register_benchmark(
        Benchmark(
            name=name,
            version="1",
            description=description,
            expected_files=f"a folder written by `latentkit data synth --task {name}`",
            loader=lambda path, split, image_dir: _load(name, path, split),
            splits=SPLITS,
            max_new_tokens=max_new_tokens,
            synthetic=True,
        )
    )


_register("synth-zoom", "fine perception on a canvas of small shapes (V*/HR-Bench-like)", 96)
_register("synth-maze", "FrozenLake-style planning with board states as auxiliary images (VSP-like)", 384)
_register(
    "synth-moves",
    "where a marker lands after moves on a board of coloured cells (a computed board state)",
    64,
)
_register("synth-arith", "multi-step arithmetic word problems, text only (GSM8K-like)", 256)
