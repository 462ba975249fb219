"""`latentkit compare`: join eval summaries into comparison.md / .csv / .json and a grouped bar chart (and,
when summaries hold several answers per question, pass@k curves in pass_at_k.png and a pass@k table).

Rows are evaluated models (method and run), columns are benchmarks; each cell carries a 95% Wilson interval
over its questions. Runs that differ only by a seed suffix (`-seed3`, `-s3`) are also summarised together:
mean over seeds with a 95% t-interval. Results of one benchmark scored under a different benchmark version,
scorer or decoding setup are flagged in the table, never averaged together.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from latentkit.errors import DataError
from latentkit.eval.stats import FIRST_STEP_WORDS, Interval, mean_interval, wilson_interval
from latentkit.records import write_json

SUMMARY_SUFFIX = ".summary.json"
# Settings that must agree for two numbers of one benchmark to be read side by side.
COMPARABLE_KEYS = ("benchmark_version", "scorer", "split", "count", "num_samples", "sampling")
KEY_NAMES = {"count": "number of questions"}
SEED_SUFFIX = re.compile(r"-(?:seed|s)(\d+)$")


@dataclass(frozen=True)
class Entry:
    label: str
    method: str
    run: str
    benchmark: str
    split: str
    benchmark_version: str
    scorer: str
    accuracy: float
    chance_level: float | None
    count: int
    aux_images: str
    num_samples: int
    sampling: str
    summary: str
    no_answer: int | None  # answers with no answer extracted (None: a summary from before it was counted)
    repetition: int | None  # answers that ran to the length limit in a loop
    low: float  # 95% Wilson interval of the accuracy over the questions (several answers per question: their
    high: float  # mean correctness counts as the question's, an approximation)
    pass_at_k: tuple[tuple[int, float], ...] = ()  # (k, pass@k) for every k the summary reports
    distinct_answers: float | None = None  # mean distinct answers among a question's k (k > 1)
    distinct_first_steps: float | None = None

    @property
    def seed_group(self) -> str:
        """The label without a trailing seed suffix: runs in one group differ only by their seed."""
        run = SEED_SUFFIX.sub("", self.run)
        return self.label.replace(f"({self.run})", f"({run})", 1)


@dataclass(frozen=True)
class SeedSummary:
    """One benchmark's accuracy over the seeds of one run group."""

    group: str
    benchmark: str
    runs: int
    interval: Interval


def seed_summaries(entries: list[Entry]) -> list[SeedSummary]:
    """Mean and 95% t-interval over seeds, for every (group, benchmark) with at least two runs."""
    grouped: dict[tuple[str, str], list[float]] = {}
    for entry in entries:
        if SEED_SUFFIX.search(entry.run):
            grouped.setdefault((entry.seed_group, entry.benchmark), []).append(entry.accuracy)
    return [
        SeedSummary(group, benchmark, len(values), mean_interval(values))
        for (group, benchmark), values in grouped.items()
        if len(values) >= 2
    ]


def find_summaries(inputs: list[Path]) -> list[Path]:
    """Summary files from summary JSONs, results JSONLs (their summary beside them) or run directories."""
    found: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            candidates = sorted((item / "eval").glob(f"*{SUMMARY_SUFFIX}")) or sorted(
                item.glob(f"*{SUMMARY_SUFFIX}")
            )
            if not candidates:
                raise DataError(
                    f"{item} holds no eval summaries (*{SUMMARY_SUFFIX}): run `latentkit eval --run {item}` first"
                )
            found.extend(candidates)
        elif item.name.endswith(SUMMARY_SUFFIX) and item.is_file():
            found.append(item)
        elif (
            item.suffix == ".jsonl"
            and item.with_name(item.name.removesuffix(".jsonl") + SUMMARY_SUFFIX).is_file()
        ):
            found.append(item.with_name(item.name.removesuffix(".jsonl") + SUMMARY_SUFFIX))
        else:
            raise DataError(
                f"{item} is not a run directory, an eval summary (*{SUMMARY_SUFFIX}) or an eval JSONL with one"
            )
    return found


def load_entry(path: Path) -> Entry:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON ({exc.msg}); rerun `latentkit eval` to rewrite it"
        ) from exc
    missing = [
        key for key in ("benchmark", "accuracy", "scorer", "model", "benchmark_version") if key not in summary
    ]
    if missing:
        raise DataError(f"{path} is not an eval summary: missing {', '.join(missing)}")
    model = summary["model"]
    run = Path(model.get("run") or model.get("model_dir") or path.parent).name
    aux = summary.get("aux_images", "none")
    overrides = " ".join(text.removeprefix("method.") for text in model.get("method_overrides", []))
    label = (
        f"{model.get('method', '?')} ({run}{_model_within_run(model)})"
        + (" +aux images" if aux != "none" else "")
        + (f" [{overrides}]" if overrides else "")
    )
    sampling = summary.get("sampling", {})
    decoding = (
        "greedy"
        if not sampling.get("temperature")
        else f"T={sampling['temperature']} p={sampling.get('top_p')}"
    )
    count = int(summary.get("counts", {}).get("samples", 0))
    accuracy = float(summary["accuracy"])
    interval = wilson_interval(round(accuracy * count), count) if count else Interval(accuracy, 0.0, 1.0)
    return Entry(
        label=label,
        method=model.get("method", "?"),
        run=run,
        benchmark=summary["benchmark"],
        split=summary.get("split", "test"),
        benchmark_version=str(summary["benchmark_version"]),
        scorer=summary["scorer"],
        accuracy=accuracy,
        chance_level=summary.get("chance_level"),
        count=count,
        aux_images=aux,
        num_samples=int(summary.get("num_samples", 1)),
        sampling=decoding,
        summary=str(path),
        no_answer=summary.get("counts", {}).get("no_answer_extracted"),
        repetition=summary.get("counts", {}).get("repetition"),
        low=interval.low,
        high=interval.high,
        pass_at_k=tuple(sorted((int(k), float(v)) for k, v in summary.get("pass_at_k", {}).items())),
        distinct_answers=summary.get("diversity", {}).get("distinct_answers"),
        distinct_first_steps=summary.get("diversity", {}).get("distinct_first_steps"),
    )


def _model_within_run(model: dict[str, Any]) -> str:
    """`: stages/sft/final` for a run's model other than its final one, else nothing."""
    if not model.get("run") or not model.get("model_dir"):
        return ""
    run, model_dir = Path(model["run"]), Path(model["model_dir"])
    if model_dir == run / "final" or not model_dir.is_relative_to(run):
        return ""
    return f": {model_dir.relative_to(run)}"


def disambiguate(entries: list[Entry]) -> list[Entry]:
    """Entries that would share a table cell (same label and benchmark) get their summary's name, then its path."""
    for name in (lambda e: Path(e.summary).name.removesuffix(SUMMARY_SUFFIX), lambda e: e.summary):
        cells = Counter((e.label, e.benchmark) for e in entries)
        entries = [
            replace(e, label=f"{e.label} [{name(e)}]") if cells[e.label, e.benchmark] > 1 else e
            for e in entries
        ]
    return entries


def mismatches(entries: list[Entry]) -> dict[str, list[str]]:
    """Per benchmark, the settings that differ between its entries (empty when all agree)."""
    found: dict[str, list[str]] = {}
    for benchmark in sorted({e.benchmark for e in entries}):
        group = [e for e in entries if e.benchmark == benchmark]
        differing = [key for key in COMPARABLE_KEYS if len({getattr(e, key) for e in group}) > 1]
        if differing:
            found[benchmark] = differing
    return found


def compare(inputs: list[Path], out_dir: Path) -> dict[str, Any]:
    entries = disambiguate([load_entry(path) for path in find_summaries(inputs)])
    if not entries:
        raise DataError("nothing to compare: pass run directories or eval summaries")
    out_dir.mkdir(parents=True, exist_ok=True)
    flagged = mismatches(entries)
    seeds = seed_summaries(entries)
    result = {
        "entries": [asdict(e) for e in entries],
        "over_seeds": [
            {"group": s.group, "benchmark": s.benchmark, "runs": s.runs, **s.interval.to_json()}
            for s in seeds
        ],
        "mismatches": flagged,
    }
    write_json(out_dir / "comparison.json", result)
    _write_csv(entries, flagged, out_dir / "comparison.csv")
    (out_dir / "comparison.md").write_text(markdown_table(entries, flagged, seeds), encoding="utf-8")
    plot(entries, flagged, out_dir / "comparison.png")
    curves = [entry for entry in entries if len(entry.pass_at_k) > 1]
    if curves:
        plot_pass_at_k(curves, out_dir / "pass_at_k.png")
    return result


def _columns(entries: list[Entry]) -> list[str]:
    return sorted({e.benchmark for e in entries})


def _rows(entries: list[Entry]) -> list[str]:
    return list(dict.fromkeys(e.label for e in entries))


def _cell(entries: list[Entry], label: str, benchmark: str) -> Entry | None:
    matching = [e for e in entries if e.label == label and e.benchmark == benchmark]
    return matching[-1] if matching else None


def _cell_text(entry: Entry) -> str:
    """Accuracy, interval, n and any degenerate answers (no answer extracted; a loop up to the length limit)."""
    counts = [f"n={entry.count}"]
    counts += [f"no answer {entry.no_answer}"] if entry.no_answer else []
    counts += [f"looped {entry.repetition}"] if entry.repetition else []
    interval = f"[{100 * entry.low:.1f}, {100 * entry.high:.1f}]"
    return f"{100 * entry.accuracy:.1f} {interval} ({', '.join(counts)})"


def markdown_table(
    entries: list[Entry], flagged: dict[str, list[str]], seeds: list[SeedSummary] | None = None
) -> str:
    columns = _columns(entries)
    header = ["model", *[f"{c} ⚠" if c in flagged else c for c in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in _rows(entries):
        cells = [label]
        for column in columns:
            entry = _cell(entries, label, column)
            cells.append("—" if entry is None else _cell_text(entry))
        lines.append("| " + " | ".join(cells) + " |")
    chance = []
    for column in columns:
        levels = {e.chance_level for e in entries if e.benchmark == column and e.chance_level is not None}
        chance.append("—" if not levels else " / ".join(f"{100 * level:.1f}" for level in sorted(levels)))
    lines.append("| chance | " + " | ".join(chance) + " |")
    lines.append("")
    if seeds:
        lines += [
            "Over seeds (mean, 95% t-interval):",
            "",
            "| runs | benchmark | seeds | accuracy |",
            "|---|---|---|---|",
        ]
        for summary in seeds:
            interval = summary.interval
            lines.append(
                f"| {summary.group} | {summary.benchmark} | {summary.runs} | {100 * interval.estimate:.1f} "
                f"[{100 * interval.low:.1f}, {100 * interval.high:.1f}] |"
            )
        lines.append("")
    lines.append(
        "Accuracy in % with a 95% Wilson interval over the questions; n questions, of which `no answer`: no answer "
        "could be extracted, `looped`: the output repeated itself up to the length limit. Scorers (rule-based; papers used an LLM judge, exact rules read lower): "
    )
    for column in columns:
        group = [e for e in entries if e.benchmark == column]
        scorers = sorted({e.scorer for e in group})
        versions = sorted({e.benchmark_version for e in group})
        lines.append(
            f"- {column}: scorer {', '.join(scorers)}; benchmark version {', '.join(versions)}; "
            f"decoding {', '.join(sorted({e.sampling for e in group}))}"
        )
    for benchmark, keys in flagged.items():
        lines.append(
            f"- ⚠ {benchmark}: the results differ in {', '.join(KEY_NAMES.get(k, k) for k in keys)}; these "
            "numbers are not comparable"
        )
    curves = [entry for entry in entries if len(entry.pass_at_k) > 1]
    if curves:
        lines += ["", *pass_at_k_table(curves)]
    return "\n".join(lines) + "\n"


def pass_at_k_table(entries: list[Entry]) -> list[str]:
    """pass@k (%) of every entry with several answers per question, one row per entry and benchmark."""
    ks = sorted({k for entry in entries for k, _ in entry.pass_at_k})
    lines = [
        "pass@k (%), unbiased estimate from the answers per question (decoding as in each row's summary):",
        "",
        "| model | benchmark | decoding | " + " | ".join(f"k={k}" for k in ks) + " | distinct answers | "
        "distinct first steps |",
        "|---|---|---|" + "---|" * (len(ks) + 2),
    ]
    for entry in entries:
        values = dict(entry.pass_at_k)
        cells = [f"{100 * values[k]:.1f}" if k in values else "—" for k in ks]
        cells += [
            f"{v:.2f}" if v is not None else "—" for v in (entry.distinct_answers, entry.distinct_first_steps)
        ]
        lines.append(f"| {entry.label} | {entry.benchmark} | {entry.sampling} | " + " | ".join(cells) + " |")
    note = f"Distinct: mean over questions among its k answers; a first step is an answer's first {FIRST_STEP_WORDS} words."
    lines += ["", note]
    return lines


def _write_csv(entries: list[Entry], flagged: dict[str, list[str]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        names = list(asdict(entries[0]))
        writer.writerow([*names, "mismatch"])
        for entry in entries:
            writer.writerow([*asdict(entry).values(), ";".join(flagged.get(entry.benchmark, []))])


def plot(entries: list[Entry], flagged: dict[str, list[str]], path: Path) -> None:
    """Grouped bars: one group per benchmark, one bar per model, chance level as a dashed line per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, rows = _columns(entries), _rows(entries)
    width = 0.8 / len(rows)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.6 * len(columns) * max(1, len(rows)) ** 0.5 + 2), 4.5))
    for index, label in enumerate(rows):
        xs, heights, errors = [], [], [[], []]
        for position, column in enumerate(columns):
            entry = _cell(entries, label, column)
            if entry is not None:
                xs.append(position - 0.4 + width * (index + 0.5))
                heights.append(100 * entry.accuracy)
                errors[0].append(100 * (entry.accuracy - entry.low))
                errors[1].append(100 * (entry.high - entry.accuracy))
        bars = axes.bar(xs, heights, width, label=label, yerr=errors, capsize=2)
        axes.bar_label(bars, fmt="%.0f", fontsize=7)
    for position, column in enumerate(columns):
        levels = [e.chance_level for e in entries if e.benchmark == column and e.chance_level is not None]
        if levels:
            axes.hlines(
                100 * max(levels), position - 0.45, position + 0.45, colors="black", linestyles="dashed"
            )
    axes.plot([], [], color="black", linestyle="dashed", label="chance")
    axes.set_xticks(range(len(columns)), [f"{c} ⚠" if c in flagged else c for c in columns])
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 105)
    axes.set_title("latentkit compare")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_pass_at_k(entries: list[Entry], path: Path) -> None:
    """pass@k against k (log scale), one panel per benchmark, one line per model; chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _columns(entries)
    figure, panels = plt.subplots(1, len(columns), figsize=(5.5 * len(columns), 4), squeeze=False)
    for axes, column in zip(panels[0], columns, strict=True):
        for entry in (e for e in entries if e.benchmark == column):
            ks, values = zip(*entry.pass_at_k, strict=True)
            axes.plot(ks, [100 * v for v in values], marker="o", label=f"{entry.label} ({entry.sampling})")
        levels = [e.chance_level for e in entries if e.benchmark == column and e.chance_level is not None]
        if levels:
            axes.axhline(100 * max(levels), color="black", linestyle="dashed", label="chance (one answer)")
        axes.set_xscale("log", base=2)
        axes.set_xlabel("k (answers per question)")
        axes.set_ylabel("pass@k (%)")
        axes.set_title(column)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
