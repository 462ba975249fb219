"""`latentkit compare`: a Wilson interval per cell and the mean over seeds with a t-interval, on summary files
written by hand (the numbers are checked against independent computations)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from latentkit.eval.compare import compare


def write_summary(directory: Path, run: str, method: str, accuracy: float, samples: int) -> Path:
    path = directory / f"{run}.summary.json"
    summary = {
        "benchmark": "synth-zoom",
        "benchmark_version": "1",
        "split": "test",
        "scorer": "boxed_exact",
        "chance_level": 0.25,
        "accuracy": accuracy,
        "counts": {"samples": samples},
        "num_samples": 1,
        "sampling": {"temperature": 0.0},
        "aux_images": "none",
        "model": {"method": method, "run": f"runs/{run}"},
    }
    path.write_text(json.dumps(summary))
    return path


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_cells_carry_wilson_intervals_and_seeds_are_summarised(tmp_path):
    paths = [
        write_summary(tmp_path, "sft-nocrop-seed0", "sft", 0.50, 200),
        write_summary(tmp_path, "sft-nocrop-seed1", "sft", 0.60, 200),
        write_summary(tmp_path, "sft-nocrop-seed2", "sft", 0.70, 200),
        write_summary(tmp_path, "monet", "monet", 0.25, 200),
    ]
    result = compare(paths, tmp_path / "out")
    first = result["entries"][0]
    low, high = wilson(100, 200)
    assert first["low"] == pytest.approx(low) and first["high"] == pytest.approx(high)
    (seeds,) = result["over_seeds"]
    assert seeds["group"] == "sft (sft-nocrop)" and seeds["runs"] == 3
    # mean 0.6, sample std 0.1, t(0.975, 2) = 4.302653
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert seeds["estimate"] == pytest.approx(0.6)
    assert seeds["low"] == pytest.approx(0.6 - half, abs=1e-6) and seeds["high"] == pytest.approx(
        0.6 + half, abs=1e-6
    )
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert f"50.0 [{100 * low:.1f}, {100 * high:.1f}] (n=200)" in table
    assert "| sft (sft-nocrop) | synth-zoom | 3 | 60.0 [" in table


def test_a_single_seed_is_not_summarised(tmp_path):
    paths = [
        write_summary(tmp_path, "sft-seed0", "sft", 0.5, 10),
        write_summary(tmp_path, "monet", "monet", 0.4, 10),
    ]
    result = compare(paths, tmp_path / "out")
    assert result["over_seeds"] == []
    assert "Over seeds" not in (tmp_path / "out" / "comparison.md").read_text()
