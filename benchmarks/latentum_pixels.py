"""LatentUM's pixel decoder on held-out synth-maze boards, for a run trained through stage pixels: every board of the
split's samples (question boards and auxiliary boards) through the frozen vision tower and MBAQ to codes, drawn back
by the pixel decoder, against the board as the tower saw it. Prints two tables:

1. Reconstruction: MSE and PSNR (RGB in [0, 1]); cells read back from the drawn board (`read_board_cells`: the tile
   and whether the agent is on it) against the true board's, per cell and per whole board; the re-encoding agreement
   (the drawn board through the vision tower and MBAQ again: sub-codes equal to the original's). Baseline: the mean
   training board drawn for every board.
2. Cost per image (batch 1, mean of --repeats after one warm-up): the vision tower + MBAQ (image -> codes), the pixel
   decoder (codes -> image), and the round trip codes -> pixel decoder -> vision tower + MBAQ -> codes.

Usage:
    python benchmarks/latentum_pixels.py runs/latentum-tiny-qwen2.5-vl --split test --limit 64
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from latentkit.methods.latentum.pixels import decode_codes, encode_images, pixel_loss, psnr, to_image
from latentum_runs import load_run, run_parser
from PIL import Image

from latentkit.records import load_split
from latentkit.synth.maze import read_board_cells


@dataclass
class Scores:
    squared_error: float = 0.0
    values: int = 0
    cells_right: int = 0
    tiles_right: int = 0
    agents_right: int = 0
    cells: int = 0
    boards_right: int = 0
    boards: int = 0
    codes_equal: int = 0
    codes: int = 0

    def add(
        self, drawn: torch.Tensor, target: torch.Tensor, truth: list, grid_size: int, cell_size: int
    ) -> None:
        self.squared_error += float(pixel_loss(drawn, target)) * target.numel()
        self.values += target.numel()
        read = read_board_cells(to_image(drawn), grid_size, cell_size)
        pairs = [
            (got, want) for got_line, want_line in zip(read, truth) for got, want in zip(got_line, want_line)
        ]
        self.cells_right += sum(got == want for got, want in pairs)
        self.tiles_right += sum(got[0] == want[0] for got, want in pairs)
        self.agents_right += sum(got[1] == want[1] for got, want in pairs)
        self.cells += len(pairs)
        self.boards_right += all(got == want for got, want in pairs)
        self.boards += 1

    def row(self, label: str) -> str:
        mse = self.squared_error / self.values
        recode = f"{self.codes_equal / self.codes:.3f}" if self.codes else "-"
        return (
            f"| {label} | {self.boards} | {mse:.4f} | {psnr(mse):.1f} | {self.cells_right / self.cells:.3f} | "
            f"{self.tiles_right / self.cells:.3f} | {self.agents_right / self.cells:.3f} | "
            f"{self.boards_right / self.boards:.3f} | {recode} |"
        )


def board_paths(data: Path, split: str, limit: int) -> list[Path]:
    return [
        path
        for sample in load_split(data, split).samples[:limit]
        for path in (*sample.images, *sample.aux_images)
    ]


def encode(model, images: list[Image.Image]):
    """PIL images -> the processor -> the vision tower and MBAQ (`EncodedImage`s)."""
    backbone = model.backbone
    inputs = [backbone.preprocess_image(image) for image in images]
    pixel_values = torch.cat([i.pixel_values for i in inputs]).to(backbone.device)
    grids = torch.tensor([i.grid_thw for i in inputs], device=backbone.device)
    return encode_images(backbone, model.method.quantizer, pixel_values, grids)


def seconds_per_call(work: Callable[[], object], repeats: int) -> float:
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


@torch.no_grad()
def main() -> None:
    parser = run_parser(__doc__, several=False)
    parser.add_argument("--batch-size", type=int, default=32, help="boards per encoding batch")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    run = load_run(args.run, args.split, args.limit)
    model, data = run.model, run.data
    method, backbone = model.method, model.backbone
    info = json.loads((data / "synth_info.json").read_text())
    grid_size, cell_size = info["grid_size"], info["cell_size"]
    decoder, quantizer = method.pixel_decoder, method.quantizer
    print(
        f"run {args.run} · decoder width {method.config.pixels.width} depth {method.config.pixels.depth} · trained on "
        f"{int(decoder.trained_batches)} batches · device {backbone.device} · torch {torch.__version__} · "
        f"transformers {transformers.__version__} · {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    train_boards = board_paths(data, "train", args.limit)
    mean_board = torch.stack(
        [
            image.pixels
            for start in range(0, len(train_boards), args.batch_size)
            for image in encode(model, [Image.open(p) for p in train_boards[start : start + args.batch_size]])
        ]
    ).mean(0)
    decoded, baseline = Scores(), Scores()
    paths = board_paths(data, args.split, args.limit)
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        encoded = encode(model, [Image.open(path) for path in chunk])
        drawn = decode_codes(quantizer, decoder, [e.codes for e in encoded], [e.grid for e in encoded])
        drawn = [image.clamp(0, 1) for image in drawn]
        again = encode(model, [to_image(image) for image in drawn])
        for path, image, board, redrawn in zip(chunk, encoded, drawn, again):
            truth = read_board_cells(Image.open(path), grid_size, cell_size)
            decoded.add(board, image.pixels, truth, grid_size, cell_size)
            decoded.codes_equal += int((redrawn.codes == image.codes).sum())
            decoded.codes += image.codes.numel()
            baseline.add(mean_board, image.pixels, truth, grid_size, cell_size)
    print()
    print(f"Reconstruction of {args.split} boards ({grid_size} x {grid_size} cells of {cell_size} px)")
    print()
    print(
        "| drawn by | boards | MSE | PSNR (dB) | cells right | tiles right | agent right | boards right | re-encoded codes equal |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(decoded.row(f"pixel decoder ({int(decoder.trained_batches)} batches)"))
    print(baseline.row(f"mean training board ({len(train_boards)} boards)"))

    board = Image.open(paths[0]).convert("RGB")
    (first,) = encode(model, [board])

    def to_codes() -> torch.Tensor:
        return encode(model, [board])[0].codes

    def draw() -> torch.Tensor:
        return decode_codes(quantizer, decoder, [first.codes], [first.grid])[0]

    def round_trip() -> torch.Tensor:
        return encode(model, [to_image(draw())])[0].codes

    print()
    print(f"Cost per image (batch 1, mean of {args.repeats})")
    print()
    print("| path | ms per image |")
    print("|---|---|")
    for label, work in (
        ("processor + vision tower + MBAQ: image -> codes", to_codes),
        ("pixel decoder: codes -> RGB tensor", draw),
        (
            "round trip: codes -> pixel decoder -> 8-bit image -> processor + vision tower + MBAQ -> codes",
            round_trip,
        ),
    ):
        print(f"| {label} | {1000 * seconds_per_call(work, args.repeats):.2f} |")


if __name__ == "__main__":
    main()
