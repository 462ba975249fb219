"""Monet's formulas on small cases computed independently (arXiv 2511.21395): the stage-2 controlled mask, the
latent-only backprop of the alignment, the cosine axis, observation weighting; and its teacher cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from latentkit.methods.monet import Monet, MonetConfig
from latentkit.methods.monet.layout import observation_positions, stage2_mask
from latentkit.methods.monet.losses import alignment_loss
from latentkit.methods.monet.method import cache_mean

from latentkit.backbone import build_backbone
from latentkit.checkpoint import load_final_weights, save_final
from latentkit.config import ModelSection
from latentkit.latent import FilledLatents, fill_latents
from latentkit.layout import IGNORE_INDEX, Kind, collate, inputs_embeds, latent_slot_positions
from latentkit.losses import weighted_next_token_ce
from latentkit.records import load_split
from latentkit.registry import StageContext, StageProgress, get_method
from latentkit.representation_cache import ensure_cache
from latentkit.segments import Sample, Segment
from latentkit.synth.zoom import generate_synth_zoom
from latentkit.trainer import TrainModule

K = 3


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoom")
    generate_synth_zoom(root, n_train=2, n_val=0, n_test=0)
    sample = load_split(root, "train").samples[0]
    return sample.images[0], sample.aux_images[0]


def two_look_sample(images, sample_id: str = "two", colour: str = "red") -> Sample:
    question, aux = images
    segments = (
        Segment("text", "system", "You are a helpful assistant."),
        Segment("image", "user", image=question),
        Segment("text", "user", "What is the small shape?"),
        Segment("text", "assistant", "Let me zoom in."),
        Segment("aux_image", "assistant", image=aux),
        Segment("observation", "assistant", f"It is {colour}."),
        Segment("text", "assistant", " Closer."),
        Segment("aux_image", "assistant", image=aux),
        Segment("observation", "assistant", "A circle."),
        Segment("text", "assistant", " \\boxed{circle}"),
    )
    return Sample(sample_id, "test", segments, answer="circle")


def make_method(**overrides) -> Monet:
    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset="tiny-qwen2.5-vl"))
    method = get_method("monet")(MonetConfig(num_latents=K, **overrides))
    method.setup(backbone)
    return method


def context_for(method: Monet, run_dir: Path, samples: list[Sample], stage: str) -> StageContext:
    module = TrainModule(method.backbone, method)
    return StageContext(
        run_dir=run_dir,
        stage_dir=run_dir / "stages" / stage,
        samples=samples,
        process_index=0,
        num_processes=1,
        barrier=lambda: None,
        log=lambda event: events.append(event),
        load_stage_weights=lambda name: load_final_weights(module, run_dir / "stages" / name / "final"),
        progress=False,
    )


events: list[dict] = []


@pytest.mark.parametrize("start_sees_image", [True, False])
def test_stage2_mask_against_a_hand_written_dense_mask(images, start_sees_image):
    method = make_method(start_sees_image=start_sees_image)
    backbone = method.backbone
    layout = method.layout(two_look_sample(images), "distill")
    ids = layout.input_ids.tolist()
    start, slot, end = (backbone.token_id(t) for t in method.config.latent_tokens)
    vision_start, vision_end = backbone.token_id("<|vision_start|>"), backbone.token_id("<|vision_end|>")
    # Find the spans from the token ids alone: the second and third vision blocks are the auxiliary images.
    opens = [i for i, t in enumerate(ids) if t == vision_start]
    closes = [i for i, t in enumerate(ids) if t == vision_end]
    starts = [i for i, t in enumerate(ids) if t == start]
    assert len(opens) == 3 and len(starts) == 2
    n = len(ids)
    expected = torch.zeros(n, n, dtype=torch.bool)
    for row in range(n):
        for col in range(row + 1):
            allowed = True
            for image_open, image_close, latent_start in zip(opens[1:], closes[1:], starts):
                last_slot = latent_start + K
                assert ids[latent_start + 1 : last_slot + 1] == [slot] * K and ids[last_slot + 1] == end
                # rows after the image and before its latent block (the start token's row too unless it sees the
                # image), and rows after the K slots, are blind to it
                first_seeing = latent_start if start_sees_image else latent_start + 1
                blind = image_close < row < first_seeing or row > last_slot
                if image_open <= col <= image_close and blind:
                    allowed = False
            expected[row, col] = allowed
    batch = collate([layout], backbone.tokenizer.pad_token_id)
    dense = method.mask(batch, "distill").to_dense()[0, 0]
    assert torch.equal(dense, expected)
    # The question image stays visible to the last row; the end token cannot see either auxiliary image.
    assert dense[n - 1, opens[0] + 1] and not dense[starts[0] + K + 1, opens[1] + 1]
    assert dense[starts[0], opens[1] + 1] == start_sees_image and dense[starts[0] + 1, opens[1] + 1]


def test_layout_weights_labels_and_latent_slots(images):
    method = make_method()
    backbone = method.backbone
    sample = two_look_sample(images)
    close = backbone.token_id("</observation>")
    open_ = backbone.token_id("<observation>")
    start, slot, end = (backbone.token_id(t) for t in method.config.latent_tokens)
    warmup = method.layout(sample, "warmup")
    text_obs = (warmup.kinds == Kind.OBSERVATION) & (warmup.input_ids != open_) & (warmup.input_ids != close)
    assert set(warmup.loss_weight[text_obs].tolist()) == {2.0}  # stage 1: observation x2
    tags = (warmup.input_ids == open_) | (warmup.input_ids == close)
    assert (warmup.labels[tags] == IGNORE_INDEX).all()  # stage 1: tags are not targets
    assert (warmup.kinds == Kind.LATENT).sum() == 0
    for stage, start_is_target in (("distill", False), ("latent", True)):
        layout = method.layout(sample, stage)
        text_obs = (
            (layout.kinds == Kind.OBSERVATION) & (layout.input_ids != open_) & (layout.input_ids != close)
        )
        assert set(layout.loss_weight[text_obs].tolist()) == {4.0}  # stages 2-3: observation x4
        slots = latent_slot_positions(layout)
        assert len(slots) == 2 * K and (layout.input_ids[slots] == slot).all()
        assert (layout.labels[slots] == IGNORE_INDEX).all()
        assert ((layout.labels[layout.input_ids == start] == start).all()) == start_is_target
        assert (layout.labels[layout.input_ids == end] == end).all()
        has_aux = any(image.kind == Kind.AUX_IMAGE for image in layout.images)
        assert has_aux == (stage == "distill")


def test_stage1_aux_vision_start_is_a_target_only_when_asked(images):
    """Spec stage 1: labels ignore image tokens, so by default no vision-start is a target in Monet's warm-up;
    `train_aux_vision_start` makes each auxiliary image's one a target. The `sft` method keeps training it."""
    sample = two_look_sample(images)
    for train, method in ((False, make_method()), (True, make_method(train_aux_vision_start=True))):
        layout = method.layout(sample, "warmup")
        vision_start = method.backbone.token_id("<|vision_start|>")
        opens = (layout.input_ids == vision_start).nonzero().squeeze(-1).tolist()
        assert len(opens) == 3
        assert layout.labels[opens[0]] == IGNORE_INDEX  # the question image's
        expected = vision_start if train else IGNORE_INDEX
        assert layout.labels[opens[1:]].tolist() == [expected, expected]
        image_tokens = layout.input_ids == method.backbone.token_id("<|image_pad|>")
        assert (layout.labels[image_tokens] == IGNORE_INDEX).all()
    sft = get_method("sft")(get_method("sft").Config())
    sft.setup(method.backbone)
    layout = sft.layout(sample, "sft")
    opens = (layout.input_ids == vision_start).nonzero().squeeze(-1).tolist()
    assert layout.labels[opens[1:]].tolist() == [vision_start, vision_start]


def test_cosine_over_the_hidden_axis_and_the_official_token_axis():
    torch.manual_seed(1)
    student = [torch.randn(3, 4, 5), torch.randn(3, 2, 5)]
    teacher = [torch.randn(3, 4, 5), torch.randn(3, 2, 5)]
    terms = []
    for s, t in zip(student, teacher):
        for layer in range(3):
            for token in range(s.shape[1]):
                a, b = s[layer, token], t[layer, token]
                terms.append(1 - float(a @ b) / (float(a.norm()) * float(b.norm())))
    assert alignment_loss(student, teacher, "hidden").item() == pytest.approx(
        sum(terms) / len(terms), rel=1e-5
    )
    per_sample = []
    for s, t in zip(student, teacher):
        values = []
        for layer in range(3):
            for channel in range(5):
                a, b = s[layer, :, channel], t[layer, :, channel]
                values.append(1 - float(a @ b) / (float(a.norm()) * float(b.norm())))
        per_sample.append(sum(values) / len(values))
    assert alignment_loss(student, teacher, "token").item() == pytest.approx(sum(per_sample) / 2, rel=1e-5)
    # torch's default axis is dim=1, the official code's call
    official = (1 - F.cosine_similarity(student[0], teacher[0])).mean()
    assert alignment_loss(student[:1], teacher[:1], "token").item() == pytest.approx(
        official.item(), rel=1e-6
    )


def distill_gradients(method: Monet, batch) -> dict[str, torch.Tensor]:
    method.backbone.model.zero_grad(set_to_none=True)
    method.loss(method.backbone, batch, "distill", StageProgress(0, 1)).loss.backward()
    return {n: p.grad.clone() for n, p in method.backbone.model.named_parameters() if p.grad is not None}


def prepared(method: Monet, run_dir: Path, samples: list[Sample]):
    save_final(method.backbone, method, "warmup", run_dir / "stages" / "warmup" / "final")
    method.prepare_stage("distill", context_for(method, run_dir, samples, "distill"))
    return collate([method.layout(s, "distill") for s in samples], method.backbone.tokenizer.pad_token_id)


def test_alignment_gradient_reaches_the_weights_only_through_the_latents(images, tmp_path):
    samples = [two_look_sample(images), two_look_sample(images, "blue", "blue")]
    method = make_method(alignment_weight=2.0)
    batch = prepared(method, tmp_path, samples)
    with_proxy = distill_gradients(method, batch)
    method.config.alignment_weight = 0.0
    ce_only = distill_gradients(method, batch)
    # Independent: g = dL_align/d(latent inputs) of forward 2; the weights get alpha * J_latents^T g.
    backbone = method.backbone
    backbone.model.zero_grad(set_to_none=True)
    mask = stage2_mask(batch)
    embeds = inputs_embeds(backbone, batch)
    filled = method.fill_batch(batch, embeds, mask)
    leaf = filled.values.detach().requires_grad_(True)
    out = backbone.forward(
        FilledLatents(leaf, filled.positions).write(embeds),
        batch.position_ids,
        mask,
        output_hidden_states=True,
    )
    close = backbone.token_id("</observation>")
    layers = torch.stack(out.hidden_states)
    students = [
        layers[:, b, ((l.kinds == Kind.OBSERVATION) & (l.input_ids != close)).nonzero().squeeze(-1)]
        for b, l in enumerate(batch.layouts)
    ]
    align = alignment_loss(students, method.caches["teacher"].get(batch.keys))
    assert align.item() > 1e-4
    (g,) = torch.autograd.grad(align, leaf)
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    names = [n for n, p in backbone.model.named_parameters() if p.requires_grad]
    vjp = torch.autograd.grad(filled.values, params, grad_outputs=g, allow_unused=True)
    compared = 0
    for name, value in zip(names, vjp):
        difference = with_proxy.get(name, torch.zeros_like(params[names.index(name)])) - ce_only.get(
            name, 0.0
        )
        expected = 2.0 * value if value is not None else torch.zeros_like(difference)
        torch.testing.assert_close(difference, expected, atol=2e-5, rtol=1e-3)
        compared += 1
    assert compared == len(params)
    # Tokens seen only in the last observation, after every latent, cannot shape a latent: no alignment gradient
    # reaches their embedding rows, unlike with ordinary backprop (the ablation).
    embedding = "model.language_model.embed_tokens.weight"
    last_slot = max(max(latent_slot_positions(l)) for l in batch.layouts)
    position = torch.arange(batch.input_ids.shape[1])
    after = (batch.kinds == Kind.OBSERVATION) & (batch.input_ids != close) & (position > last_slot)
    before = set(batch.input_ids[:, : last_slot + 1].flatten().tolist())
    only_obs = [t for t in torch.unique(batch.input_ids[after]).tolist() if t not in before]
    assert only_obs
    assert torch.allclose(with_proxy[embedding][only_obs], ce_only[embedding][only_obs], atol=1e-7)
    method.config.alignment_weight = 2.0
    method.config.latent_only_backprop = False
    ordinary = distill_gradients(method, batch)
    assert not torch.allclose(ordinary[embedding][only_obs], ce_only[embedding][only_obs], atol=1e-6)


def test_teacher_cache_holds_every_layer_at_observation_positions_and_is_rebuilt_when_stale(images, tmp_path):
    samples = [two_look_sample(images)]
    method = make_method()
    events.clear()
    prepared(method, tmp_path, samples)
    teacher = method.caches["teacher"].get([("test", "two")])[0]
    layout = method.layout(samples[0], "warmup")
    batch = collate([layout], method.backbone.tokenizer.pad_token_id)
    with torch.no_grad():
        out = method.backbone.forward(
            inputs_embeds(method.backbone, batch),
            batch.position_ids,
            method.mask(batch, "warmup"),
            output_hidden_states=True,
        )
    close = method.backbone.token_id("</observation>")
    positions = ((layout.kinds == Kind.OBSERVATION) & (layout.input_ids != close)).nonzero().squeeze(-1)
    assert teacher.shape == (method.backbone.num_layers + 1, len(positions), method.backbone.hidden_size)
    torch.testing.assert_close(teacher, torch.stack(out.hidden_states)[:, 0, positions])
    assert [e["event"] for e in events] == ["cache_built"]
    # Same weights and data: reused. Changed weights: fingerprint differs, rebuilt.
    method.prepare_stage("distill", context_for(method, tmp_path, samples, "distill"))
    assert events[-1]["event"] == "cache_reused"
    with torch.no_grad():
        method.backbone.model.lm_head.weight.mul_(1.5)
        method.backbone.decoder().norm.weight.mul_(0.5)
    save_final(method.backbone, method, "warmup", tmp_path / "stages" / "warmup" / "final")
    method.prepare_stage("distill", context_for(method, tmp_path, samples, "distill"))
    assert [e["event"] for e in events[-2:]] == ["cache_stale", "cache_built"]
    manifest = json.loads((tmp_path / "stages" / "distill" / "teacher" / "manifest.json").read_text())
    assert manifest["fingerprint"] == events[-1]["fingerprint"]
    assert [entry[:2] for entry in manifest["index"]] == [["test", "two"]]


def test_cache_fingerprint_covers_the_attention_backend_and_dtype(images, tmp_path):
    method = make_method()
    save_final(method.backbone, method, "warmup", tmp_path / "final")
    samples = [two_look_sample(images)]
    seen = {method._fingerprint("teacher", tmp_path / "final", samples)}
    method.backbone.attn_backend = "triton"
    seen.add(method._fingerprint("teacher", tmp_path / "final", samples))
    method.backbone.model.to(torch.float64)
    seen.add(method._fingerprint("teacher", tmp_path / "final", samples))
    assert len(seen) == 3


# --- gradient paths of stages 2 and 3, each against a computation by hand ----------------------------------------


class StubCache:
    """Random teacher or target tensors of the right shapes, in place of a built cache."""

    def __init__(self, shapes: dict[tuple[str, str], tuple[int, int, int]]):
        generator = torch.Generator().manual_seed(5)
        self.tensors = {key: torch.randn(*shape, generator=generator) for key, shape in shapes.items()}

    def get(self, keys):
        return [self.tensors[key] for key in keys]


def parameter_gradients(method: Monet, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in method.backbone.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def method_gradients(method: Monet, batch, stage: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The weight gradients of the method's loss, and the filled latents with their own gradient."""
    captured = []
    fill = method.fill_batch

    def keep_latents(*args, **kwargs):
        filled = fill(*args, **kwargs)
        if filled.values.requires_grad:
            filled.values.retain_grad()
        captured.append(filled.values)
        return filled

    method.fill_batch = keep_latents
    loss = method.loss(method.backbone, batch, stage, StageProgress(0, 1)).loss
    grads = parameter_gradients(method, loss)
    loss.backward()
    method.fill_batch = fill
    return grads, captured[0]


def ce_by_hand(method: Monet, batch, mask, feedback: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(CE through forward 2 with the latents as constants, CE through the latents into forward 1), separately."""
    backbone = method.backbone
    embeds = inputs_embeds(backbone, batch)
    slots = [latent_slot_positions(layout) for layout in batch.layouts]
    filled = fill_latents(
        backbone, embeds, batch.position_ids, mask, slots, [len(l) for l in batch.layouts], feedback
    )
    constants = filled.values.detach().requires_grad_(True)
    out = backbone.forward(FilledLatents(constants, filled.positions).write(embeds), batch.position_ids, mask)
    ce, _ = weighted_next_token_ce(backbone, out.last_hidden_state, batch.labels, batch.loss_weight)
    through_forward_2 = parameter_gradients(method, ce)
    (at_latents,) = torch.autograd.grad(ce, constants, retain_graph=True)
    if not filled.values.requires_grad:
        return through_forward_2, [torch.zeros_like(g) for g in through_forward_2]
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    into_forward_1 = torch.autograd.grad(
        filled.values, params, grad_outputs=at_latents, allow_unused=True, retain_graph=True
    )
    return through_forward_2, [
        torch.zeros_like(p) if g is None else g for p, g in zip(params, into_forward_1)
    ]


def norm(grads: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def assert_gradients_equal(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("fill_gradient", ["full", "truncated", "none"])
def test_stage2_ce_reaches_forward_1_through_the_latents(images, fill_gradient):
    """Stage 2 with latent-only backprop on (alpha 0, so the loss's gradient is CE's): the weight gradient is CE
    through forward 2 with the latents as constants plus CE through the latents into forward 1 (the fill, with
    the `fill_gradient` option); the second part is not zero unless `none`."""
    method = make_method(alignment_weight=0.0, fill_gradient=fill_gradient)
    samples = [two_look_sample(images), two_look_sample(images, "blue", "blue")]
    batch = collate([method.layout(s, "distill") for s in samples], method.backbone.tokenizer.pad_token_id)
    close = method.backbone.token_id("</observation>")
    shape = (method.backbone.num_layers + 1, 0, method.backbone.hidden_size)
    counts = [len(observation_positions(l, close)) for l in batch.layouts]
    method.caches["teacher"] = StubCache(
        {l.key: (shape[0], n, shape[2]) for l, n in zip(batch.layouts, counts)}
    )
    got, _ = method_gradients(method, batch, "distill")
    through_forward_2, into_forward_1 = ce_by_hand(method, batch, stage2_mask(batch), fill_gradient)
    assert_gradients_equal(got, [a + b for a, b in zip(through_forward_2, into_forward_1)])
    if fill_gradient == "none":
        assert norm(into_forward_1) == 0.0
    else:
        assert norm(into_forward_1) > 1e-3 * norm(through_forward_2)
        assert_part_included(got, through_forward_2)


def assert_part_included(got: list[torch.Tensor], without: list[torch.Tensor]) -> None:
    """`got` is not the gradient without the part through forward 1 (at the comparison's tolerance)."""
    assert not all(torch.allclose(g, w, atol=2e-5, rtol=1e-3) for g, w in zip(got, without))


def test_stage3_fills_with_gradient_and_the_first_latent_gets_it(images):
    """Stage 3 is ordinary backprop: the weights get CE + alignment through forward 2 and through the latents
    into the fill, and the first latent, h(start), has a gradient."""
    method = make_method(target_alignment_weight=0.0)
    batch = collate(
        [method.layout(two_look_sample(images), "latent")], method.backbone.tokenizer.pad_token_id
    )
    layout = batch.layouts[0]
    shape = (method.backbone.num_layers + 1, len(latent_slot_positions(layout)), method.backbone.hidden_size)
    method.caches["targets"] = StubCache({layout.key: shape})
    got, latents = method_gradients(method, batch, "latent")
    assert latents.grad is not None and float(latents.grad[0, 0].abs().sum()) > 0
    through_forward_2, into_forward_1 = ce_by_hand(method, batch, method.mask(batch, "latent"), "full")
    assert norm(into_forward_1) > 1e-3 * norm(through_forward_2)
    assert_gradients_equal(got, [a + b for a, b in zip(through_forward_2, into_forward_1)])
    assert_part_included(got, through_forward_2)
    # With the alignment on, h(start) also gets the alignment's gradient at every latent position.
    method.config.target_alignment_weight = 2.0
    method.backbone.model.zero_grad(set_to_none=True)
    _, aligned = method_gradients(method, batch, "latent")
    assert not torch.allclose(aligned.grad[0, 0], latents.grad[0, 0])


def test_cache_mean_pools_tokens_by_slot_over_samples(tmp_path):
    tensors = {"a": torch.arange(12.0).reshape(1, 4, 3), "b": torch.ones(1, 2, 3)}
    samples = [Sample(name, "d", (Segment("text", "user", name),)) for name in tensors]
    cache = ensure_cache(
        tmp_path / "c",
        "targets",
        "f",
        samples,
        lambda chunk: [tensors[s.sample_id] for s in chunk],
        1,
        context_for(make_method(), tmp_path, samples, "latent"),
    )
    a = tensors["a"][0]
    # period 2: slot 0 pools a's tokens 0 and 2 and b's token 0; slot 1 pools a's 1 and 3 and b's 1.
    expected = torch.stack([(a[0] + a[2] + 1) / 3, (a[1] + a[3] + 1) / 3]).unsqueeze(0)
    assert torch.allclose(cache_mean(cache, [("d", "a"), ("d", "b")], 2, chunk=1), expected)
    one = torch.cat([a, torch.ones(2, 3)]).mean(0).reshape(1, 1, 3)
    assert torch.allclose(cache_mean(cache, [("d", "a"), ("d", "b")], 1), one)


def test_centred_alignment_is_not_satisfied_by_the_targets_common_part():
    """Targets = a large shared vector + a small per-sample part. A student that is the shared vector alone carries
    nothing of the input: the raw cosine nearly accepts it, the centred one does not."""
    method = make_method(alignment_centre=True)
    generator = torch.Generator().manual_seed(0)
    common = 10.0 * torch.randn(1, 1, 8, generator=generator)
    goals = [common + 0.3 * torch.randn(1, 2, 8, generator=generator) for _ in range(4)]
    method.centres["targets"] = torch.cat(goals, dim=1).mean(1, keepdim=True).repeat(1, 2, 1)
    students = [common.repeat(1, 2, 1) for _ in goals]
    raw = alignment_loss(students, goals)
    centred = alignment_loss(method._centred("targets", students), method._centred("targets", goals))
    assert float(raw) < 0.01 and float(centred) > 0.9
    assert torch.allclose(method._centred("targets", goals)[0], goals[0] - method.centres["targets"])
    assert alignment_loss(method._centred("targets", goals), method._centred("targets", goals)) < 1e-6
