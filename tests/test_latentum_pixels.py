"""LatentUM's pixel decoder: the loss and PSNR by hand, the token-grid layout of the decoded pixels (each token's
block of pixels depends on that token alone when the decoder has no spatial blocks), codes -> images against the
codebook lookup done by hand, the frozen VLM and MBAQ in stage pixels, one-line errors (untrained quantizer or
decoder, bad codes, bad config, an existing PNG), and stage pixels end to end through the CLI with the decoder
loaded back bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import latentkit, metrics, train_args
from latentkit.methods.latentum import Latentum, LatentumConfig
from latentkit.methods.latentum.config import PixelDecoderConfig
from latentkit.methods.latentum.pixels import (
    PixelDecoder,
    decode_codes,
    encode_images,
    pixel_loss,
    psnr,
    to_image,
    token_grid,
)
from PIL import Image
from safetensors.torch import load_file

import latentkit as lk
from latentkit.backbone import build_backbone
from latentkit.config import ModelSection, build_config
from latentkit.errors import CheckpointError, ConfigError, DataError
from latentkit.images import save_images
from latentkit.layout import collate
from latentkit.optim import freeze_and_group, trainable_parameters
from latentkit.records import load_split
from latentkit.registry import StageProgress
from latentkit.synth.maze import generate_synth_maze


@pytest.fixture(scope="module")
def maze(tmp_path_factory):
    root = tmp_path_factory.mktemp("maze")
    generate_synth_maze(root, n_train=2, n_val=0, n_test=0)
    return load_split(root, "train").samples


@pytest.fixture(scope="module")
def method():
    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset="tiny-qwen2.5-vl"))
    latentum = Latentum(LatentumConfig())
    latentum.setup(backbone)
    return latentum


# --- the loss --------------------------------------------------------------------------------------------------
def test_pixel_loss_and_psnr_by_hand():
    # errors (0.5, -0.1, 0, 0.2): squares 0.25 + 0.01 + 0 + 0.04 = 0.30, absolutes 0.8, over 4 values
    predicted = torch.tensor([[[0.5, 0.4], [1.0, 0.2]]])
    target = torch.tensor([[[0.0, 0.5], [1.0, 0.0]]])
    assert float(pixel_loss(predicted, target)) == pytest.approx(0.30 / 4, rel=1e-6)
    assert float(pixel_loss(predicted, target, l1_weight=0.5)) == pytest.approx(
        0.30 / 4 + 0.5 * 0.8 / 4, rel=1e-6
    )
    assert psnr(0.01) == pytest.approx(20.0)
    assert psnr(0.0) == math.inf


# --- the decoder -----------------------------------------------------------------------------------------------
def test_each_tokens_pixels_come_from_that_token_in_row_major_order():
    """Without spatial blocks the decoder is per token: changing z_q at token (r, c) of a 2 x 3 grid changes
    exactly the s x s block at rows r*s.., columns c*s.. of the image."""
    torch.manual_seed(0)
    decoder = PixelDecoder(latent_size=5, token_pixels=4, width=8, depth=0, kernel_size=3)
    z_q = torch.randn(1, 2, 3, 5)
    base = decoder(z_q)
    assert base.shape == (1, 3, 8, 12)
    for row in range(2):
        for col in range(3):
            moved = z_q.clone()
            moved[0, row, col] += 1.0
            changed = (decoder(moved) - base).abs().sum(1)[0] > 0
            expected = torch.zeros(8, 12, dtype=torch.bool)
            expected[row * 4 : (row + 1) * 4, col * 4 : (col + 1) * 4] = True
            assert torch.equal(changed, expected)


def test_decode_codes_is_the_decoder_of_the_looked_up_entries(method):
    quantizer, decoder = method.quantizer, method.pixel_decoder
    codebooks, entries, chunk = quantizer.quantizer.codebook.shape
    generator = torch.Generator().manual_seed(1)
    codes = [
        torch.randint(entries, (6, codebooks), generator=generator),
        torch.randint(entries, (4, codebooks)),
    ]
    grids = [(2, 3), (2, 2)]
    got = decode_codes(quantizer, decoder, codes, grids)
    for image_codes, (rows, cols), image in zip(codes, grids, got):
        book = quantizer.quantizer.table().detach()
        # by hand: position p's z_q is its C entries side by side, placed at (p // cols, p % cols)
        z_q = torch.stack(
            [
                torch.cat([book[c, image_codes[p, c]] for c in range(codebooks)])
                for p in range(len(image_codes))
            ]
        )
        expected = decoder(z_q.view(1, rows, cols, codebooks * chunk))[0]
        assert image.shape == (3, rows * 28, cols * 28)
        assert torch.allclose(image, expected, atol=1e-6)
    with pytest.raises(
        DataError, match=r"image 1: codes of shape \(5, 4\) do not fill a 2 x 2 token grid"
    ) as caught:
        decode_codes(quantizer, decoder, [codes[0], torch.zeros(5, codebooks, dtype=torch.long)], grids)
    assert "\n" not in str(caught.value)


def test_boards_encode_to_one_token_per_cell_with_the_pixels_the_tower_saw(method, maze):
    backbone = method.backbone
    paths = [*maze[0].images, *maze[0].aux_images]
    inputs = [backbone.preprocess_image(Image.open(p)) for p in paths]
    pixel_values = torch.cat([i.pixel_values for i in inputs])
    grids = torch.tensor([i.grid_thw for i in inputs])
    encoded = encode_images(backbone, method.quantizer, pixel_values, grids)
    features = backbone.vision_features(pixel_values, grids)
    for path, image, image_features in zip(paths, encoded, features):
        assert (
            image.grid == (4, 4) == token_grid(backbone, Image.open(path))
        )  # 112 px boards, 28 px per token
        assert torch.equal(image.codes, method.quantizer.encode(image_features))
        board = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255
        assert torch.allclose(image.pixels, board, atol=1e-5)


# --- the stage ---------------------------------------------------------------------------------------------------
def test_stage_pixels_trains_the_decoder_only(method, maze):
    backbone = method.backbone
    every = trainable_parameters(backbone, method)
    groups = freeze_and_group(backbone, method, list(method.stage_freeze("pixels")), {}, every)
    assert {id(p) for params in groups.values() for p in params} == {
        id(p) for p in method.pixel_decoder.parameters()
    }
    batch = collate([method.layout(s, "pixels") for s in maze], backbone.tokenizer.pad_token_id)
    with pytest.raises(ConfigError, match="the quantizer was never trained") as caught:
        method.prepare_stage("pixels", None)  # a fresh MBAQ: usage all zero
    assert "\n" not in str(caught.value)
    method.modules.train()
    method.loss(backbone, batch, "quantizer", StageProgress(0, 1))  # MBAQ's first step: usage becomes shares
    method.modules.zero_grad()
    quantizer_before = {k: v.clone() for k, v in method.quantizer.state_dict().items()}
    trained_before = int(method.pixel_decoder.trained_batches)
    out = method.loss(backbone, batch, "pixels", StageProgress(0, 1))
    out.loss.backward()
    assert all(p.grad is None for p in backbone.model.parameters())
    assert all(p.grad is None for p in method.quantizer.parameters())
    assert all(p.grad is not None and p.grad.isfinite().all() for p in method.pixel_decoder.parameters())
    assert all(torch.equal(v, quantizer_before[k]) for k, v in method.quantizer.state_dict().items())
    assert int(method.pixel_decoder.trained_batches) == trained_before + 1
    assert out.metrics["images"] == sum(len(s.images) + len(s.aux_images) for s in maze)
    assert out.metrics["psnr"] == pytest.approx(psnr(out.metrics["mse"]))
    method.prepare_stage("pixels", None)  # a trained MBAQ passes


def test_an_untrained_decoder_draws_nothing_and_an_existing_png_is_kept(method, tmp_path):
    fresh = Latentum(LatentumConfig())
    fresh.setup(method.backbone)
    codes = [torch.zeros(16, 4, dtype=torch.long)]
    with pytest.raises(CheckpointError, match="pixel decoder is untrained") as caught:
        fresh.board_images(codes, (4, 4))
    assert "\n" not in str(caught.value)
    images = [to_image(torch.rand(3, 8, 8)), to_image(torch.rand(3, 8, 8))]
    paths = save_images(images, tmp_path / "boards", "board")
    assert [p.name for p in paths] == ["board-001.png", "board-002.png"]
    assert all(np.array_equal(np.array(Image.open(p)), np.array(i)) for p, i in zip(paths, images))
    before = paths[1].read_bytes()
    with pytest.raises(ConfigError, match="board-001.png exists and would be overwritten") as caught:
        save_images(images[::-1], tmp_path / "boards", "board")
    assert "\n" not in str(caught.value) and paths[1].read_bytes() == before


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        ({"kernel_size": 4}, "kernel_size=4 is even"),
        ({"width": 0}, "width"),
        ({"depth": -1}, "depth"),
        ({"l1_weight": -1.0}, "l1_weight"),
        ({"widht": 8}, "width"),
    ],
)
def test_bad_decoder_config_values_are_one_line_errors(pixels, message):
    with pytest.raises(ConfigError, match=message) as caught:
        build_config(LatentumConfig, {"method": {"pixels": pixels}}, "c.yaml")
    assert "\n" not in str(caught.value)
    assert PixelDecoderConfig() == LatentumConfig().pixels


# --- end to end --------------------------------------------------------------------------------------------------
def test_stage_pixels_end_to_end_and_the_decoder_loads_back_bit_exact(tmp_path):
    steps = [f"train.stages.{stage}.steps=1" for stage in ("language", "vision")]
    steps += ["train.stages.quantizer.steps=2", "train.stages.pixels.steps=3", "data.synth.n_train=8"]
    latentkit(*train_args(tmp_path, "px", "--method", "latentum", *steps))
    run = tmp_path / "px"
    records = [m for m in metrics(run) if m.get("stage") == "pixels" and "loss" in m]
    assert [m["step"] for m in records] == [1, 2, 3]
    assert all(math.isfinite(m[k]) and m["images"] > 0 for m in records for k in ("loss", "mse", "psnr"))
    owned = load_file(str(run / "final" / "method_modules.safetensors"))
    after_vision = load_file(str(run / "stages" / "vision" / "final" / "method_modules.safetensors"))
    for key, value in owned.items():  # stage pixels moved the decoder only
        assert torch.equal(value, after_vision[key]) == (not key.startswith("pixel_decoder."))
    assert int(owned["pixel_decoder.trained_batches"]) == 3
    model = lk.load(run)
    loaded = model.method.modules.state_dict()
    assert loaded.keys() == owned.keys() and all(torch.equal(loaded[k], owned[k]) for k in owned)
    board = Image.open(load_split(run / "data" / "synth-maze", "train").samples[0].images[0])
    processed = model.backbone.preprocess_image(board)
    (encoded,) = encode_images(
        model.backbone, model.method.quantizer, processed.pixel_values, torch.tensor([processed.grid_thw])
    )
    paths = model.method.save_board_images([encoded.codes], encoded.grid, tmp_path / "boards")
    assert Image.open(paths[0]).size == board.size


def test_stage_pixels_without_a_trained_quantizer_exits_2_in_one_line(tmp_path):
    result = latentkit(
        *train_args(tmp_path, "bare", "--method", "latentum", "train.stage=pixels"), check=False
    )
    assert result.returncode == 2
    message = result.stderr.strip()
    assert "\n" not in message and "stages/vision/final is missing" in message and "train.stage" in message
    assert not (tmp_path / "bare" / "stages" / "pixels" / "final").exists()
