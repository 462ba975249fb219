"""Batched latent fill against a one-sample-at-a-time loop, tiny Monet default on CPU (issue target: at least 4x
at batch 8).

Usage:
    python benchmarks/latent_fill.py                       # 32 samples, batch 8, K=8, stage-2 sequences
    python benchmarks/latent_fill.py --samples 64 --batch-size 8 --num-latents 8 --repeats 5 --task synth-maze

Model: the tiny-qwen2.5-vl preset (float32, random weights, seed 0) with Monet's stage-2 layouts (each
auxiliary image followed by start, K slots, end) under the controlled mask, on the embedded synthetic task's
train split. Both modes run `fill_latents` without gradient (the forward 1 of stage 2):

  * one-at-a-time, recompute: one sample at a time, one latent at a time, a full forward over the prefix for
    every latent (`fill_latents_reference`; the public code's loop is batch 1, one latent at a time).
  * one-at-a-time, cached: one sample per `fill_latents` call (batch 1 with a KV cache), the stronger baseline.
  * batched: B samples per call; as many forwards as the sample with the most slots has slots.

Both include the vision tower and building the mask; layouts are built once, outside the timing. The latents
of the two modes are compared (max absolute difference). Times are the median over `--repeats` runs after
one warm-up.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from latentkit.methods.monet import Monet, MonetConfig

from latentkit.backbone import build_backbone
from latentkit.config import ModelSection
from latentkit.latent import fill_latents_reference
from latentkit.layout import collate, inputs_embeds, latent_slot_positions
from latentkit.records import load_split
from latentkit.synth import get_synth_task


def fill(method: Monet, layouts: list) -> list[torch.Tensor]:
    backbone = method.backbone
    batch = collate(layouts, backbone.tokenizer.pad_token_id)
    mask = method.mask(batch, "distill")
    filled = method.fill_batch(batch, inputs_embeds(backbone, batch), mask)
    return [filled.values[b, : int((filled.positions[b] >= 0).sum())] for b in range(len(layouts))]


def fill_recomputing(method: Monet, layout) -> torch.Tensor:
    backbone = method.backbone
    batch = collate([layout], backbone.tokenizer.pad_token_id)
    mask = method.mask(batch, "distill")
    slots = [latent_slot_positions(layout)]
    return fill_latents_reference(backbone, inputs_embeds(backbone, batch), batch.position_ids, mask, slots)[
        0
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-latents", type=int, default=8)
    parser.add_argument("--task", default="synth-zoom", choices=["synth-zoom", "synth-maze"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = build_backbone(ModelSection())
    backbone.model.eval()
    method = Monet(MonetConfig(num_latents=args.num_latents))
    method.setup(backbone)
    with tempfile.TemporaryDirectory() as scratch:
        task = get_synth_task(args.task)
        task.generate(
            Path(scratch), n_train=args.samples, n_val=1, n_test=1, seed=0, variant=task.default_variant
        )
        layouts = [method.layout(s, "distill") for s in load_split(Path(scratch), "train").samples]

        def recomputing() -> list[torch.Tensor]:
            return [fill_recomputing(method, layout) for layout in layouts]

        def one_at_a_time() -> list[torch.Tensor]:
            return [fill(method, [layout])[0] for layout in layouts]

        def batched() -> list[torch.Tensor]:
            out: list[torch.Tensor] = []
            for start in range(0, len(layouts), args.batch_size):
                out.extend(fill(method, layouts[start : start + args.batch_size]))
            return out

        results = {}
        with torch.no_grad():
            modes = (
                ("one-at-a-time, recompute", recomputing),
                ("one-at-a-time, cached", one_at_a_time),
                (f"batched (B={args.batch_size})", batched),
            )
            for name, function in modes:
                function()  # warm-up
                runs = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    latents = function()
                    runs.append(time.perf_counter() - started)
                results[name] = (statistics.median(runs), latents)

    (recompute_time, recomputed), (single_time, single), (_, batch) = results.values()
    difference = max(
        float((a - b).abs().max())
        for reference in (recomputed, single)
        for a, b in zip(reference, batch)
        if a.numel()
    )
    slots = sum(int(latents.shape[0]) for latents in batch)
    tokens = sum(len(layout) for layout in layouts)
    print(
        f"device: {platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}; task {args.task}, {args.samples} samples ({tokens} tokens, {slots} latent "
        f"slots), K={args.num_latents}, repeats {args.repeats}"
    )
    print("| mode | median s | samples/s | latents/s | speed-up vs recompute | vs cached |")
    print("|---|---|---|---|---|---|")
    for name, (seconds, _) in results.items():
        print(
            f"| {name} | {seconds:.3f} | {args.samples / seconds:.1f} | {slots / seconds:.0f} | "
            f"{recompute_time / seconds:.2f}x | {single_time / seconds:.2f}x |"
        )
    print(f"max |latent difference| from batched: {difference:.2e}")


if __name__ == "__main__":
    main()
