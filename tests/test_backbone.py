"""Tests for latentkit.backbone: every expectation comes from HF's own code (eager attention, get_rope_index),
an explicit hand computation, or an independent second run (unpadded, uncached, reloaded)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from latentkit.backbone import PRESETS, Backbone, build_backbone, load_checkpoint
from latentkit.backbone.lora import apply_lora, is_lora
from latentkit.backbone.qwen_vl import mrope_position_ids
from latentkit.config import ModelSection
from latentkit.errors import CheckpointError, ConfigError
from latentkit.masks import MaskSpec, causal_mask, full_mask, with_padding

ALL = ["tiny-qwen2.5-vl", "tiny-qwen2-vl", "tiny-causal-lm"]
VL = ["tiny-qwen2.5-vl", "tiny-qwen2-vl"]
FAMILY = {"tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-qwen2-vl": "qwen2_vl", "tiny-causal-lm": "causal_lm"}
ATOL = 1e-5
# PIL sizes (width, height): 112x112 -> 8x8 patches (16 tokens), 56 wide x 84 high -> 6x4 patches (6 tokens)
IMAGE_SIZES = [(112, 112), (56, 84)]


def make_backbone(preset: str) -> Backbone:
    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset=preset))
    backbone.model.eval()
    return backbone


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def eager_copy(backbone: Backbone) -> torch.nn.Module:
    """The same weights under HF's own eager attention: an oracle that shares no code with latentkit.kernels."""
    reference = copy.deepcopy(backbone.model)
    reference.set_attn_implementation("eager")
    return reference


def additive(dense: torch.Tensor) -> torch.Tensor:
    """bool [B,1,Nq,Nk] (True = may attend) -> the float mask HF eager attention adds to its scores."""
    return torch.zeros(dense.shape).masked_fill(~dense, torch.finfo(torch.float32).min)


def batched_positions(positions: torch.Tensor) -> torch.Tensor:
    """One sequence's positions ([N] or [3, N]) with a batch axis: [1, N] or [3, 1, N]."""
    return positions.unsqueeze(-2)


def text_ids(backbone: Backbone) -> torch.Tensor:
    return torch.tensor(backbone.encode_text("What is the colour of the object at row 1, column 2?"))


def image_sequence(backbone: Backbone, sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """text, then per image: vision_start, image_pad x num_tokens, vision_end, text; and the matching HF inputs."""
    chat = backbone.chat
    ids = backbone.encode_text("Look at the image:")
    token_types = [0] * len(ids)
    pixel_values, grids = [], []
    for i, (width, height) in enumerate(sizes):
        image = backbone.preprocess_image(noise_image(width, height, seed=i))
        pad = [backbone.token_id(chat.image_pad)] * image.num_tokens
        ids += [backbone.token_id(chat.vision_start), *pad, backbone.token_id(chat.vision_end)]
        token_types += [0, *[1] * len(pad), 0]
        pixel_values.append(image.pixel_values)
        grids.append(image.grid_thw)
        text = backbone.encode_text(" What is the shape of the object?")
        ids += text
        token_types += [0] * len(text)
    return {
        "input_ids": torch.tensor(ids),
        "mm_token_type_ids": torch.tensor(token_types),
        "pixel_values": torch.cat(pixel_values),
        "image_grid_thw": torch.tensor(grids),
    }


def sample_inputs(backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(inputs_embeds [1,N,D], position_ids, HF model kwargs) of one sequence: with two images for VL presets."""
    if not backbone.supports_images:
        ids = text_ids(backbone)
        return (
            backbone.embed(ids[None]),
            batched_positions(backbone.position_ids(ids, [])),
            {"input_ids": ids[None]},
        )
    seq = image_sequence(backbone, IMAGE_SIZES)
    ids = seq["input_ids"]
    embeds = backbone.embed(ids[None])
    image_embeds = backbone.encode_images(seq["pixel_values"], seq["image_grid_thw"])
    embeds = embeds.masked_scatter((ids == backbone.image_token_id)[None, :, None], image_embeds)
    grids = [tuple(g) for g in seq["image_grid_thw"].tolist()]
    positions = batched_positions(backbone.position_ids(ids, grids))
    hf_kwargs = {
        "input_ids": ids[None],
        "mm_token_type_ids": seq["mm_token_type_ids"][None],
        "pixel_values": seq["pixel_values"],
        "image_grid_thw": seq["image_grid_thw"],
    }
    return embeds, positions, hf_kwargs


@pytest.fixture(scope="module", params=ALL)
def backbone(request) -> Backbone:
    return make_backbone(request.param)


@pytest.fixture(scope="module", params=VL)
def vl_backbone(request) -> Backbone:
    return make_backbone(request.param)


# --- presets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ALL)
def test_preset_family_and_sizes(preset):
    backbone = make_backbone(preset)
    assert backbone.family == FAMILY[preset]
    assert backbone.source == preset
    assert backbone.num_layers == backbone.model.config.get_text_config().num_hidden_layers
    assert backbone.hidden_size == backbone.model.config.get_text_config().hidden_size
    assert backbone.lm_head.out_features == backbone.model.get_input_embeddings().num_embeddings
    assert backbone.supports_images == (preset in VL)
    for token in backbone.chat.special_tokens():
        assert backbone.tokenizer.convert_ids_to_tokens(backbone.token_id(token)) == token


def test_text_backbone_rejects_images():
    backbone = make_backbone("tiny-causal-lm")
    with pytest.raises(ValueError, match="takes no images"):
        backbone.preprocess_image(noise_image(28, 28, seed=0))
    with pytest.raises(ValueError, match="takes no images"):
        backbone.vision_features(torch.zeros(4, 1176), torch.tensor([[1, 2, 2]]))


def test_pre_projector_features_through_the_models_own_merger_are_its_image_embeddings(vl_backbone):
    """Per image, the features before the merger: HF's own merger of all of them, in one call, is bit for bit the
    model's own `get_image_features` (Qwen2.5-VL's tower runs in window order; 112x112 spans several windows)."""
    sizes = [*IMAGE_SIZES, (84, 112)]
    images = [vl_backbone.preprocess_image(noise_image(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    pixels = torch.cat([image.pixel_values for image in images])
    grids = torch.tensor([image.grid_thw for image in images])
    model = vl_backbone.hf_model().model
    merger = vl_backbone.vision().merger
    with torch.no_grad():
        features = vl_backbone.vision_features(pixels, grids)
        expected = model.get_image_features(pixels, grids).pooler_output
        width = vl_backbone.vision_feature_size // vl_backbone.merge_size**2
        merged = merger(torch.cat(features).reshape(-1, width))
        projected = vl_backbone.project_vision_features(torch.cat(features))
    assert [f.shape for f in features] == [
        (image.num_tokens, vl_backbone.vision_feature_size) for image in images
    ]
    assert vl_backbone.vision_feature_size == merger.hidden_size
    assert torch.equal(merged, torch.cat(expected))
    assert torch.equal(projected, torch.cat(expected))
    # image by image (a different matrix-product blocking, so to rounding), each to its own embeddings
    for feature, embedding in zip(features, expected):
        assert torch.allclose(merger(feature.reshape(-1, width)), embedding, atol=ATOL, rtol=0)


def test_vision_pixels_are_the_images_the_processor_was_given(vl_backbone):
    """Sizes the processor keeps (multiples of 28): the inverse of its normalisation and patch layout gives back
    each image, non-square ones too (a transposed block order would not), several images in one call."""
    sizes = [(112, 84), (56, 112)]
    originals = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    images = [vl_backbone.preprocess_image(image) for image in originals]
    pixels = torch.cat([image.pixel_values for image in images])
    got = vl_backbone.vision_pixels(pixels, torch.tensor([image.grid_thw for image in images]))
    for image, original in zip(got, originals):
        expected = torch.from_numpy(np.array(original)).permute(2, 0, 1).float() / 255
        assert image.shape == expected.shape
        assert torch.allclose(image, expected, atol=1e-5, rtol=0)
    token = vl_backbone.image_token_pixels  # one image token per token x token square
    assert [image.num_tokens for image in images] == [(w // token) * (h // token) for w, h in sizes]
    with pytest.raises(ValueError, match="takes no images"):
        make_backbone("tiny-causal-lm").vision_pixels(pixels, torch.tensor([[1, 8, 6]]))


@pytest.mark.parametrize("preset", ALL)
def test_building_is_deterministic(preset):
    first, second = make_backbone(preset), make_backbone(preset)
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- M-RoPE positions ------------------------------------------------------------------------------------


def test_mrope_hand_computed():
    # tokens: a b [image: merged grid 2x3] c; then an image at position 0
    pad = 9
    ids = torch.tensor([1, 2, *[pad] * 6, 3])
    expected = torch.tensor(
        [
            [0, 1, 2, 2, 2, 2, 2, 2, 5],
            [0, 1, 2, 2, 2, 3, 3, 3, 5],
            [0, 1, 2, 3, 4, 2, 3, 4, 5],
        ]
    )
    assert torch.equal(mrope_position_ids(ids, pad, [(1, 4, 6)], merge_size=2), expected)
    ids = torch.tensor([*[pad] * 4, 3, 4])
    expected = torch.tensor([[0, 0, 0, 0, 2, 3], [0, 0, 1, 1, 2, 3], [0, 1, 0, 1, 2, 3]])
    assert torch.equal(mrope_position_ids(ids, pad, [(1, 4, 4)], merge_size=2), expected)


def test_mrope_matches_hf_get_rope_index(vl_backbone):
    seq = image_sequence(vl_backbone, IMAGE_SIZES)
    grids = [tuple(g) for g in seq["image_grid_thw"].tolist()]
    assert grids == [(1, 8, 8), (1, 6, 4)]
    ours = vl_backbone.position_ids(seq["input_ids"], grids)
    theirs, _ = vl_backbone.model.model.get_rope_index(
        seq["input_ids"][None],
        mm_token_type_ids=seq["mm_token_type_ids"][None],
        image_grid_thw=seq["image_grid_thw"],
    )
    assert ours.shape == (3, seq["input_ids"].shape[0])
    assert torch.equal(ours, theirs[:, 0])


def test_text_positions_are_arange(backbone):
    ids = text_ids(backbone)
    positions = backbone.position_ids(ids, [])
    n = ids.shape[0]
    expected = torch.arange(n).expand(3, n) if backbone.supports_images else torch.arange(n)
    assert torch.equal(positions, expected)


# --- forward ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_causal_forward_matches_hf(backbone):
    embeds, positions, hf_kwargs = sample_inputs(backbone)
    n = embeds.shape[1]
    ours = backbone.logits(backbone.forward(embeds, positions, causal_mask(1, n)).last_hidden_state)
    # HF computes its own image features and (from mm_token_type_ids) its own M-RoPE positions
    plain = backbone.model(**hf_kwargs).logits
    eager = eager_copy(backbone)(**hf_kwargs).logits
    assert ours.shape == plain.shape == (1, n, backbone.lm_head.out_features)
    torch.testing.assert_close(ours, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours, eager, atol=ATOL, rtol=0)


@torch.no_grad()
def test_image_content_reaches_the_text(vl_backbone):
    embeds, positions, hf_kwargs = sample_inputs(vl_backbone)
    n = embeds.shape[1]
    ids = hf_kwargs["input_ids"][0]
    first_image = int((ids == vl_backbone.image_token_id).nonzero()[0])
    blank = vl_backbone.embed(ids[None])  # placeholders left as the image_pad embedding
    with_images = vl_backbone.forward(embeds, positions, causal_mask(1, n)).last_hidden_state
    without = vl_backbone.forward(blank, positions, causal_mask(1, n)).last_hidden_state
    torch.testing.assert_close(with_images[:, :first_image], without[:, :first_image], atol=0, rtol=0)
    assert (with_images[:, -1] - without[:, -1]).abs().max() > 1e-3


def _one_sample(backbone: Backbone, prompt: str, image_index: int) -> dict[str, torch.Tensor]:
    """input_ids [N], position_ids ([N] or [3, N]) and, for VL presets, one image's inputs."""
    if not backbone.supports_images:
        ids = torch.tensor(backbone.encode_text(prompt))
        return {"input_ids": ids, "position_ids": backbone.position_ids(ids, [])}
    seq = image_sequence(backbone, [IMAGE_SIZES[image_index]])
    ids = torch.cat([seq["input_ids"], torch.tensor(backbone.encode_text(prompt))])
    grids = [tuple(g) for g in seq["image_grid_thw"].tolist()]
    return dict(seq, input_ids=ids, position_ids=backbone.position_ids(ids, grids))


def _embed(
    backbone: Backbone, input_ids: torch.Tensor, samples: list[dict[str, torch.Tensor]]
) -> torch.Tensor:
    """Token embeddings [B, N, D] with the samples' images (in order) written into the image_pad positions."""
    embeds = backbone.embed(input_ids)
    if not backbone.supports_images:
        return embeds
    pixel_values = torch.cat([s["pixel_values"] for s in samples])
    grids = torch.cat([s["image_grid_thw"] for s in samples])
    image_embeds = backbone.encode_images(pixel_values, grids)
    return embeds.masked_scatter((input_ids == backbone.image_token_id).unsqueeze(-1), image_embeds)


@torch.no_grad()
def test_right_padding_matches_unpadded(backbone):
    samples = [_one_sample(backbone, " The answer is red.", 0), _one_sample(backbone, " Yes", 1)]
    lengths = [s["input_ids"].shape[0] for s in samples]
    assert lengths[0] != lengths[1]
    n, pad_id = max(lengths), backbone.token_id(backbone.chat.pad)
    input_ids = torch.full((2, n), pad_id)
    positions = torch.zeros((*samples[0]["position_ids"].shape[:-1], 2, n), dtype=torch.long)
    valid = torch.zeros(2, n, dtype=torch.bool)
    for row, sample in enumerate(samples):
        input_ids[row, : lengths[row]] = sample["input_ids"]
        positions[..., row, : lengths[row]] = sample["position_ids"]
        valid[row, : lengths[row]] = True
    mask = with_padding(causal_mask(2, n), valid)
    padded = backbone.forward(_embed(backbone, input_ids, samples), positions, mask).last_hidden_state
    for row, sample in enumerate(samples):
        ids = sample["input_ids"][None]
        alone = backbone.forward(
            _embed(backbone, ids, [sample]),
            batched_positions(sample["position_ids"]),
            causal_mask(1, lengths[row]),
        ).last_hidden_state
        torch.testing.assert_close(padded[row, : lengths[row]], alone[0], atol=ATOL, rtol=0)
    # without the padding mask the short row's padding rows would see the padding: the mask is what differs
    embeds = _embed(backbone, input_ids, samples)
    unmasked = backbone.forward(embeds, positions, causal_mask(2, n)).last_hidden_state
    short = lengths.index(min(lengths))
    assert (unmasked[short, -1] - padded[short, -1]).abs().max() > 1e-4


@torch.no_grad()
def test_left_padding_fully_masked_rows(backbone):
    """Left padding: pad rows see no key at all (fully masked) and must stay finite, also in the backward."""
    sample = _one_sample(backbone, " The answer is red.", 0)
    length, extra = sample["input_ids"].shape[0], 3
    n = length + extra
    input_ids = torch.full((1, n), backbone.token_id(backbone.chat.pad))
    input_ids[0, extra:] = sample["input_ids"]
    positions = torch.zeros((*sample["position_ids"].shape[:-1], 1, n), dtype=torch.long)
    positions[..., 0, extra:] = sample["position_ids"]
    valid = torch.arange(n)[None] >= extra
    mask = with_padding(causal_mask(1, n), valid)
    assert not bool(mask.to_dense()[0, 0, :extra].any())
    embeds = _embed(backbone, input_ids, [sample]).requires_grad_(True)
    with torch.enable_grad():
        out = backbone.forward(embeds, positions, mask).last_hidden_state
        out.sum().backward()
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(embeds.grad).all())
    alone = backbone.forward(
        _embed(backbone, sample["input_ids"][None], [sample]),
        batched_positions(sample["position_ids"]),
        causal_mask(1, length),
    ).last_hidden_state
    torch.testing.assert_close(out[:, extra:], alone, atol=ATOL, rtol=0)
    # a fully masked row gets no attention output: its first-layer attention input passes through unchanged
    layer = backbone.decoder().layers[0]
    captured = []
    handle = layer.self_attn.register_forward_hook(lambda _m, _i, o: captured.append(o[0]))
    try:
        backbone.forward(embeds, positions, mask)
    finally:
        handle.remove()
    assert torch.equal(captured[0][0, :extra], torch.zeros_like(captured[0][0, :extra]))
    assert captured[0][0, extra:].abs().max() > 0


def _random_spec(n: int, causal: bool, seed: int) -> MaskSpec:
    """Random hidden-row intervals, each at most n // 3 rows long; every row keeps at least one key."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n, (1, n, 2), generator=g)
    lengths = torch.randint(0, n // 3 + 1, (1, n, 2), generator=g)
    ends = (starts + lengths).clamp(max=n)
    intervals = torch.stack([starts[..., 0], ends[..., 0], starts[..., 1], ends[..., 1]], dim=-1)
    spec = MaskSpec(causal, intervals.to(torch.int32))
    assert bool(spec.to_dense().any(-1).all())  # fully masked rows are zeroed by latentkit, not by HF eager
    return spec


@pytest.mark.parametrize("causal", [True, False])
@torch.no_grad()
def test_custom_mask_matches_hf_eager_with_dense_mask(backbone, causal):
    embeds, positions, _ = sample_inputs(backbone)
    n = embeds.shape[1]
    spec = _random_spec(n, causal, seed=3)
    ours = backbone.forward(embeds, positions, spec, output_hidden_states=True)
    # HF's own model below the LM head (for VL, it passes inputs_embeds straight to the language model)
    theirs = eager_copy(backbone).model(
        inputs_embeds=embeds,
        position_ids=positions,
        attention_mask=additive(spec.to_dense()),
        output_hidden_states=True,
    )
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, atol=ATOL, rtol=0)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == backbone.num_layers + 1
    for mine, hf in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(mine, hf, atol=ATOL, rtol=0)
    # and the mask matters: plain causal attention gives something else
    plain = backbone.forward(embeds, positions, causal_mask(1, n)).last_hidden_state
    assert (plain - ours.last_hidden_state).abs().max() > 1e-3


@torch.no_grad()
def test_hidden_column_changes_only_rows_that_saw_it(backbone):
    embeds, positions, _ = sample_inputs(backbone)
    n = embeds.shape[1]
    column, first_blind_row = 2, n // 2
    intervals = torch.zeros(1, n, 4, dtype=torch.int32)
    intervals[0, column] = torch.tensor([first_blind_row, n, 0, 0])
    masked = backbone.forward(embeds, positions, MaskSpec(True, intervals)).last_hidden_state
    plain = backbone.forward(embeds, positions, causal_mask(1, n)).last_hidden_state
    torch.testing.assert_close(masked[:, :first_blind_row], plain[:, :first_blind_row], atol=0, rtol=0)
    assert bool(((masked - plain)[0, first_blind_row:].abs().amax(-1) > 1e-4).all())


@torch.no_grad()
def test_hiding_a_column_from_everyone_equals_dropping_the_token(backbone):
    """Causal, column j hidden from all later rows: the other rows equal HF on the sequence without token j."""
    ids = text_ids(backbone)
    n, j = ids.shape[0], 3
    positions = batched_positions(backbone.position_ids(ids, []))
    intervals = torch.zeros(1, n, 4, dtype=torch.int32)
    intervals[0, j] = torch.tensor([j + 1, n, 0, 0])
    ours = backbone.forward(backbone.embed(ids[None]), positions, MaskSpec(True, intervals)).last_hidden_state
    keep = torch.arange(n) != j
    theirs = eager_copy(backbone)(
        input_ids=ids[None, keep], position_ids=positions[..., keep], output_hidden_states=True
    ).hidden_states[-1]
    torch.testing.assert_close(ours[:, keep], theirs, atol=ATOL, rtol=0)


@torch.no_grad()
def test_full_mask_is_bidirectional(backbone):
    embeds, positions, _ = sample_inputs(backbone)
    n = embeds.shape[1]
    causal = backbone.forward(embeds, positions, causal_mask(1, n)).last_hidden_state
    full = backbone.forward(embeds, positions, full_mask(1, n)).last_hidden_state
    assert (causal[:, 0] - full[:, 0]).abs().max() > 1e-3


@torch.no_grad()
def test_hidden_states_count_and_last_is_post_norm(backbone):
    embeds, positions, _ = sample_inputs(backbone)
    n = embeds.shape[1]
    # post-norm: the final norm applied to the last decoder layer's output
    decoder = backbone.decoder()
    captured = []
    handle = decoder.layers[-1].register_forward_hook(
        lambda _m, _i, o: captured.append(o[0] if isinstance(o, tuple) else o)
    )
    try:
        out = backbone.forward(embeds, positions, causal_mask(1, n), output_hidden_states=True)
    finally:
        handle.remove()
    assert len(out.hidden_states) == backbone.num_layers + 1
    assert torch.equal(out.hidden_states[0], embeds)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert not torch.equal(captured[0], out.last_hidden_state)
    torch.testing.assert_close(decoder.norm(captured[0]), out.last_hidden_state, atol=0, rtol=0)
    assert out.cache is None
    assert backbone.forward(embeds, positions, causal_mask(1, n)).hidden_states is None


# --- KV cache --------------------------------------------------------------------------------------------


def _custom_causal_spec(n: int) -> MaskSpec:
    intervals = torch.zeros(1, n, 4, dtype=torch.int32)
    intervals[0, 1] = torch.tensor([3, 6, n - 2, n])  # column 1 hidden from rows 3..5 and the last two
    intervals[0, 4] = torch.tensor([n - 3, n - 1, 0, 0])
    return MaskSpec(True, intervals)


@pytest.mark.parametrize("custom", [False, True])
@torch.no_grad()
def test_kv_cache_matches_full_forward(backbone, custom):
    embeds, positions, _ = sample_inputs(backbone)
    n = embeds.shape[1]
    split = n - 3
    spec = _custom_causal_spec(n) if custom else causal_mask(1, n)
    full = backbone.forward(embeds, positions, spec).last_hidden_state
    cache = DynamicCache(config=backbone.model.config)
    prefix = backbone.forward(embeds[:, :split], positions[..., :split], spec.truncate(split), cache=cache)
    assert prefix.cache is cache and cache.get_seq_length() == split
    step = backbone.forward(embeds[:, split:], positions[..., split:], spec, cache=cache)
    assert cache.get_seq_length() == n
    torch.testing.assert_close(prefix.last_hidden_state, full[:, :split], atol=ATOL, rtol=0)
    torch.testing.assert_close(step.last_hidden_state, full[:, split:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_kv_cache_one_token_at_a_time(backbone):
    embeds, positions, _ = sample_inputs(backbone)
    n = embeds.shape[1]
    full = backbone.forward(embeds, positions, causal_mask(1, n)).last_hidden_state
    cache = DynamicCache(config=backbone.model.config)
    split = n - 4
    backbone.forward(embeds[:, :split], positions[..., :split], causal_mask(1, split), cache=cache)
    for i in range(split, n):
        step = backbone.forward(
            embeds[:, i : i + 1], positions[..., i : i + 1], causal_mask(1, i + 1), cache=cache
        )
        torch.testing.assert_close(step.last_hidden_state[:, 0], full[:, i], atol=ATOL, rtol=0)


def test_mask_that_does_not_cover_the_keys_is_rejected(backbone):
    embeds, positions, _ = sample_inputs(backbone)
    n = embeds.shape[1]
    with pytest.raises(ValueError, match="do not match the mask"):
        backbone.forward(embeds, positions, causal_mask(1, n + 2))


# --- tokens ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ALL)
def test_add_tokens_grows_vocabulary_and_keeps_ids(preset):
    backbone = make_backbone(preset)
    text = "What is the colour? <|im_start|>"
    before_ids = backbone.encode_text(text)
    before_specials = {t: backbone.token_id(t) for t in backbone.chat.special_tokens()}
    old_rows = backbone.model.get_input_embeddings().weight.detach().clone()
    old_head = backbone.lm_head.weight.detach().clone()
    vocab = len(backbone.tokenizer)

    new = ["<|latent_start|>", "<|latent|>", "<|latent_end|>"]
    ids = backbone.add_tokens(new)
    assert ids == [vocab, vocab + 1, vocab + 2]
    assert len(backbone.tokenizer) == vocab + 3
    embeddings = backbone.model.get_input_embeddings()
    assert embeddings.num_embeddings == vocab + 3
    assert backbone.lm_head.out_features == vocab + 3
    assert backbone.model.config.get_text_config().vocab_size == vocab + 3
    assert torch.equal(embeddings.weight[:vocab], old_rows)
    assert torch.equal(backbone.lm_head.weight[:vocab], old_head)
    assert backbone.encode_text(text) == before_ids
    assert {t: backbone.token_id(t) for t in before_specials} == before_specials
    # special: never split by the BPE
    assert backbone.encode_text("red<|latent|>blue").count(ids[1]) == 1
    assert ids[1] in backbone.tokenizer.all_special_ids
    # known tokens: same ids, no resize
    weight = embeddings.weight
    assert backbone.add_tokens(["<|latent|>", backbone.chat.im_end]) == [
        ids[1],
        before_specials["<|im_end|>"],
    ]
    assert backbone.model.get_input_embeddings().weight is weight


def test_add_tokens_does_not_resize_when_rows_to_spare():
    # real Qwen checkpoints have more embedding rows than tokenizer entries
    backbone = make_backbone("tiny-qwen2.5-vl")
    rows = len(backbone.tokenizer) + 8
    backbone.model.resize_token_embeddings(rows, mean_resizing=False)
    weight = backbone.model.get_input_embeddings().weight
    (new_id,) = backbone.add_tokens(["<|latent|>"])
    assert new_id < rows
    assert backbone.model.get_input_embeddings().weight is weight


def test_unknown_token_raises_key_error(backbone):
    with pytest.raises(KeyError, match="add_tokens"):
        backbone.token_id("<|no_such_token|>")


def test_unk_token_itself_is_known():
    # HF's Qwen2Tokenizer declares <|endoftext|> (the pad token) as its unk token
    backbone = make_backbone("tiny-causal-lm")
    pad_id = backbone.token_id(backbone.chat.pad)
    backbone.tokenizer.unk_token = backbone.chat.pad
    assert backbone.tokenizer.convert_tokens_to_ids("<|no_such_token|>") == pad_id
    assert backbone.token_id(backbone.chat.pad) == pad_id
    with pytest.raises(KeyError):
        backbone.token_id("<|no_such_token|>")


# --- save / load -----------------------------------------------------------------------------------------


@torch.no_grad()
def _assert_same_outputs(first: Backbone, second: Backbone, atol: float = 0.0) -> None:
    embeds, positions, _ = sample_inputs(first)
    embeds_2, positions_2, _ = sample_inputs(second)
    torch.testing.assert_close(embeds, embeds_2, atol=atol, rtol=0)
    assert torch.equal(positions, positions_2)
    n = embeds.shape[1]
    a = first.logits(first.forward(embeds, positions, causal_mask(1, n)).last_hidden_state)
    b = second.logits(second.forward(embeds_2, positions_2, causal_mask(1, n)).last_hidden_state)
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("preset", ALL)
def test_save_load_round_trip(preset, tmp_path):
    backbone = make_backbone(preset)
    backbone.add_tokens(["<|latent|>"])
    backbone.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.json").is_file()
    assert list((tmp_path / "ckpt").glob("*.safetensors"))
    loaded = load_checkpoint(tmp_path / "ckpt", ModelSection())
    loaded.model.eval()
    assert type(loaded) is type(backbone) and loaded.family == backbone.family
    assert type(loaded.model) is type(backbone.model)
    assert loaded.source == str(tmp_path / "ckpt")
    assert loaded.tokenizer.get_vocab() == backbone.tokenizer.get_vocab()
    assert type(loaded.tokenizer) is type(backbone.tokenizer)
    for text in [
        "apples costs 100 total 1000",
        "<|im_start|>user\nIs it red?<|latent|><|im_end|>",
        "café  x",
    ]:
        assert loaded.encode_text(text) == backbone.encode_text(text), text
    assert loaded.token_id("<|latent|>") == backbone.token_id("<|latent|>")
    a, b = backbone.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if backbone.supports_images:
        image = noise_image(56, 84, seed=5)
        p, q = backbone.preprocess_image(image), loaded.preprocess_image(image)
        assert p.grid_thw == q.grid_thw and p.num_tokens == q.num_tokens
        assert torch.equal(p.pixel_values, q.pixel_values)
    _assert_same_outputs(backbone, loaded)
    # model.path goes through the same loader; the family is also found without the latentkit marker
    via_config = build_backbone(ModelSection(path=tmp_path / "ckpt"))
    assert via_config.family == backbone.family
    (tmp_path / "ckpt" / "latentkit_backbone.json").unlink()
    assert load_checkpoint(tmp_path / "ckpt", ModelSection()).family == backbone.family


def test_load_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path / "empty", ModelSection())
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "missing", ModelSection())
    with pytest.raises(ConfigError) as info:
        build_backbone(ModelSection(preset="nope"))
    for name in PRESETS:
        assert name in str(info.value)
    assert "'nope'" in str(info.value)


# --- LoRA ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ALL)
def test_lora_forward_and_merged_save(preset, tmp_path):
    backbone = make_backbone(preset)
    embeds, positions, hf_kwargs = sample_inputs(backbone)
    n = embeds.shape[1]
    with torch.no_grad():
        base = backbone.forward(embeds, positions, causal_mask(1, n)).last_hidden_state

    backbone.model = apply_lora(
        backbone.model, r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"]
    )
    assert is_lora(backbone.model)
    trainable = [name for name, p in backbone.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 2 * 2 * backbone.num_layers  # A and B, q and v, every decoder layer
    with torch.no_grad():  # lora_B starts at zero: make the adapters do something
        for name, p in backbone.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    backbone.model.eval()

    out = backbone.forward(embeds, positions, causal_mask(1, n))
    out.last_hidden_state.sum().backward()
    assert all(p.grad is not None for p in backbone.model.parameters() if p.requires_grad)
    lora_hidden = out.last_hidden_state.detach()
    assert (lora_hidden - base).abs().max() > 1e-3
    with torch.no_grad():
        lora_logits = backbone.logits(lora_hidden)
        torch.testing.assert_close(lora_logits, backbone.model(**hf_kwargs).logits, atol=ATOL, rtol=0)

    backbone.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter" / "adapter_config.json").is_file()
    with torch.no_grad():  # the live model is untouched by saving
        after = backbone.forward(embeds, positions, causal_mask(1, n)).last_hidden_state
    assert torch.equal(after, lora_hidden)
    assert is_lora(backbone.model)

    loaded = load_checkpoint(tmp_path / "ckpt", ModelSection())
    loaded.model.eval()
    assert not is_lora(loaded.model)
    assert not any("lora" in name for name in loaded.model.state_dict())
    with torch.no_grad():
        merged = loaded.forward(embeds, positions, causal_mask(1, n)).last_hidden_state
        torch.testing.assert_close(merged, lora_hidden, atol=ATOL, rtol=0)
        torch.testing.assert_close(loaded.logits(merged), lora_logits, atol=ATOL, rtol=0)
