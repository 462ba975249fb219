"""`synth-moves`: where does a marker land? A board state computed from the question image and its moves.

A `grid` x `grid` board of solid coloured cells, one vision token per cell (`cell_size` = 28 px, the merged
patch), with a white marker in one cell. The question lists `min_moves`..`max_moves` unit moves (up, down,
left, right; none leaves the board) and asks the colour of the cell where the marker ends. The auxiliary image
is the board after the moves, the marker in its new cell: computable from the question image and the text, yet
reading the answer off the question image needs the marker found and the moves composed in one pass, while on
the board after the moves it is one look at the marker's cell. The observation states the landing cell's
colour; the answer is boxed. Chance level: 1/6 (the landing colour is uniform over the palette).
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
from latentkit.synth.streams import sample_streams, split_counts
from latentkit.synth.zoom import PALETTE

TASK = "synth-moves"
PATCH_MULTIPLE = 28
MOVES: dict[str, tuple[int, int]] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
MARKER_COLOUR = (255, 255, 255)
SYSTEM_PROMPT = "You are a helpful assistant."
ANSWER_INSTRUCTION = "Put the final answer in \\boxed{}."

Variant = Literal["open"]


@dataclass(frozen=True)
class MovesInfo:
    """What was generated: written to `synth_info.json` beside the splits."""

    task: str
    variant: Variant
    seed: int
    grid: int
    cell_size: int
    marker_size: int
    min_moves: int
    max_moves: int
    counts: dict[str, int]
    move_count_counts: dict[str, dict[str, int]]
    chance_level: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate_synth_moves(
    out_dir: Path,
    *,
    n_train: int = 256,
    n_val: int = 32,
    n_test: int = 64,
    seed: int = 0,
    variant: Variant = "open",
    grid: int = 3,
    cell_size: int = 28,
    marker_size: int = 10,
    min_moves: int = 1,
    max_moves: int = 2,
) -> MovesInfo:
    """Write `out_dir/{train,val,test}.json`, their PNG images under `out_dir/images/`, and `synth_info.json`."""
    counts = split_counts(TASK, seed, n_train, n_val, n_test)
    _check_knobs(variant, grid, cell_size, marker_size, min_moves, max_moves)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    move_count_counts: dict[str, dict[str, int]] = {}
    for split, count in counts.items():
        records = []
        for _, sample_id, rng in sample_streams(TASK, seed, split, count):
            record, before, after = _make_sample(
                rng, sample_id, grid, cell_size, marker_size, min_moves, max_moves
            )
            before.save(out_dir / "images" / f"{sample_id}.png", format="PNG")
            after.save(out_dir / "images" / f"{sample_id}_after.png", format="PNG")
            records.append(record)
        write_records(out_dir / f"{split}.json", records)
        move_count_counts[split] = dict(
            sorted(Counter(str(len(r["metadata"]["moves"])) for r in records).items())
        )
    info = MovesInfo(
        task=TASK,
        variant=variant,
        seed=seed,
        grid=grid,
        cell_size=cell_size,
        marker_size=marker_size,
        min_moves=min_moves,
        max_moves=max_moves,
        counts=counts,
        move_count_counts=move_count_counts,
        chance_level=1.0 / len(PALETTE),
    )
    write_json(out_dir / "synth_info.json", info.to_dict())
    return info


def _check_knobs(
    variant: str, grid: int, cell_size: int, marker_size: int, min_moves: int, max_moves: int
) -> None:
    def fail(knob: str, value: object, rule: str) -> DataError:
        return DataError(f"synth-moves: {knob}={value!r} is invalid: {rule}")

    if variant != "open":
        raise fail("variant", variant, "must be 'open'")
    if grid < 2:
        raise fail("grid", grid, "must be >= 2 (a marker needs somewhere to move)")
    if cell_size <= 0 or (grid * cell_size) % PATCH_MULTIPLE:
        raise fail("cell_size", cell_size, f"grid * cell_size must be a multiple of {PATCH_MULTIPLE}")
    if not 2 <= marker_size <= cell_size - 8:
        raise fail("marker_size", marker_size, f"must be between 2 and cell_size - 8 = {cell_size - 8} px")
    if min_moves < 1:
        raise fail("min_moves", min_moves, "must be >= 1")
    if max_moves < min_moves:
        raise fail("max_moves", max_moves, f"must be >= min_moves={min_moves}")


def landing_cell(start: tuple[int, int], moves: list[str], grid: int) -> tuple[int, int]:
    """The (row, column) the marker reaches from `start` (0-based) by `moves`; a move off the board is an error."""
    row, col = start
    for move in moves:
        d_row, d_col = MOVES[move]
        row, col = row + d_row, col + d_col
        if not (0 <= row < grid and 0 <= col < grid):
            raise ValueError(f"move {move!r} leaves the {grid}x{grid} board at ({row}, {col})")
    return row, col


def _make_sample(
    rng: np.random.Generator,
    sample_id: str,
    grid: int,
    cell_size: int,
    marker_size: int,
    min_moves: int,
    max_moves: int,
) -> tuple[dict[str, Any], Image.Image, Image.Image]:
    colours = list(PALETTE)
    start = (int(rng.integers(grid)), int(rng.integers(grid)))
    moves: list[str] = []
    position = start
    for _ in range(int(rng.integers(min_moves, max_moves + 1))):
        # No move undoes the one before it, so every listed move matters.
        legal = [m for m in MOVES if _on_board(position, m, grid) and not _undoes(m, moves[-1:])]
        moves.append(legal[int(rng.integers(len(legal)))])
        position = landing_cell(position, moves[-1:], grid)
    board = [[colours[int(rng.integers(len(colours)))] for _ in range(grid)] for _ in range(grid)]
    # The landing colour is drawn last and uniformly, so the answer is uniform over the palette.
    board[position[0]][position[1]] = colours[int(rng.integers(len(colours)))]
    answer = board[position[0]][position[1]]
    before = _draw(board, start, cell_size, marker_size)
    after = _draw(board, position, cell_size, marker_size)
    moves_text = ", then ".join(moves)
    article = "an" if answer[0] in "aeiou" else "a"
    question = (
        f"The white square moves {moves_text}. What colour is the cell where it stops? {ANSWER_INSTRUCTION}"
    )
    metadata: dict[str, Any] = {
        "dataset_name": TASK,
        "sample_id": sample_id,
        "answer": answer,
        "moves": moves,
        "start_row": start[0] + 1,
        "start_col": start[1] + 1,
        "end_row": position[0] + 1,
        "end_col": position[1] + 1,
        "start_colour": board[start[0]][start[1]],
        "target_colour": answer,
    }
    record = {
        "data": [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": f"images/{sample_id}.png"},
                    {"type": "text", "text": question},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": f"Let me move it. {DEFAULT_LATENT_MARKER}"},
                    {"type": "image", "image": f"images/{sample_id}_after.png"},
                    {
                        "type": "text",
                        "text": f"<observation>It stops on {article} {answer} cell.</observation> "
                        f"The answer is \\boxed{{{answer}}}.",
                    },
                ],
            },
        ],
        "metadata": metadata,
    }
    return record, before, after


def _undoes(move: str, previous: list[str]) -> bool:
    return bool(previous) and all(a + b == 0 for a, b in zip(MOVES[move], MOVES[previous[0]]))


def _on_board(position: tuple[int, int], move: str, grid: int) -> bool:
    d_row, d_col = MOVES[move]
    return 0 <= position[0] + d_row < grid and 0 <= position[1] + d_col < grid


def _draw(board: list[list[str]], marker: tuple[int, int], cell_size: int, marker_size: int) -> Image.Image:
    size = len(board) * cell_size
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for row, colours in enumerate(board):
        for col, colour in enumerate(colours):
            x0, y0 = col * cell_size, row * cell_size
            draw.rectangle((x0, y0, x0 + cell_size - 1, y0 + cell_size - 1), fill=PALETTE[colour])
    offset = (cell_size - marker_size) // 2
    x0, y0 = marker[1] * cell_size + offset, marker[0] * cell_size + offset
    draw.rectangle((x0, y0, x0 + marker_size - 1, y0 + marker_size - 1), fill=MARKER_COLOUR)
    return image
