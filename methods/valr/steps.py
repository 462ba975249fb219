"""Cutting a response into reasoning steps (README.md, "VaLR"); a latent segment goes before each.

Rules: `lines` (a step starts after each newline), `sentences` (after each `.`, `!` or `?` followed by space, and
after each newline), `markers` (at each match of a regex such as `Step \\d+:`), `aux_images` (only at images).
Under every rule an auxiliary image's place starts a step, and that image is the step's target; every other step
targets the question image (none for a text-only record: its steps are not aligned). Text is split, never
changed: the pieces of a response concatenate to the original. A turn's first segment always starts a step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

from latentkit.segments import Sample, Segment

_SENTENCE_END = re.compile(r"(?<=[.!?])(?=\s)|(?<=\n)")
_LINE_END = re.compile(r"(?<=\n)")


@dataclass(frozen=True)
class Steps:
    """`sample` with its response text split at step starts; `starts[j]` is the segment index where step j begins
    and `targets[j]` the index into `sample_images` of its target image (None: no target)."""

    sample: Sample
    starts: tuple[int, ...]
    targets: tuple[int | None, ...]


def sample_images(sample: Sample) -> tuple[Path, ...]:
    """The images a step can target, in a fixed order: the first question image (if any), then the auxiliary ones."""
    return (*sample.images[:1], *sample.aux_images)


def _split_points(text: str, rule: str, marker: re.Pattern[str]) -> list[int]:
    """Offsets inside `text` (0 < offset < len) where a new step begins."""
    if rule == "lines":
        points = [m.start() for m in _LINE_END.finditer(text)]
    elif rule == "sentences":
        points = [m.start() for m in _SENTENCE_END.finditer(text)]
    elif rule == "markers":
        # The spaces before a marker go with it, so "... 2. Step 3:" splits as "... 2." + " Step 3:".
        points = [len(text[: m.start()].rstrip(" \t")) for m in marker.finditer(text)]
    else:
        points = []
    return sorted({p for p in points if 0 < p < len(text)})


def _pieces(text: str, points: list[int]) -> list[str]:
    """`text` cut at `points`; a later piece of whitespace only joins the piece before it (a leading one stays
    apart: it ends the step before this segment)."""
    cuts = [0, *points, len(text)]
    merged: list[str] = []
    for piece in (text[a:b] for a, b in pairwise(cuts) if b > a):
        if merged and not piece.strip():
            merged[-1] += piece
        else:
            merged.append(piece)
    return merged


def _starts_step(previous: str, text: str, rule: str, marker: re.Pattern[str]) -> bool:
    """Whether a text or observation segment begins a new step, given the text of the segment before it."""
    if rule == "lines":
        return previous.endswith("\n")
    if rule == "sentences":
        return previous.endswith("\n") or previous.rstrip().endswith((".", "!", "?"))
    if rule == "markers":
        return marker.match(text.lstrip()) is not None
    return False


def cut_steps(sample: Sample, rule: str, marker: str) -> Steps:
    pattern = re.compile(marker)
    question = 0 if sample.images else None
    aux_index = 1 if sample.images else 0
    segments: list[Segment] = []
    starts: list[int] = []
    targets: list[int | None] = []
    role = None
    previous = ""  # the text of the response segment before this one ("" after an image)
    for segment in sample.segments:
        new_turn = segment.role != role
        role = segment.role
        if role != "assistant":
            segments.append(segment)
            continue
        if segment.kind == "aux_image":
            starts.append(len(segments))
            targets.append(aux_index)
            aux_index += 1
            segments.append(segment)
            previous = ""
            continue
        if segment.kind == "image" or not segment.text:
            segments.append(segment)
            continue
        pieces = (
            _pieces(segment.text, _split_points(segment.text, rule, pattern))
            if segment.kind == "text"
            else [segment.text]
        )
        for number, piece in enumerate(pieces):
            first = number == 0
            if first and not new_turn and not piece.strip():
                opens = False  # whitespace that ends the step before
            else:
                opens = (
                    not first or new_turn or bool(previous and _starts_step(previous, piece, rule, pattern))
                )
            if opens:
                starts.append(len(segments))
                targets.append(question)
            segments.append(replace(segment, text=piece))
            previous = previous + piece if first and not opens else piece
    return Steps(replace(sample, segments=tuple(segments)), tuple(starts), tuple(targets))
