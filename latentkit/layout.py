"""Layouts: one sample as tokens, each carrying its segment kind and index, labels and loss weights, image
and latent slots and position ids; and `Batch`, the right-padded collation of layouts.

Segment kinds are the built-in `Kind` codes plus those methods register for themselves (`register_kind`);
`kind_name` turns any code back into its name for display.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, fields
from enum import IntEnum
from pathlib import Path

import torch
from PIL import Image

from latentkit.backbone import Backbone, ImageInput
from latentkit.errors import DataError, RegistryError
from latentkit.segments import SampleKey

IGNORE_INDEX = -100


class Kind(IntEnum):
    """Per-token segment kind; masks, labels, weights and diagnostics are computed from it."""

    PAD = -1
    TEXT = 0
    IMAGE = 1
    AUX_IMAGE = 2
    LATENT = 3
    OBSERVATION = 4


KIND_DTYPE = torch.int16  # per-token kinds: room for method kinds above the built-in codes
FIRST_METHOD_KIND = 16
_METHOD_KIND_COUNT = torch.iinfo(KIND_DTYPE).max + 1 - FIRST_METHOD_KIND
_method_kinds: dict[int, str] = {}


def register_kind(name: str) -> int:
    """A method's own segment kind (e.g. "code"), usable wherever a `Kind` is; returns its code.

    The code (>= FIRST_METHOD_KIND) is derived from the name, so it is the same in every process and run;
    registering a name again returns the same code. Two names that hash to one code are an error.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise RegistryError(f"segment kind name {name!r} is invalid; use lower-case letters, digits and _")
    if name.upper() in Kind.__members__:
        raise RegistryError(f"segment kind {name!r} is built in; use Kind.{name.upper()} instead")
    digest = hashlib.sha256(name.encode()).digest()
    code = FIRST_METHOD_KIND + int.from_bytes(digest[:8], "big") % _METHOD_KIND_COUNT
    owner = _method_kinds.setdefault(code, name)
    if owner != name:
        raise RegistryError(
            f"segment kind {name!r} gets code {code}, which {owner!r} already has; rename one"
        )
    return code


def kind_name(code: int) -> str:
    """The name of a built-in or registered segment kind code ("text", "aux_image", "pad", "code", ...)."""
    code = int(code)
    if code in _method_kinds:
        return _method_kinds[code]
    if code in {int(kind) for kind in Kind}:
        return Kind(code).name.lower()
    raise RegistryError(f"no segment kind has code {code}; a method must register_kind its kinds before use")


@dataclass(frozen=True)
class ImageSlot:
    image: ImageInput
    kind: int  # Kind.IMAGE, Kind.AUX_IMAGE or a registered kind
    start: int  # first image token (after the vision-start token)
    end: int  # one past the last image token
    segment_index: int


@dataclass(frozen=True)
class LatentSlot:
    start: int  # the start token
    end: int  # the end token; the K slots are (start, end)
    segment_index: int


@dataclass(frozen=True)
class EmbeddingSlot:
    """Vectors written into `inputs_embeds` at [start, start + n) (prompt embeddings); never targets."""

    start: int
    vectors: torch.Tensor  # [n, D]
    segment_index: int


@dataclass
class Layout:
    dataset: str
    sample_id: str
    input_ids: torch.Tensor  # long [N]
    kinds: torch.Tensor  # KIND_DTYPE [N]: Kind values or registered kind codes
    segment_index: torch.Tensor  # int32 [N]
    labels: torch.Tensor  # long [N]: the token's own id where it is a training target, else IGNORE_INDEX
    loss_weight: torch.Tensor  # float [N]
    position_ids: torch.Tensor  # long [N] or [3, N]
    images: list[ImageSlot]
    latents: list[LatentSlot]
    embeddings: list[EmbeddingSlot] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def key(self) -> SampleKey:
        return (self.dataset, self.sample_id)


def latent_slot_positions(layout: Layout) -> list[int]:
    """Positions of the K slots of every latent block, in order (start and end tokens excluded)."""
    return [p for latent in layout.latents for p in range(latent.start + 1, latent.end)]


@dataclass
class LayoutBuilder:
    """Appends tokens of typed segments; `build` computes position ids through the backbone."""

    backbone: Backbone
    ids: list[int] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    images: list[ImageSlot] = field(default_factory=list)
    latents: list[LatentSlot] = field(default_factory=list)
    embeddings: list[EmbeddingSlot] = field(default_factory=list)

    def add_ids(
        self, ids: list[int], kind: int, segment_index: int, train: bool = False, weight: float = 1.0
    ) -> None:
        """`kind`: a `Kind` or a code from `register_kind`."""
        kind_name(kind)  # an unregistered code is refused here, not found later in a mask or a metric
        self.ids.extend(ids)
        self.kinds.extend([int(kind)] * len(ids))
        self.segments.extend([segment_index] * len(ids))
        self.labels.extend(ids if train else [IGNORE_INDEX] * len(ids))
        self.weights.extend([weight if train else 0.0] * len(ids))

    def add_text(
        self, text: str, kind: int, segment_index: int, train: bool = False, weight: float = 1.0
    ) -> None:
        self.add_ids(self.backbone.encode_text(text), kind, segment_index, train, weight)

    def add_token(
        self, token: str, kind: int, segment_index: int, train: bool = False, weight: float = 1.0
    ) -> None:
        self.add_ids([self.backbone.token_id(token)], kind, segment_index, train, weight)

    def add_image(self, path: Path, kind: int, segment_index: int, start_is_target: bool = False) -> None:
        """vision-start, one placeholder per merged patch, vision-end; only vision-start can be a target."""
        try:
            with Image.open(path) as image:
                processed = self.backbone.preprocess_image(image)
        except OSError as exc:
            raise DataError(f"image {path} cannot be read ({exc}); fix or remove the file") from exc
        chat = self.backbone.chat
        self.add_token(chat.vision_start, kind, segment_index, train=start_is_target)
        start = len(self.ids)
        self.add_ids([self.backbone.token_id(chat.image_pad)] * processed.num_tokens, kind, segment_index)
        self.images.append(ImageSlot(processed, kind, start, len(self.ids), segment_index))
        self.add_token(chat.vision_end, kind, segment_index)

    def add_latent(
        self,
        start_token: str,
        slot_token: str,
        end_token: str,
        k: int,
        segment_index: int,
        train_start: bool = False,
        train_end: bool = False,
    ) -> None:
        """start token, K latent slots (filled later through inputs_embeds), end token; slots are never targets."""
        start = len(self.ids)
        self.add_token(start_token, Kind.LATENT, segment_index, train=train_start)
        self.add_ids([self.backbone.token_id(slot_token)] * k, Kind.LATENT, segment_index)
        self.add_token(end_token, Kind.LATENT, segment_index, train=train_end)
        self.latents.append(LatentSlot(start, len(self.ids) - 1, segment_index))

    def add_embeddings(self, vectors: torch.Tensor, segment_index: int, kind: int = Kind.TEXT) -> None:
        """Continuous vectors [n, D] as n positions (the pad token's id stands for them in `input_ids`)."""
        vectors = vectors.reshape(-1, vectors.shape[-1])
        start = len(self.ids)
        self.add_ids([self.backbone.token_id(self.backbone.chat.pad)] * vectors.shape[0], kind, segment_index)
        self.embeddings.append(EmbeddingSlot(start, vectors, segment_index))

    def build(self, sample_id: str, dataset: str) -> Layout:
        """The layout of sample `sample_id` of `dataset` (together the sample's key)."""
        input_ids = torch.tensor(self.ids, dtype=torch.long)
        return Layout(
            dataset=dataset,
            sample_id=sample_id,
            input_ids=input_ids,
            kinds=torch.tensor(self.kinds, dtype=KIND_DTYPE),
            segment_index=torch.tensor(self.segments, dtype=torch.int32),
            labels=torch.tensor(self.labels, dtype=torch.long),
            loss_weight=torch.tensor(self.weights, dtype=torch.float32),
            position_ids=self.backbone.position_ids(input_ids, [slot.image.grid_thw for slot in self.images]),
            images=list(self.images),
            latents=list(self.latents),
            embeddings=list(self.embeddings),
        )


@dataclass
class Batch:
    keys: list[SampleKey]  # (dataset, sample_id) per row
    input_ids: torch.Tensor  # [B, N], right-padded
    kinds: torch.Tensor  # [B, N], Kind.PAD on padding
    segment_index: torch.Tensor  # [B, N]
    labels: torch.Tensor  # [B, N]
    loss_weight: torch.Tensor  # [B, N]
    valid: torch.Tensor  # bool [B, N]: real tokens
    position_ids: torch.Tensor  # [B, N] or [3, B, N]
    pixel_values: torch.Tensor | None  # all images' patches, in (sample, position) order
    image_grid_thw: torch.Tensor | None  # [num_images, 3]
    layouts: list[Layout]

    def to(self, device: torch.device) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return Batch(**moved)

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def collate(layouts: list[Layout], pad_id: int) -> Batch:
    size, length = len(layouts), max(len(layout) for layout in layouts)

    def padded(name: str, value: float, dtype: torch.dtype) -> torch.Tensor:
        out = torch.full((size, length), value, dtype=dtype)
        for row, layout in enumerate(layouts):
            out[row, : len(layout)] = getattr(layout, name)
        return out

    first_positions = layouts[0].position_ids
    position_ids = torch.zeros((*first_positions.shape[:-1], size, length), dtype=torch.long)
    for row, layout in enumerate(layouts):
        position_ids[..., row, : len(layout)] = layout.position_ids
    valid = torch.zeros(size, length, dtype=torch.bool)
    for row, layout in enumerate(layouts):
        valid[row, : len(layout)] = True
    images = [slot.image for layout in layouts for slot in layout.images]
    return Batch(
        keys=[layout.key for layout in layouts],
        input_ids=padded("input_ids", pad_id, torch.long),
        kinds=padded("kinds", int(Kind.PAD), KIND_DTYPE),
        segment_index=padded("segment_index", -1, torch.int32),
        labels=padded("labels", IGNORE_INDEX, torch.long),
        loss_weight=padded("loss_weight", 0.0, torch.float32),
        valid=valid,
        position_ids=position_ids,
        pixel_values=torch.cat([image.pixel_values for image in images]) if images else None,
        image_grid_thw=torch.tensor([image.grid_thw for image in images]) if images else None,
        layouts=layouts,
    )


def inputs_embeds(backbone: Backbone, batch: Batch) -> torch.Tensor:
    """Token embeddings with every image's vision-tower output, and every embedding slot's vectors, written
    into their placeholder positions."""
    embeds = backbone.embed(batch.input_ids)
    if any(layout.embeddings for layout in batch.layouts):
        embeds = embeds.clone()
        for row, layout in enumerate(batch.layouts):
            for slot in layout.embeddings:
                end = slot.start + slot.vectors.shape[0]
                embeds[row, slot.start : end] = slot.vectors.to(embeds)
    if batch.pixel_values is None:
        return embeds
    image_positions = torch.zeros_like(batch.valid)
    for row, layout in enumerate(batch.layouts):
        for slot in layout.images:
            image_positions[row, slot.start : slot.end] = True
    image_embeds = backbone.encode_images(batch.pixel_values, batch.image_grid_thw)
    return embeds.masked_scatter(image_positions.unsqueeze(-1), image_embeds.to(embeds.dtype))
