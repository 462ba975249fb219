"""Accuracy against the number of reasoning steps in the gold answer, for several evaluated runs (VaLR's
test-time-scaling claim: accuracy keeps rising with longer reasoning where other methods degrade).

Usage:
    python benchmarks/accuracy_by_steps.py --data runs/maze-valr/data/synth-maze/test.json --field gold_plan \\
        --plot docs/valr-steps.png valr=maze-valr.jsonl sft=maze-sft.jsonl

Each `label=path` is a `latentkit eval` results file (one JSON line per answer, with `sample_id` and `correct`).
`--field` names the metadata field of the benchmark records that counts the steps: an integer, or a list whose
length is the count (synth-maze's `gold_plan`: one step per move). Prints a markdown table (accuracy with its 95%
Wilson interval per step count) and draws the accuracies with their intervals into `--plot`.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from latentkit.eval.stats import wilson_interval


def step_counts(data: Path, field: str) -> dict[str, int]:
    counts = {}
    for record in json.loads(data.read_text()):
        value = record["metadata"][field]
        counts[record["metadata"]["sample_id"]] = len(value) if isinstance(value, list) else int(value)
    return counts


def by_steps(results: Path, counts: dict[str, int]) -> dict[int, list[bool]]:
    grouped: dict[int, list[bool]] = defaultdict(list)
    for line in results.read_text().splitlines():
        answer = json.loads(line)
        grouped[counts[answer["sample_id"]]].append(bool(answer["correct"]))
    return grouped


def split_label(item: str) -> tuple[str, Path]:
    """`label=path`, at the `=` after which an existing file follows (labels and file names may hold `=`)."""
    for index, char in enumerate(item):
        if char == "=" and Path(item[index + 1 :]).is_file():
            return item[:index], Path(item[index + 1 :])
    raise SystemExit(f"{item!r} is not label=path of an existing results file")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--field", required=True)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("results", nargs="+", help="label=path of a latentkit eval results file")
    args = parser.parse_args()
    counts = step_counts(args.data, args.field)
    curves = {}
    for item in args.results:
        label, path = split_label(item)
        curves[label] = by_steps(path, counts)
    steps = sorted({n for curve in curves.values() for n in curve})
    print("| steps | n | " + " | ".join(curves) + " |")
    print("|---|---|" + "---|" * len(curves))
    for n in steps:
        cells = []
        for curve in curves.values():
            answers = curve.get(n, [])
            interval = wilson_interval(sum(answers), len(answers))
            cells.append(
                f"{sum(answers) / len(answers):.3f} [{interval.low:.2f}, {interval.high:.2f}]"
                if answers
                else "-"
            )
        size = max(len(curve.get(n, [])) for curve in curves.values())
        print(f"| {n} | {size} | " + " | ".join(cells) + " |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(5, 3.5))
        for offset, (label, curve) in enumerate(curves.items()):
            xs = [n for n in steps if curve.get(n)]
            ys = [sum(curve[n]) / len(curve[n]) for n in xs]
            intervals = [wilson_interval(sum(curve[n]), len(curve[n])) for n in xs]
            errors = [[y - i.low for y, i in zip(ys, intervals)], [i.high - y for y, i in zip(ys, intervals)]]
            shifted = [x + 0.06 * (offset - (len(curves) - 1) / 2) for x in xs]
            axes.errorbar(shifted, ys, yerr=errors, marker="o", capsize=3, label=label)
        axes.set_xlabel(f"reasoning steps in the gold answer ({args.field})")
        axes.set_ylabel("accuracy")
        axes.set_xticks(steps)
        axes.legend()
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
