"""The data pipeline's cost: parsing and validating records with the plain loader (`latentkit.records`, what every
process did at every start before the record cache) against the Arrow record cache (`latentkit.record_cache`),
cold (built) and warm (read back); and the layout work per training step without and with the layout cache.

Usage:
    python benchmarks/data.py                                  # 125,000 records, num_proc 2, 300 layout steps
    python benchmarks/data.py --records 20000 --num-proc 2 --steps 100 --train-steps 60

Records: synthetic, in the Monet-SFT-125K layout (`{"data": [system, user, assistant], "metadata": ...}`, a
question image, a text ending in the latent marker, an auxiliary image, an observation), split over four
sub-dataset folders with one `train.json` each, written to a scratch directory. Images are 32x32 PNGs, a pool of
`--images` distinct files per sub-dataset that records share (the loaders open and verify every referenced image
per record either way). Each load runs in a fresh process, so its time includes nothing cached in memory but the
OS page cache, and its peak RSS is its own (`ru_maxrss`; `num_proc` workers are reported apart).

Layouts: the tiny default (`sft` on tiny-qwen2.5-vl, the embedded synth-zoom task, 512 records, batch 8): every
micro-batch of a `--steps`-step schedule built through `LayoutDataset` (layouts + collate), without the layout
cache (`data.layout_cache_mb=0`) and with it (the default), where the stage's length pre-filter builds every
layout once first (timed apart). Then the whole step: the trainer's own `step_time` (batch, forward, backward,
optimizer) in two real `latentkit train` runs of `--train-steps` steps, without and with the layout cache.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUB_DATASETS = ("Visual_CoT", "CogCoM", "Zebra_CoT", "ReFocus")
MARKER = "<abs_vis_token></abs_vis_token>"


def record(sample_id: str, dataset: str, question: str, zoom: str, index: int) -> dict:
    turn = lambda role, *content: {"role": role, "content": list(content)}
    colour = ("red", "green", "blue", "yellow")[index % 4]
    return {
        "data": [
            turn("system", {"type": "text", "text": "You are a helpful assistant."}),
            turn(
                "user",
                {"type": "image", "image": question},
                {"type": "text", "text": f"What colour is shape {index % 97} in the picture?"},
            ),
            turn(
                "assistant",
                {"type": "text", "text": f"Let me zoom in on shape {index % 97}. {MARKER}"},
                {"type": "image", "image": zoom},
                {
                    "type": "text",
                    "text": f"Zoomed in. <observation>The shape is {colour}.</observation> So the answer is "
                    f"\\boxed{{{colour}}}.",
                },
            ),
        ],
        "metadata": {"dataset_name": dataset, "sample_id": sample_id, "answer": colour},
    }


def generate(root: Path, records: int, images: int) -> None:
    from PIL import Image

    per = -(-records // len(SUB_DATASETS))
    for number, name in enumerate(SUB_DATASETS):
        folder = root / name
        (folder / "images").mkdir(parents=True)
        for i in range(images):
            Image.new("RGB", (32, 32), (i % 256, (i * 7) % 256, number * 60)).save(
                folder / "images" / f"{i}.png"
            )
        count = min(per, records - number * per)
        rows = [
            record(f"{name}-{i}", name, f"images/{i % images}.png", f"images/{(i + 1) % images}.png", i)
            for i in range(count)
        ]
        (folder / "train.json").write_text(json.dumps(rows), encoding="utf-8")


def child(kind: str, root: Path, cache: Path, num_proc: int) -> None:
    """One load in this process; prints seconds, samples and peak RSS (this process, its largest worker) as JSON."""
    import datasets  # noqa: F401  (imported by both, so the memory after imports is comparable)

    from latentkit.record_cache import load_cached_records
    from latentkit.records import load_records, record_rules

    imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if kind == "plain":
        loaded = load_records(root)
    else:
        loaded = load_cached_records(root, record_rules(root), cache, num_proc=num_proc)
    seconds = time.perf_counter() - started
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    row = {"seconds": seconds, "samples": len(loaded.samples), "imports": imports, "rss": self_peak}
    print(json.dumps({**row, "workers": workers_peak}))


def measure(kind: str, root: Path, cache: Path, num_proc: int) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--root", str(root), "--cache", str(cache)]
    out = subprocess.run([*command, "--num-proc", str(num_proc)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def layout_steps(scratch: Path, steps: int) -> list[tuple[str, float, float, int]]:
    """(variant, one-time seconds, mean ms per step, layouts built) without and with the layout cache."""
    import torch

    from latentkit.backbone import build_backbone
    from latentkit.config import DataSection, ModelSection
    from latentkit.data import load_training_records
    from latentkit.registry import get_method
    from latentkit.stage_data import LayoutDataset, stage_order
    from latentkit.trainer import micro_batch_schedule

    torch.manual_seed(0)
    backbone = build_backbone(ModelSection())
    method_cls = get_method("sft")
    method = method_cls(method_cls.Config())
    method.setup(backbone)
    data = DataSection(cache_dir=scratch / "layout-cache")
    samples = load_training_records(data, scratch / "run", lambda work: work()).samples
    pad_id = backbone.tokenizer.pad_token_id
    rows = []
    for variant, cache_mb in (
        ("no layout cache (before)", 0),
        ("layout cache (after)", data.layout_cache_mb),
    ):
        built = 0
        dataset = LayoutDataset(samples, method, "sft", data.max_length, pad_id, cache_mb * 2**20)
        started = time.perf_counter()
        order = None
        if cache_mb:  # the stage start of the trainer: every layout once, for the length pre-filter
            order, _ = stage_order(dataset, data, 0, 0, 8, 0, 1, lambda part: part)
        once = time.perf_counter() - started
        dataset.schedule = micro_batch_schedule(len(samples), 0, 0, 0, steps, 8, 1, 0, 1, order)
        started = time.perf_counter()
        for item in range(len(dataset)):
            dataset[item]
        per_step = 1000 * (time.perf_counter() - started) / steps
        built = dataset.cache.misses if cache_mb else steps * 8
        rows.append((variant, once, per_step, built))
    return rows


def train_step_ms(scratch: Path, name: str, steps: int, skip: int, cache_mb: int) -> float:
    """Median `step_time` of a real `latentkit train` run (tiny default), its first `skip` steps not counted."""
    command = [
        sys.executable, "-m", "latentkit", "train", f"run.output_dir={scratch}", f"run.name={name}",
        f"train.steps={steps}", f"train.checkpoint_every={steps}", "train.progress=false", "train.log_every=1",
        f"data.layout_cache_mb={cache_mb}",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    lines = (scratch / name / "metrics.jsonl").read_text().splitlines()
    times = [json.loads(line)["step_time"] for line in lines if "step_time" in line][skip:]
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=125_000)
    parser.add_argument("--images", type=int, default=2048, help="distinct image files per sub-dataset")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the layout measurement")
    parser.add_argument("--train-steps", type=int, default=100, help="steps of each real training run")
    parser.add_argument("--child", choices=["plain", "cache"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.root, args.cache, args.num_proc)
        return

    import datasets
    import torch

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        root, cache = scratch / "Monet-SFT-synthetic", scratch / "cache"
        started = time.perf_counter()
        generate(root, args.records, args.images)
        print(f"generated {args.records} records in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        loads = [
            ("plain loader (every process, every start)", measure("plain", root, cache, 1)),
            (
                f"record cache, cold (build, num_proc={args.num_proc})",
                measure("cache", root, cache, args.num_proc),
            ),
            ("record cache, warm (read back)", measure("cache", root, cache, args.num_proc)),
        ]
        layouts = layout_steps(scratch, args.steps)
        skip = min(10, args.train_steps // 2)
        trained = [
            (variant, train_step_ms(scratch, f"run-{cache_mb}", args.train_steps, skip, cache_mb))
            for variant, cache_mb in (("no layout cache (before)", 0), ("layout cache (after)", 1024))
        ]

    print(
        f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    print(f"torch {torch.__version__}, datasets {datasets.__version__}\n")
    print(f"Parse and validate {args.records} records ({len(SUB_DATASETS)} sub-datasets):\n")
    print(
        "| loader | seconds | samples | peak RSS (MiB) | of which the load (MiB) | peak RSS of a worker (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in loads:
        workers = f"{row['workers']:.0f}" if row["workers"] > 0 else "-"
        load = row["rss"] - row["imports"]
        print(
            f"| {name} | {row['seconds']:.2f} | {row['samples']} | {row['rss']:.0f} | {load:.0f} | {workers} |"
        )
    print(f"\nLayouts per step (tiny default: sft, synth-zoom 512 records, batch 8, {args.steps} steps):\n")
    print("| variant | once at stage start (s) | layouts + collate per step (ms) | layouts built |")
    print("|---|---:|---:|---:|")
    for name, once, per_step, built in layouts:
        print(f"| {name} | {once:.2f} | {per_step:.2f} | {built} |")
    print(
        f"\nWhole training step, `latentkit train` (tiny default), median of steps {skip + 1}-{args.train_steps}:\n"
    )
    print("| variant | median step time (ms) |")
    print("|---|---:|")
    for name, ms in trained:
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
