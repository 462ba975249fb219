"""LatentUM's pixel decoder (spec "Pixel decoder"): the model reasons over discrete codes of its own image features
and never needs pixels; this decoder draws an image from its codes when a person wants to look.

One image's codes [positions, C] -> MBAQ's codebook entries z_q [positions, latent_size] -> laid out on the image
token grid (row-major, as the vision tower's merged patches; `rows x cols` tokens, each covering `s x s` pixels of the
processed image, s = `backbone.image_token_pixels`) -> `PixelDecoder` -> RGB [3, rows * s, cols * s] in [0, 1].

Stage `pixels` trains it with the VLM and MBAQ frozen, on every image of the training chats (question boards and
auxiliary boards): each image through the frozen vision tower and `MBAQ.encode` to codes, the target being the same
image as the tower saw it (`backbone.vision_pixels`). Loss: `pixel_loss`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from latentkit.methods.latentum.config import PixelDecoderConfig
from latentkit.methods.latentum.quantizer import MBAQ
from PIL import Image
from torch import Tensor, nn

from latentkit.backbone import Backbone
from latentkit.errors import CheckpointError, DataError
from latentkit.layout import Batch
from latentkit.registry import LossOutput

Grid = tuple[int, int]  # (rows, cols) of image tokens


def pixel_loss(predicted: Tensor, target: Tensor, l1_weight: float = 0.0) -> Tensor:
    """mean((predicted - target)^2) + l1_weight * mean(|predicted - target|), over every pixel and channel."""
    error = predicted.float() - target.float()
    return error.pow(2).mean() + l1_weight * error.abs().mean()


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]: 10 log10(1 / mse)."""
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, kernel_size: int):
        super().__init__()
        padding = kernel_size // 2
        self.body = nn.Sequential(
            nn.GELU(),
            nn.Conv2d(width, width, kernel_size, padding=padding),
            nn.GELU(),
            nn.Conv2d(width, width, kernel_size, padding=padding),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class PixelDecoder(nn.Module):
    """z_q grids [B, rows, cols, latent_size] -> RGB [B, 3, rows * s, cols * s] (not clamped)."""

    def __init__(self, latent_size: int, token_pixels: int, width: int, depth: int, kernel_size: int):
        super().__init__()
        self.embed = nn.Conv2d(latent_size, width, 1)
        self.blocks = nn.Sequential(*(ResidualBlock(width, kernel_size) for _ in range(depth)))
        self.to_pixels = nn.Sequential(nn.GELU(), nn.Conv2d(width, 3 * token_pixels**2, 1))
        self.shuffle = nn.PixelShuffle(token_pixels)
        # Batches the decoder was trained on: 0 means it holds its initial weights and draws noise.
        self.register_buffer("trained_batches", torch.zeros((), dtype=torch.long))

    def forward(self, z_q: Tensor) -> Tensor:
        hidden = self.blocks(self.embed(z_q.permute(0, 3, 1, 2).to(self.embed.weight.dtype)))
        return self.shuffle(self.to_pixels(hidden))


def build_pixel_decoder(config: PixelDecoderConfig, latent_size: int, token_pixels: int) -> PixelDecoder:
    """The decoder at its initial weights, a function of `config.seed` alone (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return PixelDecoder(latent_size, token_pixels, config.width, config.depth, config.kernel_size)


@dataclass
class EncodedImage:
    codes: Tensor  # long [rows * cols, C]
    grid: Grid
    pixels: Tensor  # [3, rows * s, cols * s]: the image as the vision tower saw it, in [0, 1]


@torch.no_grad()
def encode_images(
    backbone: Backbone, quantizer: MBAQ, pixel_values: Tensor, grid_thw: Tensor
) -> list[EncodedImage]:
    """Each image through the frozen vision tower and MBAQ to its codes, with its token grid and its pixels."""
    features = backbone.vision_features(pixel_values, grid_thw)
    pixels = backbone.vision_pixels(pixel_values, grid_thw)
    side = backbone.image_token_pixels
    encoded = []
    for image_features, image in zip(features, pixels):
        grid = (image.shape[1] // side, image.shape[2] // side)
        encoded.append(EncodedImage(quantizer.encode(image_features), grid, image))
    return encoded


def decode_codes(
    quantizer: MBAQ, decoder: PixelDecoder, codes: Sequence[Tensor], grids: Sequence[Grid]
) -> list[Tensor]:
    """Per image, codes [rows * cols, C] -> RGB [3, H, W] (not clamped); images of one grid are decoded together.
    MBAQ's codebook takes no gradient from here: the decoder learns to draw the codes MBAQ has."""
    for index, (image_codes, (rows, cols)) in enumerate(zip(codes, grids, strict=True)):
        if image_codes.ndim != 2 or image_codes.shape != (rows * cols, quantizer.quantizer.codebooks):
            raise DataError(
                f"image {index}: codes of shape {tuple(image_codes.shape)} do not fill a {rows} x {cols} token grid "
                f"of {quantizer.quantizer.codebooks} sub-codes each (expected {(rows * cols, quantizer.quantizer.codebooks)})"
            )
    images: list[Tensor | None] = [None] * len(codes)
    for grid in dict.fromkeys(grids):
        members = [i for i, g in enumerate(grids) if g == grid]
        z_q = torch.stack(
            [quantizer.quantizer.lookup(codes[i]).detach().flatten(-2).view(*grid, -1) for i in members]
        )
        for i, image in zip(members, decoder(z_q)):
            images[i] = image
    return images  # type: ignore[return-value]


def pixel_stage_loss(
    backbone: Backbone, quantizer: MBAQ, decoder: PixelDecoder, batch: Batch, l1_weight: float
) -> LossOutput:
    """Stage `pixels`: every image of the batch to codes (frozen), decoded, against the image the tower saw."""
    if batch.pixel_values is None or batch.image_grid_thw is None:
        raise DataError(f"latentum stage pixels reconstructs images; the samples {batch.keys} have none")
    encoded = encode_images(backbone, quantizer, batch.pixel_values, batch.image_grid_thw)
    predicted = decode_codes(quantizer, decoder, [e.codes for e in encoded], [e.grid for e in encoded])
    flat_predicted = torch.cat([p.flatten() for p in predicted])
    flat_target = torch.cat([e.pixels.flatten() for e in encoded]).to(flat_predicted.device)
    loss = pixel_loss(flat_predicted, flat_target, l1_weight)
    if decoder.training:
        decoder.trained_batches += 1
    with torch.no_grad():
        mse = float(pixel_loss(flat_predicted.clamp(0, 1), flat_target))
    return LossOutput(loss, {"mse": mse, "psnr": psnr(mse), "images": float(len(encoded))})


def check_decoder_trained(decoder: PixelDecoder) -> None:
    if int(decoder.trained_batches) == 0:
        raise CheckpointError(
            "latentum's pixel decoder is untrained (it would draw noise): train stage pixels first "
            "(latentkit train --method latentum ..., or train.stage=pixels on a run with a trained quantizer)"
        )


def token_grid(backbone: Backbone, image: Image.Image) -> Grid:
    """The image-token grid the vision tower gives `image` (after the processor's resize)."""
    processed = backbone.preprocess_image(image)
    (pixels,) = backbone.vision_pixels(processed.pixel_values, torch.tensor([processed.grid_thw]))
    return pixels.shape[1] // backbone.image_token_pixels, pixels.shape[2] // backbone.image_token_pixels


def to_image(pixels: Tensor) -> Image.Image:
    """RGB [3, H, W] in [0, 1] (clamped) -> an 8-bit PIL image."""
    array = (pixels.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array), "RGB")
