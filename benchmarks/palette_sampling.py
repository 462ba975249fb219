"""Cost of latent pass@k against token sampling: answers per second when each of k answers to a question gets its
own prefix z (greedy or sampled decoding) against k answers that differ only by token sampling.

Usage:
    python benchmarks/palette_sampling.py --run runs/palette-tiny-causal-lm            # 16 questions x k=8
    python benchmarks/palette_sampling.py --run RUN --questions 32 --k 16 --max-new-tokens 96 --repeats 3

Each condition loads the run's final model once (`latentkit.load` with the condition's method knobs), then answers
`--questions` test questions k times each through `latentkit.eval.answer.answer_samples` (batched: all k answers
of a batch of questions decode together, as `latentkit eval -n k` does), `--repeats` times; the table gives the
median wall time and answers/s and generated tokens/s over it. Prefix conditions also build k prompts with k
decoded prefixes; that cost is inside the time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

CONDITIONS = {
    "token sampling (T=1, no prefix)": (["method.prefix=none"], 1.0),
    "latent, greedy per z": ([], 0.0),
    "latent + token (T=1)": ([], 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument(
        "--data", type=Path, help="a folder with test.json (default: the run's embedded data)"
    )
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=4, help="questions per batch (x k answers)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch
    import transformers

    import latentkit
    from latentkit.decoding import SamplingParams
    from latentkit.eval.answer import answer_samples
    from latentkit.records import load_split

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    )
    print(f"# latent vs token pass@k sampling, {datetime.date.today()}, {device}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {args.questions} questions x k={args.k}, "
          f"max {args.max_new_tokens} new tokens, median of {args.repeats}")  # fmt: skip
    data = args.data or next(path for path in (args.run / "data").iterdir() if (path / "test.json").is_file())
    samples = load_split(data, "test").samples[: args.questions]
    repeated = [sample for sample in samples for _ in range(args.k)]
    draws = [draw for _ in samples for draw in range(args.k)]
    print("| condition | answers | seconds | answers/s | tokens/s |")
    print("|---|---|---|---|---|")
    for name, (overrides, temperature) in CONDITIONS.items():
        model = latentkit.load(args.run, overrides)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temperature, seed=0)
        times, tokens = [], 0
        for _ in range(args.repeats):
            started = time.perf_counter()
            answers = answer_samples(model.method, repeated, params, args.batch_size * args.k, draws=draws)
            times.append(time.perf_counter() - started)
            tokens = sum(t.steps for answer in answers for t in answer.trajectories)
        seconds = statistics.median(times)
        print(
            f"| {name} | {len(repeated)} | {seconds:.2f} | {len(repeated) / seconds:.1f} | {tokens / seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
