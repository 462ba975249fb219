"""`latentkit generate` (a Monet trace with its latent block marked, an sft trace, JSON, refusals) and the
Python API (`latentkit.load`, `.generate`, `.evaluate`) on briefly trained tiny runs of the embedded default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import latentkit, train_args
from latentkit.cli.app import main

import latentkit as api
from latentkit.decoding import SamplingParams
from latentkit.layout import Kind

QUESTION = ["--benchmark", "synth-zoom", "--index", "1", "--max-new-tokens", "12"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    latentkit(
        *train_args(
            out, "m", "--method", "monet", "train.steps=1", "data.synth.n_test=4", "train.until=latent"
        )
    )
    latentkit(*train_args(out, "s", "train.steps=1", "data.synth.n_test=4"))
    return out


def test_monet_trace_marks_the_latent_block(runs):
    shown = latentkit("generate", "--run", str(runs / "m"), *QUESTION, "method.decode_force=true").stdout
    lines = shown.splitlines()
    assert lines[0].startswith("method monet")
    assert "⟦latent × 8⟧" in lines and "⟦/latent⟧" in lines
    latent_rows = [line for line in lines if "norm" in line and "nearest" in line]
    assert len(latent_rows) == 8
    assert any(line.startswith("answer: ") and "gold: " in line for line in lines)
    assert any(line.startswith("finish: ") for line in lines)


def test_sft_trace_has_no_latents_and_shows_the_answer(runs):
    shown = latentkit("generate", "--run", str(runs / "s"), *QUESTION).stdout
    assert "⟦" not in shown and "answer: " in shown and "gold: " in shown


def test_save_images_for_a_method_that_draws_none_exits_2_and_writes_nothing(runs, tmp_path):
    out = tmp_path / "images"
    result = latentkit(
        "generate", "--run", str(runs / "s"), *QUESTION, "--save-images", str(out), check=False
    )
    error = result.stderr.strip().splitlines()[-1]  # after the weights' loading bar
    assert result.returncode == 2 and error.startswith("error: --save-images: method sft draws no images")
    assert not out.exists()


def test_json_holds_the_whole_trajectory(runs):
    shown = latentkit("generate", "--run", str(runs / "m"), *QUESTION, "--json", "method.decode_force=true")
    answer = json.loads(shown.stdout)
    (trajectory,) = answer["trajectories"]
    latent_positions = [i for i, kind in enumerate(trajectory["kinds"]) if kind == int(Kind.LATENT)]
    assert len(latent_positions) == 10  # start, 8 latents, end
    assert len(trajectory["vectors"]) == 8 and len(trajectory["log_probs"]) == len(trajectory["input_ids"])
    assert answer["gold"] and answer["pieces"][0][1]["continuous"] == "latent"


def test_a_free_prompt_with_an_image(runs, tmp_path):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (56, 56), (220, 20, 20)).save(image)
    shown = latentkit(
        "generate",
        "--checkpoint",
        str(runs / "s" / "final"),
        "--prompt",
        "What colour?",
        "--image",
        str(image),
        "--max-new-tokens",
        "4",
    ).stdout
    assert "sample prompt" in shown and "answer:" not in shown  # no gold, no score


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "exactly one of --benchmark"),
        (("--benchmark", "synth-zoom", "--prompt", "x"), "exactly one of --benchmark"),
        (("--benchmark", "synth-zoom", "--index", "99"), "--index 99 is outside"),
        (("--prompt", "x", "--image", "missing.png"), "--image missing.png does not exist"),
        (("--prompt", "x", "model.dtype=bfloat16"), "must set a method option"),
        (("--prompt", "x", "method.no_such_knob=1"), "method.no_such_knob"),
    ],
)
def test_refusals_are_one_line_with_exit_2(runs, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--run", str(runs / "m"), *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err


def test_python_api_loads_generates_and_evaluates(runs, tmp_path):
    model = api.load(runs / "m", ["method.decode_force=true"])
    (answer,) = api.generate(model, "What colour?", sampling=SamplingParams(max_new_tokens=11))
    (trajectory,) = answer.trajectories
    assert [b.shape[0] for b in trajectory.blocks(int(Kind.LATENT))] == [8]
    summary = api.evaluate(
        model, "synth-zoom", out=tmp_path / "e.jsonl", limit=2, sampling=SamplingParams(max_new_tokens=11)
    )
    assert summary["counts"]["samples"] == 2 and (tmp_path / "e.jsonl").is_file()
