"""`latentkit suite`: the plan (compute-matched steps split over a baseline's stages, seeds), the refusals of
a bad suite file, and a small grid trained, evaluated, compared and resumed end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import latentkit

from latentkit.errors import ConfigError
from latentkit.suite import load_suite, matched_steps, plan, run_suite

FAST = [
    "train.progress=false",
    "train.batch_size=2",
    "data.synth.n_train=8",
    "data.synth.n_val=0",
    "data.synth.n_test=4",
]


def write(tmp_path: Path, suite: dict) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_matched_runs_take_the_reference_total_split_over_their_stages(tmp_path):
    suite = load_suite(
        write(
            tmp_path,
            {
                "seeds": [0, 3],
                "runs": {
                    "monet": {
                        "method": "monet",
                        "overrides": ["train.steps=4", "train.stages.distill.steps=3", "train.until=latent"],
                    },
                    "nocrop": {
                        "method": "sft",
                        "overrides": ["method.aux_images=false"],
                        "steps_of": "monet",
                    },
                    "curriculum": {"method": "sft-curriculum", "steps_of": "monet"},
                },
            },
        )
    )
    planned = {(name, seed): overrides for name, seed, overrides in plan(suite, tmp_path / "runs")}
    assert len(planned) == 6
    assert "train.stages.sft.steps=11" in planned[("nocrop", 3)]  # 4 + 3 + 4: the stages up to latent
    assert planned[("curriculum", 0)][-2:] == ["train.stages.crops.steps=6", "train.stages.nocrops.steps=5"]
    assert "run.seed=3" in planned[("monet", 3)] and "run.name=monet-seed3" in planned[("monet", 3)]
    assert matched_steps(7, ("a", "b", "c")) == [
        "train.stages.a.steps=3",
        "train.stages.b.steps=2",
        "train.stages.c.steps=2",
    ]


@pytest.mark.parametrize(
    "suite, message",
    [
        ({"runs": {"a": {"method": "sft", "steps_of": "b"}}}, "steps_of='b' names no run"),
        (
            {
                "runs": {
                    "a": {"method": "sft"},
                    "b": {"method": "sft", "steps_of": "a"},
                    "c": {"method": "sft", "steps_of": "b"},
                }
            },
            "not matched itself",
        ),
        ({"seeds": [], "runs": {"a": {"method": "sft"}}}, "seeds is empty"),
        ({"benchmrk": "x", "runs": {}}, "did you mean benchmark"),
        ({"runs": {"a": {"method": "sft"}}, "limit": 0}, "invalid"),
    ],
)
def test_bad_suite_files_are_refused_in_one_line(tmp_path, suite, message):
    with pytest.raises(ConfigError, match=message):
        load_suite(write(tmp_path, suite))


@pytest.mark.slow
def test_a_small_grid_runs_compares_and_resumes(tmp_path):
    suite_file = write(
        tmp_path,
        {
            "seeds": [0, 1],
            "limit": 4,
            "overrides": FAST,
            "runs": {
                "sft": {"method": "sft", "overrides": ["train.steps=2"]},
                "sft-nocrop": {"method": "sft", "overrides": ["method.aux_images=false"], "steps_of": "sft"},
            },
        },
    )
    lines: list[str] = []
    result = run_suite(load_suite(suite_file), tmp_path / "out", log=lines.append)
    assert len(result["entries"]) == 4 and sum("training" in line for line in lines) == 4
    assert {row["group"] for row in result["over_seeds"]} == {"sft (sft)", "sft (sft-nocrop)"}
    for entry in result["entries"]:
        assert 0.0 <= entry["low"] <= entry["accuracy"] <= entry["high"] <= 1.0
    table = (tmp_path / "out" / "comparison" / "comparison.md").read_text()
    assert "Over seeds" in table and "sft (sft-nocrop-seed1)" in table
    assert "| sft-nocrop | sft | 2 | sft |" in table and "| sft | sft | 2 | — |" in table
    # rerun: nothing is retrained, the comparison is the same
    shown = latentkit("suite", str(suite_file), "--out", str(tmp_path / "out")).stdout
    assert "suite: training" not in shown and "Over seeds" in shown
