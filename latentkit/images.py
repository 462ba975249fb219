"""Writing images a method drew (e.g. the boards a model imagined) as PNG files, never replacing one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from latentkit.errors import ConfigError


def save_images(images: Sequence[Image.Image], directory: Path, prefix: str = "image") -> list[Path]:
    """Write `directory/<prefix>-<index>.png` (index from 1, zero-padded to 3); refuses, before writing any, to
    replace a file that exists."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} is a file, not a directory: save the images into a directory")
    paths = [directory / f"{prefix}-{index:03d}.png" for index in range(1, len(images) + 1)]
    existing = [path for path in paths if path.exists()]
    if existing:
        raise ConfigError(
            f"{existing[0]} exists and would be overwritten: save the images into an empty directory or use another prefix"
        )
    directory.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths, strict=True):
        image.save(path, format="PNG")
    return paths
