"""RL rewards: each built-in on hand-made completions, the weighted sum and its None rule, user rewards by
dotted path with TRL's signature, and every bad-spec message."""

from __future__ import annotations

import statistics
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from latentkit.errors import ConfigError
from latentkit.rl.rewards import (
    MONET_REWARDS,
    REWARDS,
    RewardSpec,
    accuracy_reward,
    combine_rewards,
    format_reward,
    latent_necessity_reward,
    length_penalty_reward,
    load_reward,
)


@pytest.fixture
def no_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import math_verify` fails, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "math_verify", None)


def _fake_math_verify(monkeypatch: pytest.MonkeyPatch, verdict: bool) -> list[tuple[Any, Any]]:
    """A stand-in `math_verify` whose `verify` answers `verdict`; returns the (gold, answer) pairs it saw.
    Its `parse` fails (empty list) on text holding "unparseable", as math_verify does on what it cannot read."""
    calls: list[tuple[Any, Any]] = []
    module = types.ModuleType("math_verify")
    module.parse = lambda text: [] if "unparseable" in text else [text]  # type: ignore[attr-defined]

    def verify(gold: Any, answer: Any) -> bool:
        calls.append((gold, answer))
        return verdict

    module.verify = verify  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "math_verify", module)
    return calls


def _accuracy(completions: list[str], answers: list[str | None], scorer: str, **columns: Any) -> list[Any]:
    n = len(completions)
    return accuracy_reward([""] * n, completions, [[]] * n, answer=answers, scorer=[scorer] * n, **columns)


# accuracy


@pytest.mark.usefixtures("no_math_verify")
def test_accuracy_numeric_falls_back_to_the_scorer() -> None:
    completions = ["3 + 4 = 7, so \\boxed{7}", "I think \\boxed{8}", "no answer at all", "\\boxed{1,234}"]
    assert _accuracy(completions, ["7", "7", "7", "Natalia sold 1234.\n#### 1234"], "numeric") == [
        1.0,
        0.0,
        0.0,
        1.0,
    ]


def test_accuracy_other_scorers_and_missing_gold() -> None:
    assert _accuracy(
        ["It is \\boxed{Red}.", "\\boxed{blue}", "\\boxed{red}"], ["red", "red", None], "boxed_exact"
    ) == [
        1.0,
        0.0,
        None,
    ]
    choices = [("red", "green"), ("red", "green")]
    assert _accuracy(
        ["The answer is (B).", "\\boxed{red}"], ["green", "green"], "choice_letter", choices=choices
    ) == [
        1.0,
        0.0,
    ]


def test_accuracy_uses_math_verify_for_numeric(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_math_verify(monkeypatch, verdict=True)
    # The scorer would say wrong; math_verify decides, on the GSM8K gold's final answer.
    assert _accuracy(["\\boxed{8}"], ["she has 7\n#### 7"], "numeric") == [1.0]
    assert calls == [(["7"], ["\\boxed{8}"])]


def test_accuracy_math_verify_false_and_scorer_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_math_verify(monkeypatch, verdict=False)
    assert _accuracy(["\\boxed{7}"], ["7"], "numeric") == [0.0]  # math_verify's verdict wins
    assert len(calls) == 1
    assert _accuracy(["\\boxed{7}"], ["unparseable 7"], "numeric") == [1.0]  # gold unreadable: the scorer
    assert _accuracy(["\\boxed{red}"], ["red"], "boxed_exact") == [1.0]  # not a math scorer
    assert len(calls) == 1


def test_accuracy_unknown_scorer() -> None:
    with pytest.raises(ConfigError, match="unknown scorer 'nope'; valid scorers: boxed_exact"):
        _accuracy(["\\boxed{1}"], ["1"], "nope")


# format


@pytest.mark.parametrize(
    ("completion", "finish_reason", "expected"),
    [
        ("Look: <observation>a red square</observation> so \\boxed{red}", "eos", 1.0),
        ("no tags at all, \\boxed{\\frac{1}{2}}", "eos", 1.0),
        ("<abs_vis_token></abs_vis_token><observation>x</observation> \\boxed{1}", "eos", 1.0),  # Monet
        ("<latent></latent> step <latent></latent> \\boxed{1}", "eos", 1.0),  # VaLR
        ("<observation>a</observation><observation>b</observation>\\boxed{1}", "eos", 1.0),
        ("\\fbox{1}", "eos", 1.0),
        ("the answer is 1", "eos", 0.0),  # no box
        ("\\boxed{1} or maybe \\boxed{2}", "eos", 0.0),  # two boxes
        ("\\boxed{1} or maybe \\fbox{2}", "eos", 0.0),
        ("the answer is \\boxed{\\frac{1}{2}", "eos", 0.0),  # box never closed
        ("\\boxed{1}", "length", 0.0),
        ("\\boxed{1}", "stop", 0.0),
        ("<observation>red \\boxed{1}", "eos", 0.0),  # observation never closed
        ("</observation>red<observation> \\boxed{1}", "eos", 0.0),  # closed before opened
        ("<observation>a<observation>b</observation></observation> \\boxed{1}", "eos", 0.0),  # nested
        ("<abs_vis_token> \\boxed{1}", "eos", 0.0),  # latent block never closed
        ("</latent><latent> \\boxed{1}", "eos", 0.0),
        ("\\boxed{1} ha ha ha ha ha", "eos", 0.0),  # a loop, even if it stopped
        ("", "eos", 0.0),
    ],
)
def test_format(completion: str, finish_reason: str, expected: float) -> None:
    assert format_reward([""], [completion], [[]], finish_reason=[finish_reason]) == [expected]


def test_format_tags_are_knobs() -> None:
    text = "<obs>x</obs> <z></z> \\boxed{1}"
    assert format_reward([""], [text], [[]], finish_reason=["eos"]) == [1.0]
    unbalanced = "<obs>x <z></z> \\boxed{1}"
    fn = load_reward(RewardSpec(name="format", kwargs={"observation_tags": ["<obs>", "</obs>"]}))
    assert fn(
        prompts=[""], completions=[text, unbalanced], completion_ids=[[], []], finish_reason=["eos"] * 2
    ) == [
        1.0,
        0.0,
    ]
    fn = load_reward(RewardSpec(name="format", kwargs={"latent_tags": [["<z>", "</z>"]]}))
    assert fn(prompts=[""], completions=["<z> \\boxed{1}"], completion_ids=[[]], finish_reason=["eos"]) == [
        0.0
    ]


# length penalty


def test_length_penalty_ramp() -> None:
    lengths = [0, 6, 7, 8, 9, 10, 11, 50]
    ids = [[0] * n for n in lengths]
    got = length_penalty_reward([""] * 8, [""] * 8, ids, max_length=10, buffer=4)
    assert got == [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]


def test_length_penalty_by_spec_and_bad_buffer() -> None:
    fn = load_reward(RewardSpec(name="length_penalty", kwargs={"max_length": 4, "buffer": 4}))
    assert fn(prompts=[""] * 3, completions=[""] * 3, completion_ids=[[], [1], [1] * 4]) == [0.0, -0.25, -1.0]
    for buffer in (0, 5):
        with pytest.raises(
            ConfigError, match=rf"length_penalty: buffer={buffer} must be in \(0, max_length=4\]"
        ):
            length_penalty_reward([""], [""], [[]], max_length=4, buffer=buffer)


# latent necessity


def test_latent_necessity_cases() -> None:
    completions = ["\\boxed{7}", "\\boxed{7}", "\\boxed{8}", "\\boxed{8}", "\\boxed{7}", "\\boxed{7}"]
    without = [False, True, True, False, None, False]
    answers: list[str | None] = ["7", "7", "7", "7", "7", None]
    got = latent_necessity_reward(
        [""] * 6,
        completions,
        [[]] * 6,
        answer=answers,
        scorer=["boxed_exact"] * 6,
        correct_without_latents=without,
    )
    assert got == [1.0, -0.5, -0.5, 0.0, None, None]
    fn = load_reward(RewardSpec(name="latent_necessity", kwargs={"gain": 2.0, "penalty": 0.25}))
    got = fn(
        prompts=[""] * 6,
        completions=completions,
        completion_ids=[[]] * 6,
        answer=answers,
        scorer=["boxed_exact"] * 6,
        correct_without_latents=without,
        finish_reason=["eos"] * 6,  # a column it does not read
    )
    assert got == [2.0, -0.25, -0.25, 0.0, None, None]


# combine_rewards


def _columns(n: int, **overrides: list[Any]) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {
        "answer": ["7"] * n,
        "choices": [None] * n,
        "metadata": [{}] * n,
        "scorer": ["boxed_exact"] * n,
        "finish_reason": ["eos"] * n,
        "latent_blocks": [1] * n,
        "correct_without_latents": [None] * n,
    }
    return columns | overrides


def test_combine_rewards_weights_none_and_metrics() -> None:
    completions = ["\\boxed{7}", "\\boxed{7} \\boxed{7}", "\\boxed{8}", "\\boxed{7}"]
    columns = _columns(
        4,
        answer=["7", "7", "7", None],
        finish_reason=["eos", "eos", "length", "eos"],
        correct_without_latents=[False, True, None, False],
    )
    specs = [
        RewardSpec(name="accuracy", weight=0.9),
        RewardSpec(name="format", weight=0.1),
        RewardSpec(name="latent_necessity", weight=2.0),
    ]
    totals, metrics = combine_rewards(specs, [""] * 4, completions, [[1]] * 4, columns)
    # accuracy [1, 1, 0, None], format [1, 0, 0, 1], latent necessity [1, -0.5, None, None]
    assert totals == pytest.approx([0.9 + 0.1 + 2.0, 0.9 - 1.0, 0.0, 0.1])
    assert metrics == pytest.approx(
        {
            "reward/accuracy/mean": 2 / 3,
            "reward/accuracy/std": (2 / 9) ** 0.5,  # population std of 1, 1, 0
            "reward/format/mean": 0.5,
            "reward/format/std": 0.5,
            "reward/latent_necessity/mean": 0.25,
            "reward/latent_necessity/std": 0.75,
        }
    )
    assert metrics["reward/accuracy/std"] == pytest.approx(statistics.pstdev([1.0, 1.0, 0.0]))


def test_combine_rewards_all_none_leaves_metrics_out() -> None:
    specs = [RewardSpec(name="accuracy"), RewardSpec(name="latent_necessity")]
    totals, metrics = combine_rewards(specs, [""] * 2, ["\\boxed{7}"] * 2, [[1]] * 2, _columns(2))
    assert totals == [1.0, 1.0]
    assert metrics == {"reward/accuracy/mean": 1.0, "reward/accuracy/std": 0.0}


def test_monet_rewards() -> None:
    assert [(spec.name, spec.weight, spec.kwargs) for spec in MONET_REWARDS] == [
        ("accuracy", 0.9, {}),
        ("format", 0.1, {}),
    ]
    totals, _ = combine_rewards(
        MONET_REWARDS, [""] * 3, ["\\boxed{7}", "\\boxed{8}", "7"], [[1]] * 3, _columns(3)
    )
    assert totals == pytest.approx([1.0, 0.1, 0.0])
    assert set(REWARDS) == {"accuracy", "format", "length_penalty", "latent_necessity"}


# user rewards by dotted path

USER_MODULE = """
def count_ids(prompts, completions, completion_ids, **kwargs):
    SEEN.update(kwargs)
    return [float(len(ids)) for ids in completion_ids]

def every_other(prompts, completions, completion_ids, **kwargs):
    return [None if i % 2 else 1.0 for i in range(len(completions))]

def scaled(prompts, completions, completion_ids, scale, offset=0.0, **kwargs):
    return [scale * len(text) + offset for text in completions]

def needs_answer(completions, answer, **kwargs):
    return [float(text == gold) for text, gold in zip(completions, answer)]

def too_short(prompts, completions, completion_ids, **kwargs):
    return [1.0]

def a_tuple(prompts, completions, completion_ids, **kwargs):
    return tuple(1.0 for _ in completions)

class Rewards:
    @staticmethod
    def one(prompts, completions, completion_ids, **kwargs):
        return [1.0] * len(completions)

SEEN = {}
NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    package = tmp_path / "user_rewards_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rewards.py").write_text(textwrap.dedent(USER_MODULE))
    (package / "broken.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("user_rewards_pkg", "user_rewards_pkg.rewards", "user_rewards_pkg.broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import user_rewards_pkg.rewards

    return user_rewards_pkg.rewards


@pytest.mark.parametrize("name", ["user_rewards_pkg.rewards:count_ids", "user_rewards_pkg.rewards.count_ids"])
def test_user_reward_by_dotted_path_gets_every_column(user_module: types.ModuleType, name: str) -> None:
    columns = _columns(2, extra_column=["a", "b"])
    totals, metrics = combine_rewards(
        [RewardSpec(name=name, weight=0.5)], ["p", "q"], ["x", "y"], [[1, 2], [3, 4, 5, 6]], columns
    )
    assert totals == [1.0, 2.0]
    assert metrics == {f"reward/{name}/mean": 3.0, f"reward/{name}/std": 1.0}
    assert user_module.SEEN == columns


def test_user_rewards_with_none_knobs_and_attribute_paths(user_module: types.ModuleType) -> None:
    specs = [
        RewardSpec(name="user_rewards_pkg.rewards:every_other", weight=2.0),
        RewardSpec(name="user_rewards_pkg.rewards:scaled", kwargs={"scale": 0.5}),
        RewardSpec(name="user_rewards_pkg.rewards:Rewards.one", weight=-1.0),
        RewardSpec(name="user_rewards_pkg.rewards:needs_answer", weight=10.0),
    ]
    totals, metrics = combine_rewards(specs, ["p"] * 3, ["7", "ab", "7"], [[1]] * 3, _columns(3))
    assert totals == pytest.approx([2.0 + 0.5 - 1.0 + 10.0, 1.0 - 1.0, 2.0 + 0.5 - 1.0 + 10.0])
    assert metrics["reward/user_rewards_pkg.rewards:every_other/mean"] == 1.0
    assert metrics["reward/user_rewards_pkg.rewards:every_other/std"] == 0.0


# bad specs

VALID = "valid names: accuracy, format, length_penalty, latent_necessity, or a dotted path 'package.module:function'"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (RewardSpec(name="acuracy"), f"unknown reward name 'acuracy'; {VALID}"),
        (
            RewardSpec(name="user_rewards_pkg.rewards:"),
            f"unknown reward name 'user_rewards_pkg.rewards:'; {VALID}",
        ),
        (RewardSpec(name=":count_ids"), f"unknown reward name ':count_ids'; {VALID}"),
        (
            RewardSpec(name="no_such_package.mod:fn"),
            (
                "reward name 'no_such_package.mod:fn': module 'no_such_package.mod' failed to import "
                "(ModuleNotFoundError(\"No module named 'no_such_package'\")); fix the path or install it"
            ),
        ),
        (
            RewardSpec(name="user_rewards_pkg.broken.fn"),
            (
                "reward name 'user_rewards_pkg.broken.fn': module 'user_rewards_pkg.broken' failed to import "
                "(RuntimeError('boom')); fix the path or install it"
            ),
        ),
        (
            RewardSpec(name="user_rewards_pkg.rewards:missing"),
            (
                "reward name 'user_rewards_pkg.rewards:missing': 'user_rewards_pkg.rewards' has no attribute "
                "'missing'; fix the function name"
            ),
        ),
        (
            RewardSpec(name="user_rewards_pkg.rewards:Rewards.two"),
            (
                "reward name 'user_rewards_pkg.rewards:Rewards.two': 'user_rewards_pkg.rewards' has no attribute "
                "'Rewards.two'; fix the function name"
            ),
        ),
        (
            RewardSpec(name="user_rewards_pkg.rewards.NOT_CALLABLE"),
            (
                "reward name 'user_rewards_pkg.rewards.NOT_CALLABLE' is not callable (a int); name a TRL-style "
                "reward function"
            ),
        ),
        (
            RewardSpec(name="length_penalty", kwargs={"max_length": 10}),
            "reward 'length_penalty' needs kwargs.buffer; set it in the reward's kwargs",
        ),
        (
            RewardSpec(name="length_penalty", kwargs={"max_length": 10, "buffer": 2, "bufer": 2}),
            "reward 'length_penalty': kwargs.bufer is not one of its knobs (max_length, buffer); remove or rename it",
        ),
        (
            RewardSpec(name="accuracy", kwargs={"answer": ["7"]}),
            "reward 'accuracy': kwargs.answer is not one of its knobs (it has none); remove or rename it",
        ),
        (
            RewardSpec(name="user_rewards_pkg.rewards:scaled"),
            "reward 'user_rewards_pkg.rewards:scaled' needs kwargs.scale; set it in the reward's kwargs",
        ),
        (
            RewardSpec(name="user_rewards_pkg.rewards:count_ids", kwargs={"scale": 2}),
            (
                "reward 'user_rewards_pkg.rewards:count_ids': kwargs.scale is not one of its knobs (it has none); "
                "remove or rename it"
            ),
        ),
    ],
)
@pytest.mark.usefixtures("user_module")
def test_load_reward_errors(spec: RewardSpec, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_reward(spec)
    assert str(error.value) == message
    assert "\n" not in message


@pytest.mark.parametrize(("function", "got"), [("too_short", "1 values"), ("a_tuple", "a tuple")])
@pytest.mark.usefixtures("user_module")
def test_combine_rewards_checks_what_a_function_returns(function: str, got: str) -> None:
    name = f"user_rewards_pkg.rewards:{function}"
    with pytest.raises(ConfigError) as error:
        combine_rewards([RewardSpec(name=name)], [""] * 2, ["a", "b"], [[1]] * 2, _columns(2))
    assert str(error.value) == (
        f"reward {name!r} returned {got} for 2 completions; it must return a list with one float or None per "
        "completion"
    )


def test_combine_rewards_refuses_a_reward_listed_twice() -> None:
    specs = [RewardSpec(name="format"), RewardSpec(name="accuracy"), RewardSpec(name="format", weight=0.5)]
    with pytest.raises(ConfigError) as error:
        combine_rewards(specs, [""], ["\\boxed{7}"], [[1]], _columns(1))
    assert str(error.value) == "reward 'format' is listed twice; list each reward once"


def test_reward_spec_is_strict() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        RewardSpec(name="accuracy", wieght=1.0)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="at least 1 character"):
        RewardSpec(name="")
    with pytest.raises(ValidationError, match="valid number"):
        RewardSpec(name="accuracy", weight="heavy")  # type: ignore[arg-type]
