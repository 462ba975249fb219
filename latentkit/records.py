"""Canonical record loader: Monet-SFT-125K conversation records -> typed `Sample`s (README.md, "Data").

A record is `{"data": [system, user, assistant], "metadata": {"dataset_name", "sample_id", "answer", ...}}`;
each turn is `{"role", "content": [{"type": "text", "text"} | {"type": "image", "image": <relative path>}]}`.
In the assistant turn a text item ending in the latent marker is followed by the auxiliary image it stands
for, and key visual facts are wrapped in observation tags (README.md, "Data").
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from latentkit.errors import DataError, writing
from latentkit.segments import Role, Sample, Segment

DEFAULT_LATENT_MARKER = "<abs_vis_token></abs_vis_token>"
DEFAULT_OBSERVATION_TAGS = ("<observation>", "</observation>")
RECORD_SUFFIXES = (".json", ".jsonl")
# JSON files that may sit beside record files in a dataset folder but hold no records.
NON_RECORD_FILES = frozenset({"synth_info.json", "dataset_info.json", "dataset_dict.json"})
SPLIT_NAMES = frozenset(
    {"train", "val", "validation", "dev", "test"}
)  # in a folder, only the asked split is read
TURN_ROLES: tuple[Role, ...] = ("system", "user", "assistant")
SKIP_HINT = "set data.on_bad_record=skip to skip bad records"
OnBadRecord = Literal["error", "skip"]


@dataclass
class LoadedRecords:
    """The samples that loaded, and how many records were skipped for which reason."""

    samples: Sequence[Sample]  # a list, or the memory-mapped `record_cache.CachedSamples`
    skipped: int = 0
    skip_reasons: Counter[str] = field(default_factory=Counter)


class BadRecord(Exception):
    """One malformed record; turned into a `DataError` (or a skip) by the loader, which knows file and index."""

    def __init__(self, reason: str, field_path: str, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.reason, self.field_path, self.problem, self.fix = reason, field_path, problem, fix


@dataclass(frozen=True)
class RecordRules:
    latent_marker: str
    observation_open: str
    observation_close: str
    require_observation_after_aux: bool
    root: Path  # image paths must stay inside it unless allow_outside_paths
    allow_outside_paths: bool


def load_records(
    path: Path,
    *,
    on_bad_record: OnBadRecord = "error",
    latent_marker: str = DEFAULT_LATENT_MARKER,
    observation_tags: tuple[str, str] = DEFAULT_OBSERVATION_TAGS,
    require_observation_after_aux: bool = True,
    limit: int | None = None,
    allow_outside_paths: bool = False,
    split: str = "train",
) -> LoadedRecords:
    """Load records from a `.json` array, a `.jsonl` file, or a folder of them (and its immediate sub-folders).
    In a folder, a file named after a split (`train`, `val`, `test`, ...) is read only when it is `split`'s, so
    sub-datasets that ship their own splits never mix them.

    Image paths are resolved against the folder holding each record file (then against `path` itself, for
    datasets whose paths are relative to the dataset root); each must stay inside the dataset root (the folder,
    or the record file's folder) unless `allow_outside_paths`, and must open as an image. Bad records raise
    `DataError`, or with `on_bad_record="skip"` are skipped and counted by reason.
    """
    if on_bad_record not in ("error", "skip"):
        raise DataError(f"data.on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    if limit is not None and limit < 0:
        raise DataError(f"data.limit must be >= 0, got {limit}")
    path = Path(path)
    rules = record_rules(
        path, latent_marker, observation_tags, require_observation_after_aux, allow_outside_paths
    )
    files = record_files(path, split)
    samples: list[Sample] = []
    loaded = LoadedRecords(samples=samples)
    if limit == 0:
        return loaded
    for record_file in files:
        base_dirs = base_dirs_of(record_file, rules)
        for location, raw in _read_records(record_file, on_bad_record, loaded):
            try:
                samples.append(parse_record(raw, record_file, base_dirs, rules))
            except BadRecord as bad:
                if on_bad_record == "error":
                    raise DataError(bad_record_message(record_file, location, bad)) from None
                loaded.skipped += 1
                loaded.skip_reasons[bad.reason] += 1
            if limit is not None and len(samples) >= limit:
                return loaded
    return loaded


def record_rules(
    path: Path,
    latent_marker: str = DEFAULT_LATENT_MARKER,
    observation_tags: tuple[str, str] = DEFAULT_OBSERVATION_TAGS,
    require_observation_after_aux: bool = True,
    allow_outside_paths: bool = False,
) -> RecordRules:
    """The checked loader settings for records under `path` (a record file or a dataset folder)."""
    if not latent_marker:
        raise DataError("the latent marker must be a non-empty string (set data.latent_marker)")
    if len(observation_tags) != 2 or not all(observation_tags):
        raise DataError("observation_tags must be two non-empty strings: (open tag, close tag)")
    path = Path(path)
    root = Path(os.path.normpath(path.absolute() if path.is_dir() else path.absolute().parent))
    return RecordRules(
        latent_marker, *observation_tags, require_observation_after_aux, root, allow_outside_paths
    )


def base_dirs_of(record_file: Path, rules: RecordRules) -> tuple[Path, ...]:
    """Where a record file's image paths are looked up: its own folder, then the dataset root."""
    return tuple(dict.fromkeys((record_file.absolute().parent, rules.root)))


def bad_record_message(record_file: Path, location: str, bad: BadRecord) -> str:
    """The one-line error for a bad record: file, record, field, problem and the fix."""
    return f"{record_file}: {location}: field {bad.field_path}: {bad.problem} ({bad.fix}, or {SKIP_HINT})"


def invalid_json_line_message(record_file: Path, location: str, problem: str) -> str:
    return f"{record_file}: {location}: invalid JSON: {problem} (fix the line, or {SKIP_HINT})"


def load_split(root: Path, split: str, **kwargs: Any) -> LoadedRecords:
    """Load `root/<split>.json` or `root/<split>.jsonl`; keyword arguments go to `load_records`."""
    root = Path(root)
    if not root.exists():
        raise DataError(_missing_path_message(root))
    for suffix in RECORD_SUFFIXES:
        candidate = root / f"{split}{suffix}"
        if candidate.is_file():
            return load_records(candidate, **kwargs)
    raise DataError(
        f"{root}: no {split}.json or {split}.jsonl found (pass data.path=... pointing at a folder with that "
        "split, or generate data with `latentkit data synth`)"
    )


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Write records as a UTF-8 JSON array, atomically (temp file in the same folder + `os.replace`)."""
    write_json(path, records)


def write_json(path: Path, value: Any) -> None:
    """Write any JSON value as UTF-8, atomically, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with writing(path), os.fdopen(fd, "w", encoding="utf-8") as tmp:
            json.dump(value, tmp, ensure_ascii=False, indent=1)
            tmp.write("\n")
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _missing_path_message(path: Path) -> str:
    return (
        f"data path {path} does not exist (pass data.path=... pointing at a record file or dataset folder, "
        "or generate data with `latentkit data synth`)"
    )


def record_files(path: Path, split: str) -> list[Path]:
    if not path.exists():
        raise DataError(_missing_path_message(path))
    if path.is_file():
        if path.suffix not in RECORD_SUFFIXES:
            raise DataError(f"{path}: unsupported record file type (use a .json array or a .jsonl file)")
        return [path]
    folders = [path, *sorted(p for p in path.iterdir() if p.is_dir())]
    files = [
        f
        for folder in folders
        for f in sorted(folder.iterdir())
        if f.is_file()
        and f.suffix in RECORD_SUFFIXES
        and f.name not in NON_RECORD_FILES
        and (f.stem not in SPLIT_NAMES or f.stem == split)
    ]
    if not files:
        raise DataError(
            f"{path}: no .json or .jsonl record files in this folder or its sub-folders "
            "(pass data.path=... pointing at the dataset, or generate data with `latentkit data synth`)"
        )
    return files


def record_items(record_file: Path) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs of one file: parsed records of a `.json` array, raw lines of a `.jsonl` file.
    A file that is not UTF-8 or, for `.json`, not a JSON array raises."""
    try:
        text = record_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{record_file}: not UTF-8 text ({err.reason}); re-save the file as UTF-8") from None
    if record_file.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{record_file}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg} (fix the file)"
            ) from None
        if not isinstance(records, list):
            raise DataError(
                f"{record_file}: expected a JSON array of records, got a JSON {type(records).__name__} "
                "(use a .jsonl file for one record per line)"
            )
        for index, raw in enumerate(records):
            yield f"record {index}", raw
        return
    index = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield f"record {index} (line {line_number})", line
            index += 1


def _read_records(
    record_file: Path, on_bad_record: OnBadRecord, loaded: LoadedRecords
) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw record) pairs; invalid JSON raises, except a bad `.jsonl` line in skip mode."""
    for location, raw in record_items(record_file):
        if record_file.suffix == ".json":
            yield location, raw
            continue
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            if on_bad_record == "error":
                raise DataError(invalid_json_line_message(record_file, location, err.msg)) from None
            loaded.skipped += 1
            loaded.skip_reasons["invalid_json"] += 1
            continue
        yield location, raw


def parse_record(raw: Any, record_file: Path, base_dirs: tuple[Path, ...], rules: RecordRules) -> Sample:
    if not isinstance(raw, dict):
        raise BadRecord(
            "bad_structure", "(record)", "expected a JSON object", 'use {"data": [...], "metadata": {...}}'
        )
    turns = raw.get("data")
    if not isinstance(turns, list) or len(turns) != 3:
        raise BadRecord(
            "bad_structure", "data", "expected a list of 3 turns", "give system, user and assistant turns"
        )
    metadata = raw.get("metadata")
    if not isinstance(metadata, dict):
        raise BadRecord("bad_structure", "metadata", "missing or not an object", "add a metadata object")
    sample_id = metadata.get("sample_id")
    if sample_id is None or str(sample_id) == "":
        raise BadRecord("missing_sample_id", "metadata.sample_id", "missing", "give every record a sample_id")
    choices = metadata.get("choices")
    if choices is not None and not isinstance(choices, list):
        raise BadRecord("bad_structure", "metadata.choices", "expected a list of options", "make it a list")

    segments: list[Segment] = []
    for turn_index, (turn, role) in enumerate(zip(turns, TURN_ROLES)):
        items = _turn_items(turn, turn_index, role)
        if role == "assistant":
            segments += _assistant_segments(items, base_dirs, rules)
        else:
            segments += _prompt_segments(items, turn_index, role, base_dirs, rules)
    answer = metadata.get("answer")
    return Sample(
        sample_id=str(sample_id),
        dataset=str(metadata.get("dataset_name") or record_file.parent.name),
        segments=tuple(segments),
        answer=None if answer is None else str(answer),
        choices=None if choices is None else tuple(str(c) for c in choices),
        metadata=metadata,
    )


def _turn_items(turn: Any, turn_index: int, role: Role) -> list[tuple[str, str, str]]:
    """Validate one turn; return its content as (field path, type, value) triples."""
    where = f"data[{turn_index}]"
    if not isinstance(turn, dict):
        raise BadRecord("bad_structure", where, "expected an object with role and content", "fix the turn")
    if turn.get("role") != role:
        raise BadRecord(
            "wrong_role_order",
            f"{where}.role",
            f"expected role {role!r}, got {turn.get('role')!r}",
            "order the turns system, user, assistant",
        )
    content = turn.get("content")
    if not isinstance(content, list):
        raise BadRecord("bad_structure", f"{where}.content", "expected a list of items", "fix the turn")
    items = []
    for item_index, item in enumerate(content):
        item_path = f"{where}.content[{item_index}]"
        kind = item.get("type") if isinstance(item, dict) else None
        if kind not in ("text", "image"):
            raise BadRecord(
                "unknown_content_type",
                f"{item_path}.type",
                f"unknown content type {kind!r}",
                'use {"type": "text", "text": ...} or {"type": "image", "image": ...}',
            )
        value = item.get(kind)
        if not isinstance(value, str):
            raise BadRecord(
                "bad_structure", f"{item_path}.{kind}", f"a {kind} item needs a string {kind!r}", "add it"
            )
        items.append((item_path, kind, value))
    return items


def _resolve_image(item_path: str, relative: str, base_dirs: tuple[Path, ...], rules: RecordRules) -> Path:
    """The image file `relative` names: inside the dataset root (unless allowed outside), and decodable."""
    field_path = f"{item_path}.image"
    found = [c for c in (Path(os.path.normpath(b / relative)) for b in base_dirs) if c.is_file()]
    inside = [c for c in found if c.is_relative_to(rules.root)]
    if not inside and found and not rules.allow_outside_paths:
        raise BadRecord(
            "image_outside_root",
            field_path,
            f"{relative} points outside the dataset folder {rules.root}",
            "keep images inside it, or set data.allow_outside_paths=true",
        )
    if not found:
        raise BadRecord(
            "missing_image", field_path, f"file {relative} not found under {base_dirs[0]}", "fix the path"
        )
    image = (inside or found)[0]
    try:
        with Image.open(image) as opened:
            opened.verify()  # header and, for PNG, every chunk's checksum; no full decode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadRecord(
            "bad_image", field_path, f"{image} is not a readable image ({exc})", "replace or remove the file"
        ) from None
    return image


def _prompt_segments(
    items: list[tuple[str, str, str]],
    turn_index: int,
    role: Role,
    base_dirs: tuple[Path, ...],
    rules: RecordRules,
) -> list[Segment]:
    segments = []
    for item_path, kind, value in items:
        if kind == "text":
            if value.strip():
                segments.append(Segment("text", role, text=value))
        elif turn_index == 0:
            raise BadRecord(
                "bad_structure",
                item_path,
                "images are not allowed in the system turn",
                "move it to the user turn",
            )
        else:
            segments.append(Segment("image", role, image=_resolve_image(item_path, value, base_dirs, rules)))
    return segments


def _assistant_segments(
    items: list[tuple[str, str, str]], base_dirs: tuple[Path, ...], rules: RecordRules
) -> list[Segment]:
    marker = rules.latent_marker
    segments: list[Segment] = []
    aux_image_fields: list[tuple[str, int]] = []  # (field path, segment position) of each auxiliary image
    for position, (item_path, kind, value) in enumerate(items):
        previous = items[position - 1] if position > 0 else None
        following = items[position + 1] if position + 1 < len(items) else None
        if kind == "image":
            if previous is None or previous[1] != "text" or not previous[2].rstrip().endswith(marker):
                raise BadRecord(
                    "image_without_marker",
                    item_path,
                    f"assistant image is not preceded by a text item ending in {marker}",
                    f"end the text before it with {marker}",
                )
            aux_image_fields.append((item_path, len(segments)))
            segments.append(
                Segment("aux_image", "assistant", image=_resolve_image(item_path, value, base_dirs, rules))
            )
            continue
        # A marker must end its text item and be followed by an image, so marker and image counts agree.
        body = value.rstrip()
        ends_with_marker = body.endswith(marker)
        if value.count(marker) > int(ends_with_marker) or (
            ends_with_marker and (following is None or following[1] != "image")
        ):
            raise BadRecord(
                "marker_without_image",
                f"{item_path}.text",
                f"latent marker {marker} is not followed by an image",
                "put the auxiliary image right after the text ending in the marker",
            )
        if ends_with_marker:
            value = body[: -len(marker)]
        segments += _split_observations(value, f"{item_path}.text", rules)
    if rules.require_observation_after_aux:
        _check_observations_follow(segments, aux_image_fields, rules)
    return segments


def _split_observations(text: str, field_path: str, rules: RecordRules) -> list[Segment]:
    """Split assistant text into text and observation segments; drop blank pieces."""
    open_tag, close_tag = rules.observation_open, rules.observation_close
    pieces: list[tuple[Literal["text", "observation"], str]] = []
    rest = text
    while rest:
        start, end = rest.find(open_tag), rest.find(close_tag)
        if start < 0 and end < 0:
            pieces.append(("text", rest))
            break
        inner_start = start + len(open_tag)
        next_open = rest.find(open_tag, inner_start)
        if start < 0 or end < start or (0 <= next_open < end):
            raise BadRecord(
                "unbalanced_observation",
                field_path,
                f"unbalanced {open_tag}...{close_tag} tags",
                "close every observation before opening the next",
            )
        pieces += [("text", rest[:start]), ("observation", rest[inner_start:end])]
        rest = rest[end + len(close_tag) :]
    return [Segment(kind, "assistant", text=piece) for kind, piece in pieces if piece.strip()]


def _check_observations_follow(
    segments: list[Segment], aux_image_fields: list[tuple[str, int]], rules: RecordRules
) -> None:
    """Each auxiliary image needs an observation before the next auxiliary image (or the end of the turn)."""
    boundaries = [position for _, position in aux_image_fields[1:]] + [len(segments)]
    for (item_path, position), stop in zip(aux_image_fields, boundaries):
        if not any(s.kind == "observation" for s in segments[position + 1 : stop]):
            raise BadRecord(
                "missing_observation",
                item_path,
                f"no {rules.observation_open}...{rules.observation_close} follows this auxiliary image",
                "wrap the visual fact it shows in observation tags or turn off require_observation_after_aux",
            )
