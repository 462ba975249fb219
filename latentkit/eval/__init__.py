"""Evaluation (docs/design.md, "Evaluation"): benchmark registry and loaders, batched generation, rule-based scorers,
`latentkit eval` (per-sample JSONL + summary) and `latentkit compare` (tables and a chart).

Reports name the scorer used: the papers' numbers came from an LLM judge, and exact rules read lower.
Import submodules directly (`latentkit.eval.runner`, `.compare`, `.diagnose`); this package stays light.
"""

from latentkit.eval.scorers import (
    SCORERS,
    Scorer,
    ScoreResult,
    extract_boxed,
    extract_choice,
    get_scorer,
    gsm8k_gold,
    normalize_text,
    parse_number,
)

__all__ = [
    "SCORERS",
    "ScoreResult",
    "Scorer",
    "extract_boxed",
    "extract_choice",
    "get_scorer",
    "gsm8k_gold",
    "normalize_text",
    "parse_number",
]
