"""The synth-maze generator and its rules: determinism, loadable records, valid shortest plans, balance."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentkit.errors import DataError
from latentkit.records import load_split
from latentkit.synth import SYNTH_TASKS, generate_synth_maze, get_synth_task
from latentkit.synth.maze import AGENT_COLOUR, TILE_COLOURS, read_board_cells
from latentkit.synth.maze_rules import (
    ACTIONS,
    HOLE,
    parse_actions,
    plan_is_valid,
    random_plan_success_probability,
    shortest_plan,
    walk,
)

SMALL = {"n_train": 6, "n_val": 2, "n_test": 6}
BOARD = ["SFFH", "FHFF", "FFFH", "HFFG"]


def read_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    generate_synth_maze(tmp_path / "a", seed=3, variant="yesno", **SMALL)
    generate_synth_maze(tmp_path / "b", seed=3, variant="yesno", **SMALL)
    generate_synth_maze(tmp_path / "c", seed=4, variant="yesno", **SMALL)
    assert read_tree(tmp_path / "a") == read_tree(tmp_path / "b")
    assert (tmp_path / "a" / "test.json").read_bytes() != (tmp_path / "c" / "test.json").read_bytes()


def test_test_split_does_not_depend_on_train_size(tmp_path: Path) -> None:
    generate_synth_maze(tmp_path / "few", n_train=1, n_val=1, n_test=3)
    generate_synth_maze(tmp_path / "many", n_train=7, n_val=1, n_test=3)
    for name in ("test.json", "val.json", "images/synth-maze-test-000002.png"):
        assert (tmp_path / "few" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()


@pytest.mark.parametrize("variant", ["plan", "yesno"])
def test_records_load_with_an_observation_after_every_board_state(tmp_path: Path, variant: str) -> None:
    info = generate_synth_maze(tmp_path, variant=variant, **SMALL)
    for split in ("train", "val", "test"):
        loaded = load_split(tmp_path, split, on_bad_record="skip")
        assert loaded.skipped == 0 and len(loaded.samples) == SMALL[f"n_{split}"]
        for sample in loaded.samples:
            kinds = [s.kind for s in sample.segments]
            assert len(sample.images) == 1 and len(sample.aux_images) >= 1
            assert kinds.count("observation") == kinds.count("aux_image")
            assert f"\\boxed{{{sample.answer}}}" in sample.segments[-1].text
    written = json.loads((tmp_path / "synth_info.json").read_text(encoding="utf-8"))
    assert written == info.to_dict()
    assert {"task", "variant", "chance_level"} <= set(written) and written["variant"] == variant


def test_gold_plans_are_valid_shortest_and_in_the_move_range(tmp_path: Path) -> None:
    generate_synth_maze(tmp_path, n_train=0, n_val=0, n_test=12, min_moves=2, max_moves=4)
    for sample in load_split(tmp_path, "test").samples:
        board, gold = sample.metadata["board"], tuple(sample.metadata["gold_plan"])
        assert sample.answer == ", ".join(gold) and parse_actions(sample.answer) == gold
        assert plan_is_valid(board, gold) and 2 <= len(gold) <= 4
        # Shortest: no sequence of one move fewer reaches the goal (exhaustive, independent of the BFS).
        assert not any(plan_is_valid(board, p) for p in itertools.product(ACTIONS, repeat=len(gold) - 1))


def test_aux_images_show_the_agent_after_each_move(tmp_path: Path) -> None:
    generate_synth_maze(tmp_path, n_train=0, n_val=0, n_test=3, grid_size=4, cell_size=28)
    for sample in load_split(tmp_path, "test").samples:
        steps = walk(sample.metadata["board"], sample.metadata["gold_plan"])
        assert len(sample.aux_images) == len(steps)
        for image, step in zip(sample.aux_images, steps):
            pixels = np.asarray(Image.open(image))
            assert pixels.shape == (112, 112, 3)
            agent_rows, agent_cols = np.nonzero((pixels == AGENT_COLOUR).all(axis=-1))
            assert (agent_rows.mean() // 28, agent_cols.mean() // 28) == step.cell
        observations = [s.text for s in sample.segments if s.kind == "observation"]
        row, col = steps[-1].cell
        assert observations[-1] == f"The agent is at row {row + 1}, column {col + 1}; this is the goal."


@pytest.mark.parametrize("cell_size", [28, 14])
def test_boards_read_back_cell_by_cell(tmp_path: Path, cell_size: int) -> None:
    generate_synth_maze(tmp_path, n_train=0, n_val=0, n_test=4, grid_size=4, cell_size=cell_size)
    for sample in load_split(tmp_path, "test").samples:
        board = sample.metadata["board"]
        steps = walk(board, sample.metadata["gold_plan"])
        start = tuple(v - 1 for v in sample.metadata["start"])
        for image, agent in zip(sample.images + sample.aux_images, [start, *(s.cell for s in steps)]):
            got = read_board_cells(Image.open(image), 4, cell_size)
            assert ["".join(tile for tile, _ in line) for line in got] == board
            assert [(r, c) for r in range(4) for c in range(4) if got[r][c][1]] == [agent]
    # a flat image of the hole colour reads as holes everywhere, with no agent
    holes = read_board_cells(Image.new("RGB", (56, 56), TILE_COLOURS[HOLE]), 4, 14)
    assert holes == [[(HOLE, False)] * 4] * 4


def test_yesno_is_balanced_and_labels_match_plan_validity(tmp_path: Path) -> None:
    info = generate_synth_maze(tmp_path, variant="yesno", n_train=0, n_val=0, n_test=20)
    answers = []
    for sample in load_split(tmp_path, "test").samples:
        meta = sample.metadata
        valid = plan_is_valid(meta["board"], meta["proposed_plan"])
        assert sample.answer == ("yes" if valid else "no")
        assert len(meta["proposed_plan"]) == len(meta["gold_plan"])
        answers.append(sample.answer)
    assert answers.count("yes") == answers.count("no") == 10
    assert info.chance_level == 0.5


def test_plan_chance_level_is_mean_random_plan_success(tmp_path: Path) -> None:
    info = generate_synth_maze(tmp_path, n_train=2, n_val=0, n_test=5)
    samples = load_split(tmp_path, "test").samples
    expected = [
        random_plan_success_probability(s.metadata["board"], len(s.metadata["gold_plan"])) for s in samples
    ]
    assert info.chance_level == pytest.approx(sum(expected) / len(expected))
    assert 0 < info.chance_level < 0.25


def test_rules_on_a_fixed_board() -> None:
    plan = shortest_plan(BOARD)
    assert plan is not None and len(plan) == 6 and plan_is_valid(BOARD, plan)
    assert shortest_plan(["SHG"]) is None
    assert plan_is_valid(BOARD, ["right", "right", "down", "down", "down", "right"])
    assert not plan_is_valid(BOARD, ["down", "right"])  # hole at row 2, column 2
    assert not plan_is_valid(BOARD, ["up"])  # off the board
    assert plan_is_valid(["SG"], ["left", "right"], off_grid_stays=True)
    assert not plan_is_valid(BOARD, [])
    # Exact: on "SG" one random move reaches the goal with probability 1/4; staying put on the edge (3/4)
    # leaves a second chance; on "SHG" two moves never do.
    assert random_plan_success_probability(["SG"], 1) == pytest.approx(0.25)
    assert random_plan_success_probability(["SG"], 2, off_grid_stays=True) == pytest.approx(
        0.25 + 0.75 * 0.25
    )
    assert random_plan_success_probability(["SHG"], 2) == 0.0
    with pytest.raises(DataError, match="exactly one start"):
        plan_is_valid(["FFG"], ["right"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("right, down, down", ("right", "down", "down")),
        ("Right Down", ("right", "down")),
        ("R,D,L,U", ("right", "down", "left", "up")),
        ("→ ↓ ↓", ("right", "down", "down")),
        ("RDD", ("right", "down", "down")),
        ("\\text{up}, \\text{left}.", ("up", "left")),
        ("right, jump", None),
        ("", None),
    ],
)
def test_parse_actions(text: str, expected: tuple[str, ...] | None) -> None:
    assert parse_actions(text) == expected


@pytest.mark.parametrize(
    ("knob", "value"),
    [
        ("grid_size", 1),
        ("cell_size", 30),
        ("min_moves", 0),
        ("min_moves", 7),
        ("max_moves", 1),
        ("hole_density", 0.9),
        ("variant", "open"),
        ("n_val", -1),
    ],
)
def test_bad_knobs_are_named(tmp_path: Path, knob: str, value: object) -> None:
    with pytest.raises(DataError, match=f"{knob}="):
        generate_synth_maze(tmp_path, **{knob: value})  # type: ignore[arg-type]


def test_registry_entry() -> None:
    task = SYNTH_TASKS["synth-maze"]
    assert task.variants == ("plan", "yesno") and task.default_variant == "plan"
    assert task.scorers == {"plan": "plan_valid", "yesno": "boxed_exact"}
    assert task.generate is generate_synth_maze
    assert task.knobs() == {
        "grid_size": 4,
        "cell_size": 28,
        "min_moves": 2,
        "max_moves": 4,
        "hole_density": 0.25,
    }
    assert task.parse_knobs(["grid_size=5", "hole_density=0.1"]) == {"grid_size": 5, "hole_density": 0.1}
    with pytest.raises(DataError, match="no knob 'size'.*grid_size"):
        task.parse_knobs(["size=5"])
    with pytest.raises(DataError, match="expected int"):
        task.parse_knobs(["grid_size=big"])
    with pytest.raises(DataError, match="must be written name=value"):
        task.parse_knobs(["grid_size"])
    with pytest.raises(DataError, match="valid variants: plan, yesno"):
        task.check_variant("mc")
    with pytest.raises(DataError, match="valid tasks: synth-zoom, synth-maze, synth-moves, synth-arith"):
        get_synth_task("synth-mze")
