"""MoME, the mixture of modal experts (spec "MoME"), as a wrapper around the HF decoder layers, not a fork.

Every decoder layer gets generation-branch copies of its attention's q/k/v/o projections, of its q/k norms where
the family has them (Qwen3-style; Qwen2/2.5-VL have none) and of its MLP, initialised from the text weights.
A hard per-token route (bool [B, N], `ROUTE` in `Backbone.forward`'s `extras`) picks the branch: a routed token's
projections and MLP are the copies', every other token's the originals'. LayerNorms, RoPE, attention itself and
the KV cache stay shared, so the two branches meet only in self-attention.

How: a forward pre-hook on each decoder layer reads the route from the layer's keyword arguments. Around each
original projection, norm and MLP, a forward pre-hook splits the rows once: the original runs on the unrouted rows
only, and the routed rows are set aside; its forward hook runs the copy on the routed rows and scatters both results
back into one output in token order. No token is computed by both branches. The originals keep their places and
parameter names (the base model saves in HF format unchanged); the copies are the method's own module
(`GenerationExperts`), saved with the method's weights. Without the `ROUTE` extra, or with no token routed, the
layers compute exactly what they did before."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

ROUTE = "latentum_generation_branch"  # the extras key: True where a token takes the generation branch
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


class LayerExperts(nn.Module):
    """One decoder layer's generation-branch copies: the attention parts it has, and the MLP."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        attention = layer.self_attn
        self.attention = nn.ModuleDict(
            {
                name: copy.deepcopy(getattr(attention, name))
                for name in ATTENTION_PARTS
                if hasattr(attention, name)
            }
        )
        self.mlp = copy.deepcopy(layer.mlp)

    def originals(self, layer: nn.Module) -> dict[str, nn.Module]:
        """The layer's modules these copy, by the same names as `copies`."""
        return {**{name: getattr(layer.self_attn, name) for name in self.attention}, "mlp": layer.mlp}

    def copies(self) -> dict[str, nn.Module]:
        return {**dict(self.attention.items()), "mlp": self.mlp}


class GenerationExperts(nn.Module):
    """The generation branch of every decoder layer (`layers[i]` copies decoder layer i)."""

    def __init__(self, decoder_layers: nn.ModuleList):
        super().__init__()
        self.layers = nn.ModuleList(LayerExperts(layer) for layer in decoder_layers)

    @torch.no_grad()
    def copy_text_weights(self, decoder_layers: nn.ModuleList) -> None:
        """Set every copy to its original's current weights (the branch's initialisation)."""
        for experts, layer in zip(self.layers, decoder_layers, strict=True):
            originals = experts.originals(layer)
            for name, module in experts.copies().items():
                module.load_state_dict(originals[name].state_dict())


@dataclass
class _LayerRoute:
    """The route of the call a decoder layer is in (None outside a call, or when no token is routed), and each
    part's routed rows between the part's pre-hook and its hook."""

    mask: Tensor | None = None
    routed: dict[str, Tensor] = field(default_factory=dict)


def _read_route(state: _LayerRoute, module: nn.Module, args: tuple, kwargs: dict) -> None:
    route = kwargs.get(ROUTE)
    state.mask = route.bool() if route is not None and bool(route.any()) else None


def _clear_route(state: _LayerRoute, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    state.mask = None
    state.routed.clear()


def _split_rows(state: _LayerRoute, name: str, module: nn.Module, args: tuple) -> tuple | None:
    """The original's input cut to the unrouted rows [n_u, ...]; the routed rows [n_g, ...] kept for the copy."""
    if state.mask is None:
        return None
    (hidden,) = args  # [B, N, ...]: projections, norms and MLPs take the hidden states alone
    mask = state.mask.to(hidden.device)
    state.routed[name] = hidden[mask]
    return (hidden[~mask],)


def _merge_rows(
    state: _LayerRoute, name: str, copy_module: nn.Module, module: nn.Module, args: tuple, output: Tensor
) -> Tensor | None:
    """[B, N, ...]: the original's output [n_u, ...] at the unrouted rows, the copy's on the routed rows at theirs."""
    if state.mask is None:
        return None
    mask = state.mask.to(output.device)
    generated = copy_module(state.routed.pop(name))
    merged = output.new_empty((*mask.shape, *output.shape[1:]))
    merged[~mask] = output
    merged[mask] = generated.to(output.dtype)
    return merged


def attach_experts(decoder_layers: nn.ModuleList, experts: GenerationExperts) -> list[RemovableHandle]:
    """Route every decoder layer through its copies by the `ROUTE` extra; returns the hooks' handles."""
    handles: list[RemovableHandle] = []
    for layer, layer_experts in zip(decoder_layers, experts.layers, strict=True):
        state = _LayerRoute()
        handles.append(
            layer.register_forward_pre_hook(
                lambda m, a, k, s=state: _read_route(s, m, a, k), with_kwargs=True
            )
        )
        handles.append(
            layer.register_forward_hook(
                lambda m, a, k, o, s=state: _clear_route(s, m, a, k, o), with_kwargs=True, always_call=True
            )
        )
        copies = layer_experts.copies()
        for name, original in layer_experts.originals(layer).items():
            handles.append(
                original.register_forward_pre_hook(lambda m, a, s=state, n=name: _split_rows(s, n, m, a))
            )
            handles.append(
                original.register_forward_hook(
                    lambda m, a, o, s=state, n=name, c=copies[name]: _merge_rows(s, n, c, m, a, o)
                )
            )
    return handles
