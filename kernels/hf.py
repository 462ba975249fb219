"""Registration as a transformers attention function, with the matching mask-interface entry.

The backbone passes a `PreparedMask` for every layer type. Should any code path build a mask the HF way
instead, the mask-interface entry gives it a real dense mask: the model never silently runs unmasked.
"""

from __future__ import annotations

from typing import Any

import torch
from latentkit.kernels.dispatch import PreparedMask, attend
from latentkit.kernels.reference import open_empty_rows, sdpa_attention
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "latentkit"


def latentkit_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    if isinstance(attention_mask, PreparedMask):
        out = attend(query, key, value, attention_mask, scaling)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        out = sdpa_attention(query, key, value, *open_empty_rows(attention_mask), scaling)
    else:
        raise RuntimeError(
            f"{ATTN_IMPLEMENTATION} attention received no usable mask ({type(attention_mask).__name__}); "
            "call the model through latentkit.backbone.Backbone.forward"
        )
    return out.transpose(1, 2).contiguous(), None


def latentkit_mask(*args: Any, **kwargs: Any) -> torch.Tensor:
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, latentkit_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, latentkit_mask)
