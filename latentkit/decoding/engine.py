"""The decoding engine: batched, left-padded, KV-cached generation driven by a per-row policy.

One forward per step for the whole batch. A step's feeds may differ in length across rows: the chunk is
left-padded, so every row's last real input is the chunk's last query, and pad columns stay hidden from all
queries. A rewind hides a row's cache columns past the kept length (attention then equals a run that never fed
them) and cuts its trajectory, so the cache is never copied; branching is a rewind to a remembered length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from latentkit.backbone import Backbone
from latentkit.decoding.actions import LM_HEAD, Embeddings, Finish, Proposal, Step, Token
from latentkit.decoding.policy import DecodingPolicy, RowView
from latentkit.decoding.sampling import SamplingParams, sample_tokens
from latentkit.decoding.trajectory import Trajectory
from latentkit.layout import Layout, collate, inputs_embeds
from latentkit.masks import causal_mask, with_padding

# Enough trailing tokens to hold any stop string once decoded; the text is re-checked in full on a hit.
_STOP_WINDOW_TOKENS = 16


def stop_tokens(backbone: Backbone) -> set[int]:
    """End of turn and end of text both end a generation."""
    ids = {backbone.token_id(backbone.chat.im_end)}
    if backbone.tokenizer.eos_token_id is not None:
        ids.add(int(backbone.tokenizer.eos_token_id))
    return ids


def left_pad(
    layouts: Sequence[Layout], backbone: Backbone
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt embeddings [B, L, D], position ids ([B, L] or [3, B, L]) and validity [B, L], left-padded."""
    batch = collate(list(layouts), pad_id=backbone.token_id(backbone.chat.pad)).to(backbone.device)
    embeds = inputs_embeds(backbone, batch)
    positions, valid = batch.position_ids.clone(), batch.valid.clone()
    length = embeds.shape[1]
    for row, layout in enumerate(layouts):
        shift = length - len(layout)
        embeds[row] = torch.roll(embeds[row], shift, dims=0)
        positions[..., row, :] = torch.roll(positions[..., row, :], shift, dims=-1)
        valid[row] = torch.roll(valid[row], shift, dims=0)
    return embeds, positions, valid


@dataclass
class _Row:
    """Engine-side state of one row: its cache columns (one per visible position) and the next position."""

    index: int
    trajectory: Trajectory
    columns: list[int]
    prompt_next: int
    head: str = LM_HEAD
    finished: bool = False
    feed: torch.Tensor | int | None = None  # vectors [n, D] or a token id to feed this step
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def next_position(self) -> int:
        positions = self.trajectory.positions
        return positions[-1] + 1 if positions else self.prompt_next


@torch.no_grad()
def decode(
    backbone: Backbone,
    prompts: Sequence[Layout],
    params: SamplingParams,
    policy: DecodingPolicy | None = None,
    record_hidden: bool = False,
) -> list[Trajectory]:
    """Continue every prompt under `policy` (default: plain tokens); one trajectory per prompt, in order."""
    policy = policy or DecodingPolicy()
    prompts = list(prompts)
    heads = policy.heads(backbone)
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=backbone.device).manual_seed(params.seed)
    embeds, positions, valid = left_pad(prompts, backbone)
    size, width = valid.shape
    rows = [
        _Row(
            index,
            Trajectory(prompt, decision_hidden=[] if record_hidden else None),
            list(range(width - len(prompt), width)),
            int(prompt.position_ids.max()) + 1,
        )
        for index, prompt in enumerate(prompts)
    ]
    policy.begin(backbone, prompts)
    cache = DynamicCache(config=backbone.hf_model().config)
    out = backbone.forward(embeds, positions, with_padding(causal_mask(size, width), valid), cache)
    eos = stop_tokens(backbone)
    for step in range(params.max_new_tokens):
        hidden = out.last_hidden_state[:, -1]
        live = [index for index, row in enumerate(rows) if not row.finished]
        proposals = _propose(hidden, live, rows, heads, params, generator)
        for index in live:
            row = rows[index]
            view = RowView(step, index, len(row.columns), row.trajectory)
            _apply(backbone, row, policy.decide(proposals[index], view), proposals[index], valid, eos, params)
        feeding = [row for row in rows if row.feed is not None]
        if not feeding or step + 1 == params.max_new_tokens:
            break
        out, valid = _feed(backbone, rows, valid, out.cache, positions.dim() == 3, embeds.dtype)
    for row in rows:
        _finish_text(backbone, row.trajectory, params)
    trajectories = [row.trajectory for row in rows]
    policy.end(trajectories)
    return trajectories


def _propose(hidden, live, rows, heads, params, generator) -> dict[int, Proposal]:
    """Sample every live row's next token from its current head (rows grouped by head)."""
    proposals: dict[int, Proposal] = {}
    for head in sorted({rows[i].head for i in live}):
        members = [i for i in live if rows[i].head == head]
        if head not in heads:
            raise KeyError(f"decoding policy asked for head {head!r}; it offers {', '.join(heads)}")
        ids, log_probs = sample_tokens(heads[head](hidden[members]), params, generator)
        for i, token, log_prob in zip(members, ids.tolist(), log_probs.tolist()):
            proposals[i] = Proposal(token, log_prob, hidden[i], head)
    return proposals


def _apply(backbone, row: _Row, step: Step, proposal: Proposal, valid, eos: set[int], params) -> None:
    """Carry out one decision: rewind, then record (and queue to feed) the action's positions."""
    trajectory = row.trajectory
    prompt_length = len(trajectory.prompt)
    if step.rewind_to is not None:
        if not prompt_length <= step.rewind_to <= len(row.columns):
            raise ValueError(
                f"rewind_to={step.rewind_to} is outside the generated part [{prompt_length}, {len(row.columns)}]"
            )
        dropped = row.columns[step.rewind_to :]
        if dropped:
            valid[row.index, dropped] = False
        del row.columns[step.rewind_to :]
        trajectory.truncate(step.rewind_to - prompt_length)
    row.head = step.head
    action = step.action
    if isinstance(action, Finish):
        row.finished, trajectory.finish_reason = True, action.reason
        return
    trajectory.steps += 1
    first = len(trajectory)
    if isinstance(action, Token):
        sampled = not action.forced and proposal.head == LM_HEAD and action.id == proposal.token
        _record(
            row, action.id, action.kind, proposal.log_prob if sampled else 0.0, sampled, action.emit, proposal
        )
        if action.id in eos:
            row.finished, trajectory.finish_reason = True, "eos"
        elif (
            params.stop_strings
            and action.emit
            and _cut_at_stop(backbone, trajectory.token_ids, params.stop_strings)
        ):
            row.finished, trajectory.finish_reason = True, "stop"
        else:
            row.feed = action.id
    else:
        vectors = action.vectors.reshape(-1, action.vectors.shape[-1])
        axes = _given_positions(action, vectors.shape[0])
        for j in range(vectors.shape[0]):
            declared = action.log_prob is not None
            log_prob = float(action.log_prob[j]) if declared else 0.0
            position = None if axes is None else max(axes[j])
            _record(row, action.placeholder, action.kind, log_prob, declared, False, proposal, position)
            trajectory.vectors[first + j] = vectors[j].detach()
            if axes is not None and len(set(axes[j])) > 1:
                trajectory.mrope_positions[first + j] = axes[j]
        if action.caption is not None:
            trajectory.captions[first] = action.caption
        row.feed = vectors
    row.extras = dict(step.extras)
    for name, values in step.extras.items():
        recorded = trajectory.inputs_extras.setdefault(name, {})
        for j in range(len(trajectory) - first):
            recorded[first + j] = values[j].item()


def _given_positions(action: Embeddings, count: int) -> list[tuple[int, ...]] | None:
    """Per vector, the positions the policy gave ((p,) or (temporal, height, width)), or None."""
    if action.positions is None:
        return None
    given = action.positions.reshape(-1, count) if action.positions.dim() == 2 else action.positions[None]
    if given.shape != (given.shape[0], count) or given.shape[0] not in (1, 3):
        raise ValueError(
            f"Embeddings.positions must be [{count}] or [3, {count}], got {list(action.positions.shape)}"
        )
    return [tuple(column) for column in given.T.tolist()]


def _record(
    row: _Row,
    token: int,
    kind: int,
    log_prob: float,
    is_action: bool,
    emit: bool,
    proposal,
    position: int | None = None,
) -> None:
    trajectory = row.trajectory
    trajectory.positions.append(row.next_position if position is None else position)
    trajectory.input_ids.append(token)
    trajectory.kinds.append(kind)
    trajectory.log_probs.append(log_prob)
    trajectory.is_action.append(is_action)
    trajectory.emitted.append(emit)
    if trajectory.decision_hidden is not None:
        trajectory.decision_hidden.append(proposal.hidden.detach())


def _feed(backbone, rows: list[_Row], valid, cache, mrope: bool, dtype):
    """One forward over every row's queued inputs, left-padded to the longest; returns (output, validity)."""
    token_rows = [row for row in rows if isinstance(row.feed, int)]
    if token_rows:  # one embedding lookup for every row that feeds a token
        ids = torch.tensor([row.feed for row in token_rows], device=valid.device)
        for row, embedded in zip(token_rows, backbone.embed(ids)):
            row.feed = embedded[None]
    feeding = [row for row in rows if row.feed is not None]
    size, width, device = len(rows), max(row.feed.shape[0] for row in feeding), valid.device
    # Built as Python lists and turned into tensors once: per-row tensor writes dominate a small model's step.
    position_rows = [[0] * width for _ in range(size)]
    valid_rows = [[False] * width for _ in range(size)]
    extra_rows: dict[str, list[list[int | float]]] = {}
    extra_dtypes: dict[str, torch.dtype] = {}
    blocks, base = [], valid.shape[1]
    axes: list[
        tuple[int, int, tuple[int, int, int]]
    ] = []  # (row, column, M-RoPE positions) where axes differ
    for row in feeding:
        count = row.feed.shape[0]
        pad = width - count
        blocks.append(
            row.feed if pad == 0 else torch.cat([row.feed.new_zeros(pad, row.feed.shape[1]), row.feed])
        )
        position_rows[row.index][pad:] = row.trajectory.positions[-count:]
        fed = range(len(row.trajectory) - count, len(row.trajectory))
        axes += [
            (row.index, pad + j, row.trajectory.mrope_positions[i])
            for j, i in enumerate(fed)
            if i in row.trajectory.mrope_positions
        ]
        valid_rows[row.index][pad:] = [True] * count
        for name, values in row.extras.items():
            extra_dtypes[name] = values.dtype
            extra_rows.setdefault(name, [[0] * width for _ in range(size)])[row.index][pad:] = values.tolist()
        row.columns.extend(range(base + pad, base + width))
        row.feed, row.extras = None, {}
    chunk = torch.zeros(size, width, backbone.hidden_size, dtype=dtype, device=device)
    chunk[torch.tensor([row.index for row in feeding], device=device)] = torch.stack(blocks).to(dtype)
    positions = torch.tensor(position_rows, device=device)
    new_valid = torch.tensor(valid_rows, device=device)
    extras = {
        name: torch.tensor(v, dtype=extra_dtypes[name], device=device) for name, v in extra_rows.items()
    }
    valid = torch.cat([valid, new_valid], dim=1)
    if mrope:
        positions = positions[None].repeat(3, 1, 1)
        for row_index, column, given in axes:
            positions[:, row_index, column] = torch.tensor(given, device=device)
    elif axes:
        raise ValueError("a decoding policy gave M-RoPE positions, but the backbone's positions are 1-D")
    mask = with_padding(causal_mask(size, valid.shape[1]), valid)
    return backbone.forward(chunk, positions, mask, cache, extras=extras or None), valid


def _finish_text(backbone: Backbone, trajectory: Trajectory, params: SamplingParams) -> None:
    ids = trajectory.token_ids
    if trajectory.finish_reason == "eos":
        ids = ids[:-1]
    text = backbone.tokenizer.decode(ids, skip_special_tokens=False)
    if trajectory.finish_reason == "stop":
        text = text[: min(text.index(stop) for stop in params.stop_strings if stop in text)]
    trajectory.text = text


def _cut_at_stop(backbone: Backbone, ids: list[int], stop_strings: tuple[str, ...]) -> bool:
    """Whether a stop string has appeared (the window first, then the whole text on a hit)."""
    tail = backbone.tokenizer.decode(ids[-_STOP_WINDOW_TOKENS:], skip_special_tokens=False)
    if not any(stop in tail for stop in stop_strings):
        return False
    text = backbone.tokenizer.decode(ids, skip_special_tokens=False)
    return any(stop in text for stop in stop_strings)
