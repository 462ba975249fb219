"""`latentkit eval` in one process against two processes of `accelerate launch`, on the CPU (gloo).

Usage:
    python benchmarks/eval_processes.py                      # 32 questions, batch 4, 32 new tokens
    python benchmarks/eval_processes.py --samples 64 --repeats 3

Model: the embedded default of `latentkit train --method sft` (tiny-qwen2.5-vl, float32, random weights) trained
for 4 steps, evaluated on the test split of its own synth-zoom task. Each eval is a fresh command, timed from
start to exit (imports, model load and the answers); the two results must be byte-identical.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import accelerate
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    latentkit = [sys.executable, "-m", "latentkit"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "29731"]
    launch += ["--config_file", str(REPO / "configs/accelerate/cpu_2proc.yaml"), "-m", "latentkit"]
    with tempfile.TemporaryDirectory() as root:
        runs = Path(root)
        train = ["train", f"run.output_dir={runs}", "run.name=sft", "train.steps=4", "train.progress=false"]
        subprocess.run([*latentkit, *train, f"data.synth.n_test={args.samples}"], cwd=REPO, check=True)
        rows = []
        for name, prefix in (("1 process", latentkit), ("2 processes (gloo)", launch)):
            times, out = [], runs / name.split()[0] / "zoom.jsonl"
            for _ in range(args.repeats):
                out.unlink(missing_ok=True)  # a fresh eval, not a resume
                command = [*prefix, "eval", "--run", str(runs / "sft"), "--benchmark", "synth-zoom"]
                command += ["--out", str(out), "--batch-size", str(args.batch_size), "--no-progress"]
                times.append(timed([*command, "--max-new-tokens", str(args.max_new_tokens)]))
            rows.append((name, statistics.median(times), out.read_bytes()))
    assert rows[0][2] == rows[1][2], "the two evals wrote different results"
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, accelerate {accelerate.__version__}"
    )
    print(f"{args.samples} questions, batch {args.batch_size}, {args.max_new_tokens} new tokens, CPU\n")
    print("| processes | wall time (s) | speed-up |\n|---|---:|---:|")
    for name, seconds, _ in rows:
        print(f"| {name} | {seconds:.1f} | {rows[0][1] / seconds:.2f}x |")
    print("\nresults byte-identical: yes")


if __name__ == "__main__":
    main()
