"""The decoding engine: batched against one-at-a-time, and the cost of its trajectories and log-probs, tiny
default on CPU (targets: batched/one-at-a-time at least the recorded 5.76x at batch 16).

Usage:
    python benchmarks/generate.py                                   # 32 prompts, batch 16, 32 new tokens
    python benchmarks/generate.py --prompts 64 --batch-size 16 --max-new-tokens 64 --repeats 3

Model: the tiny-qwen2.5-vl preset (float32, random weights, seed 0) with the `sft` method's prompts on the
embedded synth-zoom test split (one image per prompt). A random model rarely emits the end-of-turn token,
so nearly every sequence runs the full `--max-new-tokens`; the rows report the tokens actually generated.

  * one-at-a-time: `decode(backbone, [layout], params)` per prompt (still with a KV cache; what a loop
    over samples does).
  * batched: `decode(backbone, layouts[i:i+B], params)` per batch of B prompts (left padding, one forward
    per step for the whole batch), returning trajectories with per-position log-probs.
  * batched, ids only: the same batches through a bare greedy loop in this file (forward, argmax, append; no
    policy, no trajectory, no log-softmax): what returning trajectories and log-probs costs.

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
from latentkit.decoding import SamplingParams, decode, left_pad
from latentkit.masks import causal_mask, with_padding
from latentkit.records import load_split
from latentkit.registry import get_method
from latentkit.synth import get_synth_task


def timed(function) -> tuple[float, list]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


@torch.no_grad()
def ids_only(backbone, layouts, max_new_tokens: int) -> list[list[int]]:
    """Greedy ids with a KV cache and nothing else recorded (the reference for the engine's bookkeeping)."""
    from transformers import DynamicCache

    embeds, positions, valid = left_pad(layouts, backbone)
    size = embeds.shape[0]
    next_position = positions.amax(dim=-1).reshape(-1, size).amax(dim=0) + 1
    cache = DynamicCache(config=backbone.hf_model().config)
    out = backbone.forward(embeds, positions, with_padding(causal_mask(size, valid.shape[1]), valid), cache)
    tokens: list[list[int]] = [[] for _ in range(size)]
    for step in range(max_new_tokens):
        chosen = backbone.logits(out.last_hidden_state[:, -1]).argmax(dim=-1)
        for row, token in enumerate(chosen.tolist()):
            tokens[row].append(token)
        if step + 1 == max_new_tokens:
            break
        valid = torch.cat([valid, torch.ones(size, 1, dtype=torch.bool)], dim=1)
        step_positions = (next_position + step)[:, None]
        if positions.dim() == 3:
            step_positions = step_positions[None].expand(3, size, 1)
        mask = with_padding(causal_mask(size, valid.shape[1]), valid)
        out = backbone.forward(backbone.embed(chosen)[:, None], step_positions, mask, out.cache)
    return tokens


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
                decode(backbone, [method.prompt(s).build(s.sample_id, s.dataset)], params)[0] for s in samples
            ]

        def batched() -> list:
            out = []
            for start in range(0, len(samples), args.batch_size):
                chunk = samples[start : start + args.batch_size]
                out.extend(
                    decode(backbone, [method.prompt(s).build(s.sample_id, s.dataset) for s in chunk], params)
                )
            return out

        def batched_ids_only() -> list:
            out = []
            for start in range(0, len(samples), args.batch_size):
                chunk = samples[start : start + args.batch_size]
                out.extend(
                    ids_only(
                        backbone,
                        [method.prompt(s).build(s.sample_id, s.dataset) for s in chunk],
                        args.max_new_tokens,
                    )
                )
            return out

        results = {}
        modes = (
            ("one-at-a-time", one_at_a_time),
            (f"batched (B={args.batch_size})", batched),
            (f"batched, ids only (B={args.batch_size})", batched_ids_only),
        )
        for name, function in modes:
            function()  # warm-up
            runs = [timed(function) for _ in range(args.repeats)]
            results[name] = (statistics.median(t for t, _ in runs), runs[0][1])

    (single_time, single), (batch_time, batch), (_, bare) = results.values()
    same = [a.token_ids for a in single] == [b.token_ids for b in batch]
    # the engine stops a row at the end-of-turn token; the bare loop does not, so compare up to it
    same_as_bare = all(b.token_ids == ids[: len(b.token_ids)] for b, ids in zip(batch, bare))
    tokens = sum(len(g.token_ids) for g in batch)
    print(
        f"device: {platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}; prompts {args.prompts}, max_new_tokens {args.max_new_tokens}, "
        f"repeats {args.repeats}"
    )
    print("| mode | median s | samples/s | generated tokens/s | speed-up vs one-at-a-time |")
    print("|---|---|---|---|---|")
    for name, (seconds, _) in results.items():
        print(
            f"| {name} | {seconds:.2f} | {args.prompts / seconds:.1f} | {tokens / seconds:.0f} | "
            f"{single_time / seconds:.2f}x |"
        )
    bare_time = list(results.values())[2][0]
    print(
        f"cost of trajectories and log-probs: {100 * (batch_time / bare_time - 1):+.1f}% time against ids only"
    )
    print(f"greedy outputs identical: one-at-a-time vs batched {same}; batched vs ids only {same_as_bare}")


if __name__ == "__main__":
    main()
