"""Reasoning Palette (arXiv 2512.17206): stage `vae` fits a VAE to the mean input embedding h of each
[question; answer] with the language model frozen; stage `warmup` is a short SFT with a prefix D(z), z from the
prior, so the model stays responsive to z. At inference the prompt carries p = [D(z_1), ..., D(z_L)] right after
the question's last image (or opening the user turn), each prompt of a sample with its own z.

Stage `rl` (`latentkit.rl`, GRPO or RLOO by `train.rl.estimator`) explores with the prefixes: at training
progress tau a fraction rho(tau) of each group's rollouts (`schedules.py`) gets an L = 8 prefix of fresh z. A
rollout's prompt layout holds its prefix vectors in its embedding slot, so its trajectory replays and recomputes
log-probs under that same prefix (`latentkit.decoding.replay`); `stage_freeze` keeps the VAE (module group
`method`) frozen in every stage but `vae`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from latentkit.methods.palette.config import PaletteConfig
from latentkit.methods.palette.domain import DomainGaussian, draw_normal, fit_domains
from latentkit.methods.palette.layout import content_layout, prefixed_layout
from latentkit.methods.palette.losses import vae_loss, vae_terms
from latentkit.methods.palette.schedules import palette_rho, prefixed_count
from latentkit.methods.palette.vae import PaletteVAE, build_vae, mean_embedding
from torch import Tensor

from latentkit.backbone import Backbone
from latentkit.errors import ConfigError
from latentkit.layout import Batch, Layout, LayoutBuilder, collate, inputs_embeds
from latentkit.losses import weighted_next_token_ce
from latentkit.registry import LossOutput, Method, StageContext, StageKind, StageProgress
from latentkit.segments import Sample, SampleKey

DOMAINS = "domains"  # stages/vae/domains/<domain>.safetensors


def embedding_rms(backbone: Backbone) -> float:
    """The root mean square of the token-embedding table's entries: a token embedding's scale per coordinate."""
    return float(backbone.model.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())


@dataclass(frozen=True)
class PrefixDraws:
    """Which z a prefix is decoded from: `length` draws (L), under `seed`, in the random stream `stream`."""

    length: int
    seed: int
    stream: str


class Palette(Method):
    Config = PaletteConfig
    stages = ("vae", "warmup", "rl")
    stage_kinds: ClassVar[dict[str, StageKind]] = {"rl": "rl"}
    config: PaletteConfig
    # The embedded default (configs/palette/tiny.yaml): the tiny text model on synth-arith; a short warm-up, then
    # a short RL stage with the exploration schedule.
    run_defaults: ClassVar[dict[str, Any]] = {
        "model": {"preset": "tiny-causal-lm"},
        "data": {"task": "synth-arith"},
        "train": {
            "stages": {
                "vae": {"steps": 300, "lr": 1.0e-3},
                "warmup": {"steps": 10, "lr": 1.0e-3, "warmup_steps": 0, "schedule": "constant"},
                "rl": {"steps": 20, "batch_size": 4, "lr": 1.0e-4, "warmup_steps": 0, "schedule": "constant"},
            }
        },
    }

    def __init__(self, config: PaletteConfig):
        super().__init__(config)
        self.domain: DomainGaussian | None = None
        self.posteriors: dict[SampleKey, tuple[Tensor, Tensor]] = {}  # warmup_latents=posterior: (mu, logvar)

    def setup(self, backbone: Backbone) -> None:
        super().setup(backbone)
        backbone.add_tokens(list(self.config.observation_tags))
        self.modules["vae"] = build_vae(self.config, backbone.hidden_size).to(backbone.device)
        if self.config.domain is not None:
            self.domain = DomainGaussian.load(self.config.domain, self.config.latent_size)

    @property
    def vae(self) -> PaletteVAE:
        return self.modules["vae"]  # type: ignore[return-value]

    @cached_property
    def initial_vae(self) -> PaletteVAE:
        """The VAE at initialisation (re-created from `seeds.init`): `noise_prefix`'s untrained decoder, its output
        mapped to the embedding space by the trained VAE's input statistics."""
        initial = build_vae(self.config, self.backbone.hidden_size).to(self.backbone.device).eval()
        initial.set_input_statistics(self.vae.input_mean, self.vae.input_scale)
        return initial

    def prepare_stage(self, stage: str, context: StageContext) -> None:
        """Stage vae: h's corpus statistics (`standardize_input`). Warmup: the VAE is final (warmup keeps it
        frozen), so fit the domain Gaussians."""
        if stage == "vae" and self.config.standardize_input:
            h = self.mean_embeddings(context.samples).double()
            mean, scale = h.mean(0), h.std(0).clamp_min(1e-6)
            self.vae.set_input_statistics(self._to_vae(mean), self._to_vae(scale))
            context.log(
                {"event": "vae_input_statistics", "samples": len(h), "mean_scale": float(scale.mean())}
            )
        if stage == "warmup" and self.config.warmup_latents == "posterior":
            with torch.no_grad():
                mu, logvar = self.vae.encode(self._to_vae(self.mean_embeddings(context.samples)))
            self.posteriors = {
                s.key: (m.float().cpu(), v.float().cpu()) for s, m, v in zip(context.samples, mu, logvar)
            }
        if stage != "warmup" or self.config.domain_by is None:
            return
        folder = context.run_dir / "stages" / "vae" / DOMAINS
        if context.is_main_process:
            fitted = fit_domains(self, context.samples, folder, self.config.domain_by)
            context.log({"event": "domains_fitted", "by": self.config.domain_by, "domains": fitted})
            print(
                f"palette: {len(fitted)} domain Gaussians by {self.config.domain_by} in {folder} "
                f"({', '.join(f'{name}: {count}' for name, count in fitted.items())}); steer with method.domain=<file>"
            )
        context.barrier()

    def stage_freeze(self, stage: str) -> tuple[str, ...]:
        # vae: h is the frozen model's embeddings; every other stage (RL ones included) keeps the VAE fixed.
        return tuple(self.backbone.module_groups()) if stage == "vae" else ("method",)

    # --- layouts ----------------------------------------------------------------------------------------------
    def layout(self, sample: Sample, stage: str) -> Layout:
        if stage == "vae":
            return content_layout(self.backbone, sample)
        # Zeros that reserve the prefix positions; the loss writes D(z) there (layouts may be built in workers).
        size = self.config.train_prefix_length * self.config.vectors_per_latent
        reserved = torch.zeros(size, self.backbone.hidden_size)
        return prefixed_layout(self.backbone, sample, reserved, self.config.observation_tags)

    # --- losses -----------------------------------------------------------------------------------------------
    def loss(self, backbone: Backbone, batch: Batch, stage: str, progress: StageProgress) -> LossOutput:
        if stage == "vae":
            return self._vae_loss(backbone, batch)
        return self._warmup_loss(backbone, batch, progress)

    def _vae_loss(self, backbone: Backbone, batch: Batch) -> LossOutput:
        out = self.vae(self._to_vae(mean_embedding(backbone, batch)))
        loss = vae_loss(out.h, out.h_hat, out.mu, out.logvar, self.config.beta)
        recon, kl = vae_terms(out.h, out.h_hat.detach(), out.mu.detach(), out.logvar.detach())
        return LossOutput(loss, {"recon": float(recon), "kl": float(kl)})

    def _warmup_loss(self, backbone: Backbone, batch: Batch, progress: StageProgress) -> LossOutput:
        """LM loss with D(z) written into each row's prefix slot, z drawn per (sample, step) from the prior, or
        with `warmup_latents=posterior` from q(z | h) of the sample itself."""
        length = self.config.train_prefix_length
        eps = [
            self._latents(key, progress.step, self.config.seeds.warmup, "warmup", length)
            for key in batch.keys
        ]
        if self.config.warmup_latents == "posterior":
            eps = [self._posterior(key, e) for key, e in zip(batch.keys, eps)]
        z = torch.stack(eps)
        prefix = self.vae.decode(self._to_vae(z.flatten(0, 1))).reshape(
            len(batch.keys), -1, backbone.hidden_size
        )
        slots = torch.zeros_like(batch.valid)
        for row, layout in enumerate(batch.layouts):
            (slot,) = layout.embeddings
            slots[row, slot.start : slot.start + slot.vectors.shape[0]] = True
        embeds = inputs_embeds(backbone, batch)
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), prefix.to(embeds.dtype))
        hidden = backbone.forward(embeds, batch.position_ids, self.mask(batch, "warmup")).last_hidden_state
        loss, targets = weighted_next_token_ce(backbone, hidden, batch.labels, batch.loss_weight)
        return LossOutput(loss, {"target_tokens": float(targets)})

    def _posterior(self, key: SampleKey, eps: Tensor) -> Tensor:
        if key not in self.posteriors:
            raise ConfigError(
                f"palette: sample {key} has no posterior; prepare_stage('warmup') encodes them first"
            )
        mu, logvar = self.posteriors[key]
        return mu + (0.5 * logvar).exp() * eps

    def _to_vae(self, x: Tensor) -> Tensor:
        parameter = next(self.vae.parameters())
        return x.to(device=parameter.device, dtype=parameter.dtype)

    def _latents(self, key: SampleKey, draw: int, seed: int, stream: str, length: int) -> Tensor:
        """[length, k] standard-normal z: `length` draws, or one repeated (`prefix_sampling`)."""
        count = 1 if self.config.prefix_sampling == "repeated" else length
        return draw_normal(key, draw, seed, (count, self.config.latent_size), stream).expand(length, -1)

    # --- inference --------------------------------------------------------------------------------------------
    def prefix_latents(self, key: SampleKey, draw: int, draws: PrefixDraws | None = None) -> Tensor:
        """z [L, k] of a sample's `draw`-th prompt (L, seed and stream from `draws`; default the inference ones:
        L = test_prefix_length, seeds.prefix): from the prior N(0, I), or from the domain Gaussian when steering;
        a pure function of (key, draw, draws, domain)."""
        draws = draws or self.inference_draws
        eps = self._latents(key, draw, draws.seed, draws.stream, draws.length)
        return eps if self.domain is None else self.domain.transform(eps)

    def prefix(self, key: SampleKey, draw: int, draws: PrefixDraws | None = None) -> Tensor:
        """The prompt vectors [L * n, d] of a sample's `draw`-th prompt under `method.prefix` (n: vectors per z):
        D(z) (latent), D0(z) with the decoder at initialisation (noise_prefix), or N(0, s^2) vectors with s the
        token embeddings' RMS or `raw_noise_std` (raw_noise)."""
        config, hidden_size = self.config, self.backbone.hidden_size
        draws = draws or self.inference_draws
        if config.prefix == "raw_noise":
            shape = (draws.length * config.vectors_per_latent, hidden_size)
            std = config.raw_noise_std or embedding_rms(self.backbone)
            stream = "raw_noise" if draws.stream == "prefix" else f"raw_noise:{draws.stream}"
            return (std * draw_normal(key, draw, draws.seed, shape, stream)).to(self.backbone.device)
        vae = self.vae if config.prefix == "latent" else self.initial_vae
        with torch.no_grad():
            vectors = vae.decode(self._to_vae(self.prefix_latents(key, draw, draws)))
        return vectors.reshape(-1, hidden_size).float().to(self.backbone.device)

    @property
    def inference_draws(self) -> PrefixDraws:
        return PrefixDraws(self.config.test_prefix_length, self.config.seeds.prefix, "prefix")

    def rollout_prompts(
        self, sample: Sample, group: int, progress: StageProgress, seed: int, latents: bool = True
    ) -> list[LayoutBuilder]:
        """RL with the exploration schedule: the first round(rho(tau) * G) rollouts of a group carry an
        L = `rl_prefix_length` prefix of fresh z (drawn from the step's `seed`), the others none; without
        latents (the necessity re-roll), none carries a prefix."""
        config = self.config
        if not latents or config.prefix == "none":
            return [self.prompt_with(sample, None) for _ in range(group)]
        prefixed = prefixed_count(group, palette_rho(progress.fraction, config.rl_schedule))
        draws = PrefixDraws(config.rl_prefix_length, seed, "rl")
        return [
            self.prompt_with(sample, self.prefix(sample.key, draw, draws) if draw < prefixed else None)
            for draw in range(group)
        ]

    def prompt_embeddings(self, sample: Sample, draw: int = 0) -> Tensor | None:
        """The prefix of this sample's `draw`-th answer: k answers of one sample (latent pass@k) carry k
        different z, the same in every run."""
        return None if self.config.prefix == "none" else self.prefix(sample.key, draw)

    @property
    def prompts_vary(self) -> bool:
        return self.config.prefix != "none"

    def prompt_info(self, sample: Sample, draw: int = 0) -> dict[str, Any]:
        """The prefix as `latentkit generate` shows it: mode, L (draws of z), draw index, and the z behind it."""
        config = self.config
        if config.prefix == "none":
            return {"prefix": "none"}
        info: dict[str, Any] = {"prefix": config.prefix, "L": config.test_prefix_length, "draw": draw}
        if config.prefix != "raw_noise":
            info["z"] = [[round(v, 3) for v in row] for row in self.prefix_latents(sample.key, draw).tolist()]
        if config.domain is not None:
            info["domain"] = str(config.domain)
        return info

    def mean_embeddings(self, samples: Sequence[Sample], batch_size: int = 16) -> Tensor:
        """h [n, d] of each sample (CPU, float32)."""
        pad_id = self.backbone.tokenizer.pad_token_id
        out = []
        for start in range(0, len(samples), batch_size):
            layouts = [content_layout(self.backbone, s) for s in samples[start : start + batch_size]]
            batch = collate(layouts, pad_id).to(self.backbone.device)
            out.append(mean_embedding(self.backbone, batch).float().cpu())
        return torch.cat(out)

    def encode_samples(self, samples: Sequence[Sample], batch_size: int = 16) -> Tensor:
        """mu [n, k] of each sample's h under the current encoder (CPU, float32)."""
        with torch.no_grad():
            mu, _ = self.vae.encode(self._to_vae(self.mean_embeddings(samples, batch_size)))
        return mu.float().cpu()
