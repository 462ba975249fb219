"""Monet (arXiv 2511.21395): stage `warmup` (interleaved SFT, observation weight x2), stage `distill` (latents
after each auxiliary image under the controlled mask, aligned to the frozen warm-up model's observation
representations by latent-only backprop), stage `latent` (from the warm-up weights, auxiliary images replaced
by latents aligned to the distill model's latents), stage `vlpo` (RL from the latent model, `latentkit.rl`, with
latent steps as Gaussian actions). Decoding: `latentkit.latent.LatentPolicy`.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from latentkit.methods.monet.channel import latent_conditions, with_aux_correct
from latentkit.methods.monet.config import MonetConfig
from latentkit.methods.monet.layout import latent_layout, observation_positions, stage2_mask, teacher_layout
from latentkit.methods.monet.losses import alignment_loss, latent_only_proxy
from latentkit.methods.sft.method import sft_loss

from latentkit.backbone import Backbone
from latentkit.backbone.lora import unwrap_lora
from latentkit.checkpoint import METHOD_FILE, load_model_weights, model_fingerprint
from latentkit.decoding import SamplingParams, Trajectory, action_log_probs
from latentkit.errors import CheckpointError
from latentkit.latent import FilledLatents, LatentPolicy, LatentTokens, fill_latents
from latentkit.latent.fill import Feedback
from latentkit.layout import Batch, Layout, collate, inputs_embeds, latent_slot_positions
from latentkit.losses import weighted_next_token_ce
from latentkit.masks import MaskSpec
from latentkit.registry import LossOutput, Method, StageContext, StageKind, StageProgress
from latentkit.representation_cache import RepresentationCache, cache_fingerprint, ensure_cache, fingerprint
from latentkit.rl.losses import gaussian_logprob
from latentkit.rl.rewards import MONET_REWARDS
from latentkit.segments import Sample, SampleKey

TEACHER = "teacher"
TARGETS = "targets"


class Monet(Method):
    Config = MonetConfig
    stages = ("warmup", "distill", "latent", "vlpo")
    stage_kinds: ClassVar[dict[str, StageKind]] = {"vlpo": "rl"}
    # VLPO's rewards: 0.9 accuracy + 0.1 format (the official code's weights); on the embedded default
    # (configs/monet/tiny.yaml) a short stage vlpo of 4 prompts x 8 rollouts per step.
    run_defaults: ClassVar[dict[str, Any]] = {
        "train": {
            "rl": {"rewards": [spec.model_dump() for spec in MONET_REWARDS]},
            "stages": {
                "vlpo": {
                    "steps": 100,
                    "batch_size": 4,
                    "lr": 1.0e-4,
                    "warmup_steps": 0,
                    "schedule": "constant",
                }
            },
        }
    }
    config: MonetConfig

    def __init__(self, config: MonetConfig):
        super().__init__(config)
        self.caches: dict[str, RepresentationCache] = {}
        self.centres: dict[str, torch.Tensor] = {}  # per cache, its mean (alignment_centre)

    def setup(self, backbone: Backbone) -> None:
        super().setup(backbone)
        backbone.add_tokens([*self.config.latent_tokens, *self.config.observation_tags])

    def stage_init(self, stage: str) -> str | None:
        # Stage 2 starts from (and its teacher is) the warm-up model; stage 3 starts from it too, not from stage 2.
        return "warmup" if stage in ("distill", "latent") else None

    # --- layouts and masks ------------------------------------------------------------------------------
    def layout(self, sample: Sample, stage: str) -> Layout:
        if stage == "warmup":
            return teacher_layout(self.backbone, sample, self.config)
        return latent_layout(self.backbone, sample, self.config, keep_aux_images=stage == "distill")

    def mask(self, batch: Batch, stage: str) -> MaskSpec:
        return (
            stage2_mask(batch, self.config.start_sees_image)
            if stage == "distill"
            else super().mask(batch, stage)
        )

    # --- stage artifacts ----------------------------------------------------------------------------------
    def prepare_stage(self, stage: str, context: StageContext) -> None:
        stages_dir = context.run_dir / "stages"
        if stage == "distill" and self.config.observation_alignment:
            expected = self._fingerprint(TEACHER, stages_dir / "warmup" / "final", context.samples)
            self.caches[TEACHER] = ensure_cache(
                context.stage_dir / TEACHER,
                TEACHER,
                expected,
                context.samples,
                self.teacher_representations,
                self.config.cache_batch_size,
                context,
            )
            self._centre(TEACHER, context.samples, 1)
        elif stage == "latent":
            expected = self._fingerprint(TARGETS, stages_dir / "distill" / "final", context.samples)
            directory = stages_dir / "distill" / TARGETS
            rebuild = cache_fingerprint(directory) != expected
            if rebuild:
                context.load_stage_weights("distill")  # the targets come from the stage-2 model
            self.caches[TARGETS] = ensure_cache(
                directory,
                TARGETS,
                expected,
                context.samples,
                self.target_latents,
                self.config.cache_batch_size,
                context,
            )
            if rebuild:
                context.load_stage_weights("warmup")  # back to this stage's initial weights
            self._centre(TARGETS, context.samples, self.config.num_latents)

    def _centre(self, kind: str, samples: list[Sample], period: int) -> None:
        """With `alignment_centre`, the mean of the `kind` cache over `samples`: [layers, period, D], the vector at
        token j averaged over every j' = j mod `period` (1: one mean per layer; K: one per latent slot)."""
        if self.config.alignment_centre:
            self.centres[kind] = cache_mean(self.caches[kind], [sample.key for sample in samples], period)

    def _centred(self, kind: str, items: list[torch.Tensor]) -> list[torch.Tensor]:
        if kind not in self.centres:
            return items
        centre = self.centres[kind]
        return [item - centre.to(item).repeat(1, item.shape[1] // centre.shape[1], 1) for item in items]

    def _fingerprint(self, kind: str, weights_dir, samples: list[Sample]) -> str:
        if not weights_dir.is_dir():
            raise CheckpointError(
                f"{weights_dir} is missing: run the stage that writes it first (train.stage=...)"
            )
        settings = {
            "kind": kind,
            "config": self.config.model_dump(mode="json", exclude={"cache_batch_size"}),
            "dtype": str(self.backbone.model.dtype),
            "attn_backend": self.backbone.attn_backend,
        }
        return fingerprint(model_fingerprint(weights_dir, None), samples, settings)

    @torch.no_grad()
    def teacher_representations(self, samples: list[Sample]) -> list[torch.Tensor]:
        """Stage 2 step 1: every layer's hidden states at the observation positions of the stage-1 sequence."""
        backbone = self.backbone
        layouts = [teacher_layout(backbone, sample, self.config) for sample in samples]
        batch = collate(layouts, backbone.tokenizer.pad_token_id).to(backbone.device)
        with _eval_mode(backbone):
            out = backbone.forward(
                inputs_embeds(backbone, batch),
                batch.position_ids,
                super().mask(batch, "warmup"),
                output_hidden_states=True,
            )
        close = backbone.token_id(self.config.observation_tags[1])
        return _gather(out.hidden_states, layouts, lambda layout: observation_positions(layout, close))

    @torch.no_grad()
    def target_latents(self, samples: list[Sample]) -> list[torch.Tensor]:
        """Stage 2 output: the stage-2 model in latent mode, auxiliary images visible under the controlled mask;
        every layer's hidden states at every latent slot."""
        backbone = self.backbone
        layouts = [latent_layout(backbone, sample, self.config, keep_aux_images=True) for sample in samples]
        batch = collate(layouts, backbone.tokenizer.pad_token_id).to(backbone.device)
        mask = stage2_mask(batch, self.config.start_sees_image)
        with _eval_mode(backbone):
            embeds = inputs_embeds(backbone, batch)
            filled = self.fill_batch(batch, embeds, mask, "none")
            out = backbone.forward(filled.write(embeds), batch.position_ids, mask, output_hidden_states=True)
        return _gather(out.hidden_states, layouts, _slot_index)

    # --- losses -------------------------------------------------------------------------------------------
    def loss(self, backbone: Backbone, batch: Batch, stage: str, progress: StageProgress) -> LossOutput:
        if stage == "warmup":
            return sft_loss(self, backbone, batch, stage)
        if stage == "distill":
            return self._distill_loss(backbone, batch)
        return self._latent_loss(backbone, batch)

    def fill_batch(
        self, batch: Batch, embeds: torch.Tensor, mask: MaskSpec, feedback: Feedback | None = None
    ) -> FilledLatents:
        """Forward 1: every latent slot of the batch filled by hidden-state feedback under `mask`, with the
        gradient `feedback` says (default `fill_gradient`)."""
        slots = [latent_slot_positions(layout) for layout in batch.layouts]
        lengths = [len(layout) for layout in batch.layouts]
        feedback = feedback or self.config.fill_gradient
        return fill_latents(self.backbone, embeds, batch.position_ids, mask, slots, lengths, feedback)

    def _cache(self, kind: str) -> RepresentationCache:
        if kind not in self.caches:
            raise CheckpointError(
                f"monet: the {kind} cache is not loaded; prepare_stage must run before the loss"
            )
        return self.caches[kind]

    def _distill_loss(self, backbone: Backbone, batch: Batch) -> LossOutput:
        """Stage 2: forward 1 fills the latents; forward 2 reads them; CE + alpha * latent-only alignment.

        CE backpropagates through forward 2 and, through the latents, into forward 1. With latent-only backprop,
        forward 2 reads `latents - latents.detach() + leaf` (the latents' value and graph, plus a leaf), so the
        alignment's gradient at the latents is read off the leaf and sent into forward 1 alone (proxy).
        """
        config = self.config
        mask = stage2_mask(batch, config.start_sees_image)
        embeds = inputs_embeds(backbone, batch)
        filled = self.fill_batch(batch, embeds, mask)
        latents = filled.values
        latent_only = config.observation_alignment and config.latent_only_backprop
        leaf = latents.detach().requires_grad_(True)
        latent_inputs = latents - latents.detach() + leaf if latent_only else latents
        out = backbone.forward(
            FilledLatents(latent_inputs, filled.positions).write(embeds),
            batch.position_ids,
            mask,
            output_hidden_states=config.observation_alignment,
        )
        ce, targets = weighted_next_token_ce(backbone, out.last_hidden_state, batch.labels, batch.loss_weight)
        metrics = {"ce": float(ce.detach()), "target_tokens": float(targets)}
        if not config.observation_alignment:
            return LossOutput(ce, metrics)
        close = backbone.token_id(config.observation_tags[1])
        teachers = [t.to(embeds.device) for t in self._cache(TEACHER).get(batch.keys)]
        students = _gather(out.hidden_states, batch.layouts, lambda l: observation_positions(l, close))
        align = alignment_loss(
            self._centred(TEACHER, students), self._centred(TEACHER, teachers), config.cosine_axis
        )
        metrics["align"] = float(align.detach())
        if latent_only:
            proxy = latent_only_proxy(latents, leaf, align)
            # The value reported is CE + alpha * L_align; the gradient is that of CE + alpha * proxy.
            align = proxy - proxy.detach() + align.detach()
        return LossOutput(ce + config.alignment_weight * align, metrics)

    def _latent_loss(self, backbone: Backbone, batch: Batch) -> LossOutput:
        """Stage 3: latents filled with gradient (`fill_gradient`); CE + weight * alignment of the latent positions
        to the targets, ordinary backprop."""
        mask = super().mask(batch, "latent")
        embeds = inputs_embeds(backbone, batch)
        filled = self.fill_batch(batch, embeds, mask)
        out = backbone.forward(filled.write(embeds), batch.position_ids, mask, output_hidden_states=True)
        ce, targets = weighted_next_token_ce(backbone, out.last_hidden_state, batch.labels, batch.loss_weight)
        goals = [t.to(embeds.device) for t in self._cache(TARGETS).get(batch.keys)]
        students = _gather(out.hidden_states, batch.layouts, _slot_index)
        align = alignment_loss(self._centred(TARGETS, students), self._centred(TARGETS, goals), "hidden")
        loss = ce + self.config.target_alignment_weight * align
        metrics = {"ce": float(ce.detach()), "align": float(align.detach()), "target_tokens": float(targets)}
        return LossOutput(loss, metrics)

    # --- diagnostics --------------------------------------------------------------------------------------
    def oracle_latents(self, samples: list[Sample], run_dir: Path | None) -> list[torch.Tensor] | None:
        """Per sample [blocks, K, D]: the stage-2 targets' last layer (the stage-2 model's hidden states at the
        latent slots, made with the auxiliary images visible). Samples in the run's target cache (the training
        samples) are read from it; the others are computed by the run's stage-2 model, swapped in for the pass.
        None without a run, without its stage-2 model, or when a sample has no auxiliary image."""
        if run_dir is None or not all(sample.has_aux_images for sample in samples):
            return None
        distill_final = run_dir / "stages" / "distill" / "final"
        if not (distill_final / METHOD_FILE).is_file():
            return None
        directory = run_dir / "stages" / "distill" / TARGETS
        found: dict[SampleKey, torch.Tensor] = {}
        if cache_fingerprint(directory) is not None:
            cache = RepresentationCache(directory)
            cached = [sample.key for sample in samples if sample.key in cache.index]
            found.update(zip(cached, cache.get(cached)))
        missing = [sample for sample in samples if sample.key not in found]
        if missing:
            with swapped_weights(self.backbone, distill_final):
                size = self.config.cache_batch_size
                for start in range(0, len(missing), size):
                    chunk = missing[start : start + size]
                    found.update(zip((s.key for s in chunk), self.target_latents(chunk)))
        size = self.config.num_latents
        return [found[sample.key][-1].reshape(-1, size, found[sample.key].shape[-1]) for sample in samples]

    def latent_channel(
        self, samples: list[Sample], run_dir: Path | None
    ) -> dict[str, list[bool | None]] | None:
        """Teacher-forced channel check (`latentkit.methods.monet.channel`): the warm-up model with the auxiliary
        images (`with_aux`); the distill model in its own layout with its latents (`oracle`) or dummies."""
        if run_dir is None or not all(sample.has_aux_images for sample in samples):
            return None
        stages = run_dir / "stages"
        warmup, distill = stages / "warmup" / "final", stages / "distill" / "final"
        if not all((folder / METHOD_FILE).is_file() for folder in (warmup, distill)):
            return None
        size = self.config.cache_batch_size
        with _eval_mode(self.backbone):
            with swapped_weights(self.backbone, warmup):
                mask_of = partial(super().mask, stage="warmup")
                results = {"with_aux": with_aux_correct(self.backbone, samples, self.config, mask_of, size)}
            with swapped_weights(self.backbone, distill):
                fill = partial(self.fill_batch, feedback="none")
                results.update(latent_conditions(self.backbone, samples, self.config, fill, size))
        return results

    # --- decoding and VLPO ---------------------------------------------------------------------------------
    def decoding_policy(self) -> LatentPolicy:
        start, slot, end = (self.backbone.token_id(token) for token in self.config.latent_tokens)
        k = self.config.decode_latents or self.config.num_latents
        return LatentPolicy(
            LatentTokens(start, end, slot),
            k,
            force=self.config.decode_force,
            stop_at_end=self.config.decode_stop_at_end,
        )

    def rollout_policy(self, seed: int, latents: bool = True) -> LatentPolicy:
        """VLPO's rollouts: with `latent_actions`, each latent step declares its Gaussian log-density and feeds
        the mean or a sample (`rollout_latents`); without latents (the necessity re-roll), blocks of k = 0."""
        policy = self.decoding_policy()
        if not latents:
            return policy.varied(k=0)
        if not self.config.latent_actions:
            return policy
        sample = self.config.rollout_latents == "sample"
        return replace(policy, action_sigma=self.config.latent_sigma, sample_actions=sample, noise_seed=seed)

    def log_probs(
        self, backbone: Backbone, trajectories: list[Trajectory], params: SamplingParams
    ) -> list[torch.Tensor]:
        """Token log-probs and, with `latent_actions`, each latent's log N(z; mu_theta, sigma^2 I), mu_theta the
        replayed post-norm hidden state at the position before z (the one that produced it)."""
        density = (
            partial(gaussian_logprob, sigma=self.config.latent_sigma) if self.config.latent_actions else None
        )
        return action_log_probs(backbone, trajectories, params, density)


def cache_mean(
    cache: RepresentationCache, keys: list[SampleKey], period: int, chunk: int = 256
) -> torch.Tensor:
    """Mean of the cached [layers, n, D] tensors of `keys`, token j pooled with every j' = j mod `period`:
    [layers, period, D], in float64 and read a chunk of samples at a time."""
    total: torch.Tensor | None = None
    count = 0
    for start in range(0, len(keys), chunk):
        for tensor in cache.get(keys[start : start + chunk]):
            layers, n, dim = tensor.shape
            folded = tensor.double().reshape(layers, n // period, period, dim)
            total = folded.sum(1) if total is None else total + folded.sum(1)
            count += n // period
    if total is None or count == 0:
        raise ValueError("alignment_centre: the cache holds no vectors for these samples")
    return (total / count).float()


def _slot_index(layout: Layout) -> torch.Tensor:
    return torch.tensor(latent_slot_positions(layout), dtype=torch.long)


def _gather(hidden_states, layouts: list[Layout], positions_of) -> list[torch.Tensor]:
    """Per sample, every layer's hidden states at the given positions: [L+1, n, D]."""
    layers = torch.stack(hidden_states)
    return [layers[:, b, positions_of(layout).to(layers.device)] for b, layout in enumerate(layouts)]


class swapped_weights:
    """The backbone holds the weights of `final_dir` (an earlier stage's model) inside the block; its own after."""

    def __init__(self, backbone: Backbone, final_dir: Path):
        self.model, self.final_dir = unwrap_lora(backbone.model), final_dir

    def __enter__(self) -> None:
        self.own = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        load_model_weights(self.model, self.final_dir)

    def __exit__(self, *exc: object) -> None:
        self.model.load_state_dict(self.own)


class _eval_mode:
    """Model in eval mode for a cache pass (no dropout), restored after."""

    def __init__(self, backbone: Backbone):
        self.model = backbone.model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
