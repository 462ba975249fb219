"""VaLR's pure parts pinned by independent computations: the grid upsampling (bilinear by hand), the REPA loss
(cosines by hand), step cutting under each rule, the latent layout, the encoders' patch features, and the
alignment loss of a batch recomputed from a reference fill."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from latentkit.methods.valr import Valr, ValrConfig
from latentkit.methods.valr.config import EncoderSpec
from latentkit.methods.valr.encoders import load_encoder, patch_features
from latentkit.methods.valr.losses import grid_upsample, repa_loss
from latentkit.methods.valr.steps import cut_steps, sample_images
from PIL import Image
from pydantic import ValidationError
from transformers import (
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    Siglip2VisionConfig,
    Siglip2VisionModel,
)
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

from latentkit.backbone import build_backbone
from latentkit.config import ModelSection
from latentkit.errors import CheckpointError
from latentkit.latent import fill_latents_reference
from latentkit.layout import IGNORE_INDEX, Kind, collate, inputs_embeds, latent_slot_positions
from latentkit.masks import causal_mask, with_padding
from latentkit.registry import StageContext, StageProgress
from latentkit.segments import Sample, Segment


# --- grid_upsample and repa_loss -------------------------------------------------------------------------------
def bilinear_by_hand(grid: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Half-pixel-centred bilinear resize of a [s, s] array (source coordinate (i + 0.5) * s / out - 0.5, clamped
    at 0; the neighbour past the edge is the edge)."""
    side = grid.shape[0]
    out = np.zeros((rows, columns))

    def source(index: int, size: int) -> tuple[int, int, float]:
        x = max((index + 0.5) * side / size - 0.5, 0.0)
        low = min(math.floor(x), side - 1)
        return low, min(low + 1, side - 1), x - low

    for i in range(rows):
        r0, r1, fr = source(i, rows)
        for j in range(columns):
            c0, c1, fc = source(j, columns)
            top = grid[r0, c0] * (1 - fc) + grid[r0, c1] * fc
            bottom = grid[r1, c0] * (1 - fc) + grid[r1, c1] * fc
            out[i, j] = top * (1 - fr) + bottom * fr
    return out


@pytest.mark.parametrize("k, grid", [(4, (4, 4)), (9, (3, 5)), (4, (2, 2)), (1, (3, 3)), (16, (2, 3))])
def test_grid_upsample_is_bilinear_in_row_major_order(k, grid):
    torch.manual_seed(0)
    latents = torch.randn(2, k, 3, dtype=torch.float64)
    out = grid_upsample(latents, grid)
    assert out.shape == (2, grid[0] * grid[1], 3)
    side = math.isqrt(k)
    for n in range(2):
        for d in range(3):
            square = (
                latents[n, :, d].numpy().reshape(side, side)
            )  # latent r * side + c sits at row r, column c
            expected = bilinear_by_hand(square, *grid).reshape(-1)  # patch i * W + j
            np.testing.assert_allclose(out[n, :, d].numpy(), expected, atol=1e-12)


def test_grid_upsample_refuses_a_k_that_is_not_square():
    with pytest.raises(ValueError, match="K=6 latents do not form a square grid"):
        grid_upsample(torch.zeros(1, 6, 2), (4, 4))


def test_repa_loss_is_minus_the_mean_cosine():
    predicted = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [3.0, 4.0]]])
    target = torch.tensor([[[2.0, 0.0], [-1.0, -1.0]], [[1.0, 0.0], [4.0, 3.0]]])
    cosines = [1.0, -1.0, 0.0, 24.0 / 25.0]  # by hand: parallel, opposite, orthogonal, (12 + 12) / (5 * 5)
    assert repa_loss(predicted, target).item() == pytest.approx(-sum(cosines) / 4)


# --- config ----------------------------------------------------------------------------------------------------
def test_config_refuses_a_k_that_is_not_square_and_bad_encoders():
    with pytest.raises(ValidationError, match="K=8 latents do not form a square grid"):
        ValrConfig(num_latents=8)
    with pytest.raises(ValidationError, match="exactly one of path"):
        EncoderSpec()
    with pytest.raises(ValidationError, match="repeat a name"):
        ValrConfig(encoders=[EncoderSpec(preset="tiny-clip"), EncoderSpec(preset="tiny-clip")])
    with pytest.raises(ValidationError, match="needs at least one encoder"):
        ValrConfig(encoders=[])
    assert ValrConfig(encoders=[], alignment_weight=0).encoders == []


# --- steps -------------------------------------------------------------------------------------------------------
def sample(*response: Segment, question_image: bool = True) -> Sample:
    user = [Segment("text", "user", "Which colour?")]
    if question_image:
        user.insert(0, Segment("image", "user", image=Path("q.png")))
    return Sample("s", "d", (Segment("text", "system", "Be brief."), *user, *response), answer="red")


def text(value: str) -> Segment:
    return Segment("text", "assistant", value)


def aux(name: str) -> Segment:
    return Segment("aux_image", "assistant", image=Path(name))


def response_steps(steps) -> list[str]:
    """Each step's text (images as [name]), in order."""
    segments = steps.sample.segments
    bounds = [*steps.starts, len(segments)]
    return [
        "".join(s.text if s.image is None else f"[{s.image.name}]" for s in segments[a:b])
        for a, b in itertools.pairwise(bounds)
    ]


TRACE = (
    text("First look left. Then right.\nStep 2: count them.\n"),
    aux("crop.png"),
    Segment("observation", "assistant", "A red dot."),
    text(" So it is red. \\boxed{red}"),
)


def test_lines_rule():
    steps = cut_steps(sample(*TRACE), "lines", r"Step \d+:")
    assert response_steps(steps) == [
        "First look left. Then right.\n",
        "Step 2: count them.\n",
        "[crop.png]A red dot. So it is red. \\boxed{red}",
    ]
    assert steps.targets == (0, 0, 1)  # the question image, then the crop at its place
    assert sample_images(steps.sample) == (Path("q.png"), Path("crop.png"))


def test_sentences_rule_also_cuts_after_an_observation_that_ends_a_sentence():
    steps = cut_steps(sample(*TRACE), "sentences", r"Step \d+:")
    assert response_steps(steps) == [
        "First look left.",
        " Then right.\n",
        "Step 2: count them.\n",
        "[crop.png]A red dot.",
        " So it is red.",
        " \\boxed{red}",
    ]
    assert steps.targets == (0, 0, 0, 1, 0, 0)


def test_markers_and_aux_images_rules():
    trace = (
        text("Start here. Step 1: go up. Step 2: go left."),
        aux("b.png"),
        text(" Step 3: done. \\boxed{1}"),
    )
    steps = cut_steps(sample(*trace), "markers", r"Step \d+:")
    assert response_steps(steps) == [
        "Start here.",
        " Step 1: go up.",
        " Step 2: go left.",
        "[b.png] Step 3: done. \\boxed{1}",
    ]
    steps = cut_steps(sample(*trace), "aux_images", r"Step \d+:")
    assert response_steps(steps) == [
        "Start here. Step 1: go up. Step 2: go left.",
        "[b.png] Step 3: done. \\boxed{1}",
    ]
    assert steps.targets == (0, 1)


def test_text_only_records_have_no_targets_and_text_is_never_changed():
    record = sample(text("One.\nTwo.\n\nThree."), question_image=False)
    steps = cut_steps(record, "lines", r"Step \d+:")
    assert response_steps(steps) == ["One.\n", "Two.\n\n", "Three."]
    assert steps.targets == (None, None, None)
    original = "".join(s.text for s in record.segments)
    assert "".join(s.text for s in steps.sample.segments) == original


# --- layout ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def valr() -> Valr:
    torch.manual_seed(0)
    method = Valr(
        ValrConfig(num_latents=4, encoders=[EncoderSpec(preset="tiny-dinov2", projector_hidden=16)])
    )
    method.setup(build_backbone(ModelSection(preset="tiny-qwen2.5-vl")))
    return method


def image_sample(root: Path, sample_id: str, colour: tuple[int, int, int]) -> Sample:
    root.mkdir(parents=True, exist_ok=True)
    question, crop = root / f"{sample_id}-q.png", root / f"{sample_id}-crop.png"
    Image.new("RGB", (56, 56), colour).save(question)
    Image.new("RGB", (28, 28), colour[::-1]).save(crop)
    segments = (
        Segment("image", "user", image=question),
        Segment("text", "user", "Colour?"),
        Segment("text", "assistant", "Look closer.\n"),
        Segment("aux_image", "assistant", image=crop),
        Segment("observation", "assistant", "It is red."),
        Segment("text", "assistant", "\n\\boxed{red}"),
    )
    return Sample(sample_id, "d", segments, answer="red")


def test_latent_segment_opens_every_step_and_only_its_control_tokens_are_targets(valr, tmp_path):
    record = image_sample(tmp_path, "a", (200, 0, 0))
    layout = valr.layout(record, "align")
    assert len(layout.latents) == 3  # "Look closer.", the crop's step, "\boxed{red}"
    backbone = valr.backbone
    start, slot, end = (backbone.token_id(t) for t in valr.config.latent_tokens)
    for latent in layout.latents:
        assert layout.input_ids[latent.start] == start and layout.input_ids[latent.end] == end
        assert latent.end - latent.start - 1 == 4
        assert (layout.input_ids[latent.start + 1 : latent.end] == slot).all()
        assert (layout.labels[latent.start + 1 : latent.end] == IGNORE_INDEX).all()
        assert layout.labels[latent.start] == start and layout.labels[latent.end] == end
    assert all(image.kind == Kind.IMAGE for image in layout.images)  # the crop is not in the sequence
    plain = valr.layout(record, "sft")
    assert not plain.latents and all(image.kind == Kind.IMAGE for image in plain.images)


# --- encoders ----------------------------------------------------------------------------------------------------
def test_patch_features_drop_class_and_register_tokens():
    images = [Image.new("RGB", (70, 70), (10, 200, 30))]
    for preset, prefix in (("tiny-dinov2", 1), ("tiny-clip", 1), ("tiny-siglip", 0)):
        encoder = load_encoder(EncoderSpec(preset=preset), "e")
        assert encoder.grid == (4, 4)
        inputs = encoder.processor(images=images, return_tensors="pt")
        with torch.no_grad():
            everything = encoder.model(pixel_values=inputs["pixel_values"]).last_hidden_state
        assert everything.shape[1] == 16 + prefix
        features, grid = patch_features(encoder.model, encoder.processor, images)
        assert grid == (4, 4) and torch.equal(features, everything[:, prefix:])
    config = Dinov2WithRegistersConfig(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        image_size=28,
        patch_size=14,
        num_register_tokens=3,
    )
    model = Dinov2WithRegistersModel(config).eval()
    processor = load_encoder(EncoderSpec(preset="tiny-dinov2"), "e").processor
    processor.crop_size = {"height": 28, "width": 28}
    processor.size = {"shortest_edge": 28}
    features, grid = patch_features(model, processor, images)
    assert grid == (2, 2) and features.shape == (1, 4, 8)  # 1 class + 3 registers dropped of 8 tokens


def test_dinov3_registers_and_siglip2_native_grids():
    images = [Image.new("RGB", (40, 40), (3, 4, 5)), Image.new("RGB", (40, 40), (90, 4, 5))]
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    dinov3 = DINOv3ViTModel(
        DINOv3ViTConfig(**small, image_size=32, patch_size=16, num_register_tokens=4)
    ).eval()
    processor = BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        tokens = dinov3(
            pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]
        ).last_hidden_state
    features, grid = patch_features(dinov3, processor, images)
    assert tokens.shape[1] == 1 + 4 + 4 and grid == (2, 2)  # class, 4 registers, a 2 x 2 grid
    assert torch.equal(features, tokens[:, 5:])
    siglip2 = Siglip2VisionModel(Siglip2VisionConfig(**small, patch_size=16, num_patches=16)).eval()
    native = Siglip2ImageProcessorPil(max_num_patches=16, patch_size=16)
    inputs = native(images=images, return_tensors="pt")
    with torch.no_grad():
        tokens = siglip2(**inputs).last_hidden_state
    features, grid = patch_features(siglip2, native, images)
    assert grid == tuple(inputs["spatial_shapes"][0].tolist()) == (4, 4)
    assert torch.equal(features, tokens[:, :16])


def test_encoder_from_a_local_directory_matches_the_preset_and_fingerprints_its_processor(tmp_path):
    preset = load_encoder(EncoderSpec(preset="tiny-dinov2"), "e")
    folder = tmp_path / "dinov2"
    preset.model.save_pretrained(folder)
    preset.processor.save_pretrained(folder)
    loaded = load_encoder(EncoderSpec(path=str(folder)), "method.encoders[0]")
    Image.new("RGB", (60, 60), (1, 2, 3)).save(tmp_path / "x.png")
    assert torch.equal(loaded.features([tmp_path / "x.png"]), preset.features([tmp_path / "x.png"]))
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    settings["image_mean"] = [0.5, 0.5, 0.5]
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    changed = load_encoder(EncoderSpec(path=str(folder)), "method.encoders[0]")
    assert changed.fingerprint != loaded.fingerprint
    with pytest.raises(CheckpointError, match=r"method.encoders\[0\].path=.* holds no config.json"):
        load_encoder(EncoderSpec(path=str(tmp_path / "missing")), "method.encoders[0]")


# --- the alignment loss of a batch ----------------------------------------------------------------------------
def context(tmp_path: Path, samples: list[Sample]) -> StageContext:
    return StageContext(
        run_dir=tmp_path,
        stage_dir=tmp_path / "align",
        samples=samples,
        process_index=0,
        num_processes=1,
        barrier=lambda: None,
        log=lambda event: None,
        load_stage_weights=lambda stage: None,
        progress=False,
    )


def test_align_loss_matches_a_reference_recomputation(valr, tmp_path):
    samples = [
        image_sample(tmp_path / "img", "a", (200, 0, 0)),
        image_sample(tmp_path / "img", "b", (0, 0, 200)),
    ]
    valr.config.feature_dtype = "float32"
    valr.prepare_stage("align", context(tmp_path, samples))
    batch = collate([valr.layout(s, "align") for s in samples], valr.backbone.tokenizer.pad_token_id)
    with torch.no_grad():
        got = valr.loss(valr.backbone, batch, "align", StageProgress(0, 1))

    backbone = valr.backbone
    embeds = inputs_embeds(backbone, batch)
    size, length = batch.input_ids.shape
    mask = with_padding(causal_mask(size, length, embeds.device), batch.valid)
    slots = [latent_slot_positions(layout) for layout in batch.layouts]
    with torch.no_grad():
        filled = fill_latents_reference(backbone, embeds, batch.position_ids, mask, slots)
        written = embeds.clone()
        for b, positions in enumerate(slots):
            written[b, positions] = filled[b]
        hidden = backbone.forward(written, batch.position_ids, mask, output_hidden_states=True).hidden_states
    layer = hidden[backbone.num_layers // 2]  # "middle" of the tiny model's layers
    encoder = valr.encoders[0]
    cosines = []
    torch.set_grad_enabled(False)
    for b, record in enumerate(samples):
        targets = encoder.features(list(sample_images(record)))  # [question, crop]
        for latent, image in zip(batch.layouts[b].latents, (0, 1, 0), strict=True):
            grid = layer[b, latent.start + 1 : latent.end].T.reshape(1, -1, 2, 2)
            up = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
            predicted = valr.modules["projector0"](up.reshape(grid.shape[1], 16).T)
            cosines.append(torch.nn.functional.cosine_similarity(predicted, targets[image], dim=-1))
    torch.set_grad_enabled(True)
    repa = -torch.cat(cosines).mean()
    assert got.metrics["repa"] == pytest.approx(float(repa), abs=1e-5)
    assert got.metrics["aligned_segments"] == 6
    assert float(got.loss) == pytest.approx(got.metrics["ce"] + 0.5 * float(repa), abs=1e-5)


def test_encoder_directory_without_its_processor_is_a_one_line_error(tmp_path):
    load_encoder(EncoderSpec(preset="tiny-dinov2"), "e").model.save_pretrained(tmp_path / "bare")
    with pytest.raises(
        CheckpointError, match=r"holds no preprocessor_config.json: save the encoder's image processor"
    ):
        load_encoder(EncoderSpec(path=str(tmp_path / "bare")), "method.encoders[0]")
