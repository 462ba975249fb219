"""Imagined boards for trained LatentUM runs: the code head's teacher-forced accuracy against the true codes of
each target image (the auxiliary boards, every board position conditioned on the chat before the board), and the
CE per sub-code (`Latentum.code_report`), one row per run for the trained generation branch and head, and one for
where stage vision started (the branch copied from the run's text weights, the head at its initial weights).

Usage:
    python benchmarks/latentum_codes.py runs/latentum-tiny-qwen2.5-vl [more runs] --split test --limit 64

Chance is 1 / codebook_size per sub-code; the true codes are MBAQ's codes of the boards (the run's quantizer).
"""

from __future__ import annotations

from latentkit.methods.latentum.method import build_code_head
from latentum_runs import load_runs, run_parser


def main() -> None:
    parser = run_parser(__doc__, several=True)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    print("| run | C x N | generation branch | code accuracy | chance | CE per sub-code | positions |")
    print("|---|---|---|---|---|---|---|")
    for run in load_runs(args):
        method, samples = run.model.method, run.samples
        config = method.config
        entries = config.quantizer.codebook_size
        for label in ("trained", "start of stage vision"):
            if label != "trained":
                method.experts.copy_text_weights(method.backbone.decoder().layers)
                head = build_code_head(config.code_head, config.quantizer, method.backbone)
                method.modules["code_head"] = head.to(method.backbone.device)
            r = method.code_report(samples, args.batch_size)
            print(
                f"| {run.path.name} | {config.quantizer.codebooks} x {entries} | {label} | {r.accuracy:.3f} | "
                f"{1 / entries:.3f} | {r.ce:.3f} | {r.positions} |"
            )


if __name__ == "__main__":
    main()
