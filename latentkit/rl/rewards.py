"""RL rewards with TRL's reward-function contract, so TRL's functions and a user's own plug in by dotted path.

A reward function is called with keywords only, as TRL calls it:

    fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]

`completions` are the decoded texts, `completion_ids` their token ids, and `columns` (one entry per completion)
are what the RL loop passes: `answer` (gold, None when the sample has none), `choices`, `metadata`, `scorer` (the
benchmark scorer's name), `finish_reason`, `latent_blocks` (latent blocks the completion used) and
`correct_without_latents` (from a re-roll with the latents removed; None where there was none). Every function
takes `**kwargs` and ignores the columns it does not read.

None means "not applicable to this sample": the value is left out of that function's mean and std, and counts
as 0 in the weighted sum (TRL's rule: its weighted sum is a `nansum`).
"""

from __future__ import annotations

import importlib
import inspect
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from latentkit.config import RewardSpec
from latentkit.errors import ConfigError
from latentkit.eval.runner import repeats_at_end
from latentkit.eval.scorers import extract_boxed, get_scorer, gsm8k_gold

RewardFunc = Callable[..., list[float | None]]

# Scorers whose gold answers are math, checked with `math_verify` when it is installed.
MATH_SCORERS = frozenset({"numeric"})
# What the loop passes besides prompts, completions and completion_ids; never a knob set through `kwargs`.
COLUMNS = frozenset(
    {"answer", "choices", "metadata", "scorer", "finish_reason", "latent_blocks", "correct_without_latents"}
)
_CONTRACT = frozenset({"prompts", "completions", "completion_ids"})

OBSERVATION_TAGS = ("<observation>", "</observation>")
# Start and end tokens of a latent block as they appear in decoded text: Monet's, then VaLR's.
LATENT_TAGS = (("<abs_vis_token>", "</abs_vis_token>"), ("<latent>", "</latent>"))
# An answer box as the scorers read it (`extract_boxed`).
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _math_verify(completion: str, gold: str) -> bool | None:
    """`math_verify`'s verdict on `completion` against `gold`; None when it is not installed or cannot parse gold."""
    try:
        import math_verify
    except ImportError:
        return None
    gold_parsed = math_verify.parse(gold)
    if not gold_parsed:
        return None
    return bool(math_verify.verify(gold_parsed, math_verify.parse(completion)))


def _is_correct(
    completion: str,
    gold: str,
    scorer: str,
    choices: Sequence[str] | None,
    metadata: Mapping[str, Any] | None,
) -> bool:
    """The rule of `accuracy_reward` for one completion."""
    if scorer in MATH_SCORERS and (verdict := _math_verify(completion, gsm8k_gold(gold))) is not None:
        return verdict
    return get_scorer(scorer).score(completion, gold, list(choices) if choices else None, metadata).correct


def accuracy_reward(
    prompts: list[Any],
    completions: list[str],
    completion_ids: list[list[int]],
    *,
    answer: list[str | None],
    scorer: list[str],
    choices: list[Sequence[str] | None] | None = None,
    metadata: list[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 where the sample's scorer judges the completion correct, else 0.0; None where the gold answer is None.

    For math scorers (`MATH_SCORERS`) `math_verify` decides when it is importable and parses the gold answer
    (a GSM8K answer's text after "####"); otherwise the scorer does."""
    return [
        None
        if gold is None
        else float(_is_correct(completion, gold, scorer[i], choices and choices[i], metadata and metadata[i]))
        for i, (completion, gold) in enumerate(zip(completions, answer))
    ]


def _tags_alternate(text: str, open_tag: str, close_tag: str) -> bool:
    """Whether the tags occur as open, close, open, close, ... ending closed: balanced and never nested."""
    tags = re.findall(f"{re.escape(open_tag)}|{re.escape(close_tag)}", text)
    return all(tag == (open_tag, close_tag)[i % 2] for i, tag in enumerate(tags)) and len(tags) % 2 == 0


def is_well_formed(
    completion: str,
    finish_reason: str,
    observation_tags: Sequence[str] = OBSERVATION_TAGS,
    latent_tags: Sequence[Sequence[str]] = LATENT_TAGS,
) -> bool:
    """The rule of `format_reward`: the completion ended with the end-of-sequence token (`finish_reason` "eos"),
    holds exactly one answer box (`\\boxed{` or `\\fbox{`, as the scorers read them) whose braces close, its
    observation tags and each pair of latent tags occur as open, close, open, close, ... (balanced, not
    nested; none at all is fine), and it does not end in a repetition loop (`repeats_at_end`: one piece of at
    most 64 characters repeated 4 times)."""
    return (
        finish_reason == "eos"
        and len(_BOX_START.findall(completion)) == 1
        and extract_boxed(completion) is not None
        and _tags_alternate(completion, *observation_tags)
        and all(_tags_alternate(completion, *pair) for pair in latent_tags)
        and not repeats_at_end(completion)
    )


def format_reward(
    prompts: list[Any],
    completions: list[str],
    completion_ids: list[list[int]],
    *,
    finish_reason: list[str],
    observation_tags: Sequence[str] = OBSERVATION_TAGS,
    latent_tags: Sequence[Sequence[str]] = LATENT_TAGS,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 where the completion is a well-formed trace (`is_well_formed`), else 0.0."""
    return [
        float(is_well_formed(completion, reason, observation_tags, latent_tags))
        for completion, reason in zip(completions, finish_reason)
    ]


def length_penalty_reward(
    prompts: list[Any],
    completions: list[str],
    completion_ids: list[list[int]],
    *,
    max_length: int,
    buffer: int,
    **kwargs: Any,
) -> list[float | None]:
    """DAPO's soft overlong penalty on L = len(completion_ids): 0 for L <= max_length - buffer, then linear
    down to -1 at L = max_length, and -1 beyond."""
    if not 0 < buffer <= max_length:
        raise ConfigError(
            f"length_penalty: buffer={buffer} must be in (0, max_length={max_length}]; set kwargs.buffer"
        )
    start = max_length - buffer
    return [max(-1.0, min(0.0, (start - len(ids)) / buffer)) for ids in completion_ids]


def latent_necessity_reward(
    prompts: list[Any],
    completions: list[str],
    completion_ids: list[list[int]],
    *,
    answer: list[str | None],
    scorer: list[str],
    correct_without_latents: list[bool | None],
    choices: list[Sequence[str] | None] | None = None,
    metadata: list[Mapping[str, Any]] | None = None,
    gain: float = 1.0,
    penalty: float = 0.5,
    **kwargs: Any,
) -> list[float | None]:
    """+gain where the answer is correct (as `accuracy_reward` judges it) and its re-roll without latents is not,
    -penalty where the re-roll without latents is correct, 0 otherwise; None where `correct_without_latents`
    or the gold answer is None. The loop does the re-roll and passes its verdicts."""
    with_latents = accuracy_reward(
        prompts, completions, completion_ids, answer=answer, scorer=scorer, choices=choices, metadata=metadata
    )
    rewards: list[float | None] = []
    for correct, correct_without in zip(with_latents, correct_without_latents):
        if correct is None or correct_without is None:
            rewards.append(None)
        elif correct_without:
            rewards.append(-penalty)
        else:
            rewards.append(gain if correct else 0.0)
    return rewards


REWARDS: dict[str, RewardFunc] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "length_penalty": length_penalty_reward,
    "latent_necessity": latent_necessity_reward,
}


# Monet's VLPO rewards (arXiv 2511.21395).
MONET_REWARDS = [RewardSpec(name="accuracy", weight=0.9), RewardSpec(name="format", weight=0.1)]


def _import_path(name: str) -> Any:
    """The object at "package.module:attr.path" or "package.module.attr"."""
    module_name, sep, attribute = name.partition(":")
    if not sep:
        module_name, _, attribute = name.rpartition(".")
    if not module_name or not attribute:
        raise ConfigError(
            f"unknown reward name {name!r}; valid names: {', '.join(REWARDS)}, or a dotted path "
            "'package.module:function'"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # any failure of the user's module is reported in one line
        raise ConfigError(
            f"reward name {name!r}: module {module_name!r} failed to import ({exc!r}); fix the path or install it"
        ) from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(
                f"reward name {name!r}: {module_name!r} has no attribute {attribute!r}; fix the function name"
            )
        target = getattr(target, part)
    return target


def _check_kwargs(spec: RewardSpec, fn: Callable[..., Any]) -> None:
    """Each key of `spec.kwargs` must be a parameter of `fn` that is no column; parameters without a default
    that are neither columns nor set in `kwargs` could never be filled."""
    parameters = {
        name: parameter
        for name, parameter in inspect.signature(fn).parameters.items()
        if name not in _CONTRACT | COLUMNS
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }
    for key in spec.kwargs:
        if key not in parameters:
            raise ConfigError(
                f"reward {spec.name!r}: kwargs.{key} is not one of its knobs "
                f"({', '.join(parameters) or 'it has none'}); remove or rename it"
            )
    for name, parameter in parameters.items():
        if parameter.default is parameter.empty and name not in spec.kwargs:
            raise ConfigError(f"reward {spec.name!r} needs kwargs.{name}; set it in the reward's kwargs")


def load_reward(spec: RewardSpec) -> RewardFunc:
    """The reward function `spec` names, with `spec.kwargs` bound; ConfigError in one line otherwise."""
    fn = REWARDS[spec.name] if spec.name in REWARDS else _import_path(spec.name)
    if not callable(fn):
        raise ConfigError(
            f"reward name {spec.name!r} is not callable (a {type(fn).__name__}); name a TRL-style reward function"
        )
    _check_kwargs(spec, fn)
    return partial(fn, **spec.kwargs) if spec.kwargs else fn


def _metrics(name: str, values: list[float | None]) -> dict[str, float]:
    """Mean and population std over the non-None values; nothing when every value is None."""
    present = [float(value) for value in values if value is not None]
    if not present:
        return {}
    return {
        f"reward/{name}/mean": statistics.fmean(present),
        f"reward/{name}/std": statistics.pstdev(present),
    }


def combine_rewards(
    specs: Sequence[RewardSpec],
    prompts: list[Any],
    completions: list[str],
    completion_ids: list[list[int]],
    columns: Mapping[str, list[Any]],
) -> tuple[list[float], dict[str, float]]:
    """Per completion, the sum of weight x reward over `specs` (a None reward counts 0), and per reward
    `reward/<name>/mean` and `reward/<name>/std` over its non-None values (left out when all are None)."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise ConfigError(f"reward {twice!r} is listed twice; list each reward once")
    totals = [0.0] * len(completions)
    metrics: dict[str, float] = {}
    for spec in specs:
        values = load_reward(spec)(
            prompts=prompts, completions=completions, completion_ids=completion_ids, **columns
        )
        if not isinstance(values, list) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, list) else f"a {type(values).__name__}"
            raise ConfigError(
                f"reward {spec.name!r} returned {got} for {len(completions)} completions; it must return a list "
                "with one float or None per completion"
            )
        for i, value in enumerate(values):
            if value is not None:
                totals[i] += spec.weight * value
        metrics |= _metrics(spec.name, values)
    return totals, metrics
