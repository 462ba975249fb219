"""`latentkit eval`: answer a benchmark with a trained model, score, and write per-sample JSONL + a summary.

The JSONL is appended one sample at a time (flushed per batch), so an interrupted eval loses nothing it wrote;
rerunning with the same output file skips the samples already there. Results from another model, benchmark
or decoding setup in the same file are refused, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from latentkit.config import LatentkitConfig
from latentkit.decoding import SamplingParams
from latentkit.errors import ConfigError, DataError, writing
from latentkit.eval.answer import IMAGE_PLACEHOLDER, Answer, AuxImages, answer_samples
from latentkit.eval.benchmarks import Benchmark, EvalSet, chance_from_choices, get_benchmark
from latentkit.eval.model import EvalModel
from latentkit.eval.processes import Processes, eval_processes
from latentkit.eval.scorers import Scorer, ScoreResult, get_scorer
from latentkit.eval.stats import first_step
from latentkit.records import write_json
from latentkit.segments import Sample


@dataclass(frozen=True)
class EvalOptions:
    benchmark: str
    data: Path | None = None
    split: str = "test"
    limit: int | None = None
    batch_size: int = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    num_samples: int = 1  # answers per question; pass@k for every k <= num_samples
    aux_images: AuxImages = "none"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.aux_images not in ("none", "dataset"):
            raise ConfigError(f"--aux-images must be none or dataset, got {self.aux_images!r}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question with c correct among n samples: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per question, got {n}")
    if n - c < k:
        return 1.0
    # The product form avoids huge binomials: C(n-c,k)/C(n,k) = prod_{i=n-c+1}^{n} (1 - k/i).
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def model_output_dir(model: EvalModel, kind: str) -> Path:
    """Where `eval`/`diagnose` write by default, never inside the model folder: `<run>/<kind>/` for a run's final
    model, `<run>/<kind>/<model dir within the run>/` for another model of a run (a stage's final), else
    `<kind>/<model dir name>-<fingerprint>/` under the current directory."""
    if model.run_dir is None:
        return Path(kind) / f"{model.model_dir.name}-{model.fingerprint[:8]}"
    model_dir, run_dir = model.model_dir.resolve(), model.run_dir.resolve()
    if model_dir == run_dir / "final":
        return model.run_dir / kind
    return model.run_dir / kind / "-".join(model_dir.relative_to(run_dir).parts)


def settings_tag(options: EvalOptions, default_max_new_tokens: int) -> str:
    """The settings that differ from a greedy default run, as a file name suffix (`-t0.7-p0.95-n8`)."""
    sampling = options.sampling
    parts = ["aux"] if options.aux_images == "dataset" else []
    if sampling.temperature > 0:
        parts += [f"t{sampling.temperature:g}", f"seed{sampling.seed}"]
    parts += [f"p{sampling.top_p:g}"] if sampling.top_p < 1 else []
    parts += [f"k{sampling.top_k}"] if sampling.top_k else []
    parts += [f"n{options.num_samples}"] if options.num_samples > 1 else []
    parts += [f"max{sampling.max_new_tokens}"] if sampling.max_new_tokens != default_max_new_tokens else []
    if sampling.stop_strings:
        stops = hashlib.sha256(json.dumps(list(sampling.stop_strings)).encode()).hexdigest()[:6]
        parts.append(f"stop{stops}")
    return "".join(f"-{part}" for part in parts)


def overrides_tag(overrides: Sequence[str]) -> str:
    """Method overrides as a file name suffix: `method.prefix=noise` -> `-prefix=noise`."""
    return "".join(
        "-" + re.sub(r"[^A-Za-z0-9_.=+-]", "_", text.removeprefix("method.")) for text in overrides
    )


def default_output(model: EvalModel, options: EvalOptions) -> Path:
    tag = overrides_tag(model.method_overrides) + settings_tag(
        options, get_benchmark(options.benchmark).max_new_tokens
    )
    return model_output_dir(model, "eval") / f"{options.benchmark}-{options.split}{tag}.jsonl"


def summary_path(results: Path) -> Path:
    return results.with_name(results.name.removesuffix(".jsonl") + ".summary.json")


def load_eval_set(
    benchmark: Benchmark,
    config: LatentkitConfig,
    run_dir: Path | None,
    data: Path | None,
    split: str,
    limit: int | None,
    work_dir: Path,
    data_option: str = "--data",
) -> EvalSet:
    """The benchmark's samples: from `data`, or for synthetic tasks the run's own data (made if missing)."""
    from latentkit.eval.synthetic import synthetic_data_dir

    path = data
    if path is None and benchmark.synthetic:
        path = synthetic_data_dir(benchmark.name, config, run_dir, work_dir)
    if path is None:
        raise ConfigError(
            f"benchmark {benchmark.name!r} reads local files: set {data_option} ({benchmark.expected_files})"
        )
    eval_set = benchmark.load(Path(path), split, work_dir / "images")
    samples = eval_set.samples[:limit] if limit else eval_set.samples
    if not samples:
        raise DataError(f"benchmark {benchmark.name!r} found no samples in {eval_set.source}")
    chance = eval_set.chance_level if eval_set.chance_level is not None else chance_from_choices(samples)
    return EvalSet(samples, eval_set.scorer, chance, eval_set.source)


def run_header(
    model: EvalModel, benchmark: Benchmark, eval_set: EvalSet, options: EvalOptions
) -> dict[str, Any]:
    """Everything that must match for two result lines to be comparable (JSON-normalised, as stored)."""
    header = {
        "model_fingerprint": model.fingerprint,
        "benchmark": benchmark.name,
        "benchmark_version": benchmark.version,
        "split": options.split,
        "scorer": eval_set.scorer,
        "sampling": asdict(options.sampling),
        "num_samples": options.num_samples,
        "aux_images": options.aux_images,
        "data": str(Path(eval_set.source).resolve()),  # two folders under one benchmark name never mix
    }
    if model.method_overrides:  # absent when none, so results written before the key existed still resume
        header["method_overrides"] = list(model.method_overrides)
    return json.loads(json.dumps(header))


def evaluate(
    model: EvalModel,
    options: EvalOptions,
    out: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Answer what is not yet in `out`, append it, then write and return the summary over the whole file.

    Under `accelerate launch` the processes share the batches (see `answer_missing`); every process returns
    the summary, the main one writes the files and `log`s how many samples each process answered."""
    processes = eval_processes(model.backbone.device)
    if options.num_samples > 1 and options.sampling.temperature == 0.0 and not model.method.prompts_vary:
        raise ConfigError(
            f"--num-samples > 1 needs sampling: set --temperature above 0 (greedy answers repeat; {model.method.name}'s "
            "prompts are the same for every answer)"
        )
    benchmark = get_benchmark(options.benchmark)
    out = Path(out) if out is not None else default_output(model, options)

    def load() -> EvalSet:
        out.parent.mkdir(parents=True, exist_ok=True)
        return load_eval_set(
            benchmark, model.config, model.run_dir, options.data, options.split, options.limit, out.parent
        )

    eval_set = processes.main_first(load)  # the main process generates missing synthetic data
    header = run_header(model, benchmark, eval_set, options)
    done: dict[str, dict[str, Any]] = {}  # the records, on the main process (it alone writes)

    def read() -> set[str]:
        done.update(read_results(out, header))
        return set(done)

    done_ids = processes.from_main(read)
    answered = processes.all_gather(
        answer_missing(model, options, eval_set, header, done, done_ids, out, processes, progress)
    )
    if log is not None and processes.is_main and processes.count > 1:
        log(f"eval: {processes.count} processes answered {' + '.join(map(str, answered))} samples")

    def summary() -> dict[str, Any]:
        records = [done[sample.sample_id] for sample in eval_set.samples]
        result = summarize(records, header, eval_set, model, options, out)
        write_json(summary_path(out), result)
        return result

    return processes.from_main(summary)


def answer_missing(
    model: EvalModel,
    options: EvalOptions,
    eval_set: EvalSet,
    header: dict[str, Any],
    done: dict[str, dict[str, Any]],
    done_ids: set[str],
    out: Path,
    processes: Processes,
    progress: bool,
) -> int:
    """Answer the batches holding a sample not in `done_ids` and append their new records to `out` in sample
    order, into `done` on the main process; return how many samples this process answered.

    The batches are fixed slices of the whole benchmark, whatever is done already and however many processes
    share them, so every answer is generated in the same batch (same padding, same seeds) as in one
    uninterrupted process. Process i answers batch i of each round of `count` batches; after each round the
    main process appends the round's records in batch order. A failure on any process fails every process
    after the last complete round, whose records are all written."""
    scorer = get_scorer(eval_set.scorer)
    batches = [
        eval_set.samples[start : start + options.batch_size]
        for start in range(0, len(eval_set.samples), options.batch_size)
    ]
    todo = [batch for batch in batches if any(sample.sample_id not in done_ids for sample in batch)]
    bar = _progress(len(eval_set.samples), len(done_ids), header["benchmark"], progress and processes.is_main)

    def answer(batch: list[Sample]) -> list[dict[str, Any]]:
        repeated = [sample for sample in batch for _ in range(options.num_samples)]
        draws = [draw for _ in batch for draw in range(options.num_samples)]
        answers = answer_samples(
            model.method, repeated, options.sampling, len(repeated), options.aux_images, draws=draws
        )
        return [score_record(group, scorer, header) for group in _by_sample(answers, options.num_samples)]

    mine = todo[processes.index :: processes.count]
    for start in range(0, len(todo), processes.count):
        position = start + processes.index
        work = partial(answer, todo[position]) if position < len(todo) else list
        new = [
            record
            for records in processes.gather(work)
            for record in records
            if record["sample_id"] not in done_ids
        ]
        processes.gather(partial(_append, out, new, done) if processes.is_main else list)
        done_ids.update(record["sample_id"] for record in new)
        bar.update(len(new))
    bar.close()
    return sum(len(batch) for batch in mine)


def _append(out: Path, records: list[dict[str, Any]], done: dict[str, dict[str, Any]]) -> None:
    with writing(out), open(out, "a", encoding="utf-8") as handle:
        for record in records:
            done[record["sample_id"]] = record
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_results(path: Path, header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Records already in `path` by sample id; a torn last line (killed mid-write) is cut off, nothing else."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete, torn = lines[:-1], lines[-1]
    if torn:
        with open(path, "r+", encoding="utf-8") as handle:
            handle.truncate(len(text.encode("utf-8")) - len(torn.encode("utf-8")))
    records: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path} line {number} is not valid JSON ({exc.msg}); move the file away to start over"
            ) from exc
        mismatched = [key for key, value in header.items() if record.get("run", {}).get(key) != value]
        if mismatched:
            raise DataError(
                f"{path} line {number} holds results from a different {', '.join(mismatched)}; "
                "pass another --out (results are never mixed)"
            )
        records[record["sample_id"]] = record
    return records


def _by_sample(answers: list[Answer], num_samples: int) -> list[list[Answer]]:
    return [answers[index : index + num_samples] for index in range(0, len(answers), num_samples)]


def prompt_text(sample: Sample) -> str:
    """The prompt as a reader sees it: the user turn's text, images as placeholders."""
    parts = [IMAGE_PLACEHOLDER if s.kind == "image" else s.text for s in sample.segments if s.role == "user"]
    return "\n".join(parts)


def score_answer(answer: Answer, scorer: Scorer) -> ScoreResult:
    sample = answer.sample
    choices = list(sample.choices) if sample.choices else None
    return scorer.score(answer.text, sample.answer or "", choices, sample.metadata)


def repeats_at_end(text: str, times: int = 4, longest: int = 64) -> bool:
    """Whether `text` ends in one piece of at most `longest` characters repeated `times` times (a loop)."""
    stripped = text.rstrip()
    return any(
        stripped.endswith(stripped[-period:] * times)
        for period in range(1, min(longest, len(stripped) // times) + 1)
    )


def score_record(answers: Sequence[Answer], scorer: Scorer, header: dict[str, Any]) -> dict[str, Any]:
    sample = answers[0].sample
    scores = [score_answer(answer, scorer) for answer in answers]
    choices = list(sample.choices) if sample.choices else None
    record: dict[str, Any] = {
        "sample_id": sample.sample_id,
        "category": sample.metadata.get("category"),
        "subcategory": sample.metadata.get("subcategory"),
        "prompt": prompt_text(sample),
        "gold": sample.answer or "",
        "choices": choices,
        "output": answers[0].text,
        "extracted": scores[0].extracted,
        "correct": scores[0].correct,
        "finish_reason": answers[0].finish_reason,
        # degenerate: the answer ran to the length limit in a loop
        "repetition": answers[0].finish_reason == "length" and repeats_at_end(answers[0].text),
        "aux_images_used": answers[0].aux_images_used,
        "num_correct": sum(score.correct for score in scores),
        "num_samples": len(answers),
        "run": header,
        **answers[0].extras,  # what the decoding reported (latent blocks and steps for latent methods)
    }
    if len(answers) > 1:
        record["samples"] = [
            {"output": a.text, "extracted": s.extracted, "correct": s.correct}
            for a, s in zip(answers, scores)
        ]
        record["distinct_answers"] = len({s.extracted for s in scores if s.extracted is not None})
        record["distinct_first_steps"] = len({first_step(a.text) for a in answers})
    return record


def summarize(
    records: list[dict[str, Any]],
    header: dict[str, Any],
    eval_set: EvalSet,
    model: EvalModel,
    options: EvalOptions,
    results: Path,
) -> dict[str, Any]:
    """Accuracy = mean fraction correct per question (greedy: plain accuracy), overall and per category."""

    def accuracy(group: list[dict[str, Any]]) -> float:
        return sum(r["num_correct"] / r["num_samples"] for r in group) / len(group)

    groups: dict[str, dict[str, list[dict[str, Any]]]] = {
        "category": defaultdict(list),
        "subcategory": defaultdict(list),
    }
    for record in records:
        for key, grouped in groups.items():
            if record.get(key) is not None:
                grouped[str(record[key])].append(record)
    n = options.num_samples
    return {
        "benchmark": header["benchmark"],
        "benchmark_version": header["benchmark_version"],
        "split": header["split"],
        "scorer": header["scorer"],
        "chance_level": eval_set.chance_level,
        "accuracy": accuracy(records),
        "per_category": {
            name: {"accuracy": accuracy(g), "count": len(g)} for name, g in sorted(groups["category"].items())
        },
        "per_subcategory": {
            name: {"accuracy": accuracy(g), "count": len(g)}
            for name, g in sorted(groups["subcategory"].items())
        },
        "pass_at_k": {
            str(k): sum(pass_at_k(n, r["num_correct"], k) for r in records) / len(records)
            for k in sorted({1, 2, 4, 8, 16, 32, 64, n})
            if k <= n
        },
        "counts": {
            "samples": len(records),
            "answers": sum(r["num_samples"] for r in records),
            "correct": sum(r["num_correct"] for r in records),
            "no_answer_extracted": sum(r["extracted"] is None for r in records),
            "length_limit": sum(r["finish_reason"] == "length" for r in records),
            "repetition": sum(bool(r.get("repetition")) for r in records),
            "aux_images_used": sum(r["aux_images_used"] for r in records),
        },
        **({"diversity": diversity(records)} if n > 1 else {}),
        "model": model.describe(),
        "config_fingerprint": header["model_fingerprint"],
        "sampling": header["sampling"],
        "num_samples": n,
        "aux_images": options.aux_images,
        "data": eval_set.source,
        "results": str(results),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def diversity(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean over questions of the distinct extracted answers and the distinct first steps among its answers."""
    return {
        key: sum(r[key] for r in records) / len(records)
        for key in ("distinct_answers", "distinct_first_steps")
    }


def _progress(total: int, initial: int, name: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"eval {name}", disable=not enabled)
