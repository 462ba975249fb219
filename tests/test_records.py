"""The canonical record loader on fixture files written in the exact Monet-SFT-125K format."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from latentkit.errors import DataError
from latentkit.records import LoadedRecords, load_records, load_split, write_records
from latentkit.segments import Segment

MARKER = "<abs_vis_token></abs_vis_token>"


def make_record(sample_id: str, dataset: str = "Visual_CoT") -> dict[str, Any]:
    return {
        "data": [
            {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "images/question.png"},
                    {"type": "text", "text": "What colour is the square?"},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": f"Let me zoom in. {MARKER}"},
                    {"type": "image", "image": "images/zoom.png"},
                    {
                        "type": "text",
                        "text": "Zoomed in. <observation>The square is red.</observation> So the answer is "
                        "\\boxed{red}.",
                    },
                ],
            },
        ],
        "metadata": {"dataset_name": dataset, "sample_id": sample_id, "answer": "red"},
    }


def write_dataset(folder: Path, records: list[dict[str, Any]]) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name in ("question.png", "zoom.png"):
        Image.new("RGB", (28, 28), (200, 10, 10)).save(folder / "images" / name)
    path = folder / "train.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture
def monet_root(tmp_path: Path) -> Path:
    root = tmp_path / "Monet-SFT-125K"
    write_dataset(root / "Visual_CoT", [make_record("viscot-0"), make_record("viscot-1")])
    write_dataset(root / "CogCoM", [make_record("cogcom-0", dataset="CogCoM")])
    return root


def test_monet_directory_loads_into_segments(monet_root: Path) -> None:
    loaded = load_records(monet_root)
    assert loaded.skipped == 0
    # Sub-folders are read in sorted order: CogCoM before Visual_CoT.
    assert [s.sample_id for s in loaded.samples] == ["cogcom-0", "viscot-0", "viscot-1"]
    sample = loaded.samples[1]
    folder = (monet_root / "Visual_CoT").absolute()
    assert sample.segments == (
        Segment("text", "system", text="You are a helpful assistant."),
        Segment("image", "user", image=folder / "images" / "question.png"),
        Segment("text", "user", text="What colour is the square?"),
        Segment("text", "assistant", text="Let me zoom in. "),
        Segment("aux_image", "assistant", image=folder / "images" / "zoom.png"),
        Segment("text", "assistant", text="Zoomed in. "),
        Segment("observation", "assistant", text="The square is red."),
        Segment("text", "assistant", text=" So the answer is \\boxed{red}."),
    )
    assert sample.dataset == "Visual_CoT" and sample.answer == "red" and sample.choices is None
    assert sample.images == (folder / "images" / "question.png",)
    assert sample.aux_images == (folder / "images" / "zoom.png",) and sample.has_aux_images
    assert all(p.is_absolute() for p in sample.images + sample.aux_images)
    assert sample.metadata["sample_id"] == "viscot-0"


def test_several_observations_custom_tags_and_limit(tmp_path: Path) -> None:
    record = make_record("r0")
    record["data"][2]["content"][0]["text"] = "Look. <lat>"
    record["data"][2]["content"][2]["text"] = "<obs>A</obs> and <obs>B</obs>."
    record["metadata"]["choices"] = ["red", "blue"]
    write_dataset(tmp_path, [record, make_record("r1")])
    loaded = load_records(
        tmp_path / "train.json", latent_marker="<lat>", observation_tags=("<obs>", "</obs>"), limit=1
    )
    assert len(loaded.samples) == 1
    sample = loaded.samples[0]
    assert [(s.kind, s.text) for s in sample.segments[3:]] == [
        ("text", "Look. "),
        ("aux_image", ""),
        ("observation", "A"),
        ("text", " and "),
        ("observation", "B"),
        ("text", "."),
    ]
    assert sample.choices == ("red", "blue")


def test_jsonl_and_load_split(tmp_path: Path) -> None:
    write_dataset(tmp_path, [])
    lines = [json.dumps(make_record("a")), "", json.dumps(make_record("b"))]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [s.sample_id for s in load_split(tmp_path, "test").samples] == ["a", "b"]
    with pytest.raises(DataError, match="no val.json or val.jsonl"):
        load_split(tmp_path, "val")


def test_write_records_round_trips_atomically(tmp_path: Path) -> None:
    write_dataset(tmp_path, [])
    records = [make_record("ünïcode")]
    write_records(tmp_path / "train.json", records)
    assert json.loads((tmp_path / "train.json").read_text(encoding="utf-8")) == records
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert load_records(tmp_path / "train.json").samples[0].sample_id == "ünïcode"


def _missing_image(r: dict[str, Any]) -> None:
    r["data"][1]["content"][0]["image"] = "images/x.png"


def _wrong_role_order(r: dict[str, Any]) -> None:
    r["data"][1], r["data"][2] = r["data"][2], r["data"][1]


def _unknown_content_type(r: dict[str, Any]) -> None:
    r["data"][1]["content"][1] = {"type": "video", "video": "v.mp4"}


def _marker_without_image(r: dict[str, Any]) -> None:
    del r["data"][2]["content"][1]


def _image_without_marker(r: dict[str, Any]) -> None:
    r["data"][2]["content"][0]["text"] = "Let me zoom in."


def _missing_sample_id(r: dict[str, Any]) -> None:
    del r["metadata"]["sample_id"]


def _missing_observation(r: dict[str, Any]) -> None:
    r["data"][2]["content"][2]["text"] = "The square is red, so \\boxed{red}."


def _unbalanced_observation(r: dict[str, Any]) -> None:
    r["data"][2]["content"][2]["text"] = "<observation>The square is red. \\boxed{red}."


BAD_RECORDS = {
    "missing_image": (_missing_image, "data[1].content[0].image", "file images/x.png not found"),
    "wrong_role_order": (_wrong_role_order, "data[1].role", "expected role 'user', got 'assistant'"),
    "unknown_content_type": (
        _unknown_content_type,
        "data[1].content[1].type",
        "unknown content type 'video'",
    ),
    "marker_without_image": (_marker_without_image, "data[2].content[0].text", "not followed by an image"),
    "image_without_marker": (_image_without_marker, "data[2].content[1]", "not preceded by a text item"),
    "missing_sample_id": (_missing_sample_id, "metadata.sample_id", "missing"),
    "missing_observation": (_missing_observation, "data[2].content[1]", "no <observation>"),
    "unbalanced_observation": (_unbalanced_observation, "data[2].content[2].text", "unbalanced"),
}


@pytest.mark.parametrize("reason", sorted(BAD_RECORDS))
def test_bad_record_error_names_file_record_and_field(tmp_path: Path, reason: str) -> None:
    corrupt, field_path, problem = BAD_RECORDS[reason]
    bad = copy.deepcopy(make_record("bad"))
    corrupt(bad)
    path = write_dataset(tmp_path / "data", [make_record("good"), bad])
    with pytest.raises(DataError) as err:
        load_records(path)
    message = str(err.value)
    assert f"{path}: record 1: field {field_path}: " in message
    assert problem in message and "data.on_bad_record=skip" in message
    assert "\n" not in message


def test_skip_mode_counts_every_bad_record_by_reason(tmp_path: Path) -> None:
    records = [make_record("good-0")]
    for reason, (corrupt, _, _) in sorted(BAD_RECORDS.items()):
        bad = make_record(reason)
        corrupt(bad)
        records.append(bad)
    records.append(make_record("good-1"))
    loaded = load_records(write_dataset(tmp_path, records), on_bad_record="skip")
    assert [s.sample_id for s in loaded.samples] == ["good-0", "good-1"]
    assert loaded.skipped == len(BAD_RECORDS)
    assert loaded.skip_reasons == {reason: 1 for reason in BAD_RECORDS}


def test_observation_check_can_be_turned_off(tmp_path: Path) -> None:
    record = make_record("r")
    _missing_observation(record)
    loaded = load_records(write_dataset(tmp_path, [record]), require_observation_after_aux=False)
    assert [s.kind for s in loaded.samples[0].segments].count("observation") == 0


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    write_dataset(tmp_path, [])
    broken = tmp_path / "broken.json"
    broken.write_text('[{"data": ', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 1"):
        load_records(broken)
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(json.dumps(make_record("a")) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl: record 1 \(line 2\): invalid JSON"):
        load_records(jsonl)
    loaded: LoadedRecords = load_records(jsonl, on_bad_record="skip")
    assert len(loaded.samples) == 1 and loaded.skip_reasons == {"invalid_json": 1}


def test_missing_path_says_how_to_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_records(missing)
    assert str(missing) in str(err.value)
    assert "data.path=" in str(err.value) and "latentkit data synth" in str(err.value)
    with pytest.raises(DataError, match="data.path="):
        load_split(missing, "train")


def test_sub_datasets_with_their_own_splits_never_mix_them(tmp_path):
    """A folder of sub-datasets that each ship train/val/test: training reads each one's train file only."""
    from latentkit.synth.arith import generate_synth_arith

    for name, seed in (("a", 1), ("b", 2)):
        generate_synth_arith(tmp_path / name, n_train=3, n_val=2, n_test=4, seed=seed)
    train = load_records(tmp_path)
    assert len(train.samples) == 6 and all("-train-" in s.sample_id for s in train.samples)
    test = load_records(tmp_path, split="test")
    assert len(test.samples) == 8 and all("-test-" in s.sample_id for s in test.samples)
