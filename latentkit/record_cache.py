"""The record cache: training records parsed and validated once into an Arrow table on disk, memory-mapped by
every process and reused by later runs (docs/design.md, "Data pipeline").

One cache folder per fingerprint of the record files (absolute path, size, modification time) and the loader
settings, so a changed file or setting builds a new cache and an old one is never read for new data. The table
keeps every record's outcome, a parsed sample or its one-line error, so `data.on_bad_record` and `data.limit`
apply when the cache is read, without a rebuild. Images are checked when the cache is built (exists, inside the
dataset root, decodes) and opened again only when a layout needs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow.compute as pc

from latentkit.errors import DataError
from latentkit.records import (
    BadRecord,
    LoadedRecords,
    OnBadRecord,
    RecordRules,
    bad_record_message,
    base_dirs_of,
    invalid_json_line_message,
    parse_record,
    record_files,
    record_items,
)
from latentkit.segments import Sample, Segment

CACHE_FORMAT = 1  # part of the fingerprint: bump when the columns or the validation change
META_FILE = "latentkit_cache.json"  # written last: a folder without it is an unfinished build
READ_BATCH = 1024  # rows read at a time when iterating


def _features() -> Any:
    from datasets import Features, List, Value

    segment = {
        "kind": Value("string"),
        "role": Value("string"),
        "text": Value("string"),
        "image": Value("string"),
    }
    return Features(
        {
            "sample_id": Value("string"),
            "dataset": Value("string"),
            "source": Value("string"),  # the sub-dataset (data.mix names these)
            "segments": List(segment),
            "answer": Value("string"),
            "choices": List(Value("string")),
            "metadata": Value("string"),  # the record's metadata object as JSON
            "reason": Value("string"),  # a bad record's reason (skip counts); null for a good one
            "error": Value("string"),  # a bad record's one-line error; null for a good one
        }
    )


def source_name(record_file: Path, rules: RecordRules) -> str:
    """The sub-dataset of a record file: its sub-folder of the dataset folder, else the dataset folder's name."""
    folder = Path(os.path.normpath(record_file.absolute().parent))
    return rules.root.name if folder == rules.root else folder.relative_to(rules.root).parts[0]


def cache_fingerprint(files: Sequence[Path], rules: RecordRules, split: str) -> str:
    settings = {
        "format": CACHE_FORMAT,
        "rules": [str(value) for value in vars(rules).values()],
        "split": split,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for record_file in files:
        stat = record_file.stat()
        digest.update(f"{record_file.absolute()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


class CachedSamples(Sequence[Sample]):
    """The good records of a cache as `Sample`s, decoded from the memory-mapped table on access."""

    def __init__(self, table: Any, rows: np.ndarray) -> None:
        self.table, self.rows = table, rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...
    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return self._decode(self.rows[index])
        return self._decode(self.rows[[index]])[0]

    def __iter__(self) -> Iterator[Sample]:
        for start in range(0, len(self.rows), READ_BATCH):
            yield from self._decode(self.rows[start : start + READ_BATCH])

    @property
    def sources(self) -> list[str]:
        """The sub-dataset of each sample, in order."""
        column = self.table.data.column("source").to_numpy(zero_copy_only=False)
        return column[self.rows].tolist()

    def _decode(self, rows: np.ndarray) -> list[Sample]:
        if len(rows) == 0:
            return []
        columns = self.table[rows.tolist()]
        return [_sample({name: columns[name][i] for name in columns}) for i in range(len(rows))]


def _sample(row: dict[str, Any]) -> Sample:
    segments = tuple(
        Segment(s["kind"], s["role"], text=s["text"], image=None if s["image"] is None else Path(s["image"]))
        for s in row["segments"]
    )
    choices = row["choices"]
    return Sample(
        sample_id=row["sample_id"],
        dataset=row["dataset"],
        segments=segments,
        answer=row["answer"],
        choices=None if choices is None else tuple(choices),
        metadata=json.loads(row["metadata"]),
    )


def load_cached_records(
    path: Path,
    rules: RecordRules,
    cache_dir: Path,
    *,
    split: str = "train",
    on_bad_record: OnBadRecord = "error",
    limit: int | None = None,
    num_proc: int = 1,
) -> LoadedRecords:
    """The records under `path` through the cache in `cache_dir` (built first when missing or stale): the first
    `limit` good ones, with bad ones before them raised (`error`) or counted (`skip`) as `load_records` does."""
    files = record_files(Path(path), split)
    fingerprint = cache_fingerprint(files, rules, split)
    folder = Path(cache_dir) / fingerprint
    if not (folder / META_FILE).is_file():
        build_cache(files, rules, split, folder, num_proc)
    from datasets import load_from_disk

    table = load_from_disk(str(folder))  # memory-mapped
    errors = table.data.column("error")
    good = np.flatnonzero(pc.is_null(errors).to_numpy(zero_copy_only=False))
    if limit is not None:
        good = good[:limit]
    end = int(good[-1]) + 1 if limit is not None and len(good) == limit else len(table)
    bad = np.flatnonzero(pc.is_valid(errors.slice(0, end)).to_numpy(zero_copy_only=False))
    if len(bad) and on_bad_record == "error":
        raise DataError(errors[int(bad[0])].as_py())
    reasons = Counter(table.data.column("reason").take(bad).to_pylist())
    return LoadedRecords(samples=CachedSamples(table, good), skipped=len(bad), skip_reasons=reasons)


def build_cache(files: Sequence[Path], rules: RecordRules, split: str, folder: Path, num_proc: int) -> None:
    """Parse and validate every record of `files` (`num_proc` processes) into `folder`, atomically; older caches
    of the same dataset and split are removed."""
    from datasets import Dataset, Features, Value
    from datasets.exceptions import DatasetGenerationError
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    started = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = folder.parent / f".build-{folder.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    bars_on = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        names = [str(f.absolute()) for f in files]
        raw_features = Features(
            {"file": Value("int32"), "location": Value("string"), "text": Value("string")}
        )
        try:
            raw = Dataset.from_generator(
                _raw_rows,
                features=raw_features,
                cache_dir=str(work / "raw"),
                gen_kwargs={"files": list(enumerate(names))},
            )
        except DatasetGenerationError as err:
            if isinstance(err.__cause__, DataError):  # a whole-file problem (not UTF-8, not a JSON array)
                raise err.__cause__ from None
            raise
        parsed = raw.map(
            _validate_batch,
            batched=True,
            batch_size=256,
            num_proc=num_proc if num_proc > 1 and len(raw) > 1 else None,
            remove_columns=raw.column_names,
            features=_features(),
            fn_kwargs={"files": names, "sources": [source_name(f, rules) for f in files], "rules": rules},
            load_from_cache_file=False,
            cache_file_name=str(work / "parsed" / "parsed.arrow"),
        )
        staged = work / "table"
        parsed.save_to_disk(str(staged))
        meta = {
            "fingerprint": folder.name,
            "format": CACHE_FORMAT,
            "root": str(rules.root),
            "split": split,
            "files": names,
            "records": len(parsed),
            "seconds": round(time.perf_counter() - started, 3),
        }
        (staged / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.replace(staged, folder)
        except OSError:
            if not (folder / META_FILE).is_file():  # another process finished the same build first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if bars_on:
            enable_progress_bars()
    _remove_stale(folder, str(rules.root), split)
    print(
        f"record cache: {meta['records']} records of {rules.root} ({split}) in {meta['seconds']}s -> {folder}"
    )


def _remove_stale(current: Path, root: str, split: str) -> None:
    """Drop other caches of the same dataset folder and split: their files changed, so they are never read."""
    for other in current.parent.iterdir():
        meta_file = other / META_FILE
        if other == current or not meta_file.is_file():
            continue
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("root") == root and meta.get("split") == split:
            shutil.rmtree(other, ignore_errors=True)


def _raw_rows(files: list[tuple[int, str]]) -> Iterator[dict[str, Any]]:
    """One row per record: its file, location and JSON text (parsed again, in parallel, by `_validate_batch`).
    `files` holds (index, path) pairs because `datasets` may hand each file to its own call."""
    for file_index, name in files:
        record_file = Path(name)
        for location, item in record_items(record_file):
            text = item if record_file.suffix == ".jsonl" else json.dumps(item, ensure_ascii=False)
            yield {"file": file_index, "location": location, "text": text}


def _validate_batch(
    batch: dict[str, list[Any]], files: list[str], sources: list[str], rules: RecordRules
) -> dict[str, list[Any]]:
    names = list(_features())
    out: dict[str, list[Any]] = {name: [] for name in names}
    for file_index, location, text in zip(batch["file"], batch["location"], batch["text"]):
        record_file = Path(files[file_index])
        row: dict[str, Any] = dict.fromkeys(names)
        row["source"] = sources[file_index]
        try:
            row.update(
                _row(parse_record(json.loads(text), record_file, base_dirs_of(record_file, rules), rules))
            )
        except json.JSONDecodeError as err:
            row.update(reason="invalid_json", error=invalid_json_line_message(record_file, location, err.msg))
        except BadRecord as bad:
            row.update(reason=bad.reason, error=bad_record_message(record_file, location, bad))
        for name in names:
            out[name].append(row[name])
    return out


def _row(sample: Sample) -> dict[str, Any]:
    return {
        "sample_id": sample.sample_id,
        "dataset": sample.dataset,
        "segments": [
            {
                "kind": s.kind,
                "role": s.role,
                "text": s.text,
                "image": None if s.image is None else str(s.image),
            }
            for s in sample.segments
        ],
        "answer": sample.answer,
        "choices": None if sample.choices is None else list(sample.choices),
        "metadata": json.dumps(dict(sample.metadata), ensure_ascii=False),
    }
