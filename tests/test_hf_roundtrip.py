"""A run's `final/` in plain transformers, loaded as README.md ("Loading `final/` in plain transformers") says:
the same tokens and the same logits as latentkit's own forward, and a chat template that renders as
`latentkit.chat.render_chat` does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import latentkit, train_args
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from latentkit.api import load, prompt_sample
from latentkit.backbone import build_backbone
from latentkit.chat import ResponseWeights, drop_aux_image, render_chat
from latentkit.config import ModelSection
from latentkit.decoding.engine import left_pad
from latentkit.layout import LayoutBuilder
from latentkit.masks import causal_mask, with_padding
from latentkit.segments import Sample, Segment

SYSTEM = "You are a helpful assistant."
QUESTION = "What is the colour of the object at row 1, column 2?"
MODEL_CLASSES = {
    "tiny-qwen2.5-vl": Qwen2_5_VLForConditionalGeneration,
    "tiny-qwen2-vl": Qwen2VLForConditionalGeneration,
}


def noise_image(path: Path, width: int, height: int) -> Path:
    pixels = np.random.RandomState(0).randint(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def messages(image: bool) -> list[dict]:
    content = [{"type": "image"}] if image else []
    content.append({"type": "text", "text": QUESTION})
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    presets = {name: ["data.task=synth-zoom"] for name in MODEL_CLASSES}
    presets["tiny-causal-lm"] = ["data.task=synth-arith"]
    for preset, extra in presets.items():
        latentkit(*train_args(out, preset, f"model.preset={preset}", "train.steps=2", *extra))
    return {preset: out / preset for preset in presets}


@torch.no_grad()
def latentkit_forward(run: Path, image: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt token ids [N] and logits [1, N, V] through latentkit's own loading and forward."""
    model = load(run)
    layout = model.method.prompt(prompt_sample(QUESTION, image)).build("prompt", "prompt")
    embeds, positions, valid = left_pad([layout], model.backbone)
    mask = with_padding(causal_mask(1, len(layout)), valid)
    hidden = model.backbone.forward(embeds, positions, mask).last_hidden_state
    return layout.input_ids, model.backbone.logits(hidden)


@torch.no_grad()
@pytest.mark.parametrize("preset", list(MODEL_CLASSES))
def test_vl_final_in_plain_transformers_matches_latentkit(runs, preset, tmp_path):
    final = runs[preset] / "final"
    image = noise_image(tmp_path / "question.png", 90, 50)  # resized to 84 x 56: the resampling must match

    model = MODEL_CLASSES[preset].from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    image_processor = AutoImageProcessor.from_pretrained(final, backend="pil")
    text = tokenizer.apply_chat_template(messages(image=True), add_generation_prompt=True, tokenize=False)
    pixels = image_processor(images=[Image.open(image).convert("RGB")], return_tensors="pt")
    tokens = int(pixels["image_grid_thw"][0].prod()) // image_processor.merge_size**2
    text = text.replace("<|image_pad|>", "<|image_pad|>" * tokens)
    inputs = tokenizer(text, return_tensors="pt")
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).int()
    logits = model(**inputs, **pixels).logits

    ids, expected = latentkit_forward(runs[preset], image)
    assert inputs["input_ids"][0].tolist() == ids.tolist()
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_causal_lm_final_in_plain_transformers_matches_latentkit(runs):
    final = runs["tiny-causal-lm"] / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    inputs = tokenizer.apply_chat_template(
        messages(image=False), add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    logits = model(**inputs).logits

    ids, expected = latentkit_forward(runs["tiny-causal-lm"], None)
    assert inputs["input_ids"][0].tolist() == ids.tolist()
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("preset", list(MODEL_CLASSES))
def test_auto_processor_with_torchvision(runs, preset, tmp_path):
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    final = runs[preset] / "final"
    # resized to 84 x 56: torchvision's resampling differs from PIL's by up to 0.015 per normalised pixel
    image = Image.open(noise_image(tmp_path / "question.png", 90, 50)).convert("RGB")
    model = MODEL_CLASSES[preset].from_pretrained(final)
    processor = AutoProcessor.from_pretrained(final)
    processor.image_processor = AutoImageProcessor.from_pretrained(final, backend="pil")
    chat = messages(image=True)
    chat[1]["content"][0]["image"] = image
    inputs = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    logits = model(**inputs).logits

    ids, expected = latentkit_forward(runs[preset], tmp_path / "question.png")
    assert inputs["input_ids"][0].tolist() == ids.tolist()
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def rendered(backbone, sample: Sample, prompt_only: bool) -> str:
    builder = LayoutBuilder(backbone)
    render_chat(builder, sample, drop_aux_image, ResponseWeights(), prompt_only=prompt_only)
    return backbone.tokenizer.decode(builder.ids)


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-causal-lm"])
def test_chat_template_renders_as_latentkit(preset, tmp_path):
    backbone = build_backbone(ModelSection(preset=preset))
    image = noise_image(tmp_path / "question.png", 56, 56)
    pads = backbone.preprocess_image(Image.open(image)).num_tokens if backbone.supports_images else 0
    user = [Segment("image", "user", image=image)] if pads else []
    user.append(Segment("text", "user", QUESTION))
    chats = {
        "a plain user turn": ([*user], [{"role": "user", "content": messages(bool(pads))[1]["content"]}]),
        "with system and answer": (
            [Segment("text", "system", SYSTEM), *user, Segment("text", "assistant", "It is red.")],
            [*messages(bool(pads)), {"role": "assistant", "content": "It is red."}],
        ),
    }
    backbone.save(tmp_path / "final")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    for name, (segments, chat) in chats.items():
        sample = Sample(name, "chat", tuple(segments))
        for prompt_only in (False, True):
            if prompt_only:
                chat = [m for m in chat if m["role"] != "assistant"]
            text = tokenizer.apply_chat_template(chat, add_generation_prompt=prompt_only, tokenize=False)
            text = text.replace("<|image_pad|>", "<|image_pad|>" * pads)
            assert text == rendered(backbone, sample, prompt_only), (name, prompt_only)
