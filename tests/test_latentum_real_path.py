"""LatentUM from a plain HF-format Qwen2.5-VL directory (`model.path`, no preset, no latentkit marker): all four
stages train, `final/` loads back through `latentkit.load` with MBAQ, the MoME experts, the code head and the pixel
decoder bit for bit equal to the live weights at the end of training, its base weights load in plain transformers
as exactly the live model, and the interleaved decoding policy imagines an image on it."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml
from helpers import metrics, train_args
from latentkit.methods.latentum import Latentum
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

import latentkit as lk
from latentkit.backbone import build_backbone
from latentkit.config import ModelSection
from latentkit.decoding import SamplingParams
from latentkit.records import load_split

STAGES = ("quantizer", "language", "vision", "pixels")


def write_hf_directory(path: Path) -> None:
    """The tiny Qwen2.5-VL preset as a model hub checkpoint holds it: model, tokenizer and image processor saved by
    transformers' own `save_pretrained`, nothing of latentkit's."""
    torch.manual_seed(0)
    preset = build_backbone(ModelSection(preset="tiny-qwen2.5-vl"))
    preset.model.save_pretrained(path)
    preset.tokenizer.save_pretrained(path)
    preset.image_processor.save_pretrained(path)


def test_all_stages_from_a_hf_directory_load_back_and_imagine(tmp_path, monkeypatch):
    checkpoint = tmp_path / "Qwen2.5-VL-tiny"
    write_hf_directory(checkpoint)
    assert not list(checkpoint.glob("latentkit_*"))

    trained: list[Latentum] = []  # the method the run trains, to compare its live weights with final/
    setup = Latentum.setup

    def recording_setup(self: Latentum, backbone) -> None:
        setup(self, backbone)
        trained.append(self)

    monkeypatch.setattr(Latentum, "setup", recording_setup)
    steps = [f"train.stages.{stage}.steps=2" for stage in STAGES]
    args = [*train_args(tmp_path, "real")[1:], "run.method=latentum", "data.synth.n_train=4", *steps]
    run = lk.train(None, [*args, "model.preset=null", f"model.path={checkpoint}"])
    monkeypatch.undo()
    (live,) = trained

    records = [m for m in metrics(run) if "loss" in m]
    assert [(m["stage"], m["step"]) for m in records] == [(s, step) for s in STAGES for step in (1, 2)]
    assert all(math.isfinite(m["loss"]) for m in records)
    assert live.backbone.source == str(checkpoint)

    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert saved["preset"] is None and saved["path"] == str(checkpoint)

    model = lk.load(run, ["method.imagine.force=true"])
    live_state, loaded = live.modules.state_dict(), model.method.modules.state_dict()
    assert {key.split(".")[0] for key in loaded} == {"quantizer", "experts", "code_head", "pixel_decoder"}
    assert loaded.keys() == live_state.keys()
    assert all(torch.equal(loaded[key], live_state[key]) for key in live_state), [
        key for key in live_state if not torch.equal(loaded[key], live_state[key])
    ]
    # what was loaded is what the stages trained: fitted codebooks, a generation branch moved off the text
    # weights it started from, a decoder trained for stage pixels' two steps
    assert bool(model.method.quantizer.quantizer.usage.any())
    text_mlp = model.backbone.decoder().layers[0].mlp.up_proj.weight
    assert not torch.equal(model.method.experts.layers[0].mlp.up_proj.weight, text_mlp)
    assert int(model.method.pixel_decoder.trained_batches) == 2

    # final/'s base model in plain transformers: exactly the live model, the generation branch not in it
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(run / "final", local_files_only=True)
    plain_state, live_model = plain.state_dict(), live.backbone.model.state_dict()
    assert plain_state.keys() == live_model.keys()
    assert all(torch.equal(plain_state[key], live_model[key]) for key in live_model)
    tokenizer = AutoTokenizer.from_pretrained(run / "final", local_files_only=True)
    tags = live.config.observation_tags
    assert [tokenizer.convert_tokens_to_ids(tag) for tag in tags] == [live.backbone.token_id(t) for t in tags]

    # the interleaved decoding policy on the loaded run: image-start forced, one board imagined and read back
    sample = load_split(run / "data" / "synth-maze", "train").samples[:1]
    (answer,) = lk.generate(model, sample, sampling=SamplingParams(max_new_tokens=24))
    extras = answer.trajectories[0].extras
    assert extras["imagined_images"] == 1 and extras["imagined_grids"] == [[1, 4, 4]]
    codes = torch.tensor(extras["imagined_codes"][0])
    assert codes.shape == (16, live.config.quantizer.codebooks)
    assert int(codes.min()) >= 0 and int(codes.max()) < live.config.quantizer.codebook_size
