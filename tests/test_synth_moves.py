"""The synth-moves generator: determinism, loadable records, pixels that agree with the metadata, the landing
cell computed by hand, uniform answers, and named knob errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentkit.errors import DataError
from latentkit.records import load_split
from latentkit.synth import generate_synth_moves, get_synth_task
from latentkit.synth.moves import MARKER_COLOUR, MOVES, landing_cell
from latentkit.synth.zoom import PALETTE

SMALL = {"n_train": 6, "n_val": 2, "n_test": 4}


def read_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    generate_synth_moves(tmp_path / "a", seed=3, **SMALL)
    generate_synth_moves(tmp_path / "b", seed=3, **SMALL)
    generate_synth_moves(tmp_path / "c", seed=4, **SMALL)
    first = read_tree(tmp_path / "a")
    assert len(first) == 3 + 1 + 2 * sum(SMALL.values())
    assert first == read_tree(tmp_path / "b")
    assert (tmp_path / "a" / "test.json").read_bytes() != (tmp_path / "c" / "test.json").read_bytes()


def test_records_load_with_one_auxiliary_image_and_the_boxed_answer(tmp_path: Path) -> None:
    info = generate_synth_moves(tmp_path, **SMALL)
    for split, count in SMALL.items():
        loaded = load_split(tmp_path, split.removeprefix("n_"), on_bad_record="skip")
        assert loaded.skipped == 0 and len(loaded.samples) == count
        for sample in loaded.samples:
            assert sample.dataset == "synth-moves" and len(sample.images) == 1 and len(sample.aux_images) == 1
            assert f"\\boxed{{{sample.answer}}}" in sample.segments[-1].text
    written = json.loads((tmp_path / "synth_info.json").read_text(encoding="utf-8"))
    assert written == info.to_dict() and written["chance_level"] == pytest.approx(1 / 6)
    assert get_synth_task("synth-moves").scorers == {"open": "boxed_exact"}


def test_landing_cell_by_hand() -> None:
    assert landing_cell((0, 0), ["right", "down", "right"], 3) == (1, 2)
    assert landing_cell((2, 1), ["up", "up"], 3) == (0, 1)
    with pytest.raises(ValueError, match="leaves the 3x3 board"):
        landing_cell((0, 0), ["up"], 3)


def cell_colour(image: np.ndarray, row: int, col: int, cell: int) -> tuple[int, ...]:
    return tuple(int(v) for v in image[row * cell + 1, col * cell + 1])  # a corner pixel, off the marker


def marker_cell(image: np.ndarray, cell: int, grid: int) -> tuple[int, int]:
    centres = [(r, c) for r in range(grid) for c in range(grid)]
    found = [
        (r, c)
        for r, c in centres
        if tuple(image[r * cell + cell // 2, c * cell + cell // 2]) == MARKER_COLOUR
    ]
    assert len(found) == 1
    return found[0]


def test_pixels_agree_with_the_moves_and_the_answer(tmp_path: Path) -> None:
    generate_synth_moves(tmp_path, n_train=0, n_val=0, n_test=12, grid=4, min_moves=2, max_moves=3)
    records = json.loads((tmp_path / "test.json").read_text(encoding="utf-8"))
    for record in records:
        meta = record["metadata"]
        before = np.asarray(Image.open(tmp_path / "images" / f"{meta['sample_id']}.png").convert("RGB"))
        after = np.asarray(Image.open(tmp_path / "images" / f"{meta['sample_id']}_after.png").convert("RGB"))
        assert before.shape == (112, 112, 3)
        start = marker_cell(before, 28, 4)
        assert start == (meta["start_row"] - 1, meta["start_col"] - 1)
        end = landing_cell(start, meta["moves"], 4)
        assert marker_cell(after, 28, 4) == end == (meta["end_row"] - 1, meta["end_col"] - 1)
        assert cell_colour(before, *end, 28) == PALETTE[meta["answer"]]
        assert 2 <= len(meta["moves"]) <= 3
        assert all(
            sum(a + b == 0 for a, b in zip(MOVES[x], MOVES[y])) < 2
            for x, y in zip(meta["moves"], meta["moves"][1:])
        )
        assert meta["moves"][0] in record["data"][1]["content"][1]["text"]


def test_answers_cover_the_palette_evenly(tmp_path: Path) -> None:
    generate_synth_moves(tmp_path, n_train=600, n_val=0, n_test=0)
    answers = Counter(r["metadata"]["answer"] for r in json.loads((tmp_path / "train.json").read_text()))
    assert set(answers) == set(PALETTE) and min(answers.values()) >= 70  # 100 expected per colour


@pytest.mark.parametrize(
    ("knob", "value"),
    [
        ("grid", 1),
        ("cell_size", 20),
        ("marker_size", 25),
        ("min_moves", 0),
        ("max_moves", 0),
        ("variant", "mc"),
    ],
)
def test_bad_knobs_are_named(tmp_path: Path, knob: str, value: object) -> None:
    with pytest.raises(DataError, match=f"synth-moves: {knob}="):
        generate_synth_moves(tmp_path, **SMALL, **{knob: value})
