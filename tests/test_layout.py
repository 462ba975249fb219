"""Layouts and batches: sample keys, latent slot positions, and segment kinds that methods register."""

from __future__ import annotations

import pytest
import torch

from latentkit import layout as layout_module
from latentkit.backbone import build_backbone
from latentkit.config import ModelSection
from latentkit.errors import RegistryError
from latentkit.layout import (
    FIRST_METHOD_KIND,
    KIND_DTYPE,
    Kind,
    LayoutBuilder,
    collate,
    kind_name,
    latent_slot_positions,
    register_kind,
)
from latentkit.masks import hide_spans_outside_latents

LATENT_TOKENS = ("<lat>", "<slot>", "</lat>")


@pytest.fixture(scope="module")
def backbone():
    backbone = build_backbone(ModelSection(preset="tiny-causal-lm"))
    backbone.add_tokens(list(LATENT_TOKENS))
    return backbone


@pytest.fixture
def fresh_kinds(monkeypatch):
    """Method kinds registered inside a test stay inside it."""
    monkeypatch.setattr(layout_module, "_method_kinds", dict(layout_module._method_kinds))


def test_keys_follow_samples_into_the_batch(backbone):
    layouts = []
    for dataset in ("Visual_CoT", "CogCoM"):
        builder = LayoutBuilder(backbone)
        builder.add_text("same id", Kind.TEXT, 0)
        layouts.append(builder.build("17", dataset))
    assert layouts[0].key == ("Visual_CoT", "17") and layouts[1].dataset == "CogCoM"
    assert collate(layouts, 0).keys == [("Visual_CoT", "17"), ("CogCoM", "17")]


def test_latent_slot_positions_are_the_k_slots_of_every_block(backbone):
    builder = LayoutBuilder(backbone)
    builder.add_text("look", Kind.TEXT, 0)
    first = len(builder.ids)
    builder.add_latent(*LATENT_TOKENS, k=3, segment_index=1)
    builder.add_text("then", Kind.TEXT, 2)
    second = len(builder.ids)
    builder.add_latent(*LATENT_TOKENS, k=2, segment_index=3)
    layout = builder.build("a", "d")
    expected = [first + 1, first + 2, first + 3, second + 1, second + 2]
    assert latent_slot_positions(layout) == expected
    slot = backbone.token_id("<slot>")
    assert (layout.input_ids[expected] == slot).all() and int((layout.input_ids == slot).sum()) == 5
    assert latent_slot_positions(LayoutBuilder(backbone).build("empty", "d")) == []


def test_builtin_kind_codes_and_names_are_unchanged():
    assert [(k.name, int(k)) for k in Kind] == [
        ("PAD", -1),
        ("TEXT", 0),
        ("IMAGE", 1),
        ("AUX_IMAGE", 2),
        ("LATENT", 3),
        ("OBSERVATION", 4),
    ]
    assert [kind_name(code) for code in range(-1, 5)] == [
        "pad",
        "text",
        "image",
        "aux_image",
        "latent",
        "observation",
    ]


def test_registered_kind_is_stable_and_idempotent(fresh_kinds):
    code = register_kind("code")
    assert code >= FIRST_METHOD_KIND and code <= torch.iinfo(KIND_DTYPE).max
    assert register_kind("code") == code and kind_name(code) == "code"
    assert register_kind("tool_call") not in (code, *map(int, Kind))
    # Derived from the name, not from the order of registration: the same in another process.
    layout_module._method_kinds.clear()
    register_kind("tool_call")
    assert register_kind("code") == code


@pytest.mark.parametrize(
    "name, match",
    [
        ("text", "built in; use Kind.TEXT"),
        ("aux_image", "built in; use Kind.AUX_IMAGE"),
        ("Code", "invalid"),
        ("", "invalid"),
        ("two words", "invalid"),
    ],
)
def test_bad_kind_names_are_refused(fresh_kinds, name, match):
    with pytest.raises(RegistryError, match=match):
        register_kind(name)


def test_two_names_with_one_code_clash(fresh_kinds):
    codes: dict[int, str] = {}
    with pytest.raises(RegistryError) as error:
        for index in range(20_000):  # far more names than codes allow without a collision
            name = f"kind{index}"
            codes[register_kind(name)] = name
    message = str(error.value)
    clashing = message.split("'")[1]
    (code,) = (c for c, n in codes.items() if f"which {n!r} already has" in message)
    assert f"gets code {code}" in message and clashing != codes[code] and "rename one" in message


def test_unknown_code_has_no_name_and_cannot_be_laid_out(fresh_kinds, backbone):
    with pytest.raises(RegistryError, match="no segment kind has code 99"):
        kind_name(99)
    with pytest.raises(RegistryError, match="register_kind"):
        LayoutBuilder(backbone).add_text("x", 99, 0)


def test_registered_kind_in_layout_labels_mask_and_names(fresh_kinds, backbone):
    code = register_kind("code")
    builder = LayoutBuilder(backbone)
    builder.add_text("question", Kind.TEXT, 0)
    span_start = len(builder.ids)
    builder.add_text("print(1)", code, 1, train=True, weight=0.5)
    span_end = len(builder.ids)
    latent_start = len(builder.ids)
    builder.add_latent(*LATENT_TOKENS, k=2, segment_index=2)
    latent_end = len(builder.ids) - 1  # the end token is the first row after the block
    builder.add_text("answer", Kind.TEXT, 3, train=True)
    short = LayoutBuilder(backbone)
    short.add_text("hi", Kind.TEXT, 0)
    batch = collate([builder.build("a", "d"), short.build("b", "d")], 0)
    assert batch.kinds.dtype == KIND_DTYPE
    is_code = batch.kinds[0] == code
    assert is_code.nonzero().squeeze(-1).tolist() == list(range(span_start, span_end))
    assert torch.equal(batch.labels[0, is_code], batch.input_ids[0, is_code])
    assert set(batch.loss_weight[0, is_code].tolist()) == {0.5}
    # A mask from the kinds: the code span is seen after itself only by the latent block.
    n = batch.input_ids.shape[1]
    spans = [[(span_start, span_end, latent_start, latent_end)], []]
    dense = hide_spans_outside_latents(spans, n, batch.valid).to_dense()[0, 0]
    assert dense[latent_start + 1, is_code].all() and not dense[latent_end, is_code].any()
    names = [kind_name(c) for c in batch.kinds[1].tolist()]
    assert names[0] == "text" and names[-1] == "pad" and "code" in {kind_name(c) for c in batch.kinds[0]}
