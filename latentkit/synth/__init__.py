"""Synthetic tasks generated deterministically from a seed into canonical records (README.md, "Synthetic tasks").

`SYNTH_TASKS` maps each task name to its generator, variants and the scorer of each variant. Every
generator has the signature `(out_dir, *, n_train, n_val, n_test, seed, variant, **knobs) -> info`, where
the knobs are its remaining keyword arguments (sizes and difficulty), and writes `synth_info.json` with at
least "task", "variant" and "chance_level". Generators are imported on first use, so that light modules
(the scorers) can import `latentkit.synth.maze_rules` without pulling in numpy and PIL.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from latentkit.errors import DataError

if TYPE_CHECKING:
    from latentkit.synth.arith import ArithInfo, generate_synth_arith
    from latentkit.synth.maze import MazeInfo, generate_synth_maze
    from latentkit.synth.moves import MovesInfo, generate_synth_moves
    from latentkit.synth.zoom import SynthInfo, chance_level, generate_synth_zoom

COMMON_ARGUMENTS = frozenset({"out_dir", "n_train", "n_val", "n_test", "seed", "variant"})
_LAZY_EXPORTS = {
    "SynthInfo": "latentkit.synth.zoom",
    "chance_level": "latentkit.synth.zoom",
    "generate_synth_zoom": "latentkit.synth.zoom",
    "MazeInfo": "latentkit.synth.maze",
    "generate_synth_maze": "latentkit.synth.maze",
    "MovesInfo": "latentkit.synth.moves",
    "generate_synth_moves": "latentkit.synth.moves",
    "ArithInfo": "latentkit.synth.arith",
    "generate_synth_arith": "latentkit.synth.arith",
}


class GeneratedInfo(Protocol):
    """What every generator returns (and writes to `synth_info.json`)."""

    @property
    def counts(self) -> dict[str, int]: ...

    @property
    def chance_level(self) -> float: ...

    @property
    def variant(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SynthTask:
    name: str
    generator: str  # "module:function"
    variants: tuple[str, ...]
    default_variant: str
    scorers: Mapping[str, str]  # variant -> scorer name (latentkit.eval.scorers)

    @property
    def generate(self) -> Callable[..., GeneratedInfo]:
        module, function = self.generator.split(":")
        return getattr(importlib.import_module(module), function)

    def knobs(self) -> dict[str, Any]:
        """The generator's knobs (keyword arguments beyond the common ones) and their defaults."""
        parameters = inspect.signature(self.generate).parameters
        return {name: p.default for name, p in parameters.items() if name not in COMMON_ARGUMENTS}

    def check_variant(self, variant: str) -> str:
        if variant not in self.variants:
            raise DataError(
                f"{self.name} has no variant {variant!r}; valid variants: {', '.join(self.variants)}"
            )
        return variant

    def parse_knobs(self, assignments: Sequence[str]) -> dict[str, Any]:
        """`["grid_size=5", "hole_density=0.3"]` -> typed values (the type of each knob's default)."""
        defaults = self.knobs()
        parsed: dict[str, Any] = {}
        for assignment in assignments:
            name, equals, text = (part.strip() for part in assignment.partition("="))
            if not equals or not name or not text:
                raise DataError(
                    f"knob {assignment!r} must be written name=value (valid knobs: {', '.join(defaults)})"
                )
            if name not in defaults:
                raise DataError(f"{self.name} has no knob {name!r}; valid knobs: {', '.join(defaults)}")
            kind = type(defaults[name])
            try:
                parsed[name] = kind(text)
            except ValueError:
                raise DataError(
                    f"knob {name}={text!r}: expected {kind.__name__} (default {defaults[name]!r})"
                ) from None
        return parsed


SYNTH_TASKS: dict[str, SynthTask] = {
    task.name: task
    for task in (
        SynthTask(
            "synth-zoom",
            "latentkit.synth.zoom:generate_synth_zoom",
            ("open", "mc"),
            "open",
            {"open": "boxed_exact", "mc": "choice_letter"},
        ),
        SynthTask(
            "synth-maze",
            "latentkit.synth.maze:generate_synth_maze",
            ("plan", "yesno"),
            "plan",
            {"plan": "plan_valid", "yesno": "boxed_exact"},
        ),
        SynthTask(
            "synth-moves",
            "latentkit.synth.moves:generate_synth_moves",
            ("open",),
            "open",
            {"open": "boxed_exact"},
        ),
        SynthTask(
            "synth-arith",
            "latentkit.synth.arith:generate_synth_arith",
            ("open",),
            "open",
            {"open": "numeric"},
        ),
    )
}


def get_synth_task(name: str) -> SynthTask:
    if name not in SYNTH_TASKS:
        raise DataError(f"unknown synthetic task {name!r}; valid tasks: {', '.join(SYNTH_TASKS)}")
    return SYNTH_TASKS[name]


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SYNTH_TASKS",
    "ArithInfo",
    "GeneratedInfo",
    "MazeInfo",
    "MovesInfo",
    "SynthInfo",
    "SynthTask",
    "chance_level",
    "generate_synth_arith",
    "generate_synth_maze",
    "generate_synth_moves",
    "generate_synth_zoom",
    "get_synth_task",
]
