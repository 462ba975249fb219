"""One decoded row as a trajectory: what was fed at every position after the prompt, replayable exactly as
one training forward (`latentkit.decoding.replay`), with its log-probabilities under the sampling policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from latentkit.layout import Layout, LayoutBuilder


@dataclass
class Trajectory:
    """Per generated position i: `input_ids[i]` (a placeholder id where continuous vectors were fed),
    `kinds[i]` (segment kind code), `positions[i]` (rotary position; M-RoPE's three axes are equal after the
    prompt), `log_probs[i]` (under the sampling policy; 0 where `is_action[i]` is False: forced tokens and
    continuous inputs without a declared density), `emitted[i]` (part of the text), `vectors[i]` (the fed
    vector, continuous positions only). `mrope_positions[i]`: the (temporal, height, width) positions where a
    policy fed vectors at M-RoPE positions whose axes differ (an image), `positions[i]` then their largest.
    `captions[i]`: the policy's caption of the run of vectors starting at i. The last position may be the end
    token, recorded but never fed."""

    prompt: Layout
    input_ids: list[int] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    is_action: list[bool] = field(default_factory=list)
    emitted: list[bool] = field(default_factory=list)
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)
    mrope_positions: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    captions: dict[int, str] = field(default_factory=dict)
    inputs_extras: dict[str, dict[int, Any]] = field(default_factory=dict)  # extra name -> position -> value
    decision_hidden: list[torch.Tensor] | None = None  # with record_hidden: the state each position came from
    finish_reason: str = "length"
    text: str = ""
    steps: int = 0  # decisions taken (a latent step or a token each), the generation budget's unit
    extras: dict[str, Any] = field(
        default_factory=dict
    )  # what the policy records (latent counts, codes, ...)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def token_ids(self) -> list[int]:
        """The ids of the text the row wrote (continuous positions and silent tokens left out)."""
        return [t for t, e in zip(self.input_ids, self.emitted) if e]

    @property
    def is_continuous(self) -> torch.Tensor:
        out = torch.zeros(len(self), dtype=torch.bool)
        out[list(self.vectors)] = True
        return out

    def truncate(self, length: int) -> None:
        """Keep the first `length` generated positions (a rewind)."""
        for name in ("input_ids", "kinds", "positions", "log_probs", "is_action", "emitted"):
            del getattr(self, name)[length:]
        self.vectors = {i: v for i, v in self.vectors.items() if i < length}
        self.mrope_positions = {i: p for i, p in self.mrope_positions.items() if i < length}
        self.captions = {i: c for i, c in self.captions.items() if i < length}
        for values in self.inputs_extras.values():
            for i in [i for i in values if i >= length]:
                del values[i]
        if self.decision_hidden is not None:
            del self.decision_hidden[length:]

    def blocks(self, kind: int) -> list[torch.Tensor]:
        """Runs of consecutive continuous positions of `kind`, as [k, D] tensors (e.g. latent blocks)."""
        runs: list[list[torch.Tensor]] = []
        previous = -2
        for index in sorted(self.vectors):
            if self.kinds[index] != kind:
                continue
            if index != previous + 1 or not runs:
                runs.append([])
            runs[-1].append(self.vectors[index])
            previous = index
        return [torch.stack(run) for run in runs]

    def extend(self, builder: LayoutBuilder, segment_index: int, length: int | None = None) -> None:
        """Append the first `length` generated positions (all by default) to a prompt being continued: tokens
        as ids, continuous inputs as embedding slots, each with its kind. The layout gives embedding slots the
        next consecutive positions, not the `mrope_positions` they were fed at."""
        length = len(self) if length is None else length
        index = 0
        while index < length:
            if index in self.vectors:
                end = index
                while end < length and end in self.vectors and self.kinds[end] == self.kinds[index]:
                    end += 1
                vectors = torch.stack([self.vectors[i] for i in range(index, end)])
                builder.add_embeddings(vectors, segment_index, self.kinds[index])
                index = end
            else:
                builder.add_ids([self.input_ids[index]], self.kinds[index], segment_index)
                index += 1

    def to_json(self) -> dict[str, Any]:
        """Everything but the prompt's tensors; vectors as lists (for `latentkit generate --json`)."""
        return {
            "prompt_length": len(self.prompt),
            "prompt_vectors": [[slot.start, int(slot.vectors.shape[0])] for slot in self.prompt.embeddings],
            "input_ids": self.input_ids,
            "kinds": self.kinds,
            "positions": self.positions,
            "log_probs": self.log_probs,
            "is_action": self.is_action,
            "emitted": self.emitted,
            "vectors": {str(i): v.float().tolist() for i, v in self.vectors.items()},
            "mrope_positions": {str(i): list(p) for i, p in self.mrope_positions.items()},
            "captions": {str(i): c for i, c in self.captions.items()},
            "finish_reason": self.finish_reason,
            "text": self.text,
            "steps": self.steps,
            "extras": {k: v for k, v in self.extras.items() if isinstance(v, (int, float, str, bool, list))},
        }
