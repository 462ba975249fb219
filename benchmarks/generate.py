"""Batched generation against one-at-a-time generation, tiny default on CPU (issue target: at least 4x at batch 16).

Usage:
    python benchmarks/generate.py                                   # 32 prompts, batch 16, 32 new tokens
    python benchmarks/generate.py --prompts 64 --batch-size 16 --max-new-tokens 64 --repeats 3

Model: the tiny-qwen2.5-vl preset (float32, random weights, seed 0) with the `sft` method's prompts on the
embedded synth-zoom test split (one image per prompt). A random model rarely emits the end-of-turn token,
so nearly every sequence runs the full `--max-new-tokens`; the rows report the tokens actually generated.

  * one-at-a-time: `generate(backbone, [layout], params)` per prompt (still with a KV cache; what a loop
    over samples does).
  * batched: `generate(backbone, layouts[i:i+B], params)` per batch of B prompts (left padding, one forward
    per step for the whole batch).

Both include building the layouts (image preprocessing, tokenizing) and the vision tower. Greedy outputs of
the two are compared and must be identical. Times are the median over `--repeats` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from latentkit.backbone import build_backbone
from latentkit.config import ModelSection
from latentkit.eval.generate import SamplingParams, generate
from latentkit.records import load_split
from latentkit.registry import get_method
from latentkit.synth import get_synth_task


def timed(function) -> tuple[float, list]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = build_backbone(ModelSection())
    backbone.model.eval()
    method = get_method("sft")(get_method("sft").Config())
    method.setup(backbone)
    with tempfile.TemporaryDirectory() as scratch:
        task = get_synth_task("synth-zoom")
        task.generate(Path(scratch), n_train=1, n_val=1, n_test=args.prompts, seed=0, variant="open")
        samples = load_split(Path(scratch), "test").samples
        params = SamplingParams(max_new_tokens=args.max_new_tokens)

        def one_at_a_time() -> list:
            return [
                generate(backbone, [method.prompt(s).build(s.sample_id, s.dataset)], params)[0]
                for s in samples
            ]

        def batched() -> list:
            out = []
            for start in range(0, len(samples), args.batch_size):
                chunk = samples[start : start + args.batch_size]
                out.extend(
                    generate(
                        backbone, [method.prompt(s).build(s.sample_id, s.dataset) for s in chunk], params
                    )
                )
            return out

        results = {}
        for name, function in (("one-at-a-time", one_at_a_time), (f"batched (B={args.batch_size})", batched)):
            function()  # warm-up
            runs = [timed(function) for _ in range(args.repeats)]
            results[name] = (statistics.median(t for t, _ in runs), runs[0][1])

    (single_time, single), (_, batch) = results.values()
    same = [a.token_ids for a in single] == [b.token_ids for b in batch]
    tokens = sum(len(g.token_ids) for g in batch)
    print(
        f"device: {platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}; prompts {args.prompts}, max_new_tokens {args.max_new_tokens}, "
        f"repeats {args.repeats}"
    )
    print("| mode | median s | samples/s | generated tokens/s | speed-up |")
    print("|---|---|---|---|---|")
    for name, (seconds, _) in results.items():
        print(
            f"| {name} | {seconds:.2f} | {args.prompts / seconds:.1f} | {tokens / seconds:.0f} | "
            f"{single_time / seconds:.2f}x |"
        )
    print(f"greedy outputs identical: {same}")


if __name__ == "__main__":
    main()
