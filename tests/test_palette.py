"""Reasoning Palette's parts pinned by independent computations: the VAE loss (by hand and numpy), the VAE's shapes
and reparameterisation, the content tokens of h, the warm-up's prefix slot and loss (recomputed from z through the
HF model), the prompt prefixes per (sample, draw) and the baselines, the domain Gaussian, the VL placement after
the image with M-RoPE positions, the replay of a rollout under its own prefix, and one-line config errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from latentkit.methods.palette import Palette, PaletteConfig
from latentkit.methods.palette.domain import DomainGaussian, draw_normal, fit_domain, fit_gaussian
from latentkit.methods.palette.layout import content_layout
from latentkit.methods.palette.losses import vae_loss, vae_terms
from latentkit.methods.palette.method import embedding_rms
from latentkit.methods.palette.vae import build_vae, mean_embedding

from latentkit.backbone import build_backbone
from latentkit.config import ModelSection, build_config
from latentkit.decoding import SamplingParams, decode, token_log_probs
from latentkit.errors import ConfigError
from latentkit.layout import collate
from latentkit.records import load_split
from latentkit.registry import StageContext, StageProgress, get_method
from latentkit.synth.arith import generate_synth_arith
from latentkit.synth.zoom import generate_synth_zoom

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    root = tmp_path_factory.mktemp("arith")
    generate_synth_arith(root, n_train=6, n_val=0, n_test=0)
    return load_split(root, "train").samples


@pytest.fixture(scope="module")
def zoom(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoom")
    generate_synth_zoom(root, n_train=2, n_val=0, n_test=0)
    return load_split(root, "train").samples


def palette(preset: str = "tiny-causal-lm", **config) -> Palette:
    torch.manual_seed(0)
    backbone = build_backbone(ModelSection(preset=preset))
    method = Palette(PaletteConfig(**config))
    method.setup(backbone)
    return method


# --- the VAE loss ------------------------------------------------------------------------------------------------
def test_vae_loss_by_hand():
    # Sample 1: error (1, 2) -> 5; KL of N((1, 0), diag(1, 2)) = 0.5 * ((1 + 1 - 1 - 0) + (0 + 2 - 1 - ln 2)).
    # Sample 2: no error; the prior itself -> KL 0.
    h = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    h_hat = torch.tensor([[0.0, 0.0], [3.0, -1.0]])
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    kl = 0.5 * (1.0 + (1.0 - math.log(2.0)))
    assert float(vae_loss(h, h_hat, mu, logvar, beta=0.5)) == pytest.approx(
        (5.0 + 0.5 * kl + 0.0) / 2, rel=1e-6
    )
    recon, kl_mean = vae_terms(h, h_hat, mu, logvar)
    assert (float(recon), float(kl_mean)) == pytest.approx((2.5, kl / 2), rel=1e-6)


def test_vae_loss_matches_numpy_on_random_values():
    rng = np.random.default_rng(3)
    h, h_hat = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    mu, logvar = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    expected = 0.0
    for b in range(5):
        error = sum((h[b, i] - h_hat[b, i]) ** 2 for i in range(7))
        kl = sum(0.5 * (mu[b, j] ** 2 + math.exp(logvar[b, j]) - 1 - logvar[b, j]) for j in range(3))
        expected += (error + 0.3 * kl) / 5
    got = vae_loss(*(torch.tensor(a) for a in (h, h_hat, mu, logvar)), beta=0.3)
    assert float(got) == pytest.approx(expected, rel=1e-9)


# --- the VAE -----------------------------------------------------------------------------------------------------
def test_vae_shapes_reparameterisation_and_seeded_init():
    config = PaletteConfig(latent_size=6, encoder_widths=[10], decoder_widths=[12])
    before = torch.get_rng_state()
    vae = build_vae(config, 16)
    assert torch.equal(torch.get_rng_state(), before)  # the init seed leaves the global RNG alone
    again = build_vae(config, 16)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values()))
    assert [m.out_features for m in vae.encoder if isinstance(m, torch.nn.Linear)] == [10, 12]
    h = torch.randn(3, 16)
    mu, logvar = vae.encode(h)
    assert mu.shape == logvar.shape == (3, 6)
    assert vae.decode(mu).shape == (3, 1, 16)
    torch.manual_seed(7)
    out = vae(h)
    torch.manual_seed(7)
    eps = torch.randn(3, 6)
    z = mu + torch.exp(0.5 * logvar) * eps
    assert torch.allclose(out.h_hat, vae.decode(z)[:, 0], atol=1e-6)
    assert torch.equal(out.mu, mu) and torch.equal(out.logvar, logvar)


def test_transformer_decoder_reshapes_z_into_prefix_vectors():
    config = PaletteConfig(
        prefix_decoder="transformer", latent_size=24, prefix_tokens=3, decoder_width=8, decoder_heads=2
    )
    vae = build_vae(config, 16)
    z = torch.randn(2, 24)
    prefixes = vae.decode(z)
    assert prefixes.shape == (2, 3, 16)
    # Causal: the first vector depends only on z's first k' = 8 values.
    changed = z.clone()
    changed[:, 8:] += 1.0
    after = vae.decode(changed)
    assert torch.allclose(after[:, 0], prefixes[:, 0], atol=1e-6) and not torch.allclose(
        after[:, 1:], prefixes[:, 1:]
    )
    torch.manual_seed(1)
    out = vae(torch.randn(2, 16))
    assert out.h_hat.shape == (2, 16) and out.mu.shape == (2, 24)


def test_h_is_the_mean_embedding_of_the_question_and_answer_text_only(arith, zoom):
    method = palette()
    backbone = method.backbone
    sample = arith[0]
    layout = content_layout(backbone, sample)
    user, assistant = (s.text for s in sample.segments if s.role != "system")
    assert layout.input_ids.tolist() == backbone.encode_text(user) + backbone.encode_text(assistant)
    assert (layout.labels < 0).all()
    batch = collate([layout, content_layout(backbone, arith[1])], backbone.tokenizer.pad_token_id)
    table = backbone.model.get_input_embeddings().weight.detach()
    expected = table[torch.tensor(backbone.encode_text(user) + backbone.encode_text(assistant))].mean(0)
    assert torch.allclose(mean_embedding(backbone, batch)[0], expected, atol=1e-6)
    # A VL sample: images, the system turn and observation tags are left out, observation text is kept.
    vl = palette("tiny-qwen2.5-vl")
    sample = zoom[0]
    texts = [s.text for s in sample.segments if s.role != "system" and s.kind in ("text", "observation")]
    assert any(s.kind == "observation" for s in sample.segments)
    ids = [i for text in texts for i in vl.backbone.encode_text(text)]
    assert content_layout(vl.backbone, sample).input_ids.tolist() == ids


def test_standardized_input_statistics_loss_and_decoding(arith, tmp_path):
    method = palette()
    events = []
    context = StageContext(
        tmp_path, tmp_path / "vae", arith, 0, 1, lambda: None, events.append, lambda s: None, False
    )
    method.prepare_stage("vae", context)
    # The corpus statistics by hand: each sample's mean embedding over its content tokens.
    table = method.backbone.model.get_input_embeddings().weight.detach().double()
    h = torch.stack([table[content_layout(method.backbone, s).input_ids].mean(0) for s in arith])
    assert torch.allclose(method.vae.input_mean.double(), h.mean(0), atol=1e-6)
    assert torch.allclose(method.vae.input_scale.double(), h.std(0), atol=1e-6)
    assert events[0]["event"] == "vae_input_statistics" and events[0]["samples"] == 6
    standardized = (h - h.mean(0)) / h.std(0)
    torch.manual_seed(1)
    batch = collate([method.layout(s, "vae") for s in arith], method.backbone.tokenizer.pad_token_id)
    out = method.loss(method.backbone, batch, "vae", StageProgress(0, 1))
    torch.manual_seed(1)
    mu, logvar = method.vae.encoder(standardized.float()).chunk(2, dim=-1)
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
    expected = vae_loss(standardized.float(), method.vae.decoder(z).mean(-2), mu, logvar, 1e-3)
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-4)
    z = torch.randn(2, 32)
    prefix = method.vae.decode(z)
    assert torch.allclose(prefix, method.vae.input_mean + method.vae.input_scale * method.vae.decoder(z))
    raw = palette(standardize_input=False)
    raw.prepare_stage("vae", context)
    assert torch.equal(raw.vae.input_mean, torch.zeros(64)) and torch.equal(
        raw.vae.input_scale, torch.ones(64)
    )


def test_posterior_warmup_draws_z_from_the_samples_own_posterior(arith, tmp_path):
    method = palette(warmup_latents="posterior")
    context = StageContext(
        tmp_path, tmp_path / "w", arith, 0, 1, lambda: None, lambda e: None, lambda s: None, False
    )
    method.prepare_stage("vae", context)
    method.prepare_stage("warmup", context)
    seen = []
    decode = method.vae.decode
    method.vae.decode = lambda z: seen.append(z) or decode(z)
    batch = collate([method.layout(s, "warmup") for s in arith[:2]], method.backbone.tokenizer.pad_token_id)
    method.loss(method.backbone, batch, "warmup", StageProgress(3, 10))
    with torch.no_grad():
        mu, logvar = method.vae.encode(method.mean_embeddings(arith[:2]))
    eps = torch.cat([draw_normal(s.key, 3, 0, (1, 32), "warmup") for s in arith[:2]])
    assert torch.allclose(seen[0], mu + (0.5 * logvar).exp() * eps, atol=1e-5)


def test_stage_freeze_keeps_the_model_in_vae_and_the_vae_elsewhere():
    method = palette("tiny-qwen2.5-vl")
    assert set(method.stage_freeze("vae")) == {"vision", "embeddings", "language_model", "lm_head"}
    assert method.stage_freeze("warmup") == ("method",) == method.stage_freeze("rl")


# --- stage warmup ------------------------------------------------------------------------------------------------
def test_warmup_prefix_slot_and_loss_recomputed_from_z(arith):
    method = palette()
    backbone = method.backbone
    layouts = [method.layout(sample, "warmup") for sample in arith[:2]]
    header = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    for layout, sample in zip(layouts, arith[:2]):
        (slot,) = layout.embeddings
        assert slot.vectors.shape == (1, 64)
        assert backbone.tokenizer.decode(layout.input_ids[: slot.start].tolist()) == header
        question = sample.segments[1].text
        after = layout.input_ids[slot.start + 1 : slot.start + 1 + len(backbone.encode_text(question))]
        assert after.tolist() == backbone.encode_text(question)
        assert layout.labels[slot.start] < 0
        # The generation prompt places its prefix at the same position, after the same tokens.
        prompt = method.prompt(sample).build(sample.sample_id, sample.dataset)
        assert prompt.embeddings[0].start == slot.start and prompt.embeddings[0].vectors.shape == (4, 64)
        rest = prompt.input_ids[slot.start + 4 :]
        assert torch.equal(prompt.input_ids[: slot.start], layout.input_ids[: slot.start])
        assert torch.equal(rest, layout.input_ids[slot.start + 1 : slot.start + 1 + len(rest)])
    batch = collate(layouts, backbone.tokenizer.pad_token_id)
    progress = StageProgress(5, 10)
    loss = method.loss(backbone, batch, "warmup", progress).loss.detach()

    # Independently: D(z) with z = draw_normal(key, step, seed, stream "warmup") written at the slot, through HF.
    numerator = denominator = 0.0
    for row, layout in enumerate(layouts):
        z = draw_normal(layout.key, 5, 0, (1, 32), "warmup")
        embeds = backbone.model.get_input_embeddings()(layout.input_ids).detach().clone()
        start = layout.embeddings[0].start
        embeds[start] = method.vae.decode(z)[0, 0].detach()
        with torch.no_grad():
            logits = backbone.model(inputs_embeds=embeds[None]).logits[0]
        targets = layout.labels[1:] >= 0
        ce = F.cross_entropy(logits[:-1][targets], layout.labels[1:][targets], reduction="sum")
        numerator += float(ce)
        denominator += int(targets.sum())
    assert float(loss) == pytest.approx(numerator / denominator, rel=1e-5)
    with torch.no_grad():
        again = method.loss(backbone, batch, "warmup", progress).loss
        other_step = method.loss(backbone, batch, "warmup", StageProgress(6, 10)).loss
    assert float(again) == float(loss) and float(other_step) != float(loss)


def test_warmup_gradient_reaches_the_model_and_the_decoder_through_the_prefix(arith):
    method = palette()
    backbone = method.backbone
    batch = collate([method.layout(s, "warmup") for s in arith[:2]], backbone.tokenizer.pad_token_id)
    method.loss(backbone, batch, "warmup", StageProgress(0, 1)).loss.backward()
    # The decoder's gradient can only come through the prefix positions the model reads.
    decoder = [p.grad for p in method.vae.decoder.parameters()]
    assert all(g is not None and g.isfinite().all() for g in decoder) and any(g.any() for g in decoder)
    assert all(p.grad is None for p in method.vae.encoder.parameters())
    assert backbone.model.model.layers[0].self_attn.q_proj.weight.grad.any()


# --- inference prefixes ------------------------------------------------------------------------------------------
def test_prompt_embeddings_are_deterministic_per_draw_and_differ_across_draws(arith):
    method = palette()
    sample = arith[0]
    first = [method.prompt_embeddings(sample, draw) for draw in range(3)]
    assert method.prompts_vary and torch.equal(method.prompt_embeddings(sample, 1), first[1])
    assert all(p.shape == (4, 64) for p in first)
    assert not torch.allclose(first[0], first[1]) and not torch.allclose(first[1], first[2])
    assert not torch.allclose(first[0][0], first[0][1])  # independent z_l within one prefix
    fresh = palette()  # same seeds: the same draws in another process or run
    assert all(torch.equal(a, fresh.prompt_embeddings(sample, draw)) for draw, a in enumerate(first))
    assert torch.equal(fresh.prefix(sample.key, 1), first[1])
    z = draw_normal(sample.key, 2, 0, (4, 32))
    assert torch.equal(fresh.prefix_latents(sample.key, 2), z)
    assert torch.allclose(first[2], method.vae.decode(z)[:, 0], atol=1e-6)
    assert not torch.allclose(method.prefix(arith[1].key, 0), first[0])
    other_seed = palette(seeds={"prefix": 1})
    assert not torch.allclose(other_seed.prefix(sample.key, 0), first[0])
    repeated = palette(prefix_sampling="repeated").prefix(sample.key, 0)
    assert repeated.shape == (4, 64) and torch.equal(repeated[0], repeated[3])


def test_noise_prefix_uses_the_decoder_at_initialisation(arith):
    method = palette(prefix="noise_prefix")
    key = arith[0].key
    before = method.prefix(key, 0)
    with torch.no_grad():  # "training" moves the VAE; the baseline's decoder stays the initial one
        for parameter in method.vae.parameters():
            parameter.add_(1.0)
    assert torch.equal(method.prefix(key, 0), before)
    z = draw_normal(key, 0, 0, (4, 32))
    initial = build_vae(PaletteConfig(), 64)
    assert torch.allclose(before, initial.decode(z)[:, 0], atol=1e-6)
    latent = palette()
    with torch.no_grad():
        for parameter in latent.vae.parameters():
            parameter.add_(1.0)
    assert not torch.allclose(latent.prefix(key, 0), before)


def test_raw_noise_matches_the_token_embedding_scale(arith):
    method = palette(prefix="raw_noise")
    vectors = torch.stack([method.prefix(("d", f"s{i}"), 0) for i in range(200)])
    assert vectors.shape == (200, 4, 64)
    table = method.backbone.model.get_input_embeddings().weight.detach()
    assert embedding_rms(method.backbone) == pytest.approx(float(table.pow(2).mean().sqrt()))
    assert float(vectors.std()) == pytest.approx(embedding_rms(method.backbone), rel=0.05)
    assert abs(float(vectors.mean())) < 0.05 * embedding_rms(method.backbone)
    scaled = palette(prefix="raw_noise", raw_noise_std=2.0).prefix(("d", "s0"), 0)
    assert torch.allclose(scaled / 2.0, vectors[0] / embedding_rms(method.backbone), atol=1e-5)
    nothing = palette(prefix="none")
    assert nothing.prompt_embeddings(arith[0]) is None and not nothing.prompts_vary
    assert not nothing.prompt(arith[0]).build("a", "b").embeddings


# --- domain steering ---------------------------------------------------------------------------------------------
def test_fit_gaussian_recovers_a_known_mean_and_covariance():
    # Two points by hand: mean (1, 2), unbiased covariance [[2, 4], [4, 8]] (singular: the factor still gives it).
    two = torch.tensor([[0.0, 0.0], [2.0, 4.0]])
    full, diagonal = fit_gaussian(two, "full"), fit_gaussian(two, "diagonal")
    assert torch.allclose(full.mean, torch.tensor([1.0, 2.0]))
    assert torch.allclose(full.covariance, torch.tensor([[2.0, 4.0], [4.0, 8.0]]), atol=1e-5)
    assert torch.allclose(diagonal.factor, torch.tensor([2.0, 8.0]).sqrt())
    # Many draws of a known Gaussian.
    generator = torch.Generator().manual_seed(0)
    mean = torch.tensor([1.0, -2.0, 0.5])
    root = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [-0.3, 0.2, 0.4]])
    latents = mean + torch.randn(40_000, 3, generator=generator) @ root.T
    fitted = fit_gaussian(latents, "full")
    assert torch.allclose(fitted.mean, mean, atol=0.02)
    assert torch.allclose(fitted.covariance, root @ root.T, atol=0.03)
    diag = fit_gaussian(latents, "diagonal")
    assert torch.allclose(diag.covariance, torch.diag(torch.diag(root @ root.T)), atol=0.03)
    # Sampling through it gives that Gaussian back.
    draws = fitted.transform(torch.randn(40_000, 3, generator=generator))
    assert torch.allclose(torch.cov(draws.T), root @ root.T, atol=0.03)
    with pytest.raises(Exception, match="at least 2 samples"):
        fit_gaussian(latents[:1], "full")


def test_fit_domain_saves_a_gaussian_that_steers_the_prefix(arith, tmp_path):
    method = palette()
    path = tmp_path / "domains" / "arith.safetensors"
    gaussian = fit_domain(method, arith, path, batch_size=4)
    mu = method.encode_samples(arith)
    assert mu.shape == (6, 32)
    assert torch.allclose(gaussian.mean, mu.mean(0), atol=1e-5)
    assert torch.allclose(gaussian.factor, mu.std(0), atol=1e-5)
    steered = palette(domain=path)
    key = arith[0].key
    expected = gaussian.mean + gaussian.factor * draw_normal(key, 0, 0, (4, 32))
    assert torch.allclose(steered.prefix_latents(key, 0), expected, atol=1e-6)
    assert torch.allclose(steered.prefix(key, 0), steered.vae.decode(expected)[:, 0], atol=1e-6)
    with pytest.raises(ConfigError, match="over 32 latent dimensions but method.latent_size=8"):
        DomainGaussian.load(path, 8)
    with pytest.raises(ConfigError, match="does not exist"):
        palette(domain=tmp_path / "missing.safetensors")


# --- VL placement and M-RoPE -------------------------------------------------------------------------------------
def test_vl_prefix_sits_after_the_image_with_text_positions(zoom):
    config = {"prefix_decoder": "transformer", "latent_size": 16, "prefix_tokens": 4, "decoder_width": 16}
    method = palette("tiny-qwen2.5-vl", decoder_heads=2, test_prefix_length=1, **config)
    backbone = method.backbone
    sample = zoom[0]
    for layout in (method.layout(sample, "warmup"), method.prompt(sample).build("p", "d")):
        (image,) = layout.images  # the auxiliary image is dropped
        (slot,) = layout.embeddings
        assert slot.vectors.shape == (4, 64)
        assert layout.input_ids[image.end] == backbone.token_id(backbone.chat.vision_end)
        assert slot.start == image.end + 1
        positions = layout.position_ids
        assert positions.shape[0] == 3
        assert torch.equal(positions, backbone.position_ids(layout.input_ids, [image.image.grid_thw]))
        prefix = positions[:, slot.start : slot.start + 4]
        assert (prefix == prefix[0]).all()  # a text position on all three axes
        first = int(positions[:, : slot.start].max()) + 1
        assert prefix[0].tolist() == list(range(first, first + 4))
        assert positions[0, slot.start + 4] == first + 4  # the question text goes on from there
    batch = collate([method.layout(s, "warmup") for s in zoom], backbone.tokenizer.pad_token_id)
    assert torch.isfinite(method.loss(backbone, batch, "warmup", StageProgress(0, 1)).loss)
    vae_batch = collate([method.layout(s, "vae") for s in zoom], backbone.tokenizer.pad_token_id)
    method.loss(backbone, vae_batch, "vae", StageProgress(0, 1)).loss.backward()
    missing = [n for n, p in method.vae.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing
    assert all(p.grad is None for p in backbone.model.parameters())


# --- RL: a rollout replays under its own prefix ------------------------------------------------------------------
def test_rollout_log_probs_are_recomputed_under_its_own_prefix(arith):
    method = palette()
    backbone = method.backbone
    params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=3)
    prompts = [method.prompt(s).build(s.sample_id, s.dataset) for s in arith[:2]]
    trajectories = decode(backbone, prompts, params)
    with torch.no_grad():
        replayed = method.log_probs(backbone, trajectories, params)
    for trajectory, log_probs in zip(trajectories, replayed):
        assert torch.allclose(log_probs, torch.tensor(trajectory.log_probs), atol=1e-4)
    # Another prefix in the same prompt changes them: the replay reads the rollout's own vectors.
    for trajectory in trajectories:
        slot = trajectory.prompt.embeddings[0]
        trajectory.prompt.embeddings[0] = type(slot)(slot.start, slot.vectors * 50.0, slot.segment_index)
    with torch.no_grad():
        moved = token_log_probs(backbone, trajectories, params)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(moved, replayed))


@pytest.mark.parametrize(
    ("schedule", "step", "prefixed"),
    [("two_phase", 4, 4), ("two_phase", 5, 0), ("linear", 0, 4), ("linear", 5, 2), ("linear", 9, 0)],
)
def test_rl_rollouts_follow_the_exploration_schedule(arith, schedule, step, prefixed):
    """rho(tau) of each group (tau = step / 10; G = 4, round half up) carries an L = 8 prefix of fresh z from the
    step's seed; the others none; the latent-necessity re-roll none at all."""
    method = palette(rl_schedule=schedule)
    sample, progress = arith[0], StageProgress(step, 10)
    builders = method.rollout_prompts(sample, 4, progress, seed=7)
    layouts = [b.build(sample.sample_id, sample.dataset) for b in builders]
    carried = [layout.embeddings for layout in layouts]
    assert [len(slots) for slots in carried] == [1] * prefixed + [0] * (4 - prefixed)
    for draw, slots in enumerate(carried[:prefixed]):
        z = draw_normal(sample.key, draw, 7, (8, method.config.latent_size), "rl")
        with torch.no_grad():
            expected = method.vae.decode(z).reshape(-1, method.backbone.hidden_size)
        torch.testing.assert_close(slots[0].vectors, expected)
    if prefixed >= 2:
        assert not torch.allclose(carried[0][0].vectors, carried[1][0].vectors)
        again = method.rollout_prompts(sample, 4, progress, seed=8)[0].build(sample.sample_id, sample.dataset)
        assert not torch.allclose(again.embeddings[0].vectors, carried[0][0].vectors)  # fresh z every step
    free = method.rollout_prompts(sample, 4, progress, seed=7, latents=False)
    assert all(not b.build(sample.sample_id, sample.dataset).embeddings for b in free)


# --- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "message"),
    [
        ({"latent_size": 0}, "latent_size"),
        (
            {"prefix_decoder": "transformer", "latent_size": 30},
            "latent_size=30 is not a multiple of prefix_tokens=8",
        ),
        (
            {"prefix_decoder": "transformer", "decoder_heads": 3},
            "decoder_width=256 is not a multiple of decoder_heads=3",
        ),
        ({"prefix": "raw_noise", "domain": "d.safetensors"}, "prefix='raw_noise' has none"),
        ({"prefix_sampling": "sometimes"}, "prefix_sampling"),
        ({"encoder_widths": [64, 0]}, "encoder_widths"),
        ({"raw_noise_std": -1.0}, "raw_noise_std"),
    ],
)
def test_bad_config_values_are_one_line_errors(method, message):
    with pytest.raises(ConfigError, match=message) as caught:
        build_config(PaletteConfig, {"method": method}, "c.yaml")
    assert "\n" not in str(caught.value)


def test_tiny_config_is_the_method_default_and_registered():
    assert get_method("palette") is Palette
    raw = yaml.safe_load((REPO / "configs" / "palette" / "tiny.yaml").read_text())
    assert PaletteConfig.model_validate(raw["method"]) == PaletteConfig()
    assert raw["model"]["preset"] == "tiny-causal-lm" and raw["data"]["task"] == "synth-arith"


def test_bad_domain_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; fit one with fit_domain first"):
        palette(domain=str(tmp_path / "missing.safetensors"))
    with pytest.raises(Exception, match="domain_by='split' must be dataset, metadata.<field> or null"):
        PaletteConfig(domain_by="split")
