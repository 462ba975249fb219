"""Evaluation: rule-based answer scorers (boxed answer, option letter, normalised exact match, number).

Reports must name the scorer used: the papers' numbers came from an LLM judge, and exact rules read lower.
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
