"""Reference masked attention: a dense mask from `MaskSpec.to_dense()` into PyTorch SDPA (CPU path and test oracle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentkit.masks import MaskSpec


def dense_mask_for_sdpa(mask: MaskSpec, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense bool [B,1,Nq,Nk] safe for SDPA, bool [B,1,Nq,1] of rows that may attend to something)."""
    return open_empty_rows(mask.to_dense(num_queries))


def open_empty_rows(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fully masked rows would give NaN in SDPA (forward and backward): open them; callers zero their output."""
    row_has_keys = dense.any(dim=-1, keepdim=True)
    return dense | ~row_has_keys, row_has_keys


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dense: torch.Tensor,
    row_has_keys: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D] (GQA without expanding K/V) -> [B,Hq,Nq,D]; fully masked rows are zero."""
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=dense, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out * row_has_keys.to(out.dtype)


def reference_masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec, scale: float | None = None
) -> torch.Tensor:
    dense, row_has_keys = dense_mask_for_sdpa(mask.to(q.device), q.shape[2])
    return sdpa_attention(q, k, v, dense, row_has_keys, scale)
