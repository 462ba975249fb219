"""A VSP-layout fixture built from synth-maze records, so that `latentkit eval -b vsp` runs on boards a tiny model
was trained on: each record's question board becomes `level<N>/img/<id>.png` with its gym rows (S F H G) in
`level<N>/text/<id>.txt`, under `maze/task-main/maps/` as the published repository lays them out. The VSP prompt
(player, frozen lake, edge moves stay put) is the loader's own, not synth-maze's.

Usage:
    python benchmarks/vsp_fixture.py runs/maze-512 --out vsp-fixture --split test --limit 100
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from latentkit.records import load_split


def write_fixture(synth_dir: Path, out: Path, split: str, limit: int) -> int:
    """Write up to `limit` maps (ids 0..limit-1, one level per board size) and return how many were written."""
    maps = out / "maze" / "task-main" / "maps"
    if maps.exists():
        raise SystemExit(f"{maps} exists: pass another --out (nothing was changed)")
    samples = load_split(synth_dir, split).samples[:limit]
    unboarded = [sample.sample_id for sample in samples if not sample.metadata.get("board")]
    if unboarded:  # checked before anything is written
        raise SystemExit(
            f"{synth_dir}: record {unboarded[0]} has no board in its metadata: pass a synth-maze folder "
            "(latentkit data synth --task synth-maze)"
        )
    for map_id, sample in enumerate(samples):
        rows = sample.metadata["board"]
        level = maps / f"level{len(rows)}"
        (level / "img").mkdir(parents=True, exist_ok=True)
        (level / "text").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.images[0], level / "img" / f"{map_id}.png")
        (level / "text" / f"{map_id}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "synth_dir", type=Path, help="a synth-maze folder (latentkit data synth --task synth-maze)"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    written = write_fixture(args.synth_dir, args.out, args.split, args.limit)
    print(f"wrote {written} maps to {args.out / 'maze' / 'task-main' / 'maps'}")


if __name__ == "__main__":
    main()
