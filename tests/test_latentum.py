"""LatentUM's MBAQ pinned by independent computations: the VQ loss and the behaviour KL (by hand and numpy), the
straight-through gradient (against the up MLP's own gradient at the chosen entries), EMA usage and dead-code reset
on a constructed case, the frozen VLM in stage quantizer, one-line config errors; and the stage end to end through
the CLI, with the quantizer saved and loaded back bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import latentkit, metrics, train_args
from latentkit.methods.latentum import Latentum, LatentumConfig
from latentkit.methods.latentum.behaviour import code_statistics
from latentkit.methods.latentum.losses import behaviour_kl, vq_loss
from latentkit.methods.latentum.quantizer import MBAQ, ProductQuantizer
from safetensors.torch import load_file

import latentkit as lk
from latentkit.backbone import build_backbone
from latentkit.config import ModelSection, build_config
from latentkit.errors import ConfigError
from latentkit.layout import collate
from latentkit.optim import freeze_and_group, trainable_parameters
from latentkit.records import load_split
from latentkit.registry import StageProgress, get_method
from latentkit.synth.maze import generate_synth_maze

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def maze(tmp_path_factory):
    root = tmp_path_factory.mktemp("maze")
    generate_synth_maze(root, n_train=3, n_val=0, n_test=0)
    return load_split(root, "train").samples


# --- the losses --------------------------------------------------------------------------------------------------
def test_vq_loss_by_hand():
    # One codebook (C = 1) of N = 2 entries, two vectors of d = 1: z = (1, 3), z_q = (0, 3) -> mse 0.5.
    # sq_distances rows (0, ln 3) and (0, 0): softmax(-d^2) = (3/4, 1/4) and (1/2, 1/2), mean (5/8, 3/8).
    z = torch.tensor([[[1.0]], [[3.0]]])
    z_q = torch.tensor([[[0.0]], [[3.0]]])
    sq = torch.tensor([[[0.0, math.log(3.0)]], [[0.0, 0.0]]])
    entropy = -(5 / 8 * math.log(5 / 8) + 3 / 8 * math.log(3 / 8))
    got = vq_loss(z, z_q, sq, commitment=0.25, entropy_weight=0.1)
    assert float(got) == pytest.approx(0.5 + 0.25 * 0.5 - 0.1 * entropy, rel=1e-6)


def test_vq_loss_matches_numpy_per_codebook_with_its_stop_gradients():
    rng = np.random.default_rng(0)
    n, c, d, entries = 5, 3, 2, 4
    z, z_q = rng.normal(size=(n, c, d)), rng.normal(size=(n, c, d))
    sq = rng.uniform(0.0, 3.0, size=(n, c, entries))
    expected = 0.0
    for k in range(c):
        mse = float(np.mean((z[:, k] - z_q[:, k]) ** 2))
        soft = np.exp(-sq[:, k]) / np.exp(-sq[:, k]).sum(-1, keepdims=True)
        mean = soft.mean(0)
        expected += (mse + 0.5 * mse - 0.2 * float(-(mean * np.log(mean)).sum())) / c
    tz, tq, tsq = (torch.tensor(a, requires_grad=True) for a in (z, z_q, sq))
    got = vq_loss(tz, tq, tsq, commitment=0.5, entropy_weight=0.2)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-9)
    got.backward()
    # sg(z) in the codebook term, sg(z_q) in the commitment term: each side sees only its own term's gradient
    scale = 2.0 / (n * d * c)
    assert np.allclose(tq.grad.numpy(), scale * (z_q - z))
    assert np.allclose(tz.grad.numpy(), 0.5 * scale * (z - z_q))


def test_behaviour_kl_by_hand():
    original = torch.tensor([[math.log(3.0), 0.0]])  # p = (3/4, 1/4)
    quantized = torch.tensor([[0.0, 0.0]])  # q = (1/2, 1/2)
    forward = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(behaviour_kl(original, quantized, "forward")) == pytest.approx(forward, rel=1e-6)
    assert float(behaviour_kl(original, quantized, "reverse")) == pytest.approx(reverse, rel=1e-6)
    # temperature 2 halves the logits: p = softmax(ln 3 / 2, 0) = (sqrt 3, 1) / (sqrt 3 + 1)
    p = np.array([math.sqrt(3.0), 1.0]) / (math.sqrt(3.0) + 1.0)
    hot = float((p * np.log(p / 0.5)).sum())
    assert float(behaviour_kl(original, quantized, "forward", 2.0)) == pytest.approx(hot, rel=1e-6)


def test_code_statistics_by_hand():
    codes = torch.tensor(
        [[0, 1], [0, 1], [1, 1], [2, 1]]
    )  # codebook 0: shares (1/2, 1/4, 1/4, 0); 1: one entry
    usage, perplexity = code_statistics(codes, entries=4)
    first = math.exp(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    assert usage == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert perplexity == pytest.approx((first + 1.0) / 2)


# --- the quantizer ---------------------------------------------------------------------------------------------
def small_mbaq() -> MBAQ:
    torch.manual_seed(0)
    return MBAQ(
        feature_size=12,
        out_size=6,
        latent_size=8,
        width=10,
        codebooks=2,
        entries=5,
        ema_decay=0.9,
        dead_threshold=0.1,
    )


def test_straight_through_gradient_reaches_the_down_mlp():
    mbaq = small_mbaq().eval()  # no reset: the codebook stays as built
    features = torch.randn(7, 12)
    out = mbaq(features)
    weights = torch.randn(7, 6)
    (out.outputs * weights).sum().backward()
    assert mbaq.down[1][0].weight.grad is not None and mbaq.down[1][0].weight.grad.abs().sum() > 0
    got = [p.grad.clone() for p in mbaq.down.parameters()]
    # Independently: the up MLP's gradient at the chosen entries, passed to z as if the rounding were identity.
    mbaq.zero_grad()
    z = mbaq.down(features)
    nearest = mbaq.quantizer.lookup(out.codes).flatten(-2).detach().requires_grad_(True)
    (upstream,) = torch.autograd.grad((mbaq.up(nearest) * weights).sum(), nearest)
    z.backward(upstream)
    for mine, reference in zip(got, (p.grad for p in mbaq.down.parameters())):
        assert torch.allclose(mine, reference, atol=1e-6)
    assert torch.allclose(out.outputs, mbaq.decode(mbaq.encode(features)), atol=1e-6)
    assert torch.equal(out.codes, mbaq.encode(features))


def test_ema_usage_and_dead_code_reset_on_a_constructed_case():
    quantizer = ProductQuantizer(dim=4, codebooks=2, entries=3, ema_decay=0.5, dead_threshold=0.5)
    with torch.no_grad():
        quantizer.codebook.copy_(
            torch.tensor([[[0.0, 0.0], [10.0, 10.0], [100.0, 100.0]], [[0.0, 0.0], [1.0, 1.0], [50.0, 50.0]]])
        )
        # dead below 0.5 / 3: entry 2 of codebook 0 only
        quantizer.usage.copy_(torch.tensor([[0.5, 0.45, 0.05], [0.4, 0.4, 0.2]]))
    z = torch.tensor(
        [[0.1, 0.0, 0.9, 1.0], [9.0, 10.0, 0.0, 0.2], [1.0, 1.0, 1.0, 1.0], [0.0, -0.5, 0.2, 0.0]]
    )
    before = quantizer.usage.clone()
    torch.manual_seed(0)
    _, nearest, sq, codes, resets = quantizer(z)
    assert resets == 1
    chunks = z.reshape(4, 2, 2).numpy()
    book = quantizer.table().detach().numpy()
    # reset onto a chunk of the batch (the parameter plus its offset: float32 rounding of 100 + (x - 100))
    assert any(np.allclose(book[0, 2], row, rtol=0, atol=1e-5) for row in chunks[:, 0])
    assert np.array_equal(book[0, :2], [[0.0, 0.0], [10.0, 10.0]]) and np.array_equal(
        book[1], [[0, 0], [1, 1], [50, 50]]
    )
    assert np.array_equal(quantizer.codebook.detach().numpy()[0, 2], [100.0, 100.0])  # the parameter kept
    distances = ((chunks[:, :, None, :] - book[None]) ** 2).sum(-1)
    assert np.allclose(sq.detach().numpy(), distances, rtol=1e-5, atol=1e-3)  # float32 expansion of |a - b|^2
    assert codes.tolist() == distances.argmin(-1).tolist()
    assert torch.equal(nearest, quantizer.table()[[0, 1], codes])
    share = np.stack([np.bincount(codes[:, k].numpy(), minlength=3) / 4 for k in range(2)])
    previous = before.numpy().copy()
    previous[0, 2] = 1 / 3  # a reset entry restarts at the uniform share
    assert np.allclose(quantizer.usage.numpy(), 0.5 * previous + 0.5 * share)
    # eval mode: neither usage nor codebook moves
    quantizer.eval()
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    quantizer.usage[1, 2] = 0.0
    quantizer(z)
    assert torch.equal(quantizer.table(), state["codebook"] + state["reset_offset"])
    assert float(quantizer.usage[1, 2]) == 0.0


def test_fresh_quantizer_is_data_initialised_on_its_first_training_step_and_keeps_it_under_fsdp():
    quantizer = ProductQuantizer(dim=4, codebooks=2, entries=3, ema_decay=0.9, dead_threshold=0.1)
    z = torch.randn(6, 4)
    # FSDP2 runs the forward on a gathered copy of each parameter and drops the copy afterwards, writes and all:
    # the resets must outlive it
    persistent = quantizer.codebook
    quantizer.codebook = torch.nn.Parameter(persistent.detach().clone())
    _, _, _, _, resets = quantizer(z)
    quantizer.codebook = persistent
    assert resets == 6
    chunks = z.reshape(6, 2, 2)
    for k in range(2):
        for entry in quantizer.table()[k]:
            assert any(torch.allclose(entry, row, rtol=0, atol=1e-6) for row in chunks[:, k])


def test_weights_saved_without_a_reset_offset_load_with_a_zero_one():
    saved = ProductQuantizer(dim=4, codebooks=2, entries=3, ema_decay=0.9, dead_threshold=0.1).state_dict()
    del saved["reset_offset"]  # as written before resets had an offset: they moved `codebook` itself
    quantizer = ProductQuantizer(dim=4, codebooks=2, entries=3, ema_decay=0.9, dead_threshold=0.1)
    quantizer.reset_offset.fill_(1.0)
    quantizer.load_state_dict(saved)
    assert torch.equal(quantizer.table(), saved["codebook"]) and not quantizer.reset_offset.any()


# --- the method --------------------------------------------------------------------------------------------------
def test_stage_quantizer_trains_the_quantizer_only(maze):
    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset="tiny-qwen2-vl"))
    method = Latentum(LatentumConfig())
    method.setup(backbone)
    every = trainable_parameters(backbone, method)
    groups = freeze_and_group(backbone, method, list(method.stage_freeze("quantizer")), {}, every)
    trained = {id(p) for params in groups.values() for p in params}
    assert trained == {id(p) for p in method.quantizer.parameters()}  # no other owned module
    batch = collate([method.layout(s, "quantizer") for s in maze[:2]], backbone.tokenizer.pad_token_id)
    out = method.loss(backbone, batch, "quantizer", StageProgress(0, 1))
    out.loss.backward()
    assert all(p.grad is None for p in backbone.model.parameters())
    assert all(p.grad is not None and p.grad.isfinite().all() for p in method.quantizer.parameters())
    assert all(p.grad is None for p in method.pixel_decoder.parameters())  # stage pixels trains it
    assert out.metrics["resets"] == 4 * 64  # the first step initialises every entry from the batch
    assert 0.0 <= out.metrics["agreement"] <= 1.0 and out.metrics["kl"] >= 0.0
    report = method.quantizer_report(maze, batch_size=2)
    assert report.samples == 3 and report.positions == sum(
        int((method.layout(s, "quantizer").loss_weight > 0).sum()) for s in maze
    )
    assert 0.0 < report.usage <= 1.0 and 1.0 <= report.perplexity <= 64.0


def test_the_layout_trains_the_observation_tags_the_model_writes_at_generation(maze):
    method = Latentum(LatentumConfig())
    method.setup(build_backbone(ModelSection(preset="tiny-qwen2.5-vl")))
    samples = maze
    layout = method.layout(samples[0], "language")
    for tag in method.config.observation_tags:
        tag_id = method.backbone.token_id(tag)
        where = (layout.input_ids == tag_id).nonzero().flatten()
        assert len(where) == len(samples[0].aux_images)  # one observation after every board
        assert (layout.labels[where] == tag_id).all() and (layout.loss_weight[where] > 0).all()


def test_a_text_backbone_is_a_one_line_error():
    backbone = build_backbone(ModelSection(preset="tiny-causal-lm"))
    with pytest.raises(ConfigError, match="model.preset=tiny-qwen2.5-vl") as caught:
        Latentum(LatentumConfig()).setup(backbone)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("quantizer", "message"),
    [
        ({"latent_size": 30}, "latent_size=30 is not a multiple of codebooks=4"),
        ({"codebooks": 0}, "codebooks"),
        ({"codebook_size": 1}, "codebook_size"),
        ({"kl_direction": "sideways"}, "kl_direction"),
        ({"kl_temperature": 0}, "kl_temperature"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"dead_threshold": -0.1}, "dead_threshold"),
        ({"output": "pixels"}, "output"),
        ({"codebok_size": 8}, "codebook_size"),  # unknown key: the closest valid one is named
    ],
)
def test_bad_config_values_are_one_line_errors(quantizer, message):
    with pytest.raises(ConfigError, match=message) as caught:
        build_config(LatentumConfig, {"method": {"quantizer": quantizer}}, "c.yaml")
    assert "\n" not in str(caught.value)


def test_tiny_config_is_the_method_default_and_registered():
    assert get_method("latentum") is Latentum
    raw = yaml.safe_load((REPO / "configs" / "latentum" / "tiny.yaml").read_text())
    assert LatentumConfig.model_validate(raw["method"]) == LatentumConfig()
    defaults = Latentum.run_defaults
    assert raw["model"]["preset"] == defaults["model"]["preset"] == "tiny-qwen2.5-vl"
    assert raw["data"]["task"] == defaults["data"]["task"] == "synth-maze"
    assert raw["train"]["stages"] == defaults["train"]["stages"]


# --- end to end --------------------------------------------------------------------------------------------------
def test_stage_quantizer_end_to_end_and_the_quantizer_loads_back_bit_exact(tmp_path):
    steps = ["train.stages.quantizer.steps=3", "train.checkpoint_every=2", "data.synth.n_train=8"]
    latentkit(*train_args(tmp_path, "mbaq", "--method", "latentum", *steps, "--stage", "quantizer"))
    run = tmp_path / "mbaq"
    final = run / "stages" / "quantizer" / "final"
    records = [m for m in metrics(run) if m.get("stage") == "quantizer" and "loss" in m]
    assert [m["step"] for m in records] == [1, 2, 3]
    for record in records:
        assert all(math.isfinite(record[k]) for k in ("loss", "kl", "vq", "agreement", "usage", "perplexity"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["task"] == "synth-maze" and saved["model"]["preset"] == "tiny-qwen2.5-vl"
    assert json.loads((final / "latentkit_method.json").read_text()) == {
        "method": "latentum",
        "stage": "quantizer",
    }
    owned = load_file(str(final / "method_modules.safetensors"))
    assert owned["quantizer.quantizer.codebook"].shape == (4, 64, 8)
    assert float(owned["quantizer.quantizer.usage"].sum()) == pytest.approx(4.0, rel=1e-4)  # EMA shares saved
    checkpoint = load_file(
        str(run / "stages" / "quantizer" / "checkpoints" / "step-00000002" / "model.safetensors")
    )
    assert "method_modules.quantizer.quantizer.usage" in checkpoint  # a resume continues the EMA
    model = lk.load(final)
    loaded = model.method.modules.state_dict()
    assert loaded.keys() == owned.keys()
    assert all(torch.equal(loaded[k], owned[k]) for k in owned)
    report = model.method.quantizer_report(
        load_split(run / "data" / "synth-maze", "train").samples[:4], batch_size=2
    )
    assert 0.0 <= report.agreement <= 1.0 and report.kl >= 0.0 and report.samples == 4
