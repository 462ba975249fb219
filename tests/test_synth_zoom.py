"""The synth-zoom generator: determinism, split independence, loadable records, faithful zoom crops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentkit.errors import DataError
from latentkit.records import load_split
from latentkit.synth import chance_level, generate_synth_zoom
from latentkit.synth.zoom import BACKGROUND, PALETTE, SHAPES

SMALL = {"n_train": 6, "n_val": 2, "n_test": 4}


def read_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    generate_synth_zoom(tmp_path / "a", seed=3, variant="mc", **SMALL)
    generate_synth_zoom(tmp_path / "b", seed=3, variant="mc", **SMALL)
    generate_synth_zoom(tmp_path / "c", seed=4, variant="mc", **SMALL)
    first = read_tree(tmp_path / "a")
    assert len(first) == 3 + 1 + 2 * sum(SMALL.values())
    assert first == read_tree(tmp_path / "b")
    assert (tmp_path / "a" / "test.json").read_bytes() != (tmp_path / "c" / "test.json").read_bytes()


def test_test_split_does_not_depend_on_train_size(tmp_path: Path) -> None:
    generate_synth_zoom(tmp_path / "few", n_train=2, n_val=1, n_test=3)
    generate_synth_zoom(tmp_path / "many", n_train=9, n_val=1, n_test=3)
    for name in ("test.json", "val.json", "images/synth-zoom-test-000002_zoom.png"):
        assert (tmp_path / "few" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()
    assert (tmp_path / "few" / "train.json").read_bytes() != (tmp_path / "many" / "train.json").read_bytes()


@pytest.mark.parametrize("variant", ["open", "mc"])
def test_records_load_back_without_skips(tmp_path: Path, variant: str) -> None:
    info = generate_synth_zoom(tmp_path, variant=variant, **SMALL)
    for split, count in SMALL.items():
        loaded = load_split(tmp_path, split.removeprefix("n_"), on_bad_record="skip")
        assert loaded.skipped == 0 and len(loaded.samples) == count
        for index, sample in enumerate(loaded.samples):
            assert sample.sample_id == f"synth-zoom-{split.removeprefix('n_')}-{index:06d}"
            assert sample.dataset == "synth-zoom" and len(sample.images) == 1 and len(sample.aux_images) == 1
            assert [s.kind for s in sample.segments].count("observation") == 1
            assert f"\\boxed{{{sample.answer}}}" in sample.segments[-1].text
    written = json.loads((tmp_path / "synth_info.json").read_text(encoding="utf-8"))
    assert written == info.to_dict() and written["counts"] == {"train": 6, "val": 2, "test": 4}


def test_zoom_image_is_the_upscaled_target_with_its_margin(tmp_path: Path) -> None:
    generate_synth_zoom(
        tmp_path, n_train=0, n_val=0, n_test=5, canvas_size=112, grid=4, zoom_size=56, zoom_margin=3
    )
    cell = 112 // 4
    for sample in load_split(tmp_path, "test").samples:
        row, col = sample.metadata["target_row"] - 1, sample.metadata["target_col"] - 1
        canvas = np.asarray(Image.open(sample.images[0]))
        zoom = np.asarray(Image.open(sample.aux_images[0]))
        assert canvas.shape == (112, 112, 3) and zoom.shape == (56, 56, 3)
        # The target's pixels: the non-background pixels of its cell; the crop is their box grown by 3 px.
        region = canvas[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
        ys, xs = np.nonzero((region != BACKGROUND).any(axis=-1))
        top, left = row * cell + ys.min() - 3, col * cell + xs.min() - 3
        bottom, right = row * cell + ys.max() + 4, col * cell + xs.max() + 4
        crop = canvas[top:bottom, left:right]
        rows = (np.arange(56) * crop.shape[0]) // 56
        cols = (np.arange(56) * crop.shape[1]) // 56
        np.testing.assert_array_equal(zoom, crop[rows][:, cols])
        # The target fills most of the zoom: the detail is large there and small on the canvas.
        colour = (zoom == PALETTE[sample.metadata["target_colour"]]).all(axis=-1)
        assert colour.mean() > 0.2


def test_mc_answer_letter_matches_choices(tmp_path: Path) -> None:
    generate_synth_zoom(tmp_path, variant="mc", n_train=0, n_val=0, n_test=12)
    letters = []
    for sample in load_split(tmp_path, "test").samples:
        meta = sample.metadata
        assert sample.choices is not None and len(sample.choices) == 4 and len(set(sample.choices)) == 4
        truth = meta["target_colour"] if meta["question_type"] == "colour" else meta["target_shape"]
        assert sample.answer is not None and sample.choices["ABCD".index(sample.answer)] == truth
        question = sample.segments[2].text
        for letter, choice in zip("ABCD", sample.choices):
            assert f"({letter}) {choice}" in question
        letters.append(sample.answer)
    assert len(set(letters)) > 1


def test_open_answers_are_words_of_the_asked_attribute(tmp_path: Path) -> None:
    generate_synth_zoom(tmp_path, n_train=0, n_val=0, n_test=8)
    for sample in load_split(tmp_path, "test").samples:
        words = PALETTE if sample.metadata["question_type"] == "colour" else SHAPES
        assert sample.answer in words and sample.choices is None


def test_chance_level() -> None:
    assert chance_level("mc", {"colour": 3, "shape": 1}) == 0.25
    assert chance_level("open", {"colour": 1.0}) == pytest.approx(1 / 6)
    assert chance_level("open", {"shape": 1.0}) == pytest.approx(1 / 3)
    assert chance_level("open", {"colour": 1, "shape": 1}) == pytest.approx(0.25)
    assert chance_level("open", {"colour": 3, "shape": 1}) == pytest.approx(0.75 / 6 + 0.25 / 3)


def test_info_reports_test_split_chance_level(tmp_path: Path) -> None:
    info = generate_synth_zoom(tmp_path, n_train=0, n_val=0, n_test=10)
    assert info.chance_level == pytest.approx(chance_level("open", info.question_type_counts["test"]))


@pytest.mark.parametrize(
    ("knob", "value"),
    [
        ("canvas_size", 100),
        ("zoom_size", 50),
        ("grid", 3),
        ("target_size", 30),
        ("variant", "free"),
        ("n_test", -1),
    ],
)
def test_bad_knobs_are_named(tmp_path: Path, knob: str, value: object) -> None:
    with pytest.raises(DataError, match=f"{knob}="):
        generate_synth_zoom(tmp_path, **{knob: value})  # type: ignore[arg-type]
