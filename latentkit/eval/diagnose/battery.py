"""`latentkit diagnose`: do a latent method's latents matter? (README.md, "Monet", "Do the
latents matter?": collapse, trigger rate, constant-latent accuracy.) Works on any method whose decoding
policy is a `latentkit.latent.ContinuousPolicy`.

The battery, every decoding greedy and through `answer_samples` as `eval` decodes:
- as generated (the method's own K) and forced (every answer opens a latent block); the baseline is the
  generated run, or the forced one when no generated answer opens a block;
- replacements of every latent (the Token Replacement Test): identity (must reproduce the baseline exactly,
  checked), zeros, constant, noise, norm- and moment-matched noise, the dataset mean, the block's first
  latent repeated, another sample's latents (swap), the method's oracle latents, and K = 0 (start and end
  markers only);
- inputs: the question image swapped with another sample's, or blanked;
- a test-time K sweep;
- from the baseline latents: raw and centred similarity, linear probes of the task's attributes, top-1
  retrieval against the oracle; from a replay of the baseline: PRISM's gap and the attention mass.
Writes `<benchmark>-<split>.json`, `.md` and `.png`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentkit.decoding import SamplingParams
from latentkit.errors import ConfigError
from latentkit.eval.benchmarks import get_benchmark
from latentkit.eval.diagnose.channel import channel_summary
from latentkit.eval.diagnose.conditions import (
    ConditionRun,
    Runner,
    blanked_images,
    compared,
    derangement,
    identical,
    swapped_images,
)
from latentkit.eval.diagnose.hidden import BlockReadout, mean_attention, read_blocks
from latentkit.eval.diagnose.measures import (
    Latents,
    aligned_first_blocks,
    latent_statistics,
    relative_change,
    retrieval_top1,
    step_means,
)
from latentkit.eval.diagnose.probes import categorical_attributes, ridge_probe, variance_explained
from latentkit.eval.diagnose.report import markdown_report, plot_report
from latentkit.eval.model import EvalModel
from latentkit.eval.processes import eval_processes
from latentkit.eval.runner import load_eval_set, model_output_dir
from latentkit.eval.scorers import get_scorer
from latentkit.latent import (
    Constant,
    ContinuousPolicy,
    DatasetMean,
    Identity,
    Intervention,
    MomentMatchedNoise,
    Noise,
    NormMatchedNoise,
    RepeatFirst,
    Transplant,
    Zeros,
)
from latentkit.records import write_json
from latentkit.registry import Method
from latentkit.segments import Sample

DEFAULT_K_SWEEP = (1, 2, 4, 8, 12, 16)


@dataclass(frozen=True)
class DiagnoseOptions:
    benchmark: str
    data: Path | None = None
    split: str = "test"
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int | None = None  # default: the benchmark's
    k_sweep: tuple[int, ...] = DEFAULT_K_SWEEP
    seed: int = 0  # noise interventions, the swap derangement, probe folds

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens < 2:
            raise ConfigError(
                f"--max-new-tokens must be at least 2 (a start token and one latent), got {self.max_new_tokens}"
            )
        if not self.k_sweep or min(self.k_sweep) < 1:
            raise ConfigError(f"--k-sweep needs K values of at least 1, got {list(self.k_sweep)}")


def parse_k_sweep(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--k-sweep must be comma-separated integers such as 1,2,4,8, got {text!r}"
        ) from None


def continuous_policy(method: Method) -> ContinuousPolicy:
    policy = method.decoding_policy()
    if not isinstance(policy, ContinuousPolicy):
        raise ConfigError(
            f"method {method.name!r} does not decode with continuous steps diagnose can vary (its policy is "
            f"{type(policy).__name__}); diagnose needs a method whose decoding policy is a "
            "latentkit.latent.ContinuousPolicy (test-time K, forcing, interventions), such as monet's or latentum's"
        )
    return policy


def default_output_dir(model: EvalModel) -> Path:
    return model_output_dir(model, "diagnose")


def output_paths(out_dir: Path, options: DiagnoseOptions) -> dict[str, Path]:
    """`<benchmark>-<split>` plus the options that differ from the defaults, so no setting overwrites another."""
    tag = [f"limit{options.limit}"] if options.limit else []
    tag += [f"max{options.max_new_tokens}"] if options.max_new_tokens else []
    tag += ["k" + "_".join(map(str, options.k_sweep))] if options.k_sweep != DEFAULT_K_SWEEP else []
    tag += [f"seed{options.seed}"] if options.seed else []
    stem = "-".join([options.benchmark, options.split, *tag])
    return {suffix: out_dir / f"{stem}.{suffix}" for suffix in ("json", "md", "png")}


def diagnose(
    model: EvalModel,
    options: DiagnoseOptions,
    out_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the battery, write the JSON, Markdown and PNG reports; return the report and their paths."""
    if eval_processes(model.backbone.device).count > 1:
        raise ConfigError(
            "latentkit diagnose runs in one process (its measures compare samples with one another): run it "
            "without accelerate launch (--device cuda puts it on a GPU)"
        )
    began = time.perf_counter()
    base = continuous_policy(model.method)
    benchmark = get_benchmark(options.benchmark)
    out_dir = Path(out_dir) if out_dir is not None else default_output_dir(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_set = load_eval_set(
        benchmark, model.config, model.run_dir, options.data, options.split, options.limit, out_dir
    )
    samples = eval_set.samples
    params = SamplingParams(
        max_new_tokens=options.max_new_tokens or benchmark.max_new_tokens, seed=options.seed
    )
    runner = Runner(model.method, samples, get_scorer(eval_set.scorer), params, options.batch_size, base, log)
    generated = runner.run("generated", base.k, base.force)
    forced = runner.run("forced", base.k, True)
    # Without a single generated latent, replacing latents changes nothing: the later conditions force them.
    force = base.force or not any(generated.triggered)
    baseline = forced if force else generated
    notes: list[str] = []
    stats = latent_statistics(baseline.latents)

    identity = runner.run("identity", base.k, force, Identity())
    if not identical(identity, baseline):
        raise RuntimeError(
            "diagnose: the identity replacement changed the answers or latents; the intervention path is broken"
        )
    replacements = _replacements(model, samples, baseline, stats["mean_rms"], options.seed, notes)
    replaced = [identity, *(runner.run(i.name, base.k, force, i) for i in replacements)]
    replaced.append(runner.run("k=0", 0, force))
    oracle_blocks = model.method.oracle_latents(samples, model.run_dir)
    if oracle_blocks is None:
        notes.append(
            "oracle: skipped; the method gives no oracle latents for these samples (Monet's need the run's "
            "stage-2 model and an auxiliary image in every sample)"
        )
    else:
        oracle = Transplant(
            {s.key: list(b.float().cpu()) for s, b in zip(samples, oracle_blocks)}, 1, "oracle"
        )
        replaced.append(runner.run("oracle", base.k, force, oracle))
    channel_results = model.method.latent_channel(samples, model.run_dir)
    if channel_results is None:
        notes.append(
            "channel check: skipped; the method gives no teacher-forced channel check for these samples"
        )
    inputs, input_runs = _input_conditions(runner, samples, base.k, force, options.seed, out_dir, notes)
    sweep = [runner.run(f"k={k}", k, force) for k in options.k_sweep]
    readout = read_blocks(model.backbone, baseline.trajectories, base.kind, options.batch_size)

    report = {
        "model": model.describe(),
        "benchmark": benchmark.name,
        "benchmark_version": benchmark.version,
        "split": options.split,
        "scorer": eval_set.scorer,
        "chance_level": eval_set.chance_level,
        "num_samples": len(samples),
        "data": eval_set.source,
        "decoding": {
            "k": base.k,
            "force": base.force,
            "policy": type(base).__name__,
            "greedy": True,
            "max_new_tokens": params.max_new_tokens,
            "batch_size": options.batch_size,
            "seed": options.seed,
        },
        "generated": {
            **generated.summary(),
            "accuracy_triggered": generated.accuracy_where(True),
            "accuracy_untriggered": generated.accuracy_where(False),
        },
        "forced": forced.summary(),
        "latents_forced": force,  # replacements, input conditions and the K sweep decode forced latent blocks
        "collapse": {**stats, "latents_from": baseline.name},
        "interventions": {
            "baseline": baseline.name,
            "baseline_accuracy": baseline.accuracy,
            "baseline_interval": baseline.summary()["interval"],
            "identity_reproduces_baseline": True,  # checked above: diagnose stops otherwise
            "conditions": {run.name: compared(run, baseline) for run in replaced},
        },
        "inputs": inputs,
        "k_sweep": [{"k": k, **compared(run, baseline)} for k, run in zip(options.k_sweep, sweep)],
        "probes": _probes(samples, baseline.latents, options.seed),
        "prism": _prism(samples, readout, model, options.seed),
        "attention": mean_attention(readout.attention),
        "retrieval": _retrieval(baseline.latents, oracle_blocks),
        "channel": None
        if channel_results is None
        else channel_summary(channel_results, eval_set.chance_level),
        "notes": notes,
        "per_sample": _per_sample(samples, [generated, forced, *replaced, *input_runs, *sweep]),
        "seconds": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    report["seconds"] = round(time.perf_counter() - began, 1)
    paths = output_paths(out_dir, options)
    write_json(paths["json"], report)
    paths["md"].write_text(markdown_report(report), encoding="utf-8")
    plot_report(report, paths["png"])
    return report, paths


def _replacements(
    model: EvalModel, samples: list[Sample], baseline: ConditionRun, rms: float, seed: int, notes: list[str]
) -> list[Intervention]:
    """Every latent replaced by rule; the swap feeds another sample's baseline latents (a fixed derangement
    over the samples with a baseline block)."""
    found: list[Intervention] = [
        Zeros(),
        Constant(torch.full((model.backbone.hidden_size,), rms)),
        Noise(seed),
        NormMatchedNoise(seed),
        MomentMatchedNoise(seed),
        DatasetMean(step_means(baseline.latents)),
        RepeatFirst(),
    ]
    donors = [i for i, blocks in enumerate(baseline.latents) if blocks]
    if len(donors) < 2:
        notes.append("swap: skipped; fewer than two samples have baseline latents to exchange")
        return found
    shuffled = derangement(len(donors), seed)
    given_by = {donors[i]: donors[shuffled[i]] for i in range(len(donors))}
    blocks = {
        sample.key: baseline.latents[given_by.get(i, donors[i % len(donors)])]
        for i, sample in enumerate(samples)
    }
    found.append(Transplant(blocks, 0, "swap"))
    return found


def _input_conditions(
    runner: Runner,
    samples: list[Sample],
    k: int | None,
    force: bool,
    seed: int,
    out_dir: Path,
    notes: list[str],
) -> tuple[dict[str, dict[str, Any]], list[ConditionRun]]:
    """The question image swapped (the swap's derangement) or blanked: accuracy, and how far the latents
    move relative to the across-input spread (`relative_change`); the swap also measures how close they come
    to the donor's own latents (`toward_donor`: 0 = the donor's latents)."""
    if len(samples) < 2 or not all(sample.images for sample in samples):
        notes.append("input conditions: skipped; they need at least two samples, each with a question image")
        return {}, []
    baseline = runner.done[(k, force)]
    donors = derangement(len(samples), seed)
    swap = runner.run("image_swap", k, force, samples=swapped_images(samples, donors))
    blank = runner.run("image_blank", k, force, samples=blanked_images(samples, out_dir / "blank-images"))
    results = {}
    for run in (swap, blank):
        aligned = aligned_first_blocks([baseline.latents, run.latents])
        reference, changed = aligned.matrices
        result = {
            **compared(run, baseline),
            "relative_change": relative_change(reference, changed) if aligned.indices else None,
        }
        if run is swap:
            result["toward_donor"] = _toward_donor(baseline.latents, run.latents, donors)
        results[run.name] = result
    return results, [swap, blank]


def _toward_donor(reference: Latents, swapped: Latents, donors: list[int]) -> float | None:
    """relative_change of the swapped latents against the image donor's baseline latents."""
    aligned = aligned_first_blocks([[reference[d] for d in donors], swapped])
    return relative_change(*aligned.matrices) if len(aligned.indices) >= 2 else None


def _probes(samples: list[Sample], latents: Latents, seed: int) -> dict[str, Any]:
    """A linear probe per categorical metadata attribute, on each sample's first latent block (flattened)."""
    aligned = aligned_first_blocks([latents])
    picked = [samples[i] for i in aligned.indices]
    results = {}
    for name, labels in categorical_attributes(picked).items():
        probe = ridge_probe(aligned.matrices[0], labels, seed=seed)
        if probe is not None:
            results[name] = {
                **probe.to_json(),
                "variance_explained": variance_explained(aligned.matrices[0], labels),
            }
    return {"features": f"first latent block, {aligned.steps} steps, flattened", "attributes": results}


def _prism(
    samples: list[Sample], readout: BlockReadout, model: EvalModel, seed: int
) -> dict[str, Any] | None:
    """The gold answer from the last-layer hidden states at the latent positions (mean over the block) and at
    the first position after the block: a linear probe, and the logit lens (how often the LM head's top-1
    token there is the answer's first token, over positions)."""
    if not readout.indices:
        return None
    gold = [samples[i].answer or "" for i in readout.indices]
    first_tokens = [(model.backbone.encode_text(text) or [-1])[0] for text in gold]
    at_latents = ridge_probe(readout.at_latents, gold, seed=seed)
    after = ridge_probe(readout.after, gold, seed=seed)
    lens_latent = [
        token == first for tops, first in zip(readout.lens_at_latents, first_tokens) for token in tops
    ]
    lens_after = [token == first for token, first in zip(readout.lens_after, first_tokens)]
    return {
        "samples": len(readout.indices),
        "classes": len(set(gold)),
        "at_latents": {
            "probe": at_latents.to_json() if at_latents else None,
            "logit_lens": sum(lens_latent) / len(lens_latent),
        },
        "after_block": {
            "probe": after.to_json() if after else None,
            "logit_lens": sum(lens_after) / len(lens_after),
        },
    }


def _retrieval(latents: Latents, oracle_blocks: Sequence[torch.Tensor] | None) -> dict[str, Any] | None:
    """Top-1 retrieval of each sample's latents among every sample's oracle (cosine). The oracle holds the
    hidden states *at* the slots, which feed the next slot: latent steps 1.. are matched to oracle slots 0..
    of the first block."""
    if oracle_blocks is None:
        return None
    oracle = [[blocks[0]] for blocks in oracle_blocks]
    model_latents = aligned_first_blocks([latents], skip=1)
    keep = model_latents.indices
    if len(keep) < 2:
        return None
    steps = min(model_latents.steps, min(int(oracle[i][0].shape[0]) for i in keep))
    dimension = oracle[keep[0]][0].shape[-1]
    mine = model_latents.matrices[0][:, : steps * dimension]
    theirs = torch.stack([oracle[i][0][:steps].flatten() for i in keep]).double()
    return {
        "top1": retrieval_top1(mine, theirs),
        "top1_centred": retrieval_top1(mine, theirs, centre=True),
        "chance": 1 / len(keep),
        "samples": len(keep),
        "steps": steps,
    }


def _per_sample(samples: Sequence[Sample], runs: list[ConditionRun]) -> list[dict[str, Any]]:
    return [
        {
            "sample_id": sample.sample_id,
            "gold": sample.answer or "",
            "answers": {
                run.name: {
                    "extracted": run.extracted[index],
                    "correct": run.correct[index],
                    "latent_blocks": len(run.latents[index]),
                    "latent_steps": sum(run.block_lengths[index]),
                }
                for run in runs
            },
        }
        for index, sample in enumerate(samples)
    ]
