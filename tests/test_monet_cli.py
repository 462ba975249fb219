"""`latentkit train --method monet` end to end: the four stages (warmup, distill, latent, and the RL stage vlpo)
on the embedded default, a resumed distill stage reusing its teacher cache, `train.stage=vlpo` alone from the
latent stage's weights, evaluation with latent decoding, and the real-checkpoint path (a tiny HF-format
Qwen2.5-VL directory and records in the official Monet-SFT-125K format)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import latentkit, metrics, train_args
from PIL import Image
from safetensors.torch import load_file, save_file

from latentkit.backbone import build_backbone
from latentkit.config import ModelSection

MONET = ["--method", "monet", "method.num_latents=2", "data.synth.n_test=4"]
# Per-stage settings: distill and latent run their own step counts, latent its own lr.
STAGED = [
    "train.steps=3",
    "train.checkpoint_every=2",
    "train.stages.distill.steps=4",
    "train.stages.latent.steps=2",
    "train.stages.latent.lr=5e-4",
    "train.stages.vlpo.steps=2",
    "train.stages.vlpo.batch_size=2",
    "train.rl.num_generations=2",
    "train.rl.max_completion_length=12",
]
MARKER = "<abs_vis_token></abs_vis_token>"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    latentkit(*train_args(out, "monet", *MONET, *STAGED))
    return out / "monet"


def events(run_dir: Path) -> list[tuple[str, str, str]]:
    return [(m["stage"], m["event"], m.get("cache", "")) for m in metrics(run_dir) if "event" in m]


def test_four_stages_and_their_artifacts(run):
    for stage in ("warmup", "distill", "latent", "vlpo"):
        assert (run / "stages" / stage / "final" / "model.safetensors").is_file()
    assert json.loads((run / "final" / "latentkit_method.json").read_text()) == {
        "method": "monet",
        "stage": "vlpo",
    }
    assert events(run) == [("distill", "cache_built", "teacher"), ("latent", "cache_built", "targets")]
    steps = [(m["stage"], m["step"]) for m in metrics(run) if "loss" in m]
    assert steps == [("warmup", s) for s in (1, 2, 3)] + [("distill", s) for s in (1, 2, 3, 4)] + [
        ("latent", s) for s in (1, 2)
    ] + [("vlpo", s) for s in (1, 2)]
    # Two warm-up steps: the lr after a stage's first step is its peak lr. Monet's vlpo defaults to a constant 1e-4.
    peak = {m["stage"]: m["lr"] for m in metrics(run) if m.get("step") == 1 and "lr" in m}
    assert peak == {
        "warmup": pytest.approx(2e-3),
        "distill": pytest.approx(2e-3),
        "latent": pytest.approx(5e-4),
        "vlpo": pytest.approx(1e-4),
    }
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]["stages"]
    assert {stage: (saved[stage]["steps"], saved[stage]["lr"]) for stage in saved} == {
        "warmup": (3, 2e-3),
        "distill": (4, 2e-3),
        "latent": (2, 5e-4),
        "vlpo": (2, 1e-4),
    }
    assert all("align" in m for m in metrics(run) if m.get("stage") in ("distill", "latent") and "loss" in m)
    for kind in ("teacher", "targets"):
        folder = run / "stages" / "distill" / kind
        manifest = json.loads((folder / "manifest.json").read_text())
        shards = {shard for _, _, shard, _ in manifest["index"]}
        assert manifest["samples"] == 24 and all((folder / shard).is_file() for shard in shards)


def test_resumed_distill_stage_reuses_the_teacher_cache(run, tmp_path):
    copy = tmp_path / "monet"
    shutil.copytree(run, copy)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    saved["run"]["output_dir"] = str(tmp_path)
    (copy / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    # Cut the run back to "distill interrupted after its step-2 checkpoint".
    for path in (copy / "stages" / "distill" / "final", copy / "stages" / "latent", copy / "stages" / "vlpo"):
        shutil.rmtree(path)
    teacher = copy / "stages" / "distill" / "teacher" / "manifest.json"
    built_at = teacher.stat().st_mtime_ns
    latentkit(*train_args(tmp_path, "monet", *MONET, *STAGED), "--resume")
    resumed = [m for m in metrics(copy) if m.get("event") == "resume"]
    assert resumed == [{"event": "resume", "stage": "distill", "step": 2}]
    assert ("distill", "cache_reused", "teacher") in events(copy)
    assert teacher.stat().st_mtime_ns == built_at
    assert (copy / "final" / "model.safetensors").is_file()


def test_vlpo_alone_starts_from_the_latent_weights(run, tmp_path):
    """`train.stage=vlpo` on a run whose latent stage is done: VLPO's metrics (latent and token clip fractions
    apart, the 0.9 accuracy / 0.1 format rewards) and its weights start from stages/latent/final on disk (a
    frozen vision weight changed there is carried into vlpo's output)."""
    copy = tmp_path / "monet"
    shutil.copytree(run, copy)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    saved["run"]["output_dir"] = str(tmp_path)
    (copy / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    shutil.rmtree(copy / "stages" / "vlpo")
    latent = copy / "stages" / "latent" / "final" / "model.safetensors"
    weights = load_file(str(latent))
    marked = next(name for name in weights if "visual" in name)
    weights[marked] = weights[marked] + 1.0
    save_file(weights, str(latent))
    latentkit(*train_args(tmp_path, "monet", *MONET, *STAGED), "train.stage=vlpo", "--resume")
    after = load_file(str(copy / "stages" / "vlpo" / "final" / "model.safetensors"))
    assert torch.equal(after[marked], weights[marked])
    logged = [m for m in metrics(copy) if m.get("stage") == "vlpo" and "loss" in m]
    assert {"clip_fraction/token", "clip_fraction/latent", "reward/accuracy/mean", "reward/format/mean"} <= (
        logged[-1].keys()
    )
    assert saved["train"]["rl"]["rewards"] == [
        {"name": "accuracy", "weight": 0.9, "kwargs": {}},
        {"name": "format", "weight": 0.1, "kwargs": {}},
    ]


def test_eval_uses_latent_decoding(run, tmp_path):
    out = tmp_path / "eval.jsonl"
    latentkit(
        "eval",
        "--run",
        str(run),
        "--benchmark",
        "synth-zoom",
        "--limit",
        "4",
        "--out",
        str(out),
        "--max-new-tokens",
        "12",
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and all("latent_blocks" in r and "latent_steps" in r for r in records)
    assert all(r["latent_steps"] <= 2 * r["latent_blocks"] for r in records)


def write_official_dataset(root: Path) -> None:
    """Two sub-datasets in the Monet-SFT-125K layout, plus one record whose marker has no image (dropped)."""

    def record(sample_id: str, dataset: str, with_image: bool = True) -> dict:
        assistant = [{"type": "text", "text": f"Let me look closer. {MARKER}"}]
        if with_image:
            assistant.append({"type": "image", "image": "images/zoom.png"})
        assistant.append({"type": "text", "text": "<observation>A red square.</observation> \\boxed{red}"})
        return {
            "data": [
                {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "images/question.png"},
                        {"type": "text", "text": "Colour?"},
                    ],
                },
                {"role": "assistant", "content": assistant},
            ],
            "metadata": {"dataset_name": dataset, "sample_id": sample_id, "answer": "red"},
        }

    for dataset in ("Visual_CoT", "Zebra_CoT_visual_search"):
        folder = root / dataset
        (folder / "images").mkdir(parents=True)
        Image.new("RGB", (56, 56), (200, 10, 10)).save(folder / "images" / "question.png")
        Image.new("RGB", (28, 28), (250, 0, 0)).save(folder / "images" / "zoom.png")
        # The same ids in both sub-datasets: the stage caches key samples by (dataset, sample_id).
        records = [record(str(i), dataset) for i in range(3)] + [record(f"{dataset}-bad", dataset, False)]
        (folder / "train.json").write_text(json.dumps(records))


def test_real_checkpoint_directory_and_official_records(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "Qwen2.5-VL-tiny"
    build_backbone(ModelSection(preset="tiny-qwen2.5-vl")).save(checkpoint)
    data = tmp_path / "Monet-SFT-125K"
    write_official_dataset(data)
    args = train_args(
        tmp_path,
        "real",
        *MONET,
        "train.steps=2",
        "model.preset=null",
        f"model.path={checkpoint}",
        f"data.path={data}",
        "data.on_bad_record=skip",
        "train.rl.num_generations=2",
        "train.rl.max_completion_length=8",
    )
    # Stage vlpo scores with the accuracy reward: records that are not a synthetic task need a scorer, and the
    # run says so before any stage trains.
    refused = latentkit(*args, check=False)
    assert refused.returncode == 2 and "set train.rl.scorer" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "real" / "stages").exists()
    result = latentkit(*args, "train.rl.scorer=boxed_exact")
    assert "skipped 2 bad records" in result.stdout
    run = tmp_path / "real"
    assert (run / "final" / "config.json").is_file()
    manifest = json.loads((run / "stages" / "distill" / "teacher" / "manifest.json").read_text())
    keys = sorted((dataset, sample_id) for dataset, sample_id, _, _ in manifest["index"])
    assert keys == [(d, str(i)) for d in ("Visual_CoT", "Zebra_CoT_visual_search") for i in range(3)]


def test_distill_alone_without_warmup_is_a_clear_error(tmp_path):
    result = latentkit(
        *train_args(tmp_path, "alone", *MONET, "train.steps=1"), "--stage", "distill", check=False
    )
    assert result.returncode == 2
    assert "stages/warmup/final is missing" in result.stderr.strip().splitlines()[-1]
