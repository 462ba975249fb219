"""Fault injection: each test breaks something a real run meets (a changed config on resume, a damaged
checkpoint, Ctrl-C, a full disk, ...) and checks the one-line message and that nothing written is lost."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, final_weights, metrics, train_args
from latentkit.cli.app import main

import latentkit
from latentkit.checkpoint import MANIFEST_FILE, verify_checkpoint


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


# --- resume checks the whole config -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("runs")
    latentkit.train(None, [*train_args(out, "base")[1:], "train.steps=6", "train.checkpoint_every=2"])
    return out / "base"


def copy_run(trained: Path, tmp_path: Path) -> Path:
    """The trained run as if killed after its last checkpoint: no stage or run `final/`."""
    run = tmp_path / trained.name
    shutil.copytree(trained, run)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "stages" / "sft" / "final")
    config = (run / "config.yaml").read_text().replace(str(trained.parent), str(tmp_path))
    (run / "config.yaml").write_text(config)
    return run


def resume_args(run: Path, *extra: str) -> list[str]:
    return [
        *train_args(run.parent, run.name),
        "train.steps=6",
        "train.checkpoint_every=2",
        *extra,
        "--resume",
    ]


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("train.lr=1e-4", "train.lr"),
        ("train.steps=8", "train.steps"),
        ("train.batch_size=3", "train.batch_size"),
        ("train.stages.sft.warmup_steps=4", "train.stages.sft.warmup_steps"),
    ],
)
def test_resume_refuses_a_changed_train_value(trained, tmp_path, capsys, change, key):
    run = copy_run(trained, tmp_path)
    before = (run / "config.yaml").read_text()
    code, _, err = run_cli(capsys, *resume_args(run, change))
    line = one_line_error(code, err)
    assert f"{key} differs from the saved config.yaml" in line
    assert (run / "config.yaml").read_text() == before


def test_resume_allows_changing_how_a_run_is_watched(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    code, _, err = run_cli(
        capsys,
        *resume_args(
            run, "train.log_every=3", "train.keep_checkpoints=5", "data.num_proc=2", "data.layout_cache_mb=0"
        ),
    )
    assert code == 0, err
    assert [m["step"] for m in metrics(run) if m.get("event") == "resume"] == [4]


# --- checkpoints are verified before use ------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "truncated model": lambda c: _truncate(c / "model.safetensors"),
    "truncated optimizer": lambda c: _truncate(c / "optimizer.pt"),
    "garbage trainer_state": lambda c: (c / "trainer_state.json").write_text("{not json"),
    "missing trainer_state": lambda c: (c / "trainer_state.json").unlink(),
    "empty rng file": lambda c: (c / "rng-0.safetensors").write_bytes(b""),
    "no manifest (save never finished)": lambda c: (c / MANIFEST_FILE).unlink(),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_damaged_checkpoint_is_named_and_the_older_one_used(trained, tmp_path, capsys, corruption):
    run = copy_run(trained, tmp_path)
    checkpoints = run / "stages" / "sft" / "checkpoints"
    newest = checkpoints / "step-00000004"
    CORRUPTIONS[corruption](newest)
    (checkpoints / ".tmp-step-00000006").mkdir()  # a save that was killed half-way
    assert verify_checkpoint(newest) is not None
    code, _, err = run_cli(capsys, *resume_args(run))
    assert code == 0, err
    named = [line for line in err.splitlines() if str(newest) in line]
    assert len(named) == 1 and "unusable" in named[0] and "resuming from step-00000002" in named[0]
    assert [m["step"] for m in metrics(run) if m.get("event") == "resume"] == [2]
    assert (checkpoints / "corrupt-step-00000004").is_dir() and not (
        checkpoints / ".tmp-step-00000006"
    ).exists()
    straight, resumed = final_weights(trained), final_weights(run)
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_checkpoints_carry_a_manifest_written_last(trained):
    checkpoint = trained / "stages" / "sft" / "checkpoints" / "step-00000004"
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    assert set(manifest) == {p.name for p in checkpoint.iterdir()} - {MANIFEST_FILE}
    assert verify_checkpoint(checkpoint) is None


# --- Ctrl-C -------------------------------------------------------------------------------------------------------


def test_first_ctrl_c_finishes_the_step_writes_a_checkpoint_and_exits_130(tmp_path):
    args = train_args(tmp_path, "stopped", "train.steps=1000", "train.checkpoint_every=1000")
    process = subprocess.Popen(
        [sys.executable, "-m", "latentkit", *args], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    log = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert err.splitlines()[-1].startswith("interrupted: ") and "--resume" in err.splitlines()[-1]
    (checkpoint,) = (tmp_path / "stopped" / "stages" / "sft" / "checkpoints").glob("step-*")
    assert verify_checkpoint(checkpoint) is None
    last_step = max(m["step"] for m in metrics(tmp_path / "stopped") if "loss" in m)
    assert checkpoint.name == f"step-{last_step:08d}"


def test_second_ctrl_c_stops_at_once():
    from latentkit.interrupt import StopRequest

    # A shell's background job starts with SIGINT ignored; start from Python's own handler whatever ran pytest.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopRequest() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def test_ctrl_c_outside_training_prints_one_line_and_exits_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("latentkit.registry.list_methods", interrupted)
    code, _, err = run_cli(capsys, "methods", "list")
    assert code == 130 and len(err.splitlines()) == 1 and err.startswith("interrupted at once")


# --- no silent overwrites --------------------------------------------------------------------------------------


def test_data_synth_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    out = tmp_path / "zoom"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    args = [
        "data",
        "synth",
        "--task",
        "synth-zoom",
        "--n",
        "2",
        "--n-val",
        "0",
        "--n-test",
        "1",
        "--out",
        str(out),
    ]
    line = one_line_error(*run_cli(capsys, *args)[::2])
    assert str(out) in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    code, _, err = run_cli(capsys, *args, "--overwrite")
    assert code == 0, err
    assert (out / "mine.txt").read_text() == "keep me" and (out / "synth_info.json").is_file()


def test_eval_of_a_model_folder_writes_outside_it_and_keeps_its_fingerprint(
    trained, tmp_path, capsys, monkeypatch
):
    from latentkit.checkpoint import model_fingerprint

    model = tmp_path / "exported"
    shutil.copytree(trained / "final", model)
    before = sorted(p.name for p in model.rglob("*"))
    fingerprint = model_fingerprint(model, None)
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--checkpoint", str(model), "--benchmark", "synth-zoom", "--limit", "2"]
    args += ["--max-new-tokens", "4", "--no-progress"]
    for _ in range(2):  # the second run resumes the same file: the model's fingerprint did not change
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
    assert sorted(p.name for p in model.rglob("*")) == before
    (written,) = (tmp_path / "eval").glob("exported-*/synth-zoom-test-max4.jsonl")
    assert len(written.read_text().splitlines()) == 2
    counts = json.loads(written.with_name("synth-zoom-test-max4.summary.json").read_text())["counts"]
    assert (
        counts["length_limit"] == 2 and 0 <= counts["repetition"] <= 2
    )  # 4 new tokens: all cut at the limit
    (model / "eval").mkdir()
    (model / "eval" / "x.summary.json").write_text("{}")
    (model / "results.jsonl").write_text("{}\n")
    assert model_fingerprint(model, None) == fingerprint


def test_results_from_another_data_folder_are_not_mixed(trained, tmp_path, capsys):
    """One benchmark name, two data folders, one --out: the second is refused; the same folder resumes."""
    own = trained / "data" / "synth-zoom"
    other = tmp_path / "other"
    shutil.copytree(own, other)
    out = tmp_path / "results.jsonl"
    args = ["eval", "--run", str(trained), "--benchmark", "synth-zoom", "--split", "train", "--limit", "2"]
    args += ["--max-new-tokens", "2", "--out", str(out), "--no-progress"]
    code, _, err = run_cli(capsys, *args, "--data", str(own))
    assert code == 0, err
    line = one_line_error(*run_cli(capsys, *args, "--data", str(other))[::2])
    assert f"{out} line 1 holds results from a different data" in line and "never mixed" in line
    code, _, err = run_cli(capsys, *args, "--data", str(own))
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 2


def test_eval_and_diagnose_outputs_are_named_by_checkpoint_and_settings(tmp_path):
    from types import SimpleNamespace

    from latentkit.decoding import SamplingParams
    from latentkit.eval.diagnose import DiagnoseOptions, default_output_dir, output_paths
    from latentkit.eval.runner import EvalOptions, default_output

    run = tmp_path / "run"
    final = SimpleNamespace(
        run_dir=run, model_dir=run / "final", fingerprint="0123456789abcdef", method_overrides=()
    )
    stage = SimpleNamespace(
        run_dir=run,
        model_dir=run / "stages" / "sft" / "final",
        fingerprint="fedcba9876543210",
        method_overrides=(),
    )
    greedy = EvalOptions("synth-zoom", sampling=SamplingParams(max_new_tokens=96))
    sampled = EvalOptions("synth-zoom", sampling=SamplingParams(temperature=0.7, top_p=0.95), num_samples=4)
    assert default_output(final, greedy) == run / "eval" / "synth-zoom-test.jsonl"
    assert default_output(stage, greedy) == run / "eval" / "stages-sft-final" / "synth-zoom-test.jsonl"
    assert default_output(final, sampled).name == "synth-zoom-test-t0.7-seed0-p0.95-n4-max256.jsonl"
    assert default_output_dir(final) == run / "diagnose"
    assert default_output_dir(stage) == run / "diagnose" / "stages-sft-final"
    full, limited = DiagnoseOptions("synth-zoom"), DiagnoseOptions("synth-zoom", limit=8, seed=2)
    assert output_paths(run, full)["json"].name == "synth-zoom-test.json"
    assert output_paths(run, limited)["json"].name == "synth-zoom-test-limit8-seed2.json"


# --- compare honesty ----------------------------------------------------------------------------------------------


def fake_summary(
    path: Path, run: str, model_dir: str, samples: int, no_answer: int = 0, repetition: int = 0
) -> Path:
    summary = {
        "benchmark": "synth-zoom",
        "benchmark_version": "1",
        "split": "test",
        "scorer": "boxed_exact",
        "accuracy": 0.5,
        "chance_level": 0.25,
        "counts": {"samples": samples, "no_answer_extracted": no_answer, "repetition": repetition},
        "model": {"method": "sft", "run": run, "model_dir": model_dir},
        "sampling": {"temperature": 0.0},
        "num_samples": 1,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))
    return path


def test_compare_keeps_every_result_and_flags_different_question_counts(tmp_path):
    from latentkit.eval.compare import compare

    run = str(tmp_path / "runs" / "a")
    full = fake_summary(tmp_path / "a" / "synth-zoom-test.summary.json", run, f"{run}/final", 64, 3, 2)
    short = fake_summary(tmp_path / "b" / "synth-zoom-test-limit8.summary.json", run, f"{run}/final", 8)
    stage = fake_summary(tmp_path / "c" / "s.summary.json", run, f"{run}/stages/sft/final", 64)
    result = compare([full, short, stage], tmp_path / "cmp")
    labels = [entry["label"] for entry in result["entries"]]
    assert len(set(labels)) == 3, labels
    assert "sft (a: stages/sft/final)" in labels
    assert result["mismatches"] == {"synth-zoom": ["count"]}
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "synth-zoom ⚠" in table and "number of questions" in table
    assert "n=64, no answer 3, looped 2" in table


def test_boxed_exact_without_a_box_is_no_answer():
    from latentkit.eval.scorers import get_scorer

    assert get_scorer("boxed_exact").score("Reasoning...\nRed.", "red").extracted is None


def test_a_loop_up_to_the_length_limit_is_counted():
    from latentkit.eval.runner import repeats_at_end

    assert repeats_at_end("The answer is the the the the the the the ")
    assert repeats_at_end("abcabcabcabcab")
    assert not repeats_at_end("The square is red, so \\boxed{red}.")


# --- images and pickles -----------------------------------------------------------------------------------------


def image_record(sample_id: str, image: str) -> dict:
    turn = lambda role, *content: {"role": role, "content": list(content)}
    return {
        "data": [
            turn("system", {"type": "text", "text": "You are a helpful assistant."}),
            turn("user", {"type": "image", "image": image}, {"type": "text", "text": "What colour?"}),
            turn("assistant", {"type": "text", "text": "\\\\boxed{red}"}),
        ],
        "metadata": {"sample_id": sample_id, "answer": "red"},
    }


@pytest.fixture
def dataset(tmp_path) -> Path:
    from PIL import Image

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "images" / "good.png")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "outside.png")
    png = (root / "images" / "good.png").read_bytes()
    (root / "images" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "images" / "text.png").write_text("not an image")
    return root


@pytest.mark.parametrize(
    ("image", "reason", "message"),
    [
        ("images/truncated.png", "bad_image", "is not a readable image"),
        ("images/text.png", "bad_image", "is not a readable image"),
        ("../outside.png", "image_outside_root", "data.allow_outside_paths=true"),
    ],
)
def test_bad_images_are_caught_when_records_load(dataset, image, reason, message):
    from latentkit.errors import DataError
    from latentkit.records import load_records

    records = [image_record("ok", "images/good.png"), image_record("bad", image)]
    (dataset / "train.json").write_text(json.dumps(records))
    with pytest.raises(DataError) as error:
        load_records(dataset / "train.json")
    assert f"{dataset / 'train.json'}: record 1: field data[1].content[0].image" in str(error.value)
    assert message in str(error.value) and "\n" not in str(error.value)
    loaded = load_records(dataset / "train.json", on_bad_record="skip")
    assert [s.sample_id for s in loaded.samples] == ["ok"] and loaded.skip_reasons == {reason: 1}


def test_images_outside_the_dataset_folder_need_the_config_key(dataset):
    from latentkit.records import load_records

    (dataset / "train.json").write_text(json.dumps([image_record("out", "../outside.png")]))
    (sample,) = load_records(dataset / "train.json", allow_outside_paths=True).samples
    assert sample.segments[1].image == dataset.parent / "outside.png"


def test_torch_load_only_with_weights_only():
    """Every torch.load in the source reads tensors only and nothing unpickles (a pickle can run code)."""
    import ast

    loads, unsafe = 0, []
    for folder in ("latentkit", "methods", "cli", "kernels", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Call):
                    continue
                name = ast.unparse(node.func)
                weights_only = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                loads += name == "torch.load"
                if (name == "torch.load" and not weights_only) or name.startswith(("pickle.", "dill.")):
                    unsafe.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert loads and not unsafe, unsafe


# --- OS errors ----------------------------------------------------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_older_checkpoints(
    tmp_path, capsys, monkeypatch
):
    import errno

    import latentkit.checkpoint

    real_save, calls = latentkit.checkpoint.save_model, []

    def fills_the_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(latentkit.checkpoint, "save_model", fills_the_disk)
    args = [*train_args(tmp_path, "full"), "train.steps=6", "train.checkpoint_every=2"]
    line = one_line_error(*run_cli(capsys, *args)[::2])
    checkpoints = tmp_path / "full" / "stages" / "sft" / "checkpoints"
    assert str(checkpoints / ".tmp-step-00000004") in line and "No space left on device" in line
    assert "free some space" in line
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000002"]
    assert verify_checkpoint(checkpoints / "step-00000002") is None
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    assert [m["step"] for m in metrics(tmp_path / "full") if m.get("event") == "resume"] == [2]


def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = one_line_error(*run_cli(capsys, *train_args(blocker / "runs", "x"))[::2])
    assert str(blocker) in line


def test_a_full_disk_during_eval_names_the_results_file(trained, tmp_path, capsys, monkeypatch):
    import errno

    import latentkit.eval.runner

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "results.jsonl"
    monkeypatch.setattr(latentkit.eval.runner.os, "fsync", full)  # the disk fills as the results are written
    args = [
        "eval",
        "--run",
        str(trained),
        "--benchmark",
        "synth-zoom",
        "--limit",
        "2",
        "--max-new-tokens",
        "2",
    ]
    args += ["--data", str(trained / "data" / "synth-zoom"), "--split", "train"]  # the run has no test split
    line = one_line_error(*run_cli(capsys, *args, "--out", str(out), "--no-progress")[::2])
    assert f"cannot access {out}: No space left on device" in line


# --- friction ------------------------------------------------------------------------------------------------------


def test_every_doc_reference_points_inside_the_repository():
    """A document named in the source or docs (a path ending in .md, an upper-case name such as a design doc, a
    spec) is a file in the repository."""
    import re

    reference = re.compile(r"(?<![\w/.-])((?:[\w-]+/)+[\w-]+\.md|[A-Z][A-Z_-]*\.md)\b|spec: ([\w/-]+\.md)")
    missing = []
    for path in REPO.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(REPO).parts)  # venvs, caches, .git
        if path.suffix not in (".py", ".md", ".yaml", ".toml") or hidden or not path.is_file():
            continue
        for found in reference.finditer(path.read_text(encoding="utf-8")):
            name = found.group(1) or found.group(2)
            if not (REPO / name).is_file() and not (path.parent / name).is_file():
                missing.append(f"{path.relative_to(REPO)}: {name}")
    assert not missing, missing


def test_a_text_only_preset_trains_with_the_default_freeze(tmp_path, capsys):
    args = train_args(
        tmp_path, "text", "model.preset=tiny-causal-lm", "data.task=synth-arith", "train.steps=1"
    )
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err


def test_progress_false_silences_every_bar_and_nothing_is_deprecated(tmp_path, capsys):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Monet loads earlier stages' weights (transformers' "Loading weights" bar) and writes four finals
        code, _, err = run_cli(
            capsys,
            *train_args(
                tmp_path,
                "quiet",
                "--method",
                "monet",
                "train.steps=1",
                "train.stages.vlpo.steps=1",
                "train.stages.vlpo.batch_size=2",
                "train.rl.num_generations=2",
                "train.rl.max_completion_length=4",
            ),
        )
    assert code == 0, err
    assert not [line for line in err.splitlines() if "it/s" in line or "%|" in line], err
    deprecated = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecated, [f"{w.filename}:{w.lineno}: {w.message}" for w in deprecated]
