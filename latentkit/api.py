"""The Python API for notebooks and scripts: `train`, `load`, `generate`, `evaluate` (README.md, "From Python").

The CLI commands are thin layers over these; everything a command can do, a script can do in one process.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from latentkit.config import LatentkitConfig, apply_override, build_config, parse_override, raw_config
from latentkit.decoding import DecodingPolicy, SamplingParams
from latentkit.eval.answer import Answer, AuxImages, answer_samples
from latentkit.eval.model import EvalModel, load_eval_model
from latentkit.registry import get_method
from latentkit.segments import Sample, Segment

SYSTEM_PROMPT = "You are a helpful assistant."


def resolve_config(
    config: LatentkitConfig | Mapping[str, Any] | str | Path | None = None, overrides: Sequence[str] = ()
) -> LatentkitConfig:
    """A full run config from a config object, a mapping of sections, or a YAML path, plus `key=value` overrides."""
    if isinstance(config, LatentkitConfig) and not overrides:
        return config
    if isinstance(config, (LatentkitConfig, Mapping)):
        # a deep copy: overrides must not write into the caller's mapping
        raw = (
            config.model_dump(mode="json")
            if isinstance(config, LatentkitConfig)
            else copy.deepcopy(dict(config))
        )
        for text in overrides:
            keys, value = parse_override(text)
            apply_override(raw, keys, value)
        where = "the config given" + (" + overrides" if overrides else "")
    else:
        raw, where = raw_config(Path(config) if config is not None else None, list(overrides))
    method = get_method(raw.get("run", {}).get("method", "sft"))
    return build_config(method.Config, laid_over(method.run_defaults, raw), where)


def laid_over(defaults: Mapping[str, Any], raw: Mapping[str, Any]) -> dict[str, Any]:
    """`raw` with `defaults` filling what it does not set, section by section (nested mappings merged)."""
    merged = copy.deepcopy(dict(defaults))
    for key, value in raw.items():
        below = merged.get(key)
        merged[key] = (
            laid_over(below, value) if isinstance(below, dict) and isinstance(value, Mapping) else value
        )
    return merged


def train(
    config: LatentkitConfig | Mapping[str, Any] | str | Path | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
) -> Path:
    """Train every stage (or `train.stage`) and return the run directory, e.g.
    `latentkit.train({"run": {"method": "monet"}}, ["train.steps=20"])`."""
    from latentkit.eval.periodic import training_evaluator
    from latentkit.trainer import train as run_training

    return run_training(resolve_config(config, overrides), resume=resume, evaluator=training_evaluator)


def load(
    run_or_checkpoint: str | Path, method_overrides: Sequence[str] = (), device: str | None = None
) -> EvalModel:
    """A trained model: `.backbone`, `.method` (with its modules), `.config`. A run directory (its `final/`) or
    any model directory (a stage's `final/`); `method_overrides` set decoding knobs (`method.decode_force=true`);
    `device` as `--device` takes it (default: cuda when there is one, else cpu), in the run's `model.dtype`."""
    path = Path(run_or_checkpoint)
    if (path / "config.yaml").is_file():
        return load_eval_model(run=path, method_overrides=method_overrides, device=device)
    return load_eval_model(checkpoint=path, method_overrides=method_overrides, device=device)


def prompt_sample(text: str, image: str | Path | None = None) -> Sample:
    """A one-question sample: the system prompt, then the image (if any) and the text as the user turn."""
    segments = [Segment("text", "system", SYSTEM_PROMPT)]
    if image is not None:
        segments.append(Segment("image", "user", image=Path(image)))
    segments.append(Segment("text", "user", text))
    return Sample("prompt", "prompt", tuple(segments))


def generate(
    model: EvalModel,
    prompt: str | Sample | Sequence[Sample],
    image: str | Path | None = None,
    sampling: SamplingParams | None = None,
    aux_images: AuxImages = "none",
    policy: DecodingPolicy | None = None,
    batch_size: int = 16,
) -> list[Answer]:
    """Answer a prompt (text and an optional image) or samples; each `Answer` holds its trajectories."""
    if isinstance(prompt, str):
        samples = [prompt_sample(prompt, image)]
    elif isinstance(prompt, Sample):
        samples = [prompt]
    else:
        samples = list(prompt)
    return answer_samples(
        model.method, samples, sampling or SamplingParams(), batch_size, aux_images=aux_images, policy=policy
    )


def evaluate(
    model: EvalModel, benchmark: str, out: str | Path | None = None, progress: bool = False, **options: Any
) -> dict[str, Any]:
    """`latentkit eval` in-process: options as `EvalOptions` fields (split, limit, data, sampling, ...); returns
    the summary (also written next to the per-sample JSONL). In a script started by `accelerate launch`, the
    processes share the samples and all return the summary (the main process writes the files)."""
    from latentkit.eval.runner import EvalOptions
    from latentkit.eval.runner import evaluate as run_evaluation

    return run_evaluation(
        model, EvalOptions(benchmark, **options), Path(out) if out else None, progress=progress
    )
