"""Typed samples: a conversation as an ordered tuple of segments (docs/design.md, "From a record to a loss").

Records produce `text`, `image`, `aux_image` and `observation` segments; methods add
`latent` segments when they build a layout, so that kind is not part of `SegmentKind`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SegmentKind = Literal["text", "image", "aux_image", "observation"]
Role = Literal["system", "user", "assistant"]
SampleKey = tuple[str, str]  # (dataset, sample_id): sample ids are unique only within a dataset


@dataclass(frozen=True)
class Segment:
    """One piece of a conversation turn: text (`text`, `observation`) or an image path (`image`, `aux_image`)."""

    kind: SegmentKind
    role: Role
    text: str = ""
    image: Path | None = None

    def __post_init__(self) -> None:
        is_image_kind = self.kind in ("image", "aux_image")
        if is_image_kind and self.image is None:
            raise ValueError(f"a {self.kind} segment needs an image path")
        if not is_image_kind and self.image is not None:
            raise ValueError(f"a {self.kind} segment cannot hold an image")


@dataclass(frozen=True)
class Sample:
    """One training or evaluation example; `metadata` is the record's whole metadata object."""

    sample_id: str
    dataset: str
    segments: tuple[Segment, ...]
    answer: str | None = None
    choices: tuple[str, ...] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> SampleKey:
        return (self.dataset, self.sample_id)

    @property
    def images(self) -> tuple[Path, ...]:
        """Question images, in order."""
        return tuple(s.image for s in self.segments if s.kind == "image" and s.image is not None)

    @property
    def aux_images(self) -> tuple[Path, ...]:
        """Auxiliary images of the reasoning trace, in order."""
        return tuple(s.image for s in self.segments if s.kind == "aux_image" and s.image is not None)

    @property
    def has_aux_images(self) -> bool:
        return any(s.kind == "aux_image" for s in self.segments)
