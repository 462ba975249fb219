"""`synth-arith`: multi-step arithmetic word problems, text only (README.md, "Synthetic tasks").

A person starts with some items and goes through `min_steps`..`max_steps` events drawn from templates
(buy more, give some away, receive bags of them, multiply, share equally); every operand lies in
1..`max_number` (bag counts from 2, factors 2..4) and every intermediate count is a non-negative integer.
The assistant works through one step per event and boxes the final count. Records have no images, so they
suit text-only methods and baselines. Chance level: 0, since the answer is an open integer with no fixed
set of options to guess from. Every sample is drawn from its own generator seeded by (seed, split, index),
as in synth-zoom.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from latentkit.errors import DataError
from latentkit.records import write_json, write_records
from latentkit.synth.streams import sample_streams, split_counts

TASK = "synth-arith"
VARIANTS = ("open",)
NAMES = ("Alice", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro")
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps")
MAX_FACTOR = 4
SYSTEM_PROMPT = "You are a helpful assistant."
ANSWER_INSTRUCTION = "Think step by step and put the final answer in \\boxed{}."

Variant = Literal["open"]


@dataclass(frozen=True)
class ArithInfo:
    """What was generated: written to `synth_info.json` beside the splits."""

    task: str
    variant: Variant
    seed: int
    min_steps: int
    max_steps: int
    max_number: int
    counts: dict[str, int]
    chance_level: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Template:
    """One kind of event: when it applies, how its operands are drawn, and its wording."""

    op: str
    applies: Callable[[int, int], bool]  # (count, max_number) -> usable now
    draw: Callable[[np.random.Generator, int, int], tuple[int, ...]]  # (rng, count, max_number) -> operands
    sentence: str
    working: str


def _divisors(value: int, max_number: int) -> list[int]:
    return [d for d in range(2, min(value, max_number) + 1) if value % d == 0]


TEMPLATES = (
    _Template(
        "add",
        lambda count, top: True,
        lambda rng, count, top: (int(rng.integers(1, top + 1)),),
        "{name} buys {a} more {item}.",
        "{x} + {a} = {y}.",
    ),
    _Template(
        "subtract",
        lambda count, top: count >= 1,
        lambda rng, count, top: (int(rng.integers(1, min(count, top) + 1)),),
        "{name} gives {a} {item} to {friend}.",
        "{x} - {a} = {y}.",
    ),
    _Template(
        "add_groups",
        lambda count, top: True,
        lambda rng, count, top: (int(rng.integers(2, top + 1)), int(rng.integers(1, top + 1))),
        "{friend} gives {name} {a} bags with {b} {item} in each.",
        "{a} * {b} = {ab}, and {x} + {ab} = {y}.",
    ),
    _Template(
        "multiply",
        lambda count, top: True,
        lambda rng, count, top: (int(rng.integers(2, min(MAX_FACTOR, top) + 1)),),
        "{name} then has {a} times as many {item} as before.",
        "{x} * {a} = {y}.",
    ),
    _Template(
        "share",
        lambda count, top: bool(_divisors(count, top)),
        lambda rng, count, top: (int(rng.choice(_divisors(count, top))),),
        "{name} shares the {item} equally among {a} boxes and keeps one box.",
        "{x} / {a} = {y}.",
    ),
)


def apply_op(op: str, value: int, operands: tuple[int, ...] | list[int]) -> int:
    """The count after one event; `metadata["steps"]` lists (op, operands) so answers can be recomputed."""
    if op == "add":
        return value + operands[0]
    if op == "subtract":
        return value - operands[0]
    if op == "add_groups":
        return value + operands[0] * operands[1]
    if op == "multiply":
        return value * operands[0]
    if op == "share":
        return value // operands[0]
    raise DataError(
        f"unknown synth-arith operation {op!r}; valid operations: {', '.join(t.op for t in TEMPLATES)}"
    )


def generate_synth_arith(
    out_dir: Path,
    *,
    n_train: int = 256,
    n_val: int = 32,
    n_test: int = 64,
    seed: int = 0,
    variant: Variant = "open",
    min_steps: int = 2,
    max_steps: int = 3,
    max_number: int = 20,
) -> ArithInfo:
    """Write `out_dir/{train,val,test}.json` and `synth_info.json`."""
    counts = split_counts(TASK, seed, n_train, n_val, n_test)
    _check_knobs(variant, min_steps, max_steps, max_number)
    out_dir = Path(out_dir)
    for split, count in counts.items():
        records = [
            _make_record(rng, sample_id, min_steps, max_steps, max_number)
            for _, sample_id, rng in sample_streams(TASK, seed, split, count)
        ]
        write_records(out_dir / f"{split}.json", records)
    info = ArithInfo(
        task=TASK,
        variant=variant,
        seed=seed,
        min_steps=min_steps,
        max_steps=max_steps,
        max_number=max_number,
        counts=counts,
        chance_level=0.0,
    )
    write_json(out_dir / "synth_info.json", info.to_dict())
    return info


def _check_knobs(variant: str, min_steps: int, max_steps: int, max_number: int) -> None:
    def fail(knob: str, value: object, rule: str) -> DataError:
        return DataError(f"synth-arith: {knob}={value!r} is invalid: {rule}")

    if variant not in VARIANTS:
        raise fail("variant", variant, "must be 'open'")
    if not 1 <= min_steps <= 10:
        raise fail("min_steps", min_steps, "must be between 1 and 10")
    if not min_steps <= max_steps <= 10:
        raise fail("max_steps", max_steps, f"must be between min_steps={min_steps} and 10")
    if not 2 <= max_number <= 1000:
        raise fail("max_number", max_number, "must be between 2 and 1000")


def _make_record(
    rng: np.random.Generator, sample_id: str, min_steps: int, max_steps: int, max_number: int
) -> dict[str, Any]:
    name, friend = (NAMES[i] for i in rng.choice(len(NAMES), size=2, replace=False))
    item = ITEMS[int(rng.integers(len(ITEMS)))]
    start = int(rng.integers(1, max_number + 1))
    value = start
    sentences, workings, steps = [], [], []
    for number in range(1, int(rng.integers(min_steps, max_steps + 1)) + 1):
        usable = [template for template in TEMPLATES if template.applies(value, max_number)]
        template = usable[int(rng.integers(len(usable)))]
        operands = template.draw(rng, value, max_number)
        result = apply_op(template.op, value, operands)
        a, b = (*operands, 0)[:2]
        fields = {
            "name": name,
            "friend": friend,
            "item": item,
            "a": a,
            "b": b,
            "ab": a * b,
            "x": value,
            "y": result,
        }
        sentences.append(template.sentence.format(**fields))
        workings.append(f"Step {number}: " + template.working.format(**fields))
        steps.append({"op": template.op, "operands": list(operands)})
        value = result
    question = " ".join([f"{name} has {start} {item}.", *sentences, f"How many {item} does {name} have now?"])
    working = " ".join([f"{name} starts with {start} {item}.", *workings])
    return {
        "data": [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "text", "text": f"{question} {ANSWER_INSTRUCTION}"}]},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "text",
                        "text": f"{working} So {name} has {value} {item}. The answer is \\boxed{{{value}}}.",
                    }
                ],
            },
        ],
        "metadata": {
            "dataset_name": TASK,
            "sample_id": sample_id,
            "answer": str(value),
            "variant": "open",
            "start": start,
            "steps": steps,
        },
    }
