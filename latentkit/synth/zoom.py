"""`synth-zoom`: fine perception on a canvas of small shapes (README.md, "Synthetic tasks").

A `grid` x `grid` canvas holds one small coloured shape per cell; the question names a cell by position
and asks the colour or shape of its object. The auxiliary image is the target with `zoom_margin` pixels
of context, cropped and upscaled (the target fills it, where on the canvas it covers part of one patch); the
observation states the fact, and the answer is boxed. Every sample is drawn from its own generator seeded
by (seed, split, index), so splits are independent and a sample never depends on how many came before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from latentkit.errors import DataError
from latentkit.records import DEFAULT_LATENT_MARKER, write_json, write_records
from latentkit.synth.streams import sample_streams, split_counts

TASK = "synth-zoom"
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (135, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
# Only three shapes are drawn, so shape questions in the mc variant are padded with one that never occurs.
MC_PADDING_SHAPE = "star"
BACKGROUND = (225, 225, 225)
QUESTION_TYPES = ("colour", "shape")
MC_LETTERS = "ABCD"
PATCH_MULTIPLE = 28
SYSTEM_PROMPT = "You are a helpful assistant."
ANSWER_INSTRUCTION = "Put the final answer in \\boxed{}."

Variant = Literal["open", "mc"]
QuestionType = Literal["colour", "shape"]


@dataclass(frozen=True)
class SynthInfo:
    """What was generated: written to `synth_info.json` beside the splits."""

    task: str
    variant: Variant
    seed: int
    canvas_size: int
    grid: int
    target_size: int
    zoom_size: int
    zoom_margin: int
    counts: dict[str, int]
    question_type_counts: dict[str, dict[str, int]]
    chance_level: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Cell:
    colour: str
    shape: str
    box: tuple[int, int, int, int]  # inclusive pixel box of the shape


def chance_level(variant: Variant, question_type_mix: Mapping[str, float]) -> float:
    """Accuracy of uniform guessing: mc -> 1/4; open -> 1/6 for colour and 1/3 for shape, weighted by the mix."""
    if variant == "mc":
        return 1.0 / len(MC_LETTERS)
    total = sum(question_type_mix.values())
    if total <= 0 or set(question_type_mix) - set(QUESTION_TYPES):
        raise DataError(
            f"question_type_mix must weigh {QUESTION_TYPES} positively, got {dict(question_type_mix)}"
        )
    options = {"colour": len(PALETTE), "shape": len(SHAPES)}
    return sum(weight / options[kind] for kind, weight in question_type_mix.items()) / total


def generate_synth_zoom(
    out_dir: Path,
    *,
    n_train: int = 256,
    n_val: int = 32,
    n_test: int = 64,
    seed: int = 0,
    variant: Variant = "open",
    canvas_size: int = 112,
    grid: int = 4,
    target_size: int = 8,
    zoom_size: int = 56,
    zoom_margin: int = 2,
) -> SynthInfo:
    """Write `out_dir/{train,val,test}.json`, their PNG images under `out_dir/images/`, and `synth_info.json`."""
    counts = split_counts(TASK, seed, n_train, n_val, n_test)
    _check_knobs(variant, canvas_size, grid, target_size, zoom_size, zoom_margin)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    question_type_counts: dict[str, dict[str, int]] = {}
    for split, count in counts.items():
        records = []
        for _, sample_id, rng in sample_streams(TASK, seed, split, count):
            record, canvas, zoom = _make_sample(
                rng, sample_id, variant, canvas_size, grid, target_size, zoom_size, zoom_margin
            )
            canvas.save(out_dir / "images" / f"{sample_id}.png", format="PNG")
            zoom.save(out_dir / "images" / f"{sample_id}_zoom.png", format="PNG")
            records.append(record)
        write_records(out_dir / f"{split}.json", records)
        question_type_counts[split] = dict(
            sorted(Counter(r["metadata"]["question_type"] for r in records).items())
        )
    test_mix = question_type_counts["test"] or dict.fromkeys(QUESTION_TYPES, 1.0)
    info = SynthInfo(
        task=TASK,
        variant=variant,
        seed=seed,
        canvas_size=canvas_size,
        grid=grid,
        target_size=target_size,
        zoom_size=zoom_size,
        zoom_margin=zoom_margin,
        counts=counts,
        question_type_counts=question_type_counts,
        chance_level=chance_level(variant, test_mix),
    )
    write_json(out_dir / "synth_info.json", info.to_dict())
    return info


def _check_knobs(
    variant: str,
    canvas_size: int,
    grid: int,
    target_size: int,
    zoom_size: int,
    zoom_margin: int,
) -> None:
    def fail(knob: str, value: object, rule: str) -> DataError:
        return DataError(f"synth-zoom: {knob}={value!r} is invalid: {rule}")

    if variant not in ("open", "mc"):
        raise fail("variant", variant, "must be 'open' or 'mc'")
    for knob, size in (("canvas_size", canvas_size), ("zoom_size", zoom_size)):
        if size <= 0 or size % PATCH_MULTIPLE:
            raise fail(knob, size, f"must be a positive multiple of {PATCH_MULTIPLE} (the vision patch grid)")
    if grid < 1 or canvas_size % grid:
        raise fail("grid", grid, f"must be >= 1 and divide canvas_size={canvas_size}")
    cell_size = canvas_size // grid
    if not 4 <= target_size <= cell_size - 4:
        raise fail("target_size", target_size, f"must be between 4 and cell size - 4 = {cell_size - 4} px")
    if zoom_margin < 0:
        raise fail("zoom_margin", zoom_margin, "must be >= 0 (pixels of context around the target)")


def _make_sample(
    rng: np.random.Generator,
    sample_id: str,
    variant: Variant,
    canvas_size: int,
    grid: int,
    target_size: int,
    zoom_size: int,
    zoom_margin: int,
) -> tuple[dict[str, Any], Image.Image, Image.Image]:
    cell_size = canvas_size // grid
    cells = [
        _draw_cell_layout(rng, row, col, cell_size, target_size) for row in range(grid) for col in range(grid)
    ]
    canvas = _draw_canvas(cells, canvas_size)
    row, col = (int(v) for v in rng.integers(0, grid, size=2))
    target = cells[row * grid + col]
    zoom = canvas.crop(zoom_box(target.box, zoom_margin, canvas_size)).resize(
        (zoom_size, zoom_size), Image.Resampling.NEAREST
    )
    question_type: QuestionType = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    word = target.colour if question_type == "colour" else target.shape
    position = f"row {row + 1}, column {col + 1}"
    question = f"What {question_type} is the object at {position}?"
    metadata: dict[str, Any] = {"dataset_name": TASK, "sample_id": sample_id}
    if variant == "mc":
        choices = _mc_choices(rng, question_type, word)
        answer = MC_LETTERS[choices.index(word)]
        options = " ".join(f"({letter}) {choice}" for letter, choice in zip(MC_LETTERS, choices))
        question = f"{question} {options}. Answer with the option letter."
        metadata.update(answer=answer, choices=choices)
    else:
        answer = word
        metadata["answer"] = answer
    metadata.update(
        question_type=question_type,
        variant=variant,
        target_row=row + 1,
        target_col=col + 1,
        target_colour=target.colour,
        target_shape=target.shape,
    )
    article = "an" if target.colour[0] in "aeiou" else "a"
    record = {
        "data": [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": f"images/{sample_id}.png"},
                    {"type": "text", "text": f"{question} {ANSWER_INSTRUCTION}"},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "text",
                        "text": f"The object at {position} is small. Let me zoom in. {DEFAULT_LATENT_MARKER}",
                    },
                    {"type": "image", "image": f"images/{sample_id}_zoom.png"},
                    {
                        "type": "text",
                        "text": f"<observation>It is {article} {target.colour} {target.shape}.</observation> "
                        f"The answer is \\boxed{{{answer}}}.",
                    },
                ],
            },
        ],
        "metadata": metadata,
    }
    return record, canvas, zoom


def zoom_box(box: tuple[int, int, int, int], margin: int, canvas_size: int) -> tuple[int, int, int, int]:
    """The crop (left, top, right, bottom; right/bottom exclusive) around a target's inclusive box."""
    x0, y0, x1, y1 = box
    return (
        max(0, x0 - margin),
        max(0, y0 - margin),
        min(canvas_size, x1 + 1 + margin),
        min(canvas_size, y1 + 1 + margin),
    )


def _draw_cell_layout(
    rng: np.random.Generator, row: int, col: int, cell_size: int, target_size: int
) -> _Cell:
    colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    centred = (cell_size - target_size) // 2
    jitter = (cell_size - target_size) // 4
    dx, dy = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
    x0, y0 = col * cell_size + centred + dx, row * cell_size + centred + dy
    return _Cell(colour, shape, (x0, y0, x0 + target_size - 1, y0 + target_size - 1))


def _draw_canvas(cells: list[_Cell], canvas_size: int) -> Image.Image:
    canvas = Image.new("RGB", (canvas_size, canvas_size), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for cell in cells:
        fill = PALETTE[cell.colour]
        x0, y0, x1, y1 = cell.box
        if cell.shape == "circle":
            draw.ellipse(cell.box, fill=fill)
        elif cell.shape == "square":
            draw.rectangle(cell.box, fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return canvas


def _mc_choices(rng: np.random.Generator, question_type: QuestionType, correct: str) -> list[str]:
    pool = list(PALETTE) if question_type == "colour" else [*SHAPES, MC_PADDING_SHAPE]
    distractors = [option for option in pool if option != correct]
    picked = [distractors[i] for i in rng.choice(len(distractors), size=len(MC_LETTERS) - 1, replace=False)]
    return [[correct, *picked][i] for i in rng.permutation(len(MC_LETTERS))]
