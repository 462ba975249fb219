"""`latentkit eval` / `compare` and evaluation during training, on a real (briefly) trained tiny run."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from helpers import latentkit, metrics, train_args
from latentkit.methods.sft.method import SFT
from PIL import Image

import latentkit as api
from latentkit.decoding import DecodingPolicy, SamplingParams, Step, Token
from latentkit.eval.answer import answer_samples
from latentkit.eval.model import load_eval_model
from latentkit.eval.runner import summary_path
from latentkit.records import load_split

EVAL_DATA = ["data.synth.n_val=4", "data.synth.n_test=8", "train.steps=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    latentkit(
        *train_args(
            out,
            "evalrun",
            *EVAL_DATA,
            "train.eval_every=2",
            "train.eval.limit=4",
            "train.eval.max_new_tokens=8",
        )
    )
    return out / "evalrun"


def evaluate(run: Path, out: Path, *extra: str, check: bool = True):
    return latentkit(
        "eval",
        "--run",
        str(run),
        "--benchmark",
        "synth-zoom",
        "--out",
        str(out),
        "--max-new-tokens",
        "12",
        "--batch-size",
        "3",
        "--no-progress",
        *extra,
        check=check,
    )


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_every_logs_accuracy(run):
    evals = [m for m in metrics(run) if "eval/synth-zoom/accuracy" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert all(0.0 <= m["eval/synth-zoom/accuracy"] <= 1.0 for m in evals)


def test_eval_writes_results_and_summary(run, tmp_path):
    out = tmp_path / "zoom.jsonl"
    evaluate(run, out)
    records = lines(out)
    gold = {s.sample_id: s.answer for s in load_split(run / "data" / "synth-zoom", "test").samples}
    assert [r["sample_id"] for r in records] == list(gold)
    for record in records:
        assert record["gold"] == gold[record["sample_id"]]
        assert set(record) >= {"prompt", "output", "extracted", "correct", "category"}
        assert "<image>" in record["prompt"]
    summary = json.loads(summary_path(out).read_text())
    assert summary["scorer"] == "boxed_exact"
    assert summary["counts"]["samples"] == 8
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 8)
    assert (
        summary["chance_level"]
        == json.loads((run / "data/synth-zoom/synth_info.json").read_text())["chance_level"]
    )
    assert summary["model"]["method"] == "sft" and len(summary["config_fingerprint"]) == 16
    assert set(summary["per_category"]) <= {"colour", "shape"} and summary["per_category"]


def test_interrupted_eval_resumes_without_losing_lines(run, tmp_path):
    full = tmp_path / "full.jsonl"
    evaluate(run, full)
    partial = tmp_path / "partial.jsonl"
    kept = full.read_text().splitlines(keepends=True)[:3]
    partial.write_text("".join(kept) + '{"sample_id": "synth-zoom-te')  # killed mid-line
    evaluate(run, partial)
    resumed = partial.read_text().splitlines(keepends=True)
    assert resumed[:3] == kept
    assert [r["output"] for r in lines(partial)] == [r["output"] for r in lines(full)]


def test_results_from_other_settings_are_never_mixed(run, tmp_path):
    out = tmp_path / "zoom.jsonl"
    evaluate(run, out, "--limit", "2")
    before = out.read_text()
    result = evaluate(run, out, "--temperature", "0.8", "--num-samples", "2", check=False)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and str(out) in error and "sampling" in error
    assert out.read_text() == before


def test_pass_at_k_with_sampling(run, tmp_path):
    out = tmp_path / "k.jsonl"
    evaluate(run, out, "--limit", "3", "--temperature", "1.0", "--num-samples", "2", "--seed", "1")
    records = lines(out)
    assert all(r["num_samples"] == 2 and len(r["samples"]) == 2 for r in records)
    summary = json.loads(summary_path(out).read_text())
    assert set(summary["pass_at_k"]) == {"1", "2"}
    assert summary["pass_at_k"]["2"] >= summary["pass_at_k"]["1"]
    for record in records:
        extracted = {s["extracted"] for s in record["samples"] if s["extracted"] is not None}
        openings = {" ".join(s["output"].split()[:12]) for s in record["samples"]}
        assert (record["distinct_answers"], record["distinct_first_steps"]) == (len(extracted), len(openings))
    assert summary["diversity"]["distinct_answers"] == pytest.approx(
        sum(r["distinct_answers"] for r in records) / 3
    )
    latentkit("compare", str(summary_path(out)), "--out", str(tmp_path / "cmp"))
    assert (tmp_path / "cmp" / "pass_at_k.png").is_file()
    table = (tmp_path / "cmp" / "comparison.md").read_text().splitlines()
    row = next(line for line in table if line.startswith("| sft") and "| T=1.0" in line)
    cells = row.strip("| ").split(" | ")
    assert [float(cell) for cell in cells[-4:-2]] == [
        round(100 * summary["pass_at_k"][k], 1) for k in ("1", "2")
    ]
    diversity = summary["diversity"]
    assert cells[-2:] == [f"{diversity['distinct_answers']:.2f}", f"{diversity['distinct_first_steps']:.2f}"]


def test_checkpoint_directory_and_bad_inputs(run, tmp_path):
    out = tmp_path / "ckpt.jsonl"
    latentkit(
        "eval",
        "--checkpoint",
        str(run / "stages/sft/final"),
        "--benchmark",
        "synth-zoom",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
        "--no-progress",
    )
    assert len(lines(out)) == 2
    cases = {
        ("--checkpoint", str(tmp_path)): "not an HF-format model directory",
        ("--run", str(run), "--benchmark", "nope"): "valid benchmarks",
        ("--run", str(run), "--benchmark", "vstar"): "--data",
        ("--run", str(tmp_path)): "not a training run",
        ("--run", str(run), "--checkpoint", str(run / "final")): "exactly one",
    }
    for args, message in cases.items():
        if "--benchmark" not in args:
            args = (*args, "--benchmark", "synth-zoom")
        result = latentkit("eval", *args, check=False)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_compare_joins_summaries_and_flags_mismatches(run, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    evaluate(run, first, "--limit", "4")
    evaluate(run, second, "--limit", "4", "--aux-images", "dataset")
    odd = json.loads(summary_path(first).read_text())
    odd.update(scorer="exact", model={**odd["model"], "run": "other-run"})
    odd_path = tmp_path / "odd.summary.json"
    odd_path.write_text(json.dumps(odd))
    out = tmp_path / "cmp"
    latentkit("compare", str(first), str(summary_path(second)), "--out", str(out))
    table = (out / "comparison.md").read_text()
    assert "| chance |" in table and "+aux images" in table and "⚠" not in table
    with Image.open(out / "comparison.png") as image:
        assert image.size[0] > 300
    result = latentkit("compare", str(first), str(odd_path), "--out", str(tmp_path / "cmp2"))
    assert "settings differ" in result.stderr
    flagged = list(csv.DictReader((tmp_path / "cmp2" / "comparison.csv").read_text().splitlines()))
    assert {row["mismatch"] for row in flagged} == {"scorer"}
    assert "⚠ synth-zoom" in (tmp_path / "cmp2" / "comparison.md").read_text()
    missing = latentkit("compare", str(tmp_path / "nothing.json"), "--out", str(out), check=False)
    assert missing.returncode == 2 and "nothing.json" in missing.stderr


class AskForImageAtStep(DecodingPolicy):
    """A policy that requests an image (vision-start) at a fixed step, like a model that learned to."""

    def __init__(self, step: int) -> None:
        self.step = step

    def begin(self, backbone, prompts) -> None:
        self.vision_start = backbone.token_id(backbone.chat.vision_start)

    def decide(self, proposal, view) -> Step:
        return Step(Token(self.vision_start if view.step == self.step else proposal.token))


def test_dataset_aux_images_are_inserted_when_asked(run, monkeypatch):
    model = load_eval_model(run=run)
    samples = load_split(run / "data" / "synth-zoom", "test").samples[:2]
    monkeypatch.setattr(model.method, "decoding_policy", lambda: AskForImageAtStep(1))
    built = []
    original_prompt = model.method.prompt

    def recording_prompt(sample, draw=0):
        builder = original_prompt(sample, draw)
        built.append(builder)
        return builder

    monkeypatch.setattr(model.method, "prompt", recording_prompt)
    answers = answer_samples(model.method, samples, SamplingParams(max_new_tokens=6), 2, aux_images="dataset")
    assert [a.aux_images_used for a in answers] == [1, 1]
    assert all("<image>" in a.text for a in answers)
    image_slots = [slot for b in built for slot in b.images]
    assert len(image_slots) == 4  # question image + the inserted zoom crop, per sample
    plain = answer_samples(model.method, samples, SamplingParams(max_new_tokens=6), 2, aux_images="none")
    assert [a.aux_images_used for a in plain] == [0, 0]


def test_greedy_pass_at_k_needs_prompts_that_vary(run, tmp_path):
    result = evaluate(run, tmp_path / "g.jsonl", "--num-samples", "2", check=False)
    assert result.returncode == 2
    assert "needs sampling" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "g.jsonl").exists()


class DrawnPrefix(SFT):
    """Prompts that vary per answer: one vector per draw, from a generator seeded by (sample, draw)."""

    prompts_vary = True
    drawn: ClassVar[list[tuple[str, int]]] = []

    def prompt_embeddings(self, sample, draw=0):
        DrawnPrefix.drawn.append((sample.sample_id, draw))
        generator = torch.Generator().manual_seed(hash((sample.sample_id, draw)) % 2**31)
        return torch.randn(1, self.backbone.hidden_size, generator=generator)


def test_each_answer_gets_its_draw_and_greedy_pass_at_k_runs_when_prompts_vary(run, tmp_path):
    model = load_eval_model(run)
    method = DrawnPrefix(model.method.config)
    method.setup(model.backbone)
    model.method = method
    DrawnPrefix.drawn.clear()
    summary = api.evaluate(model, "synth-zoom", tmp_path / "v.jsonl", limit=2, num_samples=3, batch_size=1)
    assert DrawnPrefix.drawn == [(f"synth-zoom-test-00000{i}", d) for i in range(2) for d in range(3)]
    assert set(summary["pass_at_k"]) == {"1", "2", "3"} and summary["sampling"]["temperature"] == 0.0


def test_method_overrides_name_and_label_the_results(run, tmp_path):
    latentkit("eval", "--run", str(run), "--benchmark", "synth-zoom", "--limit", "2", "--max-new-tokens", "4",
              "--no-progress", "method.observation_weight=3")  # fmt: skip
    out = run / "eval" / "synth-zoom-test-observation_weight=3-max4.jsonl"
    assert all(r["run"]["method_overrides"] == ["method.observation_weight=3"] for r in lines(out))
    summary = json.loads(summary_path(out).read_text())
    assert summary["model"]["method_overrides"] == ["method.observation_weight=3"]
    latentkit("compare", str(summary_path(out)), "--out", str(tmp_path / "cmp"))
    assert "sft (evalrun) [observation_weight=3]" in (tmp_path / "cmp" / "comparison.md").read_text()
