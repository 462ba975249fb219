"""The latent engine's batched fill (KV cache, chunked by slot) equals a one-sample, one-slot-at-a-time
forward without a cache, under causal and Monet stage-2 masks, with images and samples of different shapes; and
so do its gradients under every feedback option (full, truncated, none)."""

from __future__ import annotations

import pytest
import torch

from latentkit.backbone import build_backbone
from latentkit.config import ModelSection
from latentkit.latent import fill_latents, fill_latents_reference, slot_positions
from latentkit.layout import Kind, LayoutBuilder, collate, inputs_embeds
from latentkit.masks import causal_mask, hide_spans_outside_latents, with_padding
from latentkit.records import load_split
from latentkit.synth.zoom import generate_synth_zoom

TOKENS = ("<lat>", "<lat_pad>", "</lat>")


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset="tiny-qwen2.5-vl"))
    backbone.add_tokens(list(TOKENS))
    backbone.model.eval()
    return backbone


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoom")
    generate_synth_zoom(root, n_train=2, n_val=0, n_test=0)
    sample = load_split(root, "train").samples[0]
    return sample.images[0], sample.aux_images[0]


def layout_with(backbone, images, texts: list[str], ks: list[int]):
    """text0 [aux image, latent block of k] text1 [...] ... with the question image first."""
    question, aux = images
    builder = LayoutBuilder(backbone)
    builder.add_image(question, Kind.IMAGE, 0)
    builder.add_text(texts[0], Kind.TEXT, 0)
    for index, k in enumerate(ks, start=1):
        builder.add_image(aux, Kind.AUX_IMAGE, index)
        builder.add_latent(*TOKENS, k=k, segment_index=index)
        builder.add_text(texts[index], Kind.TEXT, index)
    return builder.build(f"s{len(ks)}", "test")


def stage2_blocks(layout):
    aux = [slot for slot in layout.images if slot.kind == Kind.AUX_IMAGE]
    return [(img.start - 1, img.end + 1, lat.start, lat.end) for img, lat in zip(aux, layout.latents)]


@pytest.mark.parametrize("masking", ["causal", "spans_outside_latents_hidden"])
def test_batched_fill_equals_one_sample_at_a_time(backbone, images, masking):
    layouts = [
        layout_with(backbone, images, ["where is it?", "I see red", "and a circle then"], [3, 2]),
        layout_with(backbone, images, ["a much longer question about the picture", "ok"], [4]),
        layout_with(backbone, images, ["no latents here at all"], []),
        layout_with(backbone, images, ["q", "a", "b", "c"], [1, 1, 2]),
    ]
    batch = collate(layouts, backbone.tokenizer.pad_token_id)
    size, length = batch.input_ids.shape
    if masking == "causal":
        mask = with_padding(causal_mask(size, length), batch.valid)
    else:
        mask = hide_spans_outside_latents([stage2_blocks(layout) for layout in layouts], length, batch.valid)
    slots = slot_positions([[(lat.start, lat.end) for lat in layout.latents] for layout in layouts])
    with torch.no_grad():
        embeds = inputs_embeds(backbone, batch)
        filled = fill_latents(backbone, embeds, batch.position_ids, mask, slots, [len(l) for l in layouts])
        reference = fill_latents_reference(backbone, embeds, batch.position_ids, mask, slots)
    assert filled.values.shape[:2] == (4, 5)  # the most slots: 3 + 2
    for b, expected in enumerate(reference):
        n = len(slots[b])
        assert filled.positions[b, :n].tolist() == slots[b]
        assert (filled.positions[b, n:] == -1).all()
        torch.testing.assert_close(filled.values[b, :n], expected, atol=1e-5, rtol=1e-4)
    # the first latent of a block is h(start token), i.e. the hidden state one position before the slot
    written = filled.write(embeds)
    assert torch.equal(written[0, slots[0][0]], filled.values[0, 0])
    assert torch.equal(written[0, slots[0][0] - 1], embeds[0, slots[0][0] - 1])


def test_stage2_mask_changes_the_latents(backbone, images):
    """The mask is really applied: hiding the auxiliary image from the text changes later latents."""
    layout = layout_with(backbone, images, ["where?", "red", "then"], [2, 2])
    batch = collate([layout], backbone.tokenizer.pad_token_id)
    slots = slot_positions([[(lat.start, lat.end) for lat in layout.latents]])
    length = batch.input_ids.shape[1]
    with torch.no_grad():
        embeds = inputs_embeds(backbone, batch)
        plain = fill_latents(backbone, embeds, batch.position_ids, causal_mask(1, length), slots, [length])
        controlled = hide_spans_outside_latents([stage2_blocks(layout)], length)
        masked = fill_latents(backbone, embeds, batch.position_ids, controlled, slots, [length])
    torch.testing.assert_close(plain.values[0, :2], masked.values[0, :2])  # block 1 sees the same as causal
    assert not torch.allclose(plain.values[0, 2:], masked.values[0, 2:])  # block 2's prefix lost image 1


def mixed_layouts(backbone, images):
    return [
        layout_with(backbone, images, ["where is it?", "I see red", "and a circle"], [3, 2]),
        layout_with(backbone, images, ["a much longer question about it", "ok"], [2]),
        layout_with(backbone, images, ["no latents here"], []),
    ]


def parameter_gradients(backbone, loss) -> list[torch.Tensor]:
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("feedback", ["full", "truncated", "none"])
def test_batched_fill_gradients_equal_the_reference(backbone, images, feedback):
    """Every feedback option: the batched fill's latents and the weight gradients of a scalar of them equal the
    one-at-a-time reference's (fp32)."""
    layouts = mixed_layouts(backbone, images)
    batch = collate(layouts, backbone.tokenizer.pad_token_id)
    mask = hide_spans_outside_latents(
        [stage2_blocks(l) for l in layouts], batch.input_ids.shape[1], batch.valid
    )
    slots = slot_positions([[(lat.start, lat.end) for lat in layout.latents] for layout in layouts])
    embeds = inputs_embeds(backbone, batch)
    weights = torch.randn(len(layouts), 5, backbone.hidden_size, generator=torch.Generator().manual_seed(3))
    filled = fill_latents(
        backbone, embeds, batch.position_ids, mask, slots, [len(l) for l in layouts], feedback
    )
    reference = fill_latents_reference(backbone, embeds, batch.position_ids, mask, slots, feedback)
    for b, expected in enumerate(reference):
        torch.testing.assert_close(filled.values[b, : len(slots[b])], expected, atol=1e-5, rtol=1e-4)
    if feedback == "none":
        assert not filled.values.requires_grad and not any(r.requires_grad for r in reference)
        return
    batched = parameter_gradients(backbone, (filled.values * weights[:, : filled.values.shape[1]]).sum())
    one_at_a_time = parameter_gradients(
        backbone, sum((r * weights[b, : len(r)]).sum() for b, r in enumerate(reference))
    )
    assert any(g.abs().sum() > 0 for g in batched)
    for got, expected in zip(batched, one_at_a_time, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_truncated_feedback_is_the_sum_of_per_step_gradients_with_inputs_detached(backbone, images):
    """Independent of the fill: step i's forward over its prefix with the earlier latents (from a no-gradient
    fill) as constants; the truncated fill's gradient is the sum over steps, and differs from the full chain's."""
    layout = layout_with(backbone, images, ["q", "a", "b"], [2, 2])
    batch = collate([layout], backbone.tokenizer.pad_token_id)
    slots = slot_positions([[(lat.start, lat.end) for lat in layout.latents]])
    length = batch.input_ids.shape[1]
    mask = causal_mask(1, length)
    embeds = inputs_embeds(backbone, batch)
    weights = torch.randn(len(slots[0]), backbone.hidden_size, generator=torch.Generator().manual_seed(4))
    constants = fill_latents(backbone, embeds, batch.position_ids, mask, slots, [length], "none").values[0]
    by_step = []
    for i, p in enumerate(slots[0]):
        prefix = embeds[0, :p].clone()
        for j in range(i):
            prefix = prefix.index_put((torch.tensor([slots[0][j]]),), constants[j : j + 1])
        out = backbone.forward(prefix[None], batch.position_ids[..., :p], mask.truncate(p))
        by_step.append(parameter_gradients(backbone, out.last_hidden_state[0, p - 1] @ weights[i]))
    expected = [sum(step[n] for step in by_step) for n in range(len(by_step[0]))]
    truncated = fill_latents(backbone, embeds, batch.position_ids, mask, slots, [length], "truncated").values[
        0
    ]
    got = parameter_gradients(backbone, (truncated * weights).sum())
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    full = fill_latents(backbone, embeds, batch.position_ids, mask, slots, [length], "full").values[0]
    chained = parameter_gradients(backbone, (full * weights).sum())
    assert max(float((a - b).abs().max()) for a, b in zip(chained, got)) > 1e-4


def test_bad_slot_positions_are_refused(backbone):
    embeds = torch.zeros(1, 5, backbone.hidden_size)
    with pytest.raises(ValueError, match="sample 0 has slot positions"):
        fill_latents(
            backbone, embeds, torch.zeros(3, 1, 5, dtype=torch.long), causal_mask(1, 5), [[3, 2]], [5]
        )
    with pytest.raises(ValueError, match="within"):
        fill_latents(backbone, embeds, torch.zeros(3, 1, 5, dtype=torch.long), causal_mask(1, 5), [[0]], [5])


def test_fill_keeps_its_cache_under_gradient_checkpointing(images):
    """HF layers drop the KV cache when checkpointing in training mode; the fill must not be affected."""
    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset="tiny-qwen2.5-vl", gradient_checkpointing=True))
    backbone.add_tokens(list(TOKENS))
    backbone.model.train()
    layout = layout_with(backbone, images, ["q", "a", "b"], [2, 2])
    batch = collate([layout], backbone.tokenizer.pad_token_id)
    slots = slot_positions([[(lat.start, lat.end) for lat in layout.latents]])
    length = batch.input_ids.shape[1]
    embeds = inputs_embeds(backbone, batch)
    filled = fill_latents(backbone, embeds, batch.position_ids, causal_mask(1, length), slots, [length])
    with torch.no_grad():
        reference = fill_latents_reference(
            backbone, embeds, batch.position_ids, causal_mask(1, length), slots
        )
    torch.testing.assert_close(filled.values[0].detach(), reference[0], atol=1e-5, rtol=1e-4)
    assert all(layer.gradient_checkpointing for layer in backbone.decoder().layers)
