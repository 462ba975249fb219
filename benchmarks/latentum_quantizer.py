"""MBAQ's behaviour fidelity on a split, for trained LatentUM runs: answer agreement with the unquantized model,
mean behaviour KL, codebook usage and perplexity (`Latentum.quantizer_report`), one table row per run, plus the same
run's quantizer at its initial weights (before any training step) for reference.

Usage:
    python benchmarks/latentum_quantizer.py runs/latentum-tiny-qwen2.5-vl [more runs] --split test --limit 64

Agreement is teacher-forced over the gold response: the fraction of answer positions whose top-1 token under the
quantized image features is the unquantized model's; `answer` counts samples whose every answer position agrees.
"""

from __future__ import annotations

from latentkit.methods.latentum.method import build_quantizer
from latentum_runs import load_runs, run_parser


def main() -> None:
    parser = run_parser(__doc__, several=True)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    print("| run | C x N | quantizer | agreement | answer | KL | usage | perplexity | positions |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in load_runs(args):
        method, samples = run.model.method, run.samples
        config = method.config.quantizer
        trained = method.modules["quantizer"]
        for label in ("initial", "trained"):
            if label == "initial":
                method.modules["quantizer"] = build_quantizer(config, method.backbone).to(
                    method.backbone.device
                )
            else:
                method.modules["quantizer"] = trained
            r = method.quantizer_report(samples, args.batch_size)
            print(
                f"| {run.path.name} | {config.codebooks} x {config.codebook_size} | {label} | {r.agreement:.3f} | "
                f"{r.answer_agreement:.3f} | {r.kl:.2e} | {r.usage:.3f} | {r.perplexity:.1f} | {r.positions} |"
            )


if __name__ == "__main__":
    main()
