"""The VAE of reasoning strategies: h -> encoder MLP -> (mu, logvar) in R^k; z = mu + exp(logvar / 2) * eps;
decoder -> the prefix embeddings of z, whose mean is the reconstruction h_hat in R^d. With `standardize_input`
(ours) the VAE fits h standardized per dimension by the training corpus's mean and spread (buffers saved with it),
and the prefix embeddings are mapped back to the embedding space (with the MLP decoder, its one
embedding; with the transformer decoder, the mean of its prefix_tokens embeddings: ours, the paper does not say).

The input h (`mean_embedding`) is the mean of the frozen model's raw input-token embeddings over the content
tokens of `layout.content_layout`: the text of every user and assistant segment (text and observation), each
tokenized on its own as the chat renders it, in order; the system turn, chat-template tokens (turn markers, role
headers), observation tags and images (question and auxiliary) are left out (ours: the spec says [question; full
answer with CoT]; an image placeholder's raw embedding carries nothing of its image).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from latentkit.methods.palette.config import PaletteConfig
from torch import Tensor, nn

from latentkit.backbone import Backbone
from latentkit.layout import Batch


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers through `sizes`, SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for index, (width, out) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(width, out))
        if index < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class PrefixTransformer(nn.Module):
    """The VL decoder: z [B, n * k'] read as n vectors of k', a small causal (GPT-style) pre-norm transformer,
    then [B, n, d]: n prefix embeddings."""

    def __init__(self, latent_size: int, tokens: int, width: int, layers: int, heads: int, out_size: int):
        super().__init__()
        self.tokens = tokens
        self.project_in = nn.Linear(latent_size // tokens, width)
        self.position = nn.Parameter(torch.randn(tokens, width) * 0.02)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.project_out = nn.Linear(width, out_size)

    def forward(self, z: Tensor) -> Tensor:
        x = self.project_in(z.unflatten(-1, (self.tokens, -1))) + self.position
        causal = nn.Transformer.generate_square_subsequent_mask(self.tokens, device=z.device, dtype=x.dtype)
        return self.project_out(self.norm(self.blocks(x, mask=causal, is_causal=True)))


class MlpPrefix(nn.Module):
    """The text decoder: z [B, k] -> [B, 1, d], one prefix embedding per z."""

    def __init__(self, latent_size: int, widths: list[int], out_size: int):
        super().__init__()
        self.net = mlp([latent_size, *widths, out_size])

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).unsqueeze(-2)


@dataclass
class VaeOutput:
    h: Tensor  # [B, d]: the input as the VAE fits it (standardized when the config asks)
    h_hat: Tensor  # [B, d]: its reconstruction, in the same space
    mu: Tensor  # [B, k]
    logvar: Tensor  # [B, k]


class PaletteVAE(nn.Module):
    def __init__(self, config: PaletteConfig, hidden_size: int):
        super().__init__()
        k = config.latent_size
        encoder_widths = config.encoder_widths or [hidden_size, hidden_size]
        self.encoder = mlp([hidden_size, *encoder_widths, 2 * k])
        self.decoder: nn.Module
        if config.prefix_decoder == "transformer":
            self.decoder = PrefixTransformer(
                k,
                config.prefix_tokens,
                config.decoder_width,
                config.decoder_layers,
                config.decoder_heads,
                hidden_size,
            )
        else:
            self.decoder = MlpPrefix(k, config.decoder_widths or [hidden_size, hidden_size], hidden_size)
        # h's per-dimension mean and spread over the training corpus (`standardize_input`; identity until set).
        self.register_buffer("input_mean", torch.zeros(hidden_size))
        self.register_buffer("input_scale", torch.ones(hidden_size))

    def set_input_statistics(self, mean: Tensor, scale: Tensor) -> None:
        self.input_mean.copy_(mean)
        self.input_scale.copy_(scale)

    def standardize(self, h: Tensor) -> Tensor:
        return (h - self.input_mean) / self.input_scale

    def encode(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar), each [B, k], of raw mean embeddings h [B, d]."""
        mu, logvar = self.encoder(self.standardize(h)).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        """[B, k] -> [B, n, d]: the prefix embeddings of each z, in the model's embedding space."""
        return self.input_mean + self.input_scale * self.decoder(z)

    def forward(self, h: Tensor) -> VaeOutput:
        """Encode, reparameterise (eps from the global RNG, whose state checkpoints keep) and reconstruct, in the
        space the VAE fits (standardized h when the statistics are set)."""
        mu, logvar = self.encode(h)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        return VaeOutput(self.standardize(h), self.decoder(z).mean(-2), mu, logvar)


def build_vae(config: PaletteConfig, hidden_size: int) -> PaletteVAE:
    """The VAE at its initial weights, a function of `config.seeds.init` alone (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seeds.init)
        return PaletteVAE(config, hidden_size)


def mean_embedding(backbone: Backbone, batch: Batch) -> Tensor:
    """h [B, d]: each row's mean raw input embedding over its valid tokens (a batch of content layouts), without
    gradient to the model."""
    with torch.no_grad():
        embeds = backbone.embed(batch.input_ids).float()
        valid = batch.valid.unsqueeze(-1).to(embeds)
        return (embeds * valid).sum(1) / valid.sum(1)
