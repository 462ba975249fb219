"""The code head (spec "Generation"): an autoregressive depth head that predicts the C sub-codes of one image
position from the LLM hidden state there and the embeddings of the sub-codes already chosen, and its sampling
with classifier-free guidance.

Depth step c of a position reads the sequence [proj(h), e_0(code_0), ..., e_{c-1}(code_{c-1})] (plus a learned
depth embedding) through a small causal transformer and predicts code_c with codebook c's own output layer. In
training the chosen sub-codes are the targets (teacher forcing); in sampling, the ones drawn so far."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from latentkit.decoding.sampling import SamplingParams, policy_log_probs


class CodeHead(nn.Module):
    """hidden [n, D] (+ sub-codes long [n, C]) -> logits [n, C, N]."""

    def __init__(self, hidden_size: int, codebooks: int, entries: int, width: int, layers: int, heads: int):
        super().__init__()
        self.codebooks, self.entries = codebooks, entries
        self.input = nn.Linear(hidden_size, width)
        self.code_embeddings = nn.Embedding(codebooks * entries, width)  # codebook c's entry k at c * N + k
        self.depth_embeddings = nn.Parameter(torch.zeros(codebooks, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.output = nn.Parameter(torch.randn(codebooks, width, entries) / width**0.5)
        self.output_bias = nn.Parameter(torch.zeros(codebooks, entries))

    def _depth_inputs(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """[n, k, width]: proj(h), then the embeddings of codes[:, :k-1], plus the depth embeddings."""
        steps = codes.shape[1] + 1
        offsets = torch.arange(codes.shape[1], device=codes.device) * self.entries
        embedded = self.code_embeddings(codes + offsets)
        sequence = torch.cat([self.input(hidden.to(self.input.weight.dtype)).unsqueeze(1), embedded], dim=1)
        return sequence + self.depth_embeddings[:steps]

    def _logits(self, sequence: Tensor) -> Tensor:
        steps = sequence.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(steps, device=sequence.device)
        out = self.norm(self.transformer(sequence, mask=causal, is_causal=True))
        return torch.einsum("nkw,kwe->nke", out, self.output[:steps]) + self.output_bias[:steps]

    def forward(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forced logits [n, C, N]: step c sees the true codes[:, :c]."""
        return self._logits(self._depth_inputs(hidden, codes[:, :-1]))

    def step_logits(self, hidden: Tensor, chosen: Tensor) -> Tensor:
        """The logits [n, N] of the next sub-code (index chosen.shape[1]) given the ones chosen [n, c]."""
        return self._logits(self._depth_inputs(hidden, chosen))[:, -1]


@dataclass(frozen=True)
class GuidanceParams:
    """Classifier-free guidance and sampling on the code head's logits (spec "Generation")."""

    scale: float = 3.0
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 0.95


def guided_probabilities(cond: Tensor, uncond: Tensor, params: GuidanceParams) -> Tensor:
    """[..., N] logits with and without the condition -> the sampling distribution [..., N]:
    l = uncond + scale * (cond - uncond), divided by the temperature; then only the top_k largest entries are
    kept, and of those the smallest set, by descending probability, whose mass reaches top_p (the entry that
    crosses top_p included); renormalised."""
    guided = uncond + params.scale * (cond - uncond)
    policy = SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    return policy_log_probs(guided, policy).exp()  # the token sampler's own temperature, top-k and top-p


@torch.no_grad()
def sample_codes(
    head: CodeHead,
    cond_hidden: Tensor,
    uncond_hidden: Tensor,
    params: GuidanceParams,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One image position's C sub-codes long [n, C], drawn sub-code by sub-code under guidance; the condition
    and its absence share the sub-codes already drawn."""
    chosen = torch.zeros(cond_hidden.shape[0], 0, dtype=torch.long, device=cond_hidden.device)
    for _ in range(head.codebooks):
        probs = guided_probabilities(
            head.step_logits(cond_hidden, chosen), head.step_logits(uncond_hidden, chosen), params
        )
        drawn = torch.multinomial(probs, 1, generator=generator)
        chosen = torch.cat([chosen, drawn], dim=1)
    return chosen
