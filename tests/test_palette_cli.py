"""`latentkit train` with Reasoning Palette end to end: configs/palette/tiny.yaml runs stage vae (the language model
bit-identical to its initial weights, only the VAE trained) then stage warmup (the model trained, the VAE as vae
left it); the trained run generates with its prefix and fits a domain Gaussian; `--method palette` alone (its
embedded default, the tiny text model on synth-arith) and the VL config on the tiny preset run both stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import set_seed
from helpers import latentkit, metrics, train_args
from latentkit.methods.palette import Palette, PaletteConfig
from latentkit.methods.palette.domain import fit_domain
from safetensors.torch import load_file

import latentkit as lk
from latentkit.backbone import build_backbone
from latentkit.config import ModelSection
from latentkit.decoding import SamplingParams
from latentkit.records import load_split

STEPS = [
    "train.stages.vae.steps=3",
    "train.stages.warmup.steps=2",
    "train.stages.rl.steps=2",
    "train.rl.num_generations=2",
    "train.rl.max_completion_length=8",
    "train.checkpoint_every=2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    latentkit(*train_args(out, "palette", "--config", "configs/palette/tiny.yaml", *STEPS))
    return out / "palette"


def weights(run: Path, stage: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "stages" / stage / "final" / name))


def test_the_three_stages_run_with_their_metrics(run):
    logged = [(m["stage"], m["step"]) for m in metrics(run) if "loss" in m]
    assert logged == [("vae", 1), ("vae", 2), ("vae", 3), ("warmup", 1), ("warmup", 2), ("rl", 1), ("rl", 2)]
    # Two-phase schedule over 2 steps: every rollout of step 1 (tau = 0) carries a prefix, none of step 2 (0.5).
    assert [m["prompt_vectors_rate"] for m in metrics(run) if m.get("stage") == "rl" and "loss" in m] == [
        1.0,
        0.0,
    ]
    assert all("recon" in m and "kl" in m for m in metrics(run) if m.get("stage") == "vae" and "loss" in m)
    assert all(m["target_tokens"] > 0 for m in metrics(run) if m.get("stage") == "warmup" and "loss" in m)
    assert (run / "final" / "method_modules.safetensors").is_file()


def test_stage_vae_leaves_the_model_untouched_and_later_stages_leave_the_vae(run):
    # The trainer's start, replayed: seed, backbone, method setup (the observation tags' embedding rows).
    set_seed(0)
    backbone = build_backbone(ModelSection(preset="tiny-causal-lm"))
    method = Palette(PaletteConfig())
    method.setup(backbone)
    initial = backbone.model.state_dict()
    after_vae = weights(run, "vae", "model.safetensors")
    assert after_vae.keys() == initial.keys()
    assert all(torch.equal(after_vae[k], initial[k]) for k in initial)
    after_warmup = weights(run, "warmup", "model.safetensors")
    assert all(not torch.equal(after_warmup[k], initial[k]) for k in initial)
    vae_initial = method.modules.state_dict()
    vae_trained = weights(run, "vae", "method_modules.safetensors")
    assert all(not torch.equal(vae_trained[k], vae_initial[k]) for k in vae_initial)
    for stage in ("warmup", "rl"):  # the VAE is frozen after its own stage, RL included
        vae_after = weights(run, stage, "method_modules.safetensors")
        assert all(torch.equal(vae_after[k], vae_trained[k]) for k in vae_trained)


def test_the_run_fits_its_domains_and_steering_samples_from_them(run):
    folder = run / "stages" / "vae" / "domains"
    assert [p.name for p in folder.iterdir()] == ["synth-arith.safetensors"]
    assert [m["domains"] for m in metrics(run) if m.get("event") == "domains_fitted"] == [{"synth-arith": 24}]
    model = lk.load(run)
    samples = load_split(run / "data" / "synth-arith", "train").samples
    # Fitted as the VAE saw its inputs: the embeddings of the model stage vae left (warmup trains them on).
    mu = lk.load(run / "stages" / "vae" / "final").method.encode_samples(samples).double()
    steered = lk.load(run, [f"method.domain={folder / 'synth-arith.safetensors'}"])
    assert torch.allclose(steered.method.domain.mean.double(), mu.mean(0), atol=1e-5)
    assert torch.allclose(steered.method.domain.factor.double(), mu.std(0), atol=1e-5)
    z = steered.method.prefix_latents(samples[0].key, 0)
    eps = model.method.prefix_latents(samples[0].key, 0)
    assert torch.allclose(z, steered.method.domain.mean + eps * steered.method.domain.factor)


def test_the_trained_run_generates_with_its_prefix_and_fits_a_domain(run, tmp_path):
    model = lk.load(run)
    samples = load_split(run / "data" / "synth-arith", "train").samples[:4]
    answers = lk.generate(model, samples[:2], sampling=SamplingParams(max_new_tokens=4))
    for answer in answers:
        (slot,) = answer.trajectories[0].prompt.embeddings
        assert slot.vectors.shape == (4, 64)
        assert torch.allclose(slot.vectors, model.method.prefix(answer.sample.key, 0))
    gaussian = fit_domain(model.method, samples, tmp_path / "arith.safetensors")
    steered = lk.load(run, [f"method.domain={tmp_path / 'arith.safetensors'}"])
    assert torch.equal(steered.method.domain.mean, gaussian.mean)


def test_method_alone_runs_on_its_embedded_default(tmp_path):
    """`--method palette` lays Palette.run_defaults (configs/palette/tiny.yaml) under the command line."""
    latentkit(
        *train_args(
            tmp_path, "alone", "--method", "palette", "train.stages.warmup.steps=2", "train.stages.rl.steps=1"
        )
    )
    run = tmp_path / "alone"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    shipped = yaml.safe_load(Path("configs/palette/tiny.yaml").read_text())
    assert saved["model"]["preset"] == shipped["model"]["preset"] == "tiny-causal-lm"
    assert saved["data"]["task"] == shipped["data"]["task"] == "synth-arith"
    assert saved["train"]["stages"]["vae"]["steps"] == shipped["train"]["stages"]["vae"]["steps"]
    assert saved["train"]["stages"]["warmup"]["steps"] == 2  # the command line wins
    assert [m["stage"] for m in metrics(run) if "loss" in m].count("warmup") == 2


def test_vl_config_runs_on_the_tiny_preset(tmp_path):
    tiny = [
        "model.path=null",
        "model.preset=tiny-qwen2.5-vl",
        "model.dtype=float32",
        "model.gradient_checkpointing=false",
        "train.mixed_precision=no",
        "train.grad_accum=1",
        "train.stages.vae.batch_size=2",
        "method.decoder_width=64",
    ]
    config = ["--config", "configs/palette/qwen2_5_vl_3b.yaml"]
    latentkit(*train_args(tmp_path, "vl3b", *config, *tiny, *STEPS))
    owned = load_file(str(tmp_path / "vl3b" / "final" / "method_modules.safetensors"))
    assert owned["vae.decoder.position"].shape == (8, 64)


def test_generate_shows_the_prefix_with_its_z(run):
    common = [
        "generate",
        "--run",
        str(run),
        "--benchmark",
        "synth-arith",
        "--split",
        "train",
        "--index",
        "0",
        "--max-new-tokens",
        "4",
    ]
    shown = latentkit(*common).stdout
    header = next(line for line in shown.splitlines() if line.startswith("⟦prompt vectors × 4⟧"))
    assert "prefix=latent L=4 draw=0 z=[" in header
    data = json.loads(latentkit(*common, "--json").stdout)
    model = lk.load(run)
    key = ("synth-arith", data["sample_id"])
    expected = [[round(v, 3) for v in row] for row in model.method.prefix_latents(key, 0).tolist()]
    assert data["prompt_info"]["z"] == expected and len(data["prompt_vectors"][0]) == 4
    raw = json.loads(latentkit(*common, "--json", "method.prefix=raw_noise").stdout)
    assert raw["prompt_info"] == {"prefix": "raw_noise", "L": 4, "draw": 0}


def test_eval_conditions_are_named_apart_and_greedy_latent_pass_at_k_runs(run, tmp_path):
    common = ["eval", "--run", str(run), "--benchmark", "synth-arith", "--split", "train", "--limit", "3", "--max-new-tokens", "8",
              "--num-samples", "3", "--no-progress"]  # fmt: skip
    latentkit(*common)  # latent sampling, greedy per z
    latentkit(*common, "method.prefix=noise_prefix", "method.test_prefix_length=1")
    token = latentkit(*common, check=False)  # the same again resumes: nothing new
    assert token.returncode == 0
    refused = latentkit(*common, "method.prefix=none", check=False)
    assert refused.returncode == 2 and "needs sampling" in refused.stderr
    latentkit(*common, "method.prefix=none", "--temperature", "1.0")
    eval_dir = run / "eval"
    assert len(list(eval_dir.glob("synth-arith-*.summary.json"))) == 3
    latent = json.loads((eval_dir / "synth-arith-train-n3-max8.summary.json").read_text())
    assert latent["sampling"]["temperature"] == 0.0 and set(latent["pass_at_k"]) == {"1", "2", "3"}
    assert latent["diversity"]["distinct_first_steps"] >= 1
    noise = json.loads(
        (
            eval_dir / "synth-arith-train-prefix=noise_prefix-test_prefix_length=1-n3-max8.summary.json"
        ).read_text()
    )
    assert noise["model"]["method_overrides"] == ["method.prefix=noise_prefix", "method.test_prefix_length=1"]
    latentkit("compare", str(eval_dir), "--out", str(tmp_path / "cmp"))
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "[prefix=noise_prefix test_prefix_length=1]" in table and "[prefix=none]" in table
    assert (tmp_path / "cmp" / "pass_at_k.png").is_file()
