"""Reasoning Palette's exploration schedules for RL: at training progress tau in [0, 1], rho(tau)
is the fraction of each group's rollouts that get an L = 8 latent prefix; the rest roll out without one."""

from __future__ import annotations

import math
from typing import Literal, get_args

Schedule = Literal["two_phase", "linear", "constant"]


def palette_rho(progress: float, schedule: Schedule) -> float:
    """rho at `progress` tau in [0, 1]: two_phase 1 for tau < 0.5 else 0 (explore, then exploit); linear 1 - tau;
    constant 1 (every rollout prefixed throughout)."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if schedule == "two_phase":
        return 1.0 if progress < 0.5 else 0.0
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown palette schedule {schedule!r}; choose one of {get_args(Schedule)}")


def prefixed_count(group_size: int, rho: float) -> int:
    """How many of a group's `group_size` rollouts get a prefix: rho * G rounded half up, floor(rho * G + 0.5)
    (Python's round would send 2.5 to 2 but 3.5 to 4)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    return math.floor(rho * group_size + 0.5)
