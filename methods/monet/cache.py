"""Stage artifacts as safetensors shards keyed by sample id (teacher representations, target latents).

A cache directory holds `manifest.json` (kind, fingerprint, sample id -> shard) and the shards. The fingerprint
covers the weights the representations came from, the samples and the layout settings; a cache whose
fingerprint differs is rebuilt (and the rebuild logged), never reused. Building is striped over processes and
written to a temp directory renamed into place, so a cache that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentkit.checkpoint import replace_directory
from latentkit.errors import CheckpointError
from latentkit.registry import StageContext
from latentkit.segments import Sample

MANIFEST = "manifest.json"
SHARD_SAMPLES = 256

Compute = Callable[[list[Sample]], list[torch.Tensor]]


def fingerprint(weights: str, samples: Sequence[Sample], settings: dict[str, Any]) -> str:
    """sha256 over the weights' fingerprint, every sample's content, and the settings that shape the tensors.

    Images count by file name and size, not by absolute path, so a moved dataset or run directory stays valid.
    """
    digest = hashlib.sha256(weights.encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for sample in samples:
        segments = [(s.kind, s.role, s.text, _image_key(s.image)) for s in sample.segments]
        digest.update(json.dumps([sample.sample_id, segments]).encode())
    return digest.hexdigest()[:16]


def _image_key(image: Path | None) -> str | None:
    if image is None:
        return None
    return f"{image.name}:{image.stat().st_size}" if image.is_file() else image.name


class RepresentationCache:
    """Read side: tensors by sample id, shards opened lazily."""

    def __init__(self, directory: Path):
        self.directory = directory
        manifest = json.loads((directory / MANIFEST).read_text())
        self.kind: str = manifest["kind"]
        self.fingerprint: str = manifest["fingerprint"]
        self.index: dict[str, str] = manifest["index"]
        self._shards: dict[str, Any] = {}

    def get(self, sample_ids: Sequence[str]) -> list[torch.Tensor]:
        tensors = []
        for sample_id in sample_ids:
            shard = self.index.get(sample_id)
            if shard is None:
                raise CheckpointError(
                    f"sample {sample_id} is not in the {self.kind} cache {self.directory}; delete that folder to rebuild it"
                )
            if shard not in self._shards:
                self._shards[shard] = safe_open(str(self.directory / shard), framework="pt")
            tensors.append(self._shards[shard].get_tensor(sample_id))
        return tensors


def cache_fingerprint(directory: Path) -> str | None:
    manifest = directory / MANIFEST
    return json.loads(manifest.read_text())["fingerprint"] if manifest.is_file() else None


def ensure_cache(
    directory: Path,
    kind: str,
    expected: str,
    samples: list[Sample],
    compute: Compute,
    batch_size: int,
    context: StageContext,
) -> RepresentationCache:
    """The cache at `directory` if its fingerprint is `expected`; else build it (all processes take part)."""
    found = cache_fingerprint(directory)
    if found == expected:
        context.log({"event": "cache_reused", "cache": kind, "fingerprint": expected})
        return RepresentationCache(directory)
    if found is not None:
        context.log({"event": "cache_stale", "cache": kind, "found": found, "expected": expected})
        if context.is_main_process:
            print(
                f"{kind} cache {directory} was built from other weights or data ({found} != {expected}); rebuilding"
            )
    _build(directory, kind, expected, samples, compute, batch_size, context)
    context.log({"event": "cache_built", "cache": kind, "fingerprint": expected, "samples": len(samples)})
    return RepresentationCache(directory)


def _build(
    directory: Path,
    kind: str,
    expected: str,
    samples: list[Sample],
    compute: Compute,
    batch_size: int,
    context: StageContext,
) -> None:
    from tqdm.auto import tqdm

    staging = directory.with_name(f".tmp-{directory.name}")
    if context.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    context.barrier()
    mine = samples[context.process_index :: context.num_processes]
    index: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    shard_count = 0

    def flush() -> None:
        nonlocal shard_count
        if pending:
            name = f"shard-r{context.process_index:03d}-{shard_count:05d}.safetensors"
            save_file(pending, str(staging / name))
            index.update(dict.fromkeys(pending, name))
            pending.clear()
            shard_count += 1

    bar = tqdm(
        total=len(mine), desc=f"{kind} cache", disable=not (context.progress and context.is_main_process)
    )
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        for sample, tensor in zip(chunk, compute(chunk), strict=True):
            pending[sample.sample_id] = tensor.detach().cpu().contiguous()
        if len(pending) >= SHARD_SAMPLES:
            flush()
        bar.update(len(chunk))
    flush()
    bar.close()
    (staging / f"index-r{context.process_index:03d}.json").write_text(json.dumps(index))
    context.barrier()
    if context.is_main_process:
        merged: dict[str, str] = {}
        for part in sorted(staging.glob("index-r*.json")):
            merged.update(json.loads(part.read_text()))
            part.unlink()
        manifest = {"kind": kind, "fingerprint": expected, "samples": len(merged), "index": merged}
        (staging / MANIFEST).write_text(json.dumps(manifest) + "\n")
        replace_directory(staging, directory)
    context.barrier()
