"""LatentUM (arXiv 2604.02097) on the shared Qwen-VL backbone: understanding and generation share one semantic
latent space, images the model imagines being discrete codes of its own understanding features (spec latentum.md).

Stages, in order:
- `quantizer` trains MBAQ (`quantizer.py`) with the VLM frozen, on the chat with every image (question and
  auxiliary boards) given as MBAQ's output in place of the projector's. Its loss is the behaviour KL over the answer
  tokens plus the VQ loss (`losses.py`); `quantizer_report` measures agreement, KL, codebook usage and perplexity.
- `language` (`language.py`) trains the language model to read target images as projector(z_q), some codes noised.
- `vision` (`vision.py`) trains the generation branch (`mome.py`) and the code head (`code_head.py`) to predict the
  target images' codes, the understanding branch frozen.
- `pixels` (`pixels.py`) trains the pixel decoder that draws codes as images (`board_images`), with the VLM and MBAQ
  frozen; it needs only the quantizer.

Decoding (`decoding.py`): text, and on an emitted image-start token the image imagined as codes on the generation
branch, then read back through the understanding branch as projector(z_q)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from latentkit.methods.latentum.behaviour import (
    QuantizerReport,
    code_statistics,
    compare_behaviour,
    quantizer_report,
)
from latentkit.methods.latentum.channel import channel_conditions
from latentkit.methods.latentum.code_head import CodeHead, GuidanceParams
from latentkit.methods.latentum.config import CodeHeadConfig, LatentumConfig, QuantizerConfig
from latentkit.methods.latentum.decoding import ImaginePolicy
from latentkit.methods.latentum.language import language_loss
from latentkit.methods.latentum.losses import vq_loss
from latentkit.methods.latentum.mome import GenerationExperts, attach_experts
from latentkit.methods.latentum.pixels import (
    Grid,
    PixelDecoder,
    build_pixel_decoder,
    check_decoder_trained,
    decode_codes,
    pixel_stage_loss,
    to_image,
)
from latentkit.methods.latentum.quantizer import MBAQ
from latentkit.methods.latentum.targets import check_quantizer_trained, quantizer_trained
from latentkit.methods.latentum.vision import (
    generation_mask,
    unconditional_rows,
    vision_loss,
    with_generation_blocks,
)
from PIL import Image

from latentkit.backbone import Backbone
from latentkit.chat import ResponseWeights, inline_aux_image, render_chat
from latentkit.errors import ConfigError, DataError
from latentkit.images import save_images
from latentkit.layout import Batch, Layout, LayoutBuilder, collate
from latentkit.masks import MaskSpec
from latentkit.registry import LossOutput, Method, StageContext, StageProgress
from latentkit.segments import Sample

if TYPE_CHECKING:
    from latentkit.decoding import Trajectory


def build_quantizer(config: QuantizerConfig, backbone: Backbone) -> MBAQ:
    """MBAQ at its initial weights, a function of `config.seed` alone (the global RNG is left as it was)."""
    features = backbone.vision_feature_size
    out = backbone.hidden_size if config.output == "embeddings" else features
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return MBAQ(
            features,
            out,
            config.latent_size,
            config.width or features,
            config.codebooks,
            config.codebook_size,
            config.ema_decay,
            config.dead_threshold,
            config.output,
        )


def build_code_head(config: CodeHeadConfig, quantizer: QuantizerConfig, backbone: Backbone) -> CodeHead:
    """The code head at its initial weights, a function of `config.seed` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return CodeHead(
            backbone.hidden_size,
            quantizer.codebooks,
            quantizer.codebook_size,
            config.width,
            config.layers,
            config.heads,
        )


@dataclass(frozen=True)
class CodeReport:
    accuracy: float  # sub-codes whose top-1 is the true code, teacher-forced
    ce: float  # mean CE per sub-code
    positions: int  # image positions predicted (each of C sub-codes)
    samples: int


# What each stage trains of the method's own modules; the others are frozen there (`stage_freeze`).
STAGE_MODULES = {
    "quantizer": ("quantizer",),
    "language": (),
    "vision": ("experts", "code_head"),
    "pixels": ("pixel_decoder",),
}


class Latentum(Method):
    Config = LatentumConfig
    stages = ("quantizer", "language", "vision", "pixels")
    config: LatentumConfig
    # The embedded default (configs/latentum/tiny.yaml): the tiny Qwen2.5-VL preset on synth-maze, whose boards are
    # the images a later stage imagines.
    run_defaults: ClassVar[dict[str, Any]] = {
        "model": {"preset": "tiny-qwen2.5-vl"},
        "data": {"task": "synth-maze"},
        "train": {
            "stages": {
                "quantizer": {"steps": 30, "lr": 1.0e-3},
                "language": {"steps": 300, "lr": 2.0e-3},
                "vision": {"steps": 30, "lr": 1.0e-3},
                "pixels": {"steps": 300, "lr": 2.0e-3},
            }
        },
    }

    def setup(self, backbone: Backbone) -> None:
        if not backbone.supports_images:
            raise ConfigError(
                f"latentum quantizes a vision-language model's image features and the {backbone.family} backbone "
                "takes none: use a Qwen-VL model (model.preset=tiny-qwen2.5-vl or a Qwen2/2.5-VL model.path)"
            )
        super().setup(backbone)
        backbone.add_tokens(list(self.config.observation_tags))
        self.modules["quantizer"] = build_quantizer(self.config.quantizer, backbone).to(backbone.device)
        layers = backbone.decoder().layers
        self.modules["experts"] = GenerationExperts(layers)
        attach_experts(layers, self.experts)
        head = build_code_head(self.config.code_head, self.config.quantizer, backbone)
        self.modules["code_head"] = head.to(backbone.device)
        self.modules["pixel_decoder"] = build_pixel_decoder(
            self.config.pixels, self.config.quantizer.latent_size, backbone.image_token_pixels
        ).to(backbone.device)

    @property
    def quantizer(self) -> MBAQ:
        return self.modules["quantizer"]  # type: ignore[return-value]

    @property
    def experts(self) -> GenerationExperts:
        return self.modules["experts"]  # type: ignore[return-value]

    @property
    def code_head(self) -> CodeHead:
        return self.modules["code_head"]  # type: ignore[return-value]

    @property
    def pixel_decoder(self) -> PixelDecoder:
        return self.modules["pixel_decoder"]  # type: ignore[return-value]

    def decoding_policy(self) -> ImaginePolicy:
        """Text, and on an emitted image-start token an image imagined as codes and read back (`decoding.py`)."""
        guidance = GuidanceParams(**self.config.guidance.model_dump())
        imagine = self.config.imagine
        return ImaginePolicy(
            self.quantizer, self.code_head, guidance, imagine.seed, imagine.grid, imagine.force
        )

    def stage_freeze(self, stage: str) -> tuple[str, ...]:
        # quantizer: the VLM is the frozen reference whose behaviour MBAQ keeps; vision: the originals stay frozen
        # while the generation branch trains; language trains the VLM and none of the method's modules; pixels: the
        # VLM and MBAQ only encode the images the decoder learns to draw.
        owned = tuple(f"method.{name}" for name in self.modules if name not in STAGE_MODULES[stage])
        backbone = tuple(self.backbone.module_groups()) if stage in ("quantizer", "vision", "pixels") else ()
        return backbone + owned

    def prepare_stage(self, stage: str, context: StageContext) -> None:
        if stage in ("language", "vision", "pixels"):
            check_quantizer_trained(self.quantizer, stage)
        if stage == "vision":
            # spec "MoME": the generation branch starts from the text weights as the language stage left them
            self.experts.copy_text_weights(self.backbone.decoder().layers)

    def layout(self, sample: Sample, stage: str) -> Layout:
        """The conversation with its auxiliary images inline (the assistant's response tokens are the answer
        positions); in stage vision followed by the generation blocks of its target images."""
        builder = LayoutBuilder(self.backbone)
        # The model writes the whole response at generation, observation tags included, so they are targets too.
        weights = ResponseWeights(1.0, self.config.observation_tags, train_observation_tags=True)
        render_chat(builder, sample, inline_aux_image, weights)
        layout = builder.build(sample.sample_id, sample.dataset)
        if stage == "vision":
            return with_generation_blocks(layout, self.backbone.token_id(self.backbone.chat.vision_start))
        return layout

    def mask(self, batch: Batch, stage: str) -> MaskSpec:
        if stage == "vision":
            return generation_mask(batch, [False] * len(batch.keys))
        return super().mask(batch, stage)

    def loss(self, backbone: Backbone, batch: Batch, stage: str, progress: StageProgress) -> LossOutput:
        if stage == "language":
            config = self.config.language
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + progress.step)
            mask = self.mask(batch, stage)
            return language_loss(backbone, self.quantizer, batch, mask, config.code_noise, generator)
        if stage == "vision":
            config = self.config.vision
            dropped = unconditional_rows(batch, config.condition_dropout, config.seed, progress.step)
            trained = [*self.experts.parameters(), *self.code_head.parameters()]
            return vision_loss(
                backbone, self.quantizer, self.code_head, batch, generation_mask(batch, dropped), trained
            )
        if stage == "pixels":
            return pixel_stage_loss(
                backbone, self.quantizer, self.pixel_decoder, batch, self.config.pixels.l1_weight
            )
        return self._quantizer_loss(backbone, batch, stage)

    def _quantizer_loss(self, backbone: Backbone, batch: Batch, stage: str) -> LossOutput:
        config = self.config.quantizer
        comparison = compare_behaviour(
            backbone,
            self.quantizer,
            batch,
            self.mask(batch, stage),
            config.kl_direction,
            config.kl_temperature,
        )
        quantized = comparison.quantized
        kl = comparison.kl.mean()
        vq = vq_loss(
            quantized.z, quantized.z_q, quantized.sq_distances, config.commitment, config.entropy_weight
        )
        usage, perplexity = code_statistics(quantized.codes, config.codebook_size)
        live = self.quantizer.quantizer.usage >= config.dead_threshold / config.codebook_size
        metrics = {
            "kl": float(kl.detach()),
            "vq": float(vq.detach()),
            "agreement": float(comparison.agree.float().mean()),
            "usage": usage,
            "perplexity": perplexity,
            "live_entries": float(live.float().mean()),  # by the EMA usage
            "resets": float(quantized.resets),
        }
        return LossOutput(kl + config.vq_weight * vq, metrics)

    def latent_channel(
        self, samples: list[Sample], run_dir: Path | None
    ) -> dict[str, list[bool | None]] | None:
        """Teacher-forced channel check (`channel.py`): the gold response with its boards read as real images, as
        projector(z_q) of their true codes (`oracle`) and of dummy codes. None without a board in every sample or
        a trained quantizer."""
        boards = bool(samples) and all(sample.has_aux_images for sample in samples)
        if not boards or not quantizer_trained(self.quantizer):
            return None
        return channel_conditions(
            self.backbone,
            self.quantizer,
            samples,
            lambda sample: self.layout(sample, "language"),
            lambda batch: self.mask(batch, "language"),
            batch_size=8,
        )

    @torch.no_grad()
    def code_report(self, samples: Sequence[Sample], batch_size: int = 8) -> CodeReport:
        """Stage vision's measure on `samples`: the code head's teacher-forced top-1 sub-codes against the target
        images' true codes (every board's position conditioned on the chat before it), and their CE."""
        pad_id = self.backbone.tokenizer.pad_token_id
        correct, ce_sum, positions = 0.0, 0.0, 0
        for start in range(0, len(samples), batch_size):
            layouts = [self.layout(s, "vision") for s in samples[start : start + batch_size]]
            batch = collate(layouts, pad_id).to(self.backbone.device)
            out = vision_loss(
                self.backbone, self.quantizer, self.code_head, batch, self.mask(batch, "vision"), []
            )
            count = int(out.metrics["code_positions"])
            correct += out.metrics["code_accuracy"] * count
            ce_sum += out.metrics["code_ce"] * count
            positions += count
        if positions == 0:
            raise DataError("code_report: the samples have no target images (auxiliary boards) to predict")
        return CodeReport(correct / positions, ce_sum / positions, positions, len(samples))

    def quantizer_report(self, samples: Sequence[Sample], batch_size: int = 8) -> QuantizerReport:
        """MBAQ's agreement with the unquantized model, mean KL, codebook usage and perplexity on `samples`, with
        the stage's KL direction and temperature."""
        pad_id = self.backbone.tokenizer.pad_token_id
        device = self.backbone.device

        def batches():
            for start in range(0, len(samples), batch_size):
                layouts = [self.layout(s, "quantizer") for s in samples[start : start + batch_size]]
                batch = collate(layouts, pad_id).to(device)
                yield batch, self.mask(batch, "quantizer")

        config = self.config.quantizer
        return quantizer_report(
            self.backbone, self.quantizer, batches(), config.kl_direction, config.kl_temperature
        )

    @torch.no_grad()
    def board_images(self, codes: Sequence[torch.Tensor], grid: Grid) -> list[Image.Image]:
        """Images' codes (each long [rows * cols, C], e.g. the boards a trajectory imagined) -> PIL images, through
        MBAQ's codebooks and the pixel decoder; `grid` (rows, cols) is their image-token grid (`pixels.token_grid`
        of an image of that size)."""
        check_decoder_trained(self.pixel_decoder)
        device = self.backbone.device
        codes = [c.to(device) for c in codes]
        return [
            to_image(image)
            for image in decode_codes(self.quantizer, self.pixel_decoder, codes, [grid] * len(codes))
        ]

    def save_board_images(
        self, codes: Sequence[torch.Tensor], grid: Grid, directory: Path, prefix: str = "board"
    ) -> list[Path]:
        """`board_images` written as `directory/<prefix>-001.png`, ...; an existing file is never replaced."""
        return save_images(self.board_images(codes, grid), directory, prefix)

    def trajectory_images(self, trajectory: Trajectory) -> list[Image.Image]:
        """The boards `trajectory` imagined (`extras["imagined_codes"]`, laid out on `extras["imagined_grids"]`),
        drawn by the pixel decoder."""
        codes = trajectory.extras.get("imagined_codes", [])
        grids = trajectory.extras.get("imagined_grids", [])
        return [
            self.board_images([torch.tensor(image_codes)], (height, width))[0]
            for image_codes, (_, height, width) in zip(codes, grids, strict=True)
            if len(image_codes) == height * width  # a partial image (diagnose's k) has no picture
        ]
