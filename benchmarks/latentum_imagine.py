"""Imagined boards, sampled: for each auxiliary board of each sample, LatentUM's interleaved decoding policy
imagines a board right after the gold text before it (the board's image-start token forced; earlier boards given
as images), drawing its codes with guidance as `latentkit eval` does; the codes are scored against MBAQ's codes of
the true board. Boards are matched by construction: the k-th imagined board follows the gold prefix of board k,
so text quality does not decide which board is compared. Also: the wall-clock seconds per imagined image (batch
size 1: image-start to the end of its read-back), a constant predictor (each codebook's most frequent true code)
and chance (1 / codebook size).

Usage:
    python benchmarks/latentum_imagine.py runs/latentum-tiny-qwen2.5-vl --split test --limit 64
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from latentkit.methods.latentum.method import Latentum
from latentkit.methods.latentum.pixels import encode_images
from latentum_runs import load_run, run_parser
from PIL import Image

from latentkit.chat import ResponseWeights, inline_aux_image, render_chat
from latentkit.decoding import SamplingParams, decode
from latentkit.layout import LayoutBuilder
from latentkit.segments import Sample


def prefix_before(method: Latentum, sample: Sample, board: int):
    """The chat through the gold assistant text before aux board `board` (its image-start token not included)."""
    segments = sample.segments[:board]
    builder = LayoutBuilder(method.backbone)
    render_chat(builder, replace(sample, segments=segments), inline_aux_image, ResponseWeights())
    closing = 1 + len(method.backbone.encode_text("\n"))  # the assistant turn's end token and newline
    for name in ("ids", "kinds", "segments", "labels", "weights"):
        del getattr(builder, name)[-closing:]
    return builder.build(sample.sample_id, sample.dataset)


@torch.no_grad()
def true_codes(method: Latentum, path: Path) -> torch.Tensor:
    backbone = method.backbone
    with Image.open(path) as image:
        processed = backbone.preprocess_image(image)
    pixels, grid = processed.pixel_values.to(backbone.device), torch.tensor([processed.grid_thw])
    (encoded,) = encode_images(backbone, method.quantizer, pixels, grid.to(backbone.device))
    return encoded.codes.cpu()


def main() -> None:
    args = run_parser(__doc__, several=False).parse_args()
    run = load_run(args.run, args.split, args.limit)
    method, samples = run.model.method, run.samples
    policy = replace(method.decoding_policy(), force=True)
    imagined, gold, seconds = [], [], []
    for sample in samples:
        boards = [i for i, s in enumerate(sample.segments) if s.kind == "aux_image"]
        for board in boards:
            layout = prefix_before(method, sample, board)
            codes = true_codes(method, sample.segments[board].image)
            trajectory = decode(method.backbone, [layout], SamplingParams(codes.shape[0] + 3), policy)[0]
            imagined.append(torch.tensor(trajectory.extras["imagined_codes"][0]))
            seconds.append(trajectory.extras["imagined_seconds"][0])
            gold.append(codes)
    drawn, truth = torch.cat(imagined), torch.cat(gold)
    constant = torch.tensor(
        [Counter(truth[:, c].tolist()).most_common(1)[0][0] for c in range(truth.shape[1])]
    )
    entries = method.config.quantizer.codebook_size
    print(
        f"{len(samples)} samples, {len(gold)} boards, {truth.shape[0]} positions x {truth.shape[1]} sub-codes"
    )
    print("| codes | sub-code accuracy | positions with all sub-codes right |")
    print("|---|---|---|")
    for label, codes in (
        ("imagined (sampled, guided)", drawn),
        ("constant: most frequent true code", constant),
    ):
        right = codes == truth
        print(f"| {label} | {right.float().mean():.3f} | {right.all(-1).float().mean():.3f} |")
    print(f"| chance (1 / {entries}) | {1 / entries:.3f} | - |")
    print(
        f"seconds per imagined image (batch 1): mean {statistics.mean(seconds):.3f}, "
        f"median {statistics.median(seconds):.3f}"
    )


if __name__ == "__main__":
    main()
