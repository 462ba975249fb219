"""Stage artifacts (teacher representations, target latents, encoder features) as safetensors shards, one
tensor per sample, keyed by (dataset, sample_id): sample ids are unique only within a dataset.

A cache directory holds `manifest.json` (name, fingerprint, and per sample: dataset, sample id, shard, tensor
name) and the shards. Tensor names are generated, so any dataset or id string is safe. The fingerprint
covers the weights the tensors came from, the samples and the settings that shape the tensors; a cache whose
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
from latentkit.errors import CheckpointError, DataError
from latentkit.registry import StageContext
from latentkit.segments import Sample, SampleKey

MANIFEST = "manifest.json"
SHARD_SAMPLES = 256
FORMAT = 2  # 2: keys are (dataset, sample_id); part of the fingerprint, so older caches are rebuilt

Compute = Callable[[list[Sample]], list[torch.Tensor]]


def fingerprint(weights: str, samples: Sequence[Sample], settings: dict[str, Any]) -> str:
    """sha256 over the weights' fingerprint, every sample's key and content, and the settings that shape the
    tensors.

    Images count by file name and size, not by absolute path, so a moved dataset or run directory stays valid.
    """
    digest = hashlib.sha256(f"{FORMAT}:{weights}".encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for sample in samples:
        segments = [(s.kind, s.role, s.text, _image_key(s.image)) for s in sample.segments]
        digest.update(json.dumps([sample.dataset, sample.sample_id, segments]).encode())
    return digest.hexdigest()[:16]


def _image_key(image: Path | None) -> str | None:
    if image is None:
        return None
    return f"{image.name}:{image.stat().st_size}" if image.is_file() else image.name


class RepresentationCache:
    """Read side: tensors by (dataset, sample_id), shards opened lazily."""

    def __init__(self, directory: Path):
        self.directory = directory
        manifest = json.loads((directory / MANIFEST).read_text())
        self.name: str = manifest["name"]
        self.fingerprint: str = manifest["fingerprint"]
        self.index: dict[SampleKey, tuple[str, str]] = {
            (dataset, sample_id): (shard, tensor) for dataset, sample_id, shard, tensor in manifest["index"]
        }
        self._shards: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def get(self, keys: Sequence[SampleKey]) -> list[torch.Tensor]:
        tensors = []
        for dataset, sample_id in keys:
            entry = self.index.get((dataset, sample_id))
            if entry is None:
                raise CheckpointError(
                    f"sample {sample_id!r} of dataset {dataset!r} is not in the {self.name} cache "
                    f"{self.directory}; delete that folder to rebuild it"
                )
            shard, tensor = entry
            if shard not in self._shards:
                self._shards[shard] = safe_open(str(self.directory / shard), framework="pt")
            tensors.append(self._shards[shard].get_tensor(tensor))
        return tensors


def cache_fingerprint(directory: Path) -> str | None:
    manifest = directory / MANIFEST
    return json.loads(manifest.read_text())["fingerprint"] if manifest.is_file() else None


def ensure_cache(
    directory: Path,
    name: str,
    expected: str,
    samples: list[Sample],
    compute: Compute,
    batch_size: int,
    context: StageContext,
) -> RepresentationCache:
    """The cache at `directory` if its fingerprint is `expected`; else build it (all processes take part).

    `name` says what it holds ("teacher", "targets"), in messages and logged events; `compute` maps a chunk of
    samples to one tensor each.
    """
    _refuse_duplicate_keys(samples)
    found = cache_fingerprint(directory)
    if found == expected:
        context.log({"event": "cache_reused", "cache": name, "fingerprint": expected})
        return RepresentationCache(directory)
    if found is not None:
        context.log({"event": "cache_stale", "cache": name, "found": found, "expected": expected})
        if context.is_main_process:
            print(
                f"{name} cache {directory} was built from other weights or data ({found} != {expected}); rebuilding"
            )
    _build(directory, name, expected, samples, compute, batch_size, context)
    context.log({"event": "cache_built", "cache": name, "fingerprint": expected, "samples": len(samples)})
    return RepresentationCache(directory)


def _refuse_duplicate_keys(samples: Sequence[Sample]) -> None:
    seen: set[SampleKey] = set()
    for sample in samples:
        if sample.key in seen:
            raise DataError(
                f"dataset {sample.dataset!r} has two samples with id {sample.sample_id!r}; sample ids must be "
                "unique within a dataset (fix or drop one of the records)"
            )
        seen.add(sample.key)


def _build(
    directory: Path,
    name: str,
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
    index: list[tuple[str, str, str, str]] = []  # dataset, sample id, shard, tensor name
    pending: dict[str, torch.Tensor] = {}
    pending_keys: list[SampleKey] = []
    shard_count = 0

    def flush() -> None:
        nonlocal shard_count
        if pending:
            shard = f"shard-r{context.process_index:03d}-{shard_count:05d}.safetensors"
            save_file(pending, str(staging / shard))
            index.extend((*key, shard, tensor) for key, tensor in zip(pending_keys, pending, strict=True))
            pending.clear()
            pending_keys.clear()
            shard_count += 1

    bar = tqdm(
        total=len(mine), desc=f"{name} cache", disable=not (context.progress and context.is_main_process)
    )
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        for sample, tensor in zip(chunk, compute(chunk), strict=True):
            pending[str(len(pending))] = tensor.detach().cpu().contiguous()
            pending_keys.append(sample.key)
        if len(pending) >= SHARD_SAMPLES:
            flush()
        bar.update(len(chunk))
    flush()
    bar.close()
    (staging / f"index-r{context.process_index:03d}.json").write_text(json.dumps(index))
    context.barrier()
    if context.is_main_process:
        merged: list[list[str]] = []
        for part in sorted(staging.glob("index-r*.json")):
            merged.extend(json.loads(part.read_text()))
            part.unlink()
        manifest = {"name": name, "fingerprint": expected, "samples": len(merged), "index": merged}
        (staging / MANIFEST).write_text(json.dumps(manifest) + "\n")
        replace_directory(staging, directory)
    context.barrier()
