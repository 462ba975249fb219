"""VaLR's training cost: step time of stage `align` against stage `sft`, with the encoder features read from the
feature cache against the encoders run at every step, and without alignment (lambda = 0: the latent segments' own
cost). Tiny default on whatever device `latentkit train` picks.

Usage:
    python benchmarks/valr_step.py                      # 60 steps per stage, the first 10 not counted
    python benchmarks/valr_step.py --steps 100 --skip 10 --encoders tiny-dinov2,tiny-siglip

Each variant is one real `latentkit train --method valr` run (both stages, the same seed and batches) in a scratch
directory. A step's time is the trainer's own `step_time` in metrics.jsonl (batch construction, the latent fill,
forward, backward, optimizer); checkpoints are written only after the last step. "Whole run" is the wall time of
the command (start-up, data, both stages and, for `cache`, building the feature cache once).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "cache": ["method.feature_cache=true"],
    "on the fly": ["method.feature_cache=false"],
    "lambda=0": ["method.alignment_weight=0"],
}


def run(out: Path, name: str, steps: int, encoders: list[str], extra: list[str]) -> list[dict]:
    listed = ", ".join(f"{{preset: {encoder}}}" for encoder in encoders)
    command = [
        sys.executable, "-m", "latentkit", "train", "--method", "valr", f"run.output_dir={out}", f"run.name={name}",
        f"train.steps={steps}", f"train.checkpoint_every={steps}", "train.progress=false", "train.log_every=1",
        "data.synth.n_test=0", f"method.encoders=[{listed}]", *extra,
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def median_ms(metrics: list[dict], stage: str, skip: int) -> float:
    times = [m["step_time"] for m in metrics if m.get("stage") == stage and "step_time" in m][skip:]
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--encoders", default="tiny-dinov2")
    args = parser.parse_args()
    import torch
    import transformers

    encoders = args.encoders.split(",")
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    )
    print(f"# VaLR step time, {datetime.date.today()}, {device}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, encoders {', '.join(encoders)}, {args.steps} steps per stage, "
          f"first {args.skip} not counted")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for variant, extra in VARIANTS.items():
            started = time.perf_counter()
            metrics = run(
                Path(scratch), variant.replace(" ", "-").replace("=", ""), args.steps, encoders, extra
            )
            rows.append((variant, median_ms(metrics, "sft", args.skip), median_ms(metrics, "align", args.skip),
                         time.perf_counter() - started))  # fmt: skip
    sft = statistics.median(row[1] for row in rows)
    print("| align variant | sft step (ms) | align step (ms) | align / sft | whole run (s) |")
    print("|---|---|---|---|---|")
    for variant, sft_ms, align_ms, seconds in rows:
        print(f"| {variant} | {sft_ms:.1f} | {align_ms:.1f} | {align_ms / sft:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
