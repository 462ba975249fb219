"""The RL loop's cost per step: rollout throughput (generated positions per second) and update time against rollout
time. Tiny presets on whatever device `latentkit train` picks.

Usage:
    python benchmarks/rl_step.py                    # 30 RL steps per variant, the first 5 not counted
    python benchmarks/rl_step.py --steps 60 --skip 10 --generations 8 --prompts 4

Each variant is one real `latentkit train` run in a scratch directory; the supervised stages before the RL stage
run 1 step each (the weights hardly matter for cost, only the lengths the rollouts reach, which the table shows).
The RL loop logs `rollout_time` (decoding the G rollouts of every prompt, scoring them, advantages and the
reference's log-probs) and `update_time` (the replayed forward, backward and optimizer step, mu times) every step;
a generated position is a sampled token or a fed latent. Dynamic sampling is off, so every step decodes the same
number of rollouts.
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
from pathlib import Path

# name -> (method, RL stage, extra settings)
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "grpo, tiny-causal-lm, synth-arith": (
        "grpo",
        "grpo",
        ["model.preset=tiny-causal-lm", "data.task=synth-arith", "train.stages.sft.steps=1"],
    ),
    "grpo, tiny-qwen2.5-vl, synth-zoom": ("grpo", "grpo", ["train.stages.sft.steps=1"]),
    "monet vlpo (latents as actions)": ("monet", "vlpo", []),
    "monet vlpo, latent_actions=false": ("monet", "vlpo", ["method.latent_actions=false"]),
}
SUPERVISED = {"monet": ["warmup", "distill", "latent"], "grpo": []}


def run(
    out: Path, name: str, method: str, stage: str, args: argparse.Namespace, extra: list[str]
) -> list[dict]:
    earlier = [f"train.stages.{s}.steps=1" for s in SUPERVISED[method]]
    command = [
        sys.executable, "-m", "latentkit", "train", "--method", method, f"run.output_dir={out}", f"run.name={name}",
        f"train.stages.{stage}.steps={args.steps}", f"train.stages.{stage}.batch_size={args.prompts}",
        f"train.rl.num_generations={args.generations}", f"train.rl.num_iterations={args.iterations}",
        f"train.rl.max_completion_length={args.max_completion_length}", f"train.checkpoint_every={args.steps}",
        "train.progress=false", "train.log_every=1", "data.synth.n_test=0", "data.synth.n_val=0",
        *earlier, *extra,
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [m for m in metrics if m.get("stage") == stage and "rollout_time" in m][args.skip :]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (per process)")
    parser.add_argument("--generations", type=int, default=8, help="G, rollouts per prompt")
    parser.add_argument("--iterations", type=int, default=1, help="mu, updates per rollout batch")
    parser.add_argument("--max-completion-length", type=int, default=64)
    args = parser.parse_args()
    import torch
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(
        f"# {datetime.date.today()}, {device}, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(f"# python {platform.python_version()}; {' '.join(sys.argv[1:]) or 'defaults'}")
    rollouts = args.prompts * args.generations
    print(
        f"# {args.steps} RL steps per variant, first {args.skip} not counted; {args.prompts} prompts x G = "
        f"{args.generations} = {rollouts} rollouts per step, mu = {args.iterations}; medians over steps"
    )
    print()
    print(
        "| variant | positions / rollout | rollout s / step | positions / s | update s / step | update / rollout |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, (method, stage, extra)) in enumerate(VARIANTS.items()):
            logged = run(Path(scratch), f"v{index}", method, stage, args, extra)
            rollout = statistics.median(m["rollout_time"] for m in logged)
            update = statistics.median(m["update_time"] for m in logged)
            length = statistics.mean(m["completion_length"] for m in logged)
            speed = statistics.median(m["completion_length"] * rollouts / m["rollout_time"] for m in logged)
            print(
                f"| {name} | {length:.1f} | {rollout:.3f} | {speed:,.0f} | {update:.3f} | {update / rollout:.2f} |"
            )


if __name__ == "__main__":
    main()
