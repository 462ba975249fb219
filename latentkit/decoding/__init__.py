"""The decoding engine (docs/design.md, "Decoding"): one batched, KV-cached generator for eval, diagnose,
`latentkit generate` and RL rollouts. A per-row `DecodingPolicy` decides each step what the row feeds next;
`decode` returns one `Trajectory` per row, which `replay` turns back into one training forward.
"""

from latentkit.decoding.actions import LM_HEAD, Embeddings, Finish, Proposal, Step, Token
from latentkit.decoding.engine import decode, left_pad, stop_tokens
from latentkit.decoding.policy import DecodingPolicy, Head, RowView
from latentkit.decoding.replay import (
    ContinuousDensity,
    ReplayBatch,
    action_log_probs,
    replay_forward,
    replay_inputs,
    token_log_probs,
)
from latentkit.decoding.sampling import SamplingParams, policy_log_probs, sample_tokens
from latentkit.decoding.trajectory import Trajectory

__all__ = [
    "LM_HEAD",
    "ContinuousDensity",
    "DecodingPolicy",
    "Embeddings",
    "Finish",
    "Head",
    "Proposal",
    "ReplayBatch",
    "RowView",
    "SamplingParams",
    "Step",
    "Token",
    "Trajectory",
    "action_log_probs",
    "decode",
    "left_pad",
    "policy_log_probs",
    "replay_forward",
    "replay_inputs",
    "sample_tokens",
    "stop_tokens",
    "token_log_probs",
]
