"""Trajectories back into one training forward: the prompt, then every generated position as it was fed
(token embeddings, continuous vectors written in place), right-padded, causal. Gives the same hidden states
and policy log-probabilities as at sampling time, now with gradient (for RL losses)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from latentkit.backbone import Backbone, BackboneOutput
from latentkit.decoding.sampling import SamplingParams, policy_log_probs
from latentkit.decoding.trajectory import Trajectory
from latentkit.layout import collate, inputs_embeds
from latentkit.masks import MaskSpec, causal_mask, with_padding


@dataclass
class ReplayBatch:
    embeds: torch.Tensor  # [B, N, D]
    position_ids: torch.Tensor  # [B, N] or [3, B, N]
    valid: torch.Tensor  # bool [B, N]
    prompt_lengths: list[int]
    extras: dict[str, torch.Tensor]  # per-token extras the policy fed, [B, N] (0 in the prompt)

    @property
    def mask(self) -> MaskSpec:
        size, length = self.valid.shape
        return with_padding(causal_mask(size, length, self.valid.device), self.valid)

    def generated(self, row: int, length: int) -> slice:
        """Sequence positions of row `row`'s generated part."""
        start = self.prompt_lengths[row]
        return slice(start, start + length)


def replay_inputs(backbone: Backbone, trajectories: Sequence[Trajectory]) -> ReplayBatch:
    device = backbone.device
    prompts = collate([t.prompt for t in trajectories], backbone.token_id(backbone.chat.pad)).to(device)
    prompt_embeds = inputs_embeds(backbone, prompts)
    size = len(trajectories)
    lengths = [len(t.prompt) + len(t) for t in trajectories]
    width = max(lengths)
    mrope = prompts.position_ids.dim() == 3
    rows, positions = (
        [],
        torch.zeros((3, size, width) if mrope else (size, width), dtype=torch.long, device=device),
    )
    names = sorted({name for t in trajectories for name in t.inputs_extras})
    extras = {name: torch.zeros(size, width, dtype=torch.long, device=device) for name in names}
    valid = torch.zeros(size, width, dtype=torch.bool, device=device)
    for b, trajectory in enumerate(trajectories):
        prompt_length = len(trajectory.prompt)
        generated = backbone.embed(torch.tensor(trajectory.input_ids, dtype=torch.long, device=device))
        if trajectory.vectors:
            index = torch.tensor(sorted(trajectory.vectors), device=device)
            vectors = torch.stack([trajectory.vectors[i] for i in sorted(trajectory.vectors)]).to(generated)
            generated = generated.index_copy(0, index, vectors)
        pad = prompt_embeds.new_zeros(width - lengths[b], prompt_embeds.shape[-1])
        rows.append(torch.cat([prompt_embeds[b, :prompt_length], generated.to(prompt_embeds.dtype), pad]))
        positions[..., b, :prompt_length] = prompts.position_ids[..., b, :prompt_length]
        positions[..., b, prompt_length : lengths[b]] = torch.tensor(trajectory.positions, device=device)
        for i, given in trajectory.mrope_positions.items():
            positions[:, b, prompt_length + i] = torch.tensor(given, device=device)
        valid[b, : lengths[b]] = True
        for name, values in trajectory.inputs_extras.items():
            for i, value in values.items():
                extras[name][b, prompt_length + i] = value
    return ReplayBatch(torch.stack(rows), positions, valid, [len(t.prompt) for t in trajectories], extras)


def replay_forward(
    backbone: Backbone, trajectories: Sequence[Trajectory], output_hidden_states: bool = False
) -> tuple[BackboneOutput, ReplayBatch]:
    """One forward over the replayed trajectories (under the caller's grad mode)."""
    batch = replay_inputs(backbone, trajectories)
    out = backbone.forward(
        batch.embeds,
        batch.position_ids,
        batch.mask,
        output_hidden_states=output_hidden_states,
        extras=batch.extras or None,
    )
    return out, batch


def decision_states(
    out: BackboneOutput, batch: ReplayBatch, trajectories: Sequence[Trajectory]
) -> list[torch.Tensor]:
    """Per trajectory, the post-norm hidden state each generated position was decided from: [n, D]."""
    return [
        out.last_hidden_state[b, batch.prompt_lengths[b] - 1 : batch.prompt_lengths[b] - 1 + len(t)]
        for b, t in enumerate(trajectories)
    ]


# log-density of fed vectors z [m, D] given the hidden states they were decided from [m, D]: [m]
ContinuousDensity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def token_log_probs(
    backbone: Backbone, trajectories: Sequence[Trajectory], params: SamplingParams
) -> list[torch.Tensor]:
    """Per trajectory [n]: the sampling policy's log-probability of every sampled token (0 at other positions:
    forced tokens, continuous inputs), recomputed with gradient from one replayed forward."""
    return action_log_probs(backbone, trajectories, params)


def action_log_probs(
    backbone: Backbone,
    trajectories: Sequence[Trajectory],
    params: SamplingParams,
    density: ContinuousDensity | None = None,
) -> list[torch.Tensor]:
    """Per trajectory [n], with gradient from one replayed forward: every sampled token's log-probability and,
    with `density`, every continuous action's log-density `density(z, h)` (z the vector fed, recorded and held
    constant; h the post-norm hidden state at the position before it, which decided it). 0 at other positions."""
    out, batch = replay_forward(backbone, trajectories)
    results = []
    for trajectory, states in zip(trajectories, decision_states(out, batch, trajectories)):
        ids = torch.tensor(trajectory.input_ids, device=states.device)
        actions = torch.tensor(trajectory.is_action, dtype=torch.bool, device=states.device)
        continuous = trajectory.is_continuous.to(states.device)
        sampled = actions & ~continuous
        log_probs = torch.zeros(len(trajectory), device=states.device)
        if bool(sampled.any()):
            chosen = policy_log_probs(backbone.logits(states[sampled]), params)
            log_probs = log_probs.index_put(
                (sampled.nonzero().squeeze(-1),), chosen.gather(-1, ids[sampled, None])[:, 0]
            )
        latent = actions & continuous
        if density is not None and bool(latent.any()):
            where = latent.nonzero().squeeze(-1)
            fed = torch.stack([trajectory.vectors[int(i)] for i in where]).to(states)
            log_probs = log_probs.index_put((where,), density(fed, states[latent]).to(log_probs.dtype))
        results.append(log_probs)
    return results
