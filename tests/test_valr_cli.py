"""`latentkit train --method valr` end to end: both stages on the embedded default, the frozen encoder never
trained or saved, a resumed `align` stage reusing its feature cache, eval/generate/diagnose on the run, the
no-alignment ablation, and the real path (HF-format Qwen2.5-VL and encoder directories, official-format records)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import latentkit, metrics, train_args
from latentkit.methods.valr.config import EncoderSpec
from latentkit.methods.valr.encoders import load_encoder
from safetensors.torch import load_file
from test_monet_cli import write_official_dataset

from latentkit.backbone import build_backbone
from latentkit.config import ModelSection

VALR = ["--method", "valr", "data.synth.n_test=4", "train.steps=3", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    latentkit(*train_args(out, "valr", *VALR))
    return out / "valr"


def events(run_dir: Path) -> list[tuple[str, str, str]]:
    return [(m["stage"], m["event"], m.get("cache", "")) for m in metrics(run_dir) if "event" in m]


def test_two_stages_steps_logged_and_features_cached(run):
    for stage in ("sft", "align"):
        assert (run / "stages" / stage / "final" / "model.safetensors").is_file()
    assert events(run) == [("align", "valr_steps", ""), ("align", "cache_built", "features-tiny-dinov2")]
    steps = next(m for m in metrics(run) if m.get("event") == "valr_steps")
    assert (
        steps["rule"] == "lines"
        and steps["steps_per_sample"] == {"2": 24}
        and steps["steps_with_target"] == 48
    )
    align = [m for m in metrics(run) if m.get("stage") == "align" and "loss" in m]
    assert len(align) == 3 and all("repa" in m and m["aligned_segments"] > 0 for m in align)
    assert not any("repa" in m for m in metrics(run) if m.get("stage") == "sft")
    manifest = json.loads((run / "stages" / "align" / "features-tiny-dinov2" / "manifest.json").read_text())
    assert manifest["samples"] == 24


def test_encoder_is_frozen_and_never_saved(run):
    owned = load_file(str(run / "final" / "method_modules.safetensors"))
    assert owned and all(key.startswith("projector0.") for key in owned)
    checkpoint = run / "stages" / "align" / "checkpoints" / "step-00000002" / "model.safetensors"
    saved = load_file(str(checkpoint))
    assert not [key for key in saved if not key.startswith(("model.", "method_modules."))]
    assert not [key for key in saved if "encoder" in key]
    # The projector trained; the encoder's features equal a fresh preset's (its weights never moved).
    encoder = load_encoder(EncoderSpec(preset="tiny-dinov2"), "e")
    cache = run / "stages" / "align" / "features-tiny-dinov2"
    manifest = json.loads((cache / "manifest.json").read_text())
    _dataset, sample_id, shard, name = manifest["index"][0]
    record = next(
        r
        for r in json.loads((run / "data" / "synth-zoom" / "train.json").read_text())
        if r["metadata"]["sample_id"] == sample_id
    )
    question = run / "data" / "synth-zoom" / record["data"][1]["content"][0]["image"]
    cached = load_file(str(cache / shard))[name]
    assert cached.dtype == torch.float16 and cached.shape == (2, 16, 32)
    assert torch.allclose(cached[0].float(), encoder.features([question])[0], atol=1e-2)


def test_resumed_align_stage_reuses_its_feature_cache(run, tmp_path):
    copy = tmp_path / "valr"
    shutil.copytree(run, copy)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    saved["run"]["output_dir"] = str(tmp_path)
    (copy / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    for path in (copy / "stages" / "align" / "final", copy / "final"):
        shutil.rmtree(path)
    manifest = copy / "stages" / "align" / "features-tiny-dinov2" / "manifest.json"
    built_at = manifest.stat().st_mtime_ns
    latentkit(*train_args(tmp_path, "valr", *VALR), "--resume")
    assert [m for m in metrics(copy) if m.get("event") == "resume"] == [
        {"event": "resume", "stage": "align", "step": 2}
    ]
    assert ("align", "cache_reused", "features-tiny-dinov2") in events(copy)
    assert manifest.stat().st_mtime_ns == built_at
    assert (copy / "final" / "model.safetensors").is_file()


def test_eval_generate_and_diagnose_decode_latent_segments(run, tmp_path):
    out = tmp_path / "eval.jsonl"
    common = ["--benchmark", "synth-zoom", "--limit", "2", "--max-new-tokens", "12"]
    latentkit("eval", "--run", str(run), *common, "--out", str(out))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(r["latent_steps"] == 4 * r["latent_blocks"] for r in records)
    shown = latentkit(
        "generate",
        "--run",
        str(run),
        "--benchmark",
        "synth-zoom",
        "--index",
        "0",
        "--max-new-tokens",
        "8",
        "method.decode_force=true",
    ).stdout
    assert "<latent>" in shown
    latentkit("diagnose", "--run", str(run), *common, "--k-sweep", "1", "--batch-size", "2")
    report = json.loads(next((run / "diagnose").glob("*.json")).read_text())
    assert report["generated"]["trigger_rate"] >= 0


def test_without_alignment_there_is_no_projector_and_no_cache(tmp_path):
    latentkit(*train_args(tmp_path, "l0", *VALR, "train.steps=1", "method.alignment_weight=0"))
    run = tmp_path / "l0"
    assert not (run / "final" / "method_modules.safetensors").is_file()
    assert not (run / "stages" / "align" / "features-tiny-dinov2").exists()
    align = [m for m in metrics(run) if m.get("stage") == "align" and "loss" in m]
    assert align and not any("repa" in m for m in align)


def test_bad_k_and_layer_are_one_line_errors(tmp_path):
    for override, message in (
        ("method.num_latents=8", "K=8 latents do not form a square grid"),
        ("method.align_layer=9", "method.align_layer=9 but the model has 2 layers"),
    ):
        result = latentkit(*train_args(tmp_path, "bad", *VALR, override), check=False)
        assert result.returncode == 2
        assert message in result.stderr.strip().splitlines()[-1]


def cached_features(cache: Path, key: tuple[str, str]) -> torch.Tensor:
    manifest = json.loads((cache / "manifest.json").read_text())
    shard, name = next((s, n) for d, i, s, n in manifest["index"] if (d, i) == key)
    return load_file(str(cache / shard))[name]


def test_real_checkpoint_and_encoder_directories_with_official_records(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "Qwen2.5-VL-tiny"
    build_backbone(ModelSection(preset="tiny-qwen2.5-vl")).save(checkpoint)
    encoder = load_encoder(EncoderSpec(preset="tiny-siglip"), "e")
    encoder_dir = tmp_path / "siglip-tiny"
    encoder.model.save_pretrained(encoder_dir)
    encoder.processor.save_pretrained(encoder_dir)
    data = tmp_path / "interleaved"
    write_official_dataset(data)
    args = train_args(
        tmp_path,
        "real",
        *VALR,
        "train.steps=1",
        "model.preset=null",
        f"model.path={checkpoint}",
        f"data.path={data}",
        "data.on_bad_record=skip",
        f"method.encoders=[{{path: {encoder_dir}}}]",
    )
    latentkit(*args)
    run = tmp_path / "real"
    assert (run / "final" / "config.json").is_file()
    cache = run / "stages" / "align" / "features-siglip-tiny"
    manifest = json.loads((cache / "manifest.json").read_text())
    keys = sorted((dataset, sample_id) for dataset, sample_id, _, _ in manifest["index"])
    assert keys == [(d, str(i)) for d in ("Visual_CoT", "Zebra_CoT_visual_search") for i in range(3)]
    first = tuple(manifest["index"][0][:2])
    features_before = cached_features(cache, first)

    # Other encoder weights under the same path: the resumed align stage rebuilds the cache, never reuses it.
    with torch.no_grad():
        for parameter in encoder.model.parameters():
            parameter.add_(0.5)
    encoder.model.save_pretrained(encoder_dir)
    shutil.rmtree(run / "stages" / "align" / "final")
    shutil.rmtree(run / "final")
    latentkit(*args, "--resume")
    assert ("align", "cache_stale", "features-siglip-tiny") in events(run)
    rebuilt = json.loads((cache / "manifest.json").read_text())
    assert rebuilt["fingerprint"] != manifest["fingerprint"]
    assert not torch.equal(cached_features(cache, first), features_before)
