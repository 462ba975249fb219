"""VaLR (arXiv 2602.04476): stage `sft` (plain CoT SFT), stage `align` (a latent segment of K Coconut-filled
positions before every reasoning step; its hidden states at one layer, as a sqrt(K) x sqrt(K) grid upsampled to an
encoder's patch grid and projected, are aligned to the frozen encoder's patch features of the step's image: REPA).
Nothing extra runs at inference: decoding is `latentkit.latent.LatentPolicy`.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from pathlib import Path

import torch
from latentkit.methods.sft.method import sft_loss
from latentkit.methods.valr.config import ValrConfig
from latentkit.methods.valr.encoders import FrozenEncoder, encoder_width, load_encoder
from latentkit.methods.valr.layout import latent_layout, plain_layout
from latentkit.methods.valr.losses import grid_upsample, repa_loss
from latentkit.methods.valr.steps import Steps, cut_steps, sample_images
from torch import nn

from latentkit.backbone import Backbone
from latentkit.errors import CheckpointError, ConfigError
from latentkit.latent import LatentPolicy, LatentTokens, fill_latents
from latentkit.layout import Batch, Layout, inputs_embeds, latent_slot_positions
from latentkit.losses import weighted_next_token_ce
from latentkit.registry import LossOutput, Method, StageContext, StageProgress
from latentkit.representation_cache import RepresentationCache, ensure_cache, fingerprint
from latentkit.segments import Sample, SampleKey

FEATURES = "features"


def image_features(encoder: FrozenEncoder, groups: list[tuple[Path, ...]]) -> list[torch.Tensor]:
    """Per group of image files, their patch features [images, P, E] (one encoder pass for all of them)."""
    flat = [path for group in groups for path in group]
    rows, columns = encoder.grid
    features = encoder.features(flat) if flat else torch.zeros(0, rows * columns, encoder.width)
    bounds = [0]
    for group in groups:
        bounds.append(bounds[-1] + len(group))
    return [features[start:end] for start, end in pairwise(bounds)]


def projector(width: int, hidden: int, out: int) -> nn.Sequential:
    """psi: REPA's 3-layer MLP with SiLU."""
    return nn.Sequential(
        nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out)
    )


class Valr(Method):
    Config = ValrConfig
    stages = ("sft", "align")
    config: ValrConfig

    def __init__(self, config: ValrConfig):
        super().__init__(config)
        self.encoders: list[FrozenEncoder] = []  # loaded when a stage first needs features
        self.caches: list[RepresentationCache] = []
        # Per training sample of `align`: each step's target (an index into its images) and the images.
        self.plans: dict[SampleKey, tuple[tuple[int | None, ...], tuple]] = {}

    @property
    def aligned(self) -> bool:
        return self.config.alignment_weight > 0

    def setup(self, backbone: Backbone) -> None:
        super().setup(backbone)
        backbone.add_tokens([*self.config.latent_tokens, *self.config.observation_tags])
        self.align_layer = self._resolve_layer(backbone.num_layers)
        if self.aligned:
            for index, spec in enumerate(self.config.encoders):
                width = encoder_width(spec, f"method.encoders[{index}]")
                self.modules[f"projector{index}"] = projector(
                    backbone.hidden_size, spec.projector_hidden or backbone.hidden_size, width
                )

    def _resolve_layer(self, layers: int) -> int:
        choice = self.config.align_layer
        named = {"front": max(1, layers // 4), "middle": max(1, layers // 2), "last": layers}
        layer = named[choice] if isinstance(choice, str) else choice
        if layer > layers:
            raise ConfigError(
                f"method.align_layer={layer} but the model has {layers} layers; use 1..{layers}"
            )
        return layer

    def steps(self, sample: Sample) -> Steps:
        return cut_steps(sample, self.config.step_rule, self.config.step_marker)

    # --- layouts --------------------------------------------------------------------------------------------
    def layout(self, sample: Sample, stage: str) -> Layout:
        if stage == "sft":
            return plain_layout(self.backbone, sample, self.config)
        return latent_layout(self.backbone, self.steps(sample), self.config)

    # --- stage artifacts --------------------------------------------------------------------------------------
    def prepare_stage(self, stage: str, context: StageContext) -> None:
        if stage != "align":
            return
        plans = {sample.key: self.steps(sample) for sample in context.samples}
        self.plans = {key: (steps.targets, sample_images(steps.sample)) for key, steps in plans.items()}
        counts = Counter(len(steps.starts) for steps in plans.values())
        targeted = sum(target is not None for steps in plans.values() for target in steps.targets)
        total = sum(len(steps.starts) for steps in plans.values())
        context.log(
            {
                "event": "valr_steps",
                "rule": self.config.step_rule,
                "samples": len(plans),
                "steps_per_sample": {str(n): counts[n] for n in sorted(counts)},
                "steps_mean": total / max(len(plans), 1),
                "steps_with_target": targeted,
            }
        )
        if context.is_main_process:
            print(
                f"valr: {total} steps by rule {self.config.step_rule!r} over {len(plans)} samples "
                f"({min(counts, default=0)}-{max(counts, default=0)} per sample), {targeted} with a target image"
            )
        if not self.aligned:
            return
        self._load_encoders()
        if not self.config.feature_cache:
            self.caches = []
            return
        self.caches = [
            ensure_cache(
                context.stage_dir / f"{FEATURES}-{encoder.name}",
                f"{FEATURES}-{encoder.name}",
                fingerprint(
                    encoder.fingerprint,
                    context.samples,
                    {"kind": FEATURES, "dtype": self.config.feature_dtype},
                ),
                context.samples,
                lambda chunk, encoder=encoder: self._sample_features(encoder, chunk),
                self.config.cache_batch_size,
                context,
            )
            for encoder in self.encoders
        ]

    def _load_encoders(self) -> None:
        if self.encoders:
            return
        for index, spec in enumerate(self.config.encoders):
            encoder = load_encoder(spec, f"method.encoders[{index}]")
            self.add_auxiliary(f"encoder{index}", encoder.model).to(self.backbone.device)
            self.encoders.append(encoder)

    def _sample_features(self, encoder: FrozenEncoder, samples: list[Sample]) -> list[torch.Tensor]:
        """Per sample [images, P, E]: the encoder's patch features of each image a step can target."""
        dtype = getattr(torch, self.config.feature_dtype)
        return [f.to(dtype) for f in image_features(encoder, [sample_images(sample) for sample in samples])]

    # --- losses -----------------------------------------------------------------------------------------------
    def loss(self, backbone: Backbone, batch: Batch, stage: str, progress: StageProgress) -> LossOutput:
        if stage == "sft":
            return sft_loss(self, backbone, batch, stage)
        return self._align_loss(backbone, batch)

    def stage_freeze(self, stage: str) -> tuple[str, ...]:
        return ("method",) if stage == "sft" else ()  # the projectors train in align only

    def _with_projectors(self, out: LossOutput) -> LossOutput:
        """The projectors join the graph with zero gradient in a batch without target images, so every process's
        backward covers the same parameters."""
        untouched = sum((parameter.sum() for parameter in self.modules.parameters()), torch.zeros(()))
        return LossOutput(out.loss + 0.0 * untouched.to(out.loss), out.metrics)

    def _align_loss(self, backbone: Backbone, batch: Batch) -> LossOutput:
        """L = CE + lambda * L_REPA; no CE at the latent slots (they are never targets)."""
        mask = self.mask(batch, "align")
        embeds = inputs_embeds(backbone, batch)
        slots = [latent_slot_positions(layout) for layout in batch.layouts]
        lengths = [len(layout) for layout in batch.layouts]
        filled = fill_latents(
            backbone, embeds, batch.position_ids, mask, slots, lengths, self.config.fill_gradient
        )
        out = backbone.forward(
            filled.write(embeds), batch.position_ids, mask, output_hidden_states=self.aligned
        )
        ce, targets = weighted_next_token_ce(backbone, out.last_hidden_state, batch.labels, batch.loss_weight)
        metrics = {"ce": float(ce.detach()), "target_tokens": float(targets)}
        if not self.aligned:
            return LossOutput(ce, metrics)
        latents, picks = self._aligned_latents(out.hidden_states[self.align_layer], batch)
        metrics["aligned_segments"] = float(len(picks))
        if (
            not picks
        ):  # no step with a target image: the projectors still take part (zero gradient), as on other ranks
            untouched = sum(parameter.sum() for parameter in self.modules.parameters())
            return LossOutput(ce + 0.0 * untouched, metrics)
        per_encoder = []
        for index, encoder in enumerate(self.encoders):
            features = self._features(index, batch)
            target = torch.stack([features[b][image] for b, image in picks]).to(latents.device)
            predicted = self.modules[f"projector{index}"](grid_upsample(latents, encoder.grid))
            per_encoder.append(repa_loss(predicted, target))
            metrics[f"repa_{encoder.name}"] = float(per_encoder[-1].detach())
        repa = torch.stack(per_encoder).mean()
        metrics["repa"] = float(repa.detach())
        return LossOutput(ce + self.config.alignment_weight * repa, metrics)

    def _aligned_latents(
        self, hidden: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """[N, K, D]: the chosen layer's hidden states at the K slots of every segment whose step has a target,
        with (row in batch, image index) of each."""
        rows, picks = [], []
        for b, layout in enumerate(batch.layouts):
            targets, _ = self._plan(layout.key)
            for latent, target in zip(layout.latents, targets, strict=True):
                if target is not None:
                    rows.append(hidden[b, latent.start + 1 : latent.end])
                    picks.append((b, target))
        return (torch.stack(rows) if rows else hidden.new_zeros(0)), picks

    def _plan(self, key: SampleKey) -> tuple[tuple[int | None, ...], tuple]:
        if key not in self.plans:
            raise CheckpointError(
                f"valr: sample {key} has no step plan; prepare_stage('align') must run first"
            )
        return self.plans[key]

    def _features(self, index: int, batch: Batch) -> list[torch.Tensor]:
        """Per sample of the batch, [images, P, E] of encoder `index`: from the cache, or run now."""
        if self.caches:
            return self.caches[index].get(batch.keys)
        return image_features(self.encoders[index], [self._plan(key)[1] for key in batch.keys])

    # --- decoding ---------------------------------------------------------------------------------------------
    def decoding_policy(self) -> LatentPolicy:
        start, slot, end = (self.backbone.token_id(token) for token in self.config.latent_tokens)
        k = self.config.decode_latents or self.config.num_latents
        # K steps always: training never targets a token at the first K-1 slots, so an end token sampled there is noise.
        return LatentPolicy(
            LatentTokens(start, end, slot), k, force=self.config.decode_force, stop_at_end=False
        )
