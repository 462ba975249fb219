"""What the model's hidden states say about its latents, from one replay of the baseline trajectories
(`latentkit.decoding.replay_forward`, the exact training forward of what was decoded):

- PRISM's gap: is the gold answer decodable at the latent positions, or only after the latent block?
- Attention mass: at the answer positions (after the block), how much of the last layer's attention goes to
  the latent positions and how much to the question image's positions.

Attention probabilities are recomputed, not read from the kernel (which never materialises them): while
`capture_attention` is active, the backbone's registered attention function also computes
softmax(q k^T * scale) under the layer's own mask for the chosen layer, from the same rotated q and k, and
keeps the mass each query row gives to groups of key columns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from latentkit.backbone import Backbone
from latentkit.decoding import Trajectory, replay_forward
from latentkit.kernels.dispatch import PreparedMask
from latentkit.kernels.hf import ATTN_IMPLEMENTATION, latentkit_attention
from latentkit.layout import Kind


@dataclass
class _Capture:
    module: torch.nn.Module
    groups: torch.Tensor | None = None  # bool [B, G, Nk]: key columns of each group
    mass: torch.Tensor | None = None  # [B, Nq, G]: attention mass per group, averaged over heads


def attention_probabilities(
    query: torch.Tensor, key: torch.Tensor, mask: PreparedMask, scaling: float | None
) -> torch.Tensor:
    """softmax(q k^T * scale) [B, Hq, Nq, Nk] under `mask` (grouped K/V heads repeated); a row that may
    attend to nothing is all zeros, as the kernels output there."""
    allowed = mask.spec.to_dense(mask.num_queries).to(query.device)  # not `mask.dense`: it opens empty rows
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)


@contextmanager
def capture_attention(module: torch.nn.Module) -> Iterator[_Capture]:
    """While active, forwards through the latentkit attention also record, for `module` (one attention layer),
    the attention mass per key group set on the yielded capture's `groups`."""
    capture = _Capture(module)

    def recording(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module is capture.module and capture.groups is not None:
            probs = attention_probabilities(query, key, attention_mask, scaling)
            capture.mass = torch.einsum("bhqk,bgk->bqg", probs, capture.groups.to(probs)) / probs.shape[1]
        return latentkit_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] = recording
    try:
        yield capture
    finally:
        del ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION]


@dataclass
class BlockReadout:
    """Per sample with a latent block: hidden states at its first block's latent positions (mean) and at
    the first position after the block, and last-layer attention mass at the positions after it."""

    indices: list[int]  # which samples (into the answers) have a readout
    at_latents: torch.Tensor  # [n, D] mean post-norm hidden state over the block's positions
    after: torch.Tensor  # [n, D] post-norm hidden state at the first position after the block
    lens_at_latents: list[list[int]]  # the LM head's top-1 token at each latent position
    lens_after: list[int]  # ... and at the position after the block
    attention: list[
        dict[str, float]
    ]  # mass on latent / image / other positions, and per latent / image token


def _first_block(trajectory: Trajectory, kind: int) -> list[int] | None:
    """Generated indices of the trajectory's first continuous block of `kind` with a position after it."""
    indices = sorted(i for i in trajectory.vectors if trajectory.kinds[i] == kind)
    if not indices:
        return None
    run = [indices[0]]
    while run[-1] + 1 in trajectory.vectors and trajectory.kinds[run[-1] + 1] == kind:
        run.append(run[-1] + 1)
    return run if run[-1] + 1 < len(trajectory) else None


@torch.no_grad()
def read_blocks(
    backbone: Backbone, answers: Sequence[Sequence[Trajectory]], kind: int, batch_size: int
) -> BlockReadout:
    """Replay, per answer, the first trajectory whose first block of `kind` has a position after it."""
    picked: list[tuple[int, Trajectory, list[int]]] = []
    for index, trajectories in enumerate(answers):
        for trajectory in trajectories:
            block = _first_block(trajectory, kind)
            if block is not None:
                picked.append((index, trajectory, block))
                break
    readout = BlockReadout(
        [], torch.zeros(0, backbone.hidden_size), torch.zeros(0, backbone.hidden_size), [], [], []
    )
    at_latents, after = [], []
    layer = backbone.decoder().layers[-1].self_attn
    for start in range(0, len(picked), batch_size):
        chunk = picked[start : start + batch_size]
        trajectories = [t for _, t, _ in chunk]
        with capture_attention(layer) as capture:
            capture.groups = _key_groups(trajectories, [b for _, _, b in chunk], kind, backbone.device)
            out, batch = replay_forward(backbone, trajectories)
        hidden = out.last_hidden_state.float()
        for row, (index, trajectory, block) in enumerate(chunk):
            offset = batch.prompt_lengths[row]
            latent_rows = hidden[row, [offset + i for i in block]]
            after_row = hidden[row, offset + block[-1] + 1]
            readout.indices.append(index)
            at_latents.append(latent_rows.mean(0).cpu())
            after.append(after_row.cpu())
            readout.lens_at_latents.append(backbone.logits(latent_rows).argmax(-1).tolist())
            readout.lens_after.append(int(backbone.logits(after_row[None]).argmax(-1)))
            answer_rows = range(offset + block[-1] + 1, offset + len(trajectory))
            readout.attention.append(
                _attention_summary(capture.mass[row, list(answer_rows)], capture.groups[row])
            )
    if picked:
        readout.at_latents, readout.after = torch.stack(at_latents), torch.stack(after)
    return readout


def _key_groups(
    trajectories: list[Trajectory], blocks: list[list[int]], kind: int, device: torch.device
) -> torch.Tensor:
    """bool [B, 2, N]: the replayed sequence's latent-block columns and question-image columns."""
    width = max(len(t.prompt) + len(t) for t in trajectories)
    groups = torch.zeros(len(trajectories), 2, width, dtype=torch.bool)
    for row, (trajectory, block) in enumerate(zip(trajectories, blocks)):
        offset = len(trajectory.prompt)
        groups[row, 0, [offset + i for i in block]] = True
        groups[row, 1, :offset] = trajectory.prompt.kinds == int(Kind.IMAGE)
    return groups.to(device)


def _attention_summary(mass: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """Mean over the answer rows of the mass on each group, and that mass per token of the group."""
    latent, image = (float(v) for v in mass.float().mean(0))
    latent_tokens, image_tokens = (int(g.sum()) for g in groups)
    return {
        "latent": latent,
        "image": image,
        "other": 1.0 - latent - image,
        "latent_per_token": latent / latent_tokens,
        "image_per_token": image / image_tokens if image_tokens else float("nan"),
        "answer_positions": int(mass.shape[0]),
    }


def mean_attention(summaries: list[dict[str, float]]) -> dict[str, Any] | None:
    """The per-sample attention summaries averaged over samples (image entries over samples with an image)."""
    if not summaries:
        return None
    result: dict[str, Any] = {}
    for name in ("latent", "image", "other", "latent_per_token", "image_per_token"):
        values = [s[name] for s in summaries if s[name] == s[name]]  # NaN: no image in that prompt
        result[name] = sum(values) / len(values) if values else None
    result["samples"] = len(summaries)
    result["answer_positions"] = sum(int(s["answer_positions"]) for s in summaries)
    return result
