"""MBAQ, model-behaviour-aligned quantization (spec "MBAQ"): pre-projector image features -> down MLP -> a
`latent_size` vector z -> product quantization (C codebooks of N entries, each over its own chunk of latent_size / C
dims; one image position = C sub-codes) -> straight-through -> up MLP -> LLM input embeddings in place of the
projector's output (`output="embeddings"`, the spec) or pre-projector features for the frozen projector
(`output="features"`, ours).

Each codebook keeps an EMA of its entries' share of assignments (`usage`); an entry whose share falls below
`dead_threshold / N` is reset to a chunk of the current batch. Usage starts at 0, so the first training step puts
every entry on a vector of its batch (data initialisation). EMA and resets run in training mode only. An entry is the
trained parameter `codebook` plus the buffer `reset_offset` that resets write (`ProductQuantizer.table`): buffers keep
what a forward writes under FSDP2, a gathered parameter does not."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers through `sizes`, GELU between them (none after the last)."""
    layers: list[nn.Module] = []
    for index, (width, out) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(width, out))
        if index < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _offset_of_older_weights(module: nn.Module, state: dict, prefix: str, *args: object) -> None:
    """Weights saved before resets had an offset wrote the resets into `codebook`: their offset is zero."""
    if prefix + "codebook" in state:
        state.setdefault(prefix + "reset_offset", torch.zeros_like(state[prefix + "codebook"]))


@dataclass
class Quantized:
    z: Tensor  # [n, C, d]: the down MLP's output, in chunks
    z_q: Tensor  # [n, C, d]: each chunk's nearest entry (gradient to the codebook)
    sq_distances: Tensor  # [n, C, N]
    codes: Tensor  # long [n, C]
    outputs: Tensor  # [n, out]: the up MLP of the straight-through z_q
    resets: int  # entries reset by this call


class ProductQuantizer(nn.Module):
    def __init__(self, dim: int, codebooks: int, entries: int, ema_decay: float, dead_threshold: float):
        super().__init__()
        self.codebook = nn.Parameter(
            torch.randn(codebooks, entries, dim // codebooks) / (dim // codebooks) ** 0.5
        )
        # Where dead-code resets moved each entry: an entry is codebook + reset_offset. Resets write this buffer, not
        # the parameter: under FSDP2 the forward sees a gathered copy of the parameter, and writes to it are lost.
        self.register_buffer("reset_offset", torch.zeros_like(self.codebook))
        self.register_load_state_dict_pre_hook(_offset_of_older_weights)
        # Per codebook, the EMA of each entry's share of the assignments (each row sums to 1 once trained).
        self.register_buffer("usage", torch.zeros(codebooks, entries))
        self.ema_decay, self.dead_threshold = ema_decay, dead_threshold

    @property
    def codebooks(self) -> int:
        return self.usage.shape[0]

    @property
    def entries(self) -> int:
        return self.usage.shape[1]

    def table(self) -> Tensor:
        """The entries [C, N, d]: the trained parameter plus the resets' offsets (gradient to the parameter)."""
        return self.codebook + self.reset_offset.to(self.codebook.dtype)

    def sq_distances(self, chunks: Tensor) -> Tensor:
        """[n, C, d] -> [n, C, N], in float32 whatever the autocast."""
        with torch.autocast(chunks.device.type, enabled=False):
            chunks, codebook = chunks.float(), self.table().float()
            cross = torch.einsum("ncd,ckd->nck", chunks, codebook)
            squared = chunks.pow(2).sum(-1, keepdim=True) - 2 * cross + codebook.pow(2).sum(-1)
            return squared.clamp_min(0.0)

    def lookup(self, codes: Tensor) -> Tensor:
        """long [n, C] -> the entries [n, C, d]."""
        return self.table()[torch.arange(self.codebooks, device=codes.device), codes]

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """z [n, dim] -> (chunks, nearest entries, squared distances, codes, resets)."""
        chunks = z.unflatten(-1, (self.codebooks, -1))
        resets = self.reset_dead(chunks.detach()) if self.training else 0
        sq_distances = self.sq_distances(chunks)
        codes = sq_distances.detach().argmin(-1)
        if self.training:
            self.update_usage(codes)
        return chunks, self.lookup(codes).to(chunks.dtype), sq_distances, codes, resets

    @torch.no_grad()
    def update_usage(self, codes: Tensor) -> None:
        counts = F.one_hot(codes, self.entries).sum(0).float()  # [C, N]
        if _world_size() > 1:
            dist.all_reduce(counts)  # every process keeps the same usage, so they agree on dead entries
        share = counts / counts.sum(-1, keepdim=True)
        self.usage.mul_(self.ema_decay).add_(share, alpha=1.0 - self.ema_decay)

    @torch.no_grad()
    def reset_dead(self, chunks: Tensor) -> int:
        """Dead entries (usage below dead_threshold / N) -> random chunks of this batch, with the uniform share
        1 / N as their usage (a grace period); the main process's choice is broadcast to the others. The parameter
        keeps its value: the offset moves the entry (`table`), and the entry trains on from there."""
        dead = self.usage < self.dead_threshold / self.entries
        count = int(dead.sum())
        if count == 0:
            return 0
        codebook_index, entry_index = dead.nonzero(as_tuple=True)
        rows = torch.randint(chunks.shape[0], (count,), device=chunks.device)
        chosen = chunks[rows, codebook_index].to(self.reset_offset.dtype)
        current = self.codebook[codebook_index, entry_index].to(self.reset_offset.dtype)
        self.reset_offset[codebook_index, entry_index] = chosen - current
        self.usage[codebook_index, entry_index] = 1.0 / self.entries
        if _world_size() > 1:
            dist.broadcast(self.reset_offset, src=0)
        return count


class MBAQ(nn.Module):
    """Pre-projector features [n, feature_size] -> [n, out_size] through a product-quantized bottleneck."""

    def __init__(
        self,
        feature_size: int,
        out_size: int,
        latent_size: int,
        width: int,
        codebooks: int,
        entries: int,
        ema_decay: float,
        dead_threshold: float,
        output: str = "embeddings",
    ):
        super().__init__()
        self.output = (
            output  # "embeddings" (LLM inputs) or "features" (pre-projector, for the frozen projector)
        )
        # The projectors this replaces normalise their input first (Qwen's merger, InternVL's mlp1).
        self.down = nn.Sequential(nn.LayerNorm(feature_size), mlp([feature_size, width, latent_size]))
        self.quantizer = ProductQuantizer(latent_size, codebooks, entries, ema_decay, dead_threshold)
        self.up = mlp([latent_size, width, out_size])

    def forward(self, features: Tensor) -> Quantized:
        z = self.down(features.to(self.up[0].weight.dtype))
        chunks, nearest, sq_distances, codes, resets = self.quantizer(z)
        straight_through = (
            z + (nearest.flatten(-2) - z).detach()
        )  # spec "MBAQ": the gradient skips the rounding
        return Quantized(chunks, nearest, sq_distances, codes, self.up(straight_through), resets)

    @torch.no_grad()
    def encode(self, features: Tensor) -> Tensor:
        """Pre-projector features [n, feature_size] -> codes long [n, C] (no usage update, no reset)."""
        chunks = self.down(features.to(self.up[0].weight.dtype)).unflatten(-1, (self.quantizer.codebooks, -1))
        return self.quantizer.sq_distances(chunks).argmin(-1)

    def decode(self, codes: Tensor) -> Tensor:
        """Codes long [n, C] -> the up MLP's outputs [n, out_size] (what `forward` gives for those codes)."""
        return self.up(self.quantizer.lookup(codes).flatten(-2))
