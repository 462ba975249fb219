"""Rule-based scorers on real-looking model outputs, right, wrong and empty."""

from __future__ import annotations

import pytest

from latentkit.errors import ConfigError, DataError
from latentkit.eval import (
    SCORERS,
    extract_boxed,
    extract_choice,
    get_scorer,
    gsm8k_gold,
    normalize_text,
    parse_number,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The zoomed crop shows a red square. The answer is \\boxed{red}.", "red"),
        ("So $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{\\text{blue}}", "\\text{blue}"),
        ("First guess \\boxed{3}, but rechecking the count gives \\boxed{4}.", "4"),
        ("Final: \\fbox{left}", "left"),
        ("\\boxed{ 42 }", "42"),
        ("The answer is \\boxed{\\frac{1}{2}", None),
        ("The answer is red.", None),
        ("", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The crop shows a green triangle, so the answer is \\boxed{B}.", "B"),
        ("\\boxed{(C)}", "C"),
        ("\\boxed{B. red}", "B"),
        ("\\boxed{\\text{D}}", "D"),
        ("\\boxed{b}", "B"),
        ("The answer is B.", "B"),
        ("Looking at the top-left region, the answer is (C) blue.", "C"),
        ("Answer: (C)", "C"),
        ("Answer:\nD", "D"),
        ("The correct answer is option A because the circle is red.", "A"),
        ("The final answer is **C**.", "C"),
        ("the answer is d.", "D"),
        ("the answer is (a)", "A"),
        ("The best option is B", "B"),
        ("(B)", "B"),
        ("I think it is (D), the square.", "D"),
        ("B. red", "B"),
        ("C) yellow", "C"),
        ("B", "B"),
        ("  c\n", "C"),
        ("The answer is A. Wait, I misread the colour. The answer is C.", "C"),
        ("Options: (A) red (B) blue. The answer is D", "D"),
        ("\\boxed{A} even though the answer is B", "A"),
        ("A red circle is in the top-left corner of the image.", None),
        ("A small blue square sits next to a triangle.\nAn orange star is below it.", None),
        ("To answer\nA red circle is visible.", None),
        ("the answer is a red circle", None),
        ("The answer is Blue.", None),
        ("I cannot determine the colour from this image.", None),
        ("", None),
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_choice(text) == expected


def test_extract_choice_respects_letters() -> None:
    assert extract_choice("The answer is E.") is None
    assert extract_choice("The answer is E.", letters="ABCDE") == "E"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The Red  Square. ", "red square"),
        ("An apple", "apple"),
        ("\\text{Blue}", "blue"),
        ('"left, up, up"', "left, up, up"),
        ("a+b", "a+b"),
        ("", ""),
    ],
)
def test_normalize_text(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234", 1234.0),
        ("$12.50", 12.5),
        ("12 apples", 12.0),
        ("3/4", 0.75),
        ("\\frac{3}{4}", 0.75),
        ("\\dfrac{1}{8}", 0.125),
        ("-\\frac{1}{2}", -0.5),
        ("-2", -2.0),
        ("\u22122", -2.0),
        ("1e3", 1000.0),
        ("50%", 50.0),
        ("1,234,567.5 dollars", 1234567.5),
        ("0.5", 0.5),
        ("3-4", 3.0),
        ("no number here", None),
        ("", None),
    ],
)
def test_parse_number(text: str, expected: float | None) -> None:
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72.\n#### 72",
            "72",
        ),
        ("#### 1,000", "1,000"),
        ("72", "72"),
    ],
)
def test_gsm8k_gold(answer: str, expected: str) -> None:
    assert gsm8k_gold(answer) == expected


@pytest.mark.parametrize(
    ("scorer", "output", "gold", "choices", "extracted", "correct"),
    [
        ("boxed_exact", "The target is a red square, so \\boxed{Red}.", "red", None, "Red", True),
        ("boxed_exact", "Hmm \\boxed{blue} no wait \\boxed{\\text{red}}", "red", None, "\\text{red}", True),
        ("boxed_exact", "The square is green.\nThe answer is \\boxed{green}.", "red", None, "green", False),
        ("boxed_exact", "Reasoning...\nRed.", "red", None, None, False),
        ("boxed_exact", "I cannot determine the colour.", "red", None, None, False),
        ("boxed_exact", "", "red", None, None, False),
        ("exact", "  The Red square. ", "red square", None, "The Red square.", True),
        ("exact", "The answer is red square", "red square", None, "The answer is red square", False),
        ("exact", "   ", "red", None, None, False),
        ("choice_letter", "The answer is (B).", "B", None, "B", True),
        ("choice_letter", "Answer: C", "B", None, "C", False),
        ("choice_letter", "\\boxed{b}", "(B)", None, "B", True),
        ("choice_letter", "The answer is B", "blue", ["red", "blue", "green", "yellow"], "B", True),
        ("choice_letter", "\\boxed{Blue}", "B", ["red", "blue", "green", "yellow"], "B", True),
        ("choice_letter", "The answer is E.", "E", None, "E", True),
        ("choice_letter", "A red circle is in the corner.", "A", None, None, False),
        ("choice_letter", "I cannot determine the answer from the image.", "A", None, None, False),
        ("choice_letter", "", "A", ["red", "blue"], None, False),
        ("numeric", "She sold 48 + 24 = 72 clips.", "#### 72", None, "72", True),
        ("numeric", "Total cost is \\boxed{\\$1,234}.", "1234", None, "\\$1,234", True),
        ("numeric", "So the fraction is \\boxed{\\frac{3}{4}}", "0.75", None, "\\frac{3}{4}", True),
        ("numeric", "The change is -2 degrees.", "-2", None, "-2", True),
        ("numeric", "About 50% of them.", "50", None, "50", True),
        ("numeric", "That gives 12 apples in all.", "12", None, "12", True),
        ("numeric", "48 + 24 = 71", "#### 72", None, "71", False),
        ("numeric", "\\boxed{seventy-two}", "72", None, "seventy-two", False),
        ("numeric", "I cannot determine the number.", "72", None, None, False),
        ("numeric", "", "72", None, None, False),
    ],
)
def test_scorers(
    scorer: str, output: str, gold: str, choices: list[str] | None, extracted: str | None, correct: bool
) -> None:
    result = get_scorer(scorer).score(output, gold, choices)
    assert (result.extracted, result.correct) == (extracted, correct)


def test_numeric_relative_tolerance() -> None:
    numeric = get_scorer("numeric")
    assert numeric.score("1000000.5", "1000000").correct
    assert not numeric.score("1000002", "1000000").correct


def test_choice_letter_rejects_unmappable_gold() -> None:
    with pytest.raises(DataError, match="purple"):
        get_scorer("choice_letter").score("The answer is A", "purple", ["red", "blue"])


def test_registry_names_match() -> None:
    assert sorted(SCORERS) == ["boxed_exact", "choice_letter", "exact", "numeric", "plan_valid"]
    assert all(get_scorer(name).name == name for name in SCORERS)


def test_unknown_scorer_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="unknown scorer 'llm_judge'.*boxed_exact.*numeric"):
        get_scorer("llm_judge")


# Start at row 1, column 1; holes at (1, 4), (2, 2), (3, 4), (4, 1); goal at row 4, column 4.
MAZE = {"board": ["SFFH", "FHFF", "FFFH", "HFFG"]}
MAZE_GOLD = "down, down, right, down, right, right"
OTHER_SHORTEST = "right, right, down, down, down, right"
INTO_HOLE = "down, right, right, down, down, right"  # the second move enters the hole at row 2, column 2
OFF_THE_TOP = "up, down, down, right, down, right, right"


def boxed(plan: str) -> str:
    return f"Each move keeps the agent safe. The plan is \\boxed{{{plan}}}."


@pytest.mark.parametrize(
    ("output", "metadata", "extracted", "correct"),
    [
        (boxed(MAZE_GOLD), MAZE, MAZE_GOLD, True),
        # A shortest plan different from the gold one is still valid.
        (boxed(OTHER_SHORTEST), MAZE, OTHER_SHORTEST, True),
        (boxed("R, R, D, D, D, R"), MAZE, "R, R, D, D, D, R", True),
        (boxed("→ → ↓ ↓ ↓ →"), MAZE, "→ → ↓ ↓ ↓ →", True),
        (boxed("Right Right Down Down Down Right"), MAZE, "Right Right Down Down Down Right", True),
        ("<Output>\nAction plan: D,D,R,D,R,R", MAZE, "D,D,R,D,R,R", True),
        (f"Moves:\n{OTHER_SHORTEST}", MAZE, OTHER_SHORTEST, True),
        (boxed(INTO_HOLE), MAZE, INTO_HOLE, False),
        (boxed(OFF_THE_TOP), MAZE, OFF_THE_TOP, False),
        (boxed("down, down, right"), MAZE, "down, down, right", False),  # safe but short of the goal
        (boxed("down, down, jump"), MAZE, "down, down, jump", False),
        ("", MAZE, None, False),
        # Without a board: exact match of the normalised moves against the gold plan.
        (boxed("D, D, R, D, R, R"), {}, "D, D, R, D, R, R", True),
        (boxed(OTHER_SHORTEST), {}, OTHER_SHORTEST, False),
    ],
)
def test_plan_valid(output: str, metadata: dict, extracted: str | None, correct: bool) -> None:
    result = get_scorer("plan_valid").score(output, MAZE_GOLD, None, metadata)
    assert (result.extracted, result.correct) == (extracted, correct)


def test_plan_valid_off_grid_rule_from_metadata() -> None:
    scorer = get_scorer("plan_valid")
    assert scorer.score(boxed(OFF_THE_TOP), MAZE_GOLD, None, {**MAZE, "off_grid": "stay"}).correct
    assert not scorer.score(boxed(OFF_THE_TOP), MAZE_GOLD, None, MAZE).correct


def test_plan_valid_names_a_malformed_board() -> None:
    with pytest.raises(DataError, match="exactly one start"):
        get_scorer("plan_valid").score("\\boxed{right}", "right", None, {"board": ["FFG"]})
