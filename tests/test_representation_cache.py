"""The core representation cache: keys are (dataset, sample_id), any strings; duplicates refused; fingerprint;
reuse and rebuild; building striped over processes."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from latentkit.errors import CheckpointError, DataError
from latentkit.registry import StageContext
from latentkit.representation_cache import ensure_cache, fingerprint
from latentkit.segments import Sample, Segment


def sample(dataset: str, sample_id: str, text: str = "hi") -> Sample:
    return Sample(sample_id, dataset, (Segment("text", "user", text),))


def context(tmp_path: Path, events: list[dict] | None = None, rank: int = 0, world: int = 1, barrier=None):
    return StageContext(
        run_dir=tmp_path,
        stage_dir=tmp_path,
        samples=[],
        process_index=rank,
        num_processes=world,
        barrier=barrier or (lambda: None),
        log=(events if events is not None else []).append,
        load_stage_weights=lambda name: None,
        progress=False,
    )


def by_text(chunk: list[Sample]) -> list[torch.Tensor]:
    """One tensor per sample that tells the samples apart: its text's characters."""
    return [torch.tensor([float(ord(c)) for c in s.segments[0].text]) for s in chunk]


def test_same_id_in_two_datasets_reads_two_tensors(tmp_path):
    samples = [sample("Visual_CoT", "17", "ab"), sample("CogCoM", "17", "xyz")]
    cache = ensure_cache(tmp_path / "c", "teacher", "f", samples, by_text, 1, context(tmp_path))
    first, second = cache.get([("Visual_CoT", "17"), ("CogCoM", "17")])
    assert first.tolist() == [97.0, 98.0] and second.tolist() == [120.0, 121.0, 122.0]
    assert len(cache) == 2


def test_any_dataset_and_id_strings_are_safe(tmp_path):
    odd = [("a/b", "x.y"), ("a", "b/x.y"), ("ünï cöde", "__metadata__"), ("", "0"), ("d", ""), ("d", "..")]
    samples = [sample(d, i, f"{d}|{i}") for d, i in odd]
    cache = ensure_cache(tmp_path / "c", "teacher", "f", samples, by_text, 4, context(tmp_path))
    for (d, i), tensor in zip(odd, cache.get(odd)):
        assert "".join(chr(int(v)) for v in tensor.tolist()) == f"{d}|{i}"


def test_duplicate_key_is_refused_in_one_line(tmp_path):
    samples = [sample("Visual_CoT", "17"), sample("CogCoM", "17"), sample("Visual_CoT", "17", "again")]
    with pytest.raises(DataError) as error:
        ensure_cache(tmp_path / "c", "teacher", "f", samples, by_text, 4, context(tmp_path))
    message = str(error.value)
    assert "'Visual_CoT'" in message and "'17'" in message and "\n" not in message
    assert not (tmp_path / "c").exists()


def test_missing_sample_is_a_clear_error(tmp_path):
    cache = ensure_cache(tmp_path / "c", "teacher", "f", [sample("d", "x")], by_text, 4, context(tmp_path))
    assert cache.get([("d", "x")])[0].shape == (2,)
    with pytest.raises(CheckpointError, match="sample 'x' of dataset 'other' is not in the teacher cache"):
        cache.get([("other", "x")])


def test_reused_when_the_fingerprint_matches_and_rebuilt_when_not(tmp_path):
    events: list[dict] = []
    calls: list[int] = []

    def counted(chunk: list[Sample]) -> list[torch.Tensor]:
        calls.append(len(chunk))
        return by_text(chunk)

    samples = [sample("d", str(i), "t" * (i + 1)) for i in range(5)]
    for expected in ("f1", "f1", "f2"):
        cache = ensure_cache(
            tmp_path / "c", "targets", expected, samples, counted, 2, context(tmp_path, events)
        )
    assert [e["event"] for e in events] == ["cache_built", "cache_reused", "cache_stale", "cache_built"]
    assert calls == [2, 2, 1, 2, 2, 1]
    assert cache.fingerprint == "f2" and cache.name == "targets"
    assert not list(tmp_path.glob(".tmp-*"))


def test_built_striped_over_processes(tmp_path):
    """Two processes (threads sharing a barrier) each compute every other sample; one manifest holds all."""
    samples = [sample("d", str(i), "t" * (i + 1)) for i in range(7)]
    barrier = threading.Barrier(2)
    seen: dict[int, list[str]] = {0: [], 1: []}

    def run(rank: int) -> None:
        def compute(chunk: list[Sample]) -> list[torch.Tensor]:
            seen[rank].extend(s.sample_id for s in chunk)
            return by_text(chunk)

        ctx = context(tmp_path, rank=rank, world=2, barrier=lambda: barrier.wait(timeout=30))
        ensure_cache(tmp_path / "c", "teacher", "f", samples, compute, 3, ctx)

    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(run, rank) for rank in (0, 1)]:
            done.result()  # re-raises a process's error here
    assert seen == {0: ["0", "2", "4", "6"], 1: ["1", "3", "5"]}
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["samples"] == 7 and {entry[2].split("-")[1] for entry in manifest["index"]} == {
        "r000",
        "r001",
    }
    cache = ensure_cache(tmp_path / "c", "teacher", "f", samples, by_text, 3, context(tmp_path))
    assert [t.numel() for t in cache.get([s.key for s in samples])] == list(range(1, 8))


def test_fingerprint_covers_weights_data_keys_and_settings():
    a = sample("d", "1", "red")
    base = fingerprint("w", [a], {"k": 8})
    assert base == fingerprint("w", [a], {"k": 8})
    variants = {
        base,
        fingerprint("w2", [a], {"k": 8}),
        fingerprint("w", [sample("d", "1", "blue")], {"k": 8}),
        fingerprint("w", [sample("e", "1", "red")], {"k": 8}),
        fingerprint("w", [sample("d", "2", "red")], {"k": 8}),
        fingerprint("w", [a], {"k": 4}),
    }
    assert len(variants) == 6
