"""latentkit: train and compare latent-reasoning methods for vision-language models.

The Python API (`latentkit.train`, `.load`, `.generate`, `.evaluate`) is imported on first use, so that
`import latentkit` and the CLI's `--help` stay fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["evaluate", "generate", "load", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from latentkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'latentkit' has no attribute {name!r}")
