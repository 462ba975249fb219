"""One entry point for masked attention, and the per-step mask preparation shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from latentkit.kernels.reference import dense_mask_for_sdpa, sdpa_attention

from latentkit.masks import MaskSpec

AttentionBackend = Literal["sdpa"]
BACKENDS: tuple[str, ...] = ("sdpa",)


@dataclass(frozen=True, eq=False)
class PreparedMask:
    """A MaskSpec made ready for one backend once per forward, then reused by every layer."""

    spec: MaskSpec
    backend: AttentionBackend
    num_queries: int
    dense: torch.Tensor
    row_has_keys: torch.Tensor


def prepare_mask(spec: MaskSpec, num_queries: int, backend: AttentionBackend, device: torch.device) -> PreparedMask:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    spec = spec.to(device)
    dense, row_has_keys = dense_mask_for_sdpa(spec, num_queries)
    return PreparedMask(spec, backend, num_queries, dense, row_has_keys)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PreparedMask, scale: float | None) -> torch.Tensor:
    if q.shape[2] != mask.num_queries or k.shape[2] != mask.spec.num_keys:
        raise ValueError(
            f"attention shapes (Nq={q.shape[2]}, Nk={k.shape[2]}) do not match the mask "
            f"(Nq={mask.num_queries}, Nk={mask.spec.num_keys})"
        )
    return sdpa_attention(q, k, v, mask.dense, mask.row_has_keys, scale)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MaskSpec,
    scale: float | None = None,
    backend: AttentionBackend | Literal["auto"] = "auto",
) -> torch.Tensor:
    """Attention of q [B,Hq,Nq,D] over k/v [B,Hkv,Nk,D] under `mask`; differentiable."""
    chosen: AttentionBackend = "sdpa" if backend == "auto" else backend
    return attend(q, k, v, prepare_mask(mask, q.shape[2], chosen, q.device), scale)
