"""`latentkit generate`: one answer, printed as a person reads it (latent segments marked), or as JSON."""

from __future__ import annotations

from pathlib import Path

import typer


def generate_command(
    overrides: list[str] = typer.Argument(None, help="Method decoding knobs, e.g. method.decode_force=true"),
    run: Path = typer.Option(None, "--run", help="A training run directory (its final/ model)."),
    checkpoint: Path = typer.Option(
        None, "--checkpoint", help="A model directory (e.g. runs/x/stages/sft/final)."
    ),
    benchmark: str = typer.Option(None, "--benchmark", "-b", help="Take the question from this benchmark..."),
    index: int = typer.Option(0, "--index", "-i", help="...at this position of the split."),
    split: str = typer.Option("test", "--split"),
    data: Path = typer.Option(None, "--data", help="Benchmark files; synthetic tasks default to the run's."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Or ask this question..."),
    image: Path = typer.Option(None, "--image", help="...about this image."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Default: the benchmark's, else 256."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    seed: int = typer.Option(0, "--seed"),
    aux_images: str = typer.Option(
        "none", "--aux-images", help="dataset: give the sample's auxiliary image when the model asks for one."
    ),
    nearest: int = typer.Option(3, "--nearest", help="Nearest vocabulary tokens shown per latent."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the whole answer and its trajectories as JSON."
    ),
    save_images: Path = typer.Option(
        None,
        "--save-images",
        help="Write the images the method drew while answering (e.g. imagined boards) as PNGs into this directory.",
    ),
) -> None:
    """Generate one answer and print its trace: text, latent segments, observations, answer and gold."""
    import json
    import sys

    from latentkit.api import generate, load
    from latentkit.decoding import SamplingParams
    from latentkit.errors import ConfigError
    from latentkit.eval.runner import score_answer
    from latentkit.eval.scorers import get_scorer
    from latentkit.eval.trace import answer_json, render_answer
    from latentkit.images import save_images as save_image_files

    if (benchmark is None) == (prompt is None):
        raise ConfigError(
            "pass exactly one of --benchmark NAME (with --index) or --prompt TEXT (with --image)"
        )
    if image is not None and prompt is None:
        raise ConfigError("--image goes with --prompt; a benchmark question brings its own image")
    if image is not None and not image.is_file():
        raise ConfigError(f"--image {image} does not exist")
    if aux_images not in ("none", "dataset"):
        raise ConfigError(f"--aux-images must be none or dataset, got {aux_images!r}")
    if nearest < 1:
        raise ConfigError(f"--nearest must be at least 1, got {nearest}")
    if run is None and checkpoint is None:
        raise ConfigError("pass --run DIR (a training run) or --checkpoint DIR (a model directory)")
    if save_images is not None and save_images.exists() and not save_images.is_dir():
        raise ConfigError(f"--save-images {save_images} is a file: pass a directory")
    if save_images is not None and any(save_images.glob("image-*.png")):
        raise ConfigError(
            f"--save-images {save_images} already holds images (image-NNN.png), which would be overwritten: pass an "
            "empty or new directory"
        )
    model = load(run if run is not None else checkpoint, overrides or ())
    if save_images is not None and not model.method.draws_images:
        raise ConfigError(
            f"--save-images: method {model.method.name} draws no images while it answers (it has no "
            "trajectory_images hook); leave the option out"
        )
    budget, scorer, question = max_new_tokens or 256, None, None
    if benchmark is not None:
        question, scorer, budget = _benchmark_question(model, benchmark, split, data, index, max_new_tokens)
    sampling = SamplingParams(
        max_new_tokens=budget, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )
    (answer,) = generate(model, question or prompt, image, sampling, aux_images)  # type: ignore[arg-type]
    score = score_answer(answer, get_scorer(scorer)) if scorer is not None else None
    saved = []
    if save_images is not None:
        drawn = [image for t in answer.trajectories for image in model.method.trajectory_images(t)]
        saved = [str(path) for path in save_image_files(drawn, save_images)]
    if as_json:
        shown = answer_json(model.backbone, answer, score, nearest)
        if save_images is not None:
            shown["saved_images"] = saved
        json.dump(shown, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    typer.echo(f"method {model.method.name} · {model.model_dir} · sample {answer.sample.sample_id}")
    typer.echo(render_answer(model.backbone, answer, score, nearest, color=sys.stdout.isatty()))
    if save_images is not None:
        if not saved:
            typer.echo(f"the answer drew no images; nothing written to {save_images}")
        else:
            typer.echo(f"saved {len(saved)} image(s) to {save_images}" + "".join(f"\n  {p}" for p in saved))


def _benchmark_question(
    model, benchmark: str, split: str, data: Path | None, index: int, max_new_tokens: int | None
):
    from latentkit.errors import ConfigError
    from latentkit.eval.benchmarks import get_benchmark
    from latentkit.eval.runner import load_eval_set

    bench = get_benchmark(benchmark)
    work_dir = (model.run_dir if model.run_dir is not None else model.model_dir.parent) / "generate"
    eval_set = load_eval_set(bench, model.config, model.run_dir, data, split, None, work_dir)
    if not 0 <= index < len(eval_set.samples):
        raise ConfigError(
            f"--index {index} is outside {benchmark} {split} (it has {len(eval_set.samples)} samples: 0..{len(eval_set.samples) - 1})"
        )
    return eval_set.samples[index], eval_set.scorer, max_new_tokens or bench.max_new_tokens
