"""`synth-maze`: visual spatial planning on FrozenLake-like boards (README.md, "Synthetic tasks").

A `grid_size` x `grid_size` board with a start, a goal and holes is drawn as a PNG (agent: red circle,
start: green, goal: gold, holes: dark). Variant `plan` asks for a shortest safe plan (gold: breadth-first
search, a comma-separated list of up/down/left/right); variant `yesno` proposes a plan of the gold length
and asks whether it is valid (even indices propose the gold plan; odd ones change one of its moves, which
always breaks it). The reasoning replays the plan move by move: after each move the latent marker, the
board with the agent in its new cell as an auxiliary image, and an observation of the new position; then
the boxed answer. Plan validity (`maze_rules.plan_is_valid`): reach the goal, never step into a hole or
off the board. Difficulty knobs: `grid_size`, the gold plan length range `min_moves`..`max_moves`, and
`hole_density`.

Chance level: `yesno` 0.5 (balanced classes); `plan` the probability that uniformly random moves, as many
as the gold plan has, form a valid plan, averaged over the test split (over all splits when it is empty).
Every sample is drawn from its own generator seeded by (seed, split, index), as in synth-zoom.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from latentkit.errors import DataError
from latentkit.records import DEFAULT_LATENT_MARKER, write_json, write_records
from latentkit.synth.maze_rules import (
    ACTIONS,
    FROZEN,
    GOAL,
    HOLE,
    START,
    Board,
    Cell,
    Step,
    format_plan,
    parse_board,
    plan_is_valid,
    random_plan_success_probability,
    shortest_plan,
    walk,
)
from latentkit.synth.streams import sample_streams, split_counts

TASK = "synth-maze"
VARIANTS = ("plan", "yesno")
PATCH_MULTIPLE = 28
MAX_BOARD_DRAWS = 1000
TILE_COLOURS: dict[str, tuple[int, int, int]] = {
    FROZEN: (205, 230, 245),
    START: (150, 215, 150),
    GOAL: (240, 195, 40),
    HOLE: (25, 40, 90),
}
AGENT_COLOUR = (220, 30, 30)
GRID_LINE_COLOUR = (120, 120, 120)
SYSTEM_PROMPT = "You are a helpful assistant."
BOARD_DESCRIPTION = (
    "The board is a frozen lake. The agent (red circle) starts on the green square and must reach the gold "
    "square without stepping into a hole (dark square) or off the board. Moves: up, down, left, right."
)
ANSWER_INSTRUCTION = "Put the final answer in \\boxed{}."

Variant = Literal["plan", "yesno"]


@dataclass(frozen=True)
class MazeInfo:
    """What was generated: written to `synth_info.json` beside the splits."""

    task: str
    variant: Variant
    seed: int
    grid_size: int
    cell_size: int
    min_moves: int
    max_moves: int
    hole_density: float
    counts: dict[str, int]
    plan_length_counts: dict[str, dict[str, int]]
    chance_level: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate_synth_maze(
    out_dir: Path,
    *,
    n_train: int = 256,
    n_val: int = 32,
    n_test: int = 64,
    seed: int = 0,
    variant: Variant = "plan",
    grid_size: int = 4,
    cell_size: int = 28,
    min_moves: int = 2,
    max_moves: int = 4,
    hole_density: float = 0.25,
) -> MazeInfo:
    """Write `out_dir/{train,val,test}.json`, PNG boards under `out_dir/images/`, and `synth_info.json`."""
    counts = split_counts(TASK, seed, n_train, n_val, n_test)
    _check_knobs(variant, grid_size, cell_size, min_moves, max_moves, hole_density)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    plan_length_counts: dict[str, dict[str, int]] = {}
    chance_by_split: dict[str, list[float]] = {}
    for split, count in counts.items():
        records = []
        for index, sample_id, rng in sample_streams(TASK, seed, split, count):
            board, gold = _draw_board(rng, grid_size, min_moves, max_moves, hole_density)
            proposed = gold if variant == "plan" or index % 2 == 0 else _break_plan(rng, gold)
            steps = walk(board, proposed)
            _draw_board_image(board, board.start, cell_size).save(
                out_dir / "images" / f"{sample_id}.png", format="PNG"
            )
            for number, step in enumerate(steps, start=1):
                _draw_board_image(board, step.cell, cell_size).save(
                    out_dir / "images" / f"{sample_id}_step{number}.png", format="PNG"
                )
            records.append(_record(sample_id, variant, board, gold, proposed, steps))
        write_records(out_dir / f"{split}.json", records)
        lengths = Counter(len(r["metadata"]["gold_plan"]) for r in records)
        plan_length_counts[split] = {str(length): lengths[length] for length in sorted(lengths)}
        chance_by_split[split] = [
            random_plan_success_probability(r["metadata"]["board"], len(r["metadata"]["gold_plan"]))
            for r in records
        ]
    info = MazeInfo(
        task=TASK,
        variant=variant,
        seed=seed,
        grid_size=grid_size,
        cell_size=cell_size,
        min_moves=min_moves,
        max_moves=max_moves,
        hole_density=hole_density,
        counts=counts,
        plan_length_counts=plan_length_counts,
        chance_level=0.5 if variant == "yesno" else plan_chance_level(chance_by_split),
    )
    write_json(out_dir / "synth_info.json", info.to_dict())
    return info


def plan_chance_level(chance_by_split: dict[str, list[float]]) -> float:
    """Mean random-plan success probability over the test split, else over all splits, else 0."""
    values = chance_by_split.get("test") or [value for split in chance_by_split.values() for value in split]
    return sum(values) / len(values) if values else 0.0


def _check_knobs(
    variant: str,
    grid_size: int,
    cell_size: int,
    min_moves: int,
    max_moves: int,
    hole_density: float,
) -> None:
    def fail(knob: str, value: object, rule: str) -> DataError:
        return DataError(f"synth-maze: {knob}={value!r} is invalid: {rule}")

    if variant not in VARIANTS:
        raise fail("variant", variant, "must be 'plan' or 'yesno'")
    if grid_size < 2:
        raise fail("grid_size", grid_size, "must be >= 2")
    if cell_size < 8 or (grid_size * cell_size) % PATCH_MULTIPLE:
        raise fail(
            "cell_size",
            cell_size,
            f"must be >= 8 with grid_size * cell_size a multiple of {PATCH_MULTIPLE} (the vision patch grid)",
        )
    longest = 2 * (grid_size - 1)
    if not 1 <= min_moves <= longest:
        raise fail("min_moves", min_moves, f"must be between 1 and {longest} (corner to corner on this grid)")
    if max_moves < min_moves:
        raise fail("max_moves", max_moves, f"must be >= min_moves={min_moves}")
    if not 0.0 <= hole_density <= 0.5:
        raise fail("hole_density", hole_density, "must be between 0 and 0.5")


def _draw_board(
    rng: np.random.Generator, grid_size: int, min_moves: int, max_moves: int, hole_density: float
) -> tuple[Board, tuple[str, ...]]:
    """A random board whose shortest safe plan has `min_moves`..`max_moves` moves, and that plan."""
    cells = [(row, col) for row in range(grid_size) for col in range(grid_size)]
    for _ in range(MAX_BOARD_DRAWS):
        start = cells[int(rng.integers(len(cells)))]
        # Holes only lengthen paths, so a goal this far away has a long enough plan; the check below caps it.
        goals = [cell for cell in cells if min_moves <= _manhattan(start, cell) <= max_moves]
        if not goals:
            continue
        goal = goals[int(rng.integers(len(goals)))]
        tiles = np.where(rng.random((grid_size, grid_size)) < hole_density, HOLE, FROZEN)
        tiles[start], tiles[goal] = START, GOAL
        board = parse_board(["".join(row) for row in tiles])
        plan = shortest_plan(board)
        if plan is not None and len(plan) <= max_moves:
            return board, plan
    raise DataError(
        f"synth-maze: no board with a shortest plan of {min_moves}-{max_moves} moves in {MAX_BOARD_DRAWS} "
        "draws; lower hole_density or widen the move range"
    )


def _manhattan(a: Cell, b: Cell) -> int:
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


def _break_plan(rng: np.random.Generator, gold: tuple[str, ...]) -> tuple[str, ...]:
    """The gold plan with one move changed: the end point moves, and no shorter path exists, so it fails."""
    position = int(rng.integers(len(gold)))
    others = [action for action in ACTIONS if action != gold[position]]
    return (*gold[:position], others[int(rng.integers(len(others)))], *gold[position + 1 :])


def _draw_board_image(board: Board, agent: Cell, cell_size: int) -> Image.Image:
    image = Image.new("RGB", (board.n_cols * cell_size, board.n_rows * cell_size), GRID_LINE_COLOUR)
    draw = ImageDraw.Draw(image)
    for row, tiles in enumerate(board.rows):
        for col, tile in enumerate(tiles):
            x0, y0 = col * cell_size, row * cell_size
            draw.rectangle((x0 + 1, y0 + 1, x0 + cell_size - 1, y0 + cell_size - 1), fill=TILE_COLOURS[tile])
    inset = cell_size // 5
    x0, y0 = agent[1] * cell_size + inset, agent[0] * cell_size + inset
    draw.ellipse((x0, y0, x0 + cell_size - 1 - 2 * inset, y0 + cell_size - 1 - 2 * inset), fill=AGENT_COLOUR)
    return image


def read_board_cells(image: Image.Image, grid_size: int, cell_size: int) -> list[list[tuple[str, bool]]]:
    """The inverse of the board drawing, cell by cell: (tile, whether the agent is on it). The tile is the drawn
    colour nearest to the mean of the cell's four corners (outside the agent's circle); the agent is there when the
    mean of the cell's centre is nearer the agent's colour than to any tile's. Reads a drawn board back exactly, and
    tells how legible a reconstructed one is."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    corner = max(1, cell_size // 5 - 1)  # inside the grid line, outside the agent's inset
    centre = max(1, cell_size // 5)
    tiles = list(TILE_COLOURS)
    palette = np.array([TILE_COLOURS[tile] for tile in tiles], dtype=np.float64)
    cells = []
    for row in range(grid_size):
        line = []
        for col in range(grid_size):
            y0, x0 = row * cell_size, col * cell_size
            corners = [
                pixels[y : y + corner, x : x + corner]
                for y in (y0 + 1, y0 + cell_size - corner)
                for x in (x0 + 1, x0 + cell_size - corner)
            ]
            edge_colour = np.concatenate([c.reshape(-1, 3) for c in corners]).mean(0)
            tile = tiles[int(((palette - edge_colour) ** 2).sum(-1).argmin())]
            middle = y0 + (cell_size - centre) // 2, x0 + (cell_size - centre) // 2
            centre_colour = pixels[middle[0] : middle[0] + centre, middle[1] : middle[1] + centre]
            centre_colour = centre_colour.reshape(-1, 3).mean(0)
            agent = ((np.array(AGENT_COLOUR) - centre_colour) ** 2).sum() < (
                (palette - centre_colour) ** 2
            ).sum(-1).min()
            line.append((tile, bool(agent)))
        cells.append(line)
    return cells


def _position(cell: Cell) -> str:
    return f"row {cell[0] + 1}, column {cell[1] + 1}"


def _observation(step: Step) -> str:
    if step.outcome == "off_grid":
        return f"Moving {step.action} from {_position(step.cell)} leaves the board."
    found = {"safe": "safe", "goal": "this is the goal", "hole": "this is a hole"}[step.outcome]
    return f"The agent is at {_position(step.cell)}; {found}."


def _record(
    sample_id: str,
    variant: Variant,
    board: Board,
    gold: tuple[str, ...],
    proposed: tuple[str, ...],
    steps: list[Step],
) -> dict[str, Any]:
    valid = plan_is_valid(board, proposed)
    if variant == "plan":
        answer = format_plan(gold)
        question = f"{BOARD_DESCRIPTION} Give a shortest safe plan as a comma-separated list of moves."
        conclusion = f"The agent reached the goal in {len(gold)} moves. The plan is \\boxed{{{answer}}}."
    else:
        answer = "yes" if valid else "no"
        question = (
            f"{BOARD_DESCRIPTION} Proposed plan: {format_plan(proposed)}. Does this plan bring the agent to "
            "the goal without stepping into a hole or off the board? Answer yes or no."
        )
        if valid:
            verdict = "The plan reaches the goal safely"
        elif steps[-1].outcome == "safe":
            verdict = f"The plan ends at {_position(steps[-1].cell)}, not at the goal"
        else:
            verdict = "The plan fails"
        conclusion = f"{verdict}, so the answer is \\boxed{{{answer}}}."
    assistant: list[dict[str, str]] = []
    text = f"The agent starts at {_position(board.start)} and the goal is at {_position(board.goal)}."
    for number, step in enumerate(steps, start=1):
        assistant.append(
            {"type": "text", "text": f"{text} Move {number}: {step.action}. {DEFAULT_LATENT_MARKER}"}
        )
        assistant.append({"type": "image", "image": f"images/{sample_id}_step{number}.png"})
        text = f"<observation>{_observation(step)}</observation>"
    assistant.append({"type": "text", "text": f"{text} {conclusion}"})
    metadata: dict[str, Any] = {
        "dataset_name": TASK,
        "sample_id": sample_id,
        "answer": answer,
        "variant": variant,
        "board": list(board.rows),
        "start": [board.start[0] + 1, board.start[1] + 1],
        "goal": [board.goal[0] + 1, board.goal[1] + 1],
        "gold_plan": list(gold),
    }
    if variant == "yesno":
        metadata.update(proposed_plan=list(proposed), plan_is_valid=valid)
    return {
        "data": [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": f"images/{sample_id}.png"},
                    {"type": "text", "text": f"{question} {ANSWER_INSTRUCTION}"},
                ],
            },
            {"role": "assistant", "content": assistant},
        ],
        "metadata": metadata,
    }
