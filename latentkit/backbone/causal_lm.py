"""Text-only causal LMs (Qwen2/Qwen3/Llama-style) through AutoModelForCausalLM."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from latentkit.backbone.base import Backbone


class CausalLMBackbone(Backbone):
    family: ClassVar[str] = "causal_lm"

    def decoder(self) -> nn.Module:
        return self.hf_model().model

    def module_groups(self) -> dict[str, nn.Module]:
        decoder = self.decoder()
        return {
            "embeddings": decoder.embed_tokens,
            "language_model": decoder,
            "lm_head": self.hf_model().lm_head,
        }
