"""`latentkit eval`: answer a benchmark with a trained run (or model directory), score, write JSONL + summary."""

from __future__ import annotations

from pathlib import Path

import typer


def eval_command(
    overrides: list[str] = typer.Argument(
        None,
        help="Method decoding knobs, e.g. method.decode_latents=4 (part of the results' name and header).",
    ),
    benchmark: str = typer.Option(
        ..., "--benchmark", "-b", help="Benchmark name (see `latentkit benchmarks list`)."
    ),
    run: Path = typer.Option(None, "--run", help="A training run directory (its final/ model is evaluated)."),
    checkpoint: Path = typer.Option(
        None, "--checkpoint", help="A model directory (e.g. runs/x/stages/sft/final)."
    ),
    data: Path = typer.Option(
        None, "--data", help="Benchmark files (file or folder); synthetic tasks default to the run's."
    ),
    split: str = typer.Option("test", "--split"),
    limit: int = typer.Option(None, "--limit", help="Only the first N samples."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per generation batch."),
    out: Path = typer.Option(
        None, "--out", help="Per-sample JSONL (default: <run>/eval/<benchmark>-<split>.jsonl)."
    ),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Default: the benchmark's."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    num_samples: int = typer.Option(
        1,
        "--num-samples",
        "-n",
        help="Answers per question (pass@k); needs sampling, or a method whose prompts vary per answer.",
    ),
    seed: int = typer.Option(0, "--seed"),
    stop: list[str] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    aux_images: str = typer.Option(
        "none", "--aux-images", help="dataset: give the sample's auxiliary image when the model asks for one."
    ),
    device: str = typer.Option(
        None, "--device", help="cpu, cuda, cuda:N or mps (default: cuda when there is one, else cpu)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Evaluate a trained model on a benchmark; rerunning with the same --out resumes. Under `accelerate launch`
    the processes share the samples and the main one writes the results."""
    import json

    from transformers.utils import logging

    from latentkit.decoding import SamplingParams
    from latentkit.eval.benchmarks import get_benchmark
    from latentkit.eval.model import load_eval_model
    from latentkit.eval.processes import close_processes, eval_processes
    from latentkit.eval.runner import EvalOptions, default_output, evaluate, summary_path

    bench = get_benchmark(benchmark)
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens or bench.max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_strings=tuple(stop or ()),
        seed=seed,
    )
    options = EvalOptions(benchmark, data, split, limit, batch_size, sampling, num_samples, aux_images)  # type: ignore[arg-type]
    logging.disable_progress_bar()  # one bar per weight load is noise next to the eval's own bar
    try:
        model = load_eval_model(run, checkpoint, overrides or (), device)
        is_main = eval_processes(model.backbone.device).is_main
        results = out or default_output(model, options)
        summary = evaluate(model, options, results, progress, log=lambda line: typer.echo(line, err=True))
    finally:
        close_processes()
    if not is_main:
        return
    shown = {k: summary[k] for k in ("benchmark", "split", "scorer", "accuracy", "chance_level", "pass_at_k")}
    typer.echo(json.dumps(shown))
    typer.echo(f"wrote {results} and {summary_path(results)}")
