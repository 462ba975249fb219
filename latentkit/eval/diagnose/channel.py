"""The latent channel's validity verdict from a method's teacher-forced check (`Method.latent_channel`).

The channel *carries* the answer when the oracle condition (latents that hold the auxiliary images) scores
within `CARRY_MARGIN` of `with_aux` (the auxiliary images given); it is *needed* when every dummy (latents
replaced) stays at or below the midpoint between chance and the oracle. A task is a valid latent setting when
both hold: then a method's own latents can be read against the range from the dummies to the oracle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from latentkit.eval.stats import paired_comparison, wilson_interval

CARRY_MARGIN = 0.10
REFERENCES = ("with_aux", "oracle")


def channel_summary(results: Mapping[str, Sequence[bool | None]], chance: float | None) -> dict[str, Any]:
    """Per condition: accuracy over the scored samples, Wilson interval, and the difference to the oracle
    with an exact McNemar p on the samples scored in both; then the verdict."""
    if "oracle" not in results or "with_aux" not in results:
        raise ValueError(f"a channel check needs 'with_aux' and 'oracle' conditions, got {sorted(results)}")
    oracle = results["oracle"]
    conditions: dict[str, dict[str, Any]] = {}
    for name, correct in results.items():
        scored = [bool(c) for c in correct if c is not None]
        if not scored:
            raise ValueError(f"channel condition {name!r} scored no sample")
        both = [(bool(o), bool(c)) for o, c in zip(oracle, correct) if o is not None and c is not None]
        paired = paired_comparison([o for o, _ in both], [c for _, c in both])
        conditions[name] = {
            "accuracy": sum(scored) / len(scored),
            "interval": wilson_interval(sum(scored), len(scored)).to_json(),
            "samples": len(scored),
            "delta_vs_oracle": paired.delta,
            "p_vs_oracle": paired.p_value,
        }
    with_aux, oracle_accuracy = conditions["with_aux"]["accuracy"], conditions["oracle"]["accuracy"]
    dummies = {name: c["accuracy"] for name, c in conditions.items() if name not in REFERENCES}
    floor = chance if chance is not None else 0.0
    midpoint = floor + (oracle_accuracy - floor) / 2
    carries = oracle_accuracy >= with_aux - CARRY_MARGIN
    needed = bool(dummies) and max(dummies.values()) <= midpoint
    return {
        "conditions": conditions,
        "chance": chance,
        "carries": carries,
        "needed": needed,
        "valid": carries and needed,
        "dummy_ceiling": midpoint,
    }
