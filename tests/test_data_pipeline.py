"""The data pipeline: the Arrow record cache (built once, reused, rebuilt when stale, same errors as the plain
loader), the sample order (mix weights, length grouping, exact on resume), the layout cache and the length
pre-filter, through the real `datasets` library and the real trainer."""

from __future__ import annotations

import copy
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import pytest
from helpers import latentkit, metrics, train_args
from test_faults import one_line_error, run_cli
from test_records import BAD_RECORDS, make_record, write_dataset

from latentkit.config import DataSection
from latentkit.data import load_training_records
from latentkit.errors import DataError
from latentkit.record_cache import META_FILE, CachedSamples, load_cached_records
from latentkit.records import load_records, record_rules
from latentkit.sampling import SampleOrder, apportion, mix_weights
from latentkit.stage_data import LayoutCache, LayoutDataset, layout_bytes, sample_lengths
from latentkit.trainer import micro_batch_schedule, sample_indices


def direct(work):
    return work()


def cached(path: Path, cache: Path, **kwargs):
    return load_cached_records(path, record_rules(path), cache, **kwargs)


@pytest.fixture
def monet_root(tmp_path: Path) -> Path:
    root = tmp_path / "Monet-SFT-125K"
    write_dataset(root / "Visual_CoT", [make_record(f"viscot-{i}") for i in range(3)])
    write_dataset(root / "CogCoM", [make_record("cogcom-0", dataset="CogCoM")])
    return root


# --- the record cache ---------------------------------------------------------------------------------------


def test_cache_holds_what_the_plain_loader_reads_and_is_reused(monet_root, tmp_path, capsys):
    data = DataSection(path=monet_root, cache_dir=tmp_path / "cache")
    loaded = load_training_records(data, tmp_path / "run", direct)
    assert isinstance(loaded.samples, CachedSamples)
    assert list(loaded.samples) == load_records(monet_root).samples
    assert loaded.samples[1:3] == load_records(monet_root).samples[1:3]
    assert loaded.samples.sources == ["CogCoM", "Visual_CoT", "Visual_CoT", "Visual_CoT"]
    assert "record cache: 4 records" in capsys.readouterr().out
    (folder,) = (tmp_path / "cache").iterdir()
    assert json.loads((folder / META_FILE).read_text())["records"] == 4

    again = load_training_records(data, tmp_path / "other-run", direct)
    assert "record cache" not in capsys.readouterr().out  # read, not rebuilt
    assert list(again.samples) == list(loaded.samples)
    # A DataLoader worker gets the samples pickled: the memory-mapped table travels, not a copy of the rows.
    assert list(pickle.loads(pickle.dumps(again.samples))) == list(loaded.samples)


def test_a_changed_record_file_rebuilds_and_the_stale_cache_goes(monet_root, tmp_path):
    cache = tmp_path / "cache"
    assert len(cached(monet_root, cache).samples) == 4
    (before,) = cache.iterdir()
    records = [make_record(f"viscot-{i}") for i in range(5)]
    path = monet_root / "Visual_CoT" / "train.json"
    path.write_text(json.dumps(records))
    os.utime(path, ns=(1, 1))  # even a file whose size and time were kept would be caught by one or the other
    loaded = cached(monet_root, cache)
    assert [s.sample_id for s in loaded.samples] == ["cogcom-0", *(f"viscot-{i}" for i in range(5))]
    (after,) = cache.iterdir()
    assert after != before


def test_loader_settings_are_part_of_the_fingerprint(tmp_path):
    record = make_record("r")
    record["data"][2]["content"][2]["text"] = "The square is red, so \\boxed{red}."  # no observation
    path = write_dataset(tmp_path / "data", [record])
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="no <observation>"):
        cached(path, cache)
    relaxed = load_cached_records(path, record_rules(path, require_observation_after_aux=False), cache)
    assert [s.sample_id for s in relaxed.samples] == ["r"]
    with pytest.raises(DataError, match="no <observation>"):
        cached(path, cache)


@pytest.mark.parametrize("reason", sorted(BAD_RECORDS))
def test_bad_records_raise_the_plain_loaders_one_line_error(tmp_path, reason):
    corrupt = BAD_RECORDS[reason][0]
    bad = copy.deepcopy(make_record("bad"))
    corrupt(bad)
    path = write_dataset(tmp_path / "data", [make_record("good"), bad, make_record("good-2")])
    with pytest.raises(DataError) as plain:
        load_records(path)
    with pytest.raises(DataError) as through_cache:
        cached(path, tmp_path / "cache")
    assert str(through_cache.value) == str(plain.value) and "\n" not in str(plain.value)
    skipped = cached(path, tmp_path / "cache", on_bad_record="skip")
    assert [s.sample_id for s in skipped.samples] == ["good", "good-2"]
    assert skipped.skipped == 1 and skipped.skip_reasons == {reason: 1}


def test_bad_json_lines_whole_files_and_limit(tmp_path):
    jsonl = tmp_path / "data" / "train.jsonl"
    write_dataset(tmp_path / "data", [])
    (tmp_path / "data" / "train.json").unlink()
    lines = [json.dumps(make_record("a")), "{not json", json.dumps(make_record("b"))]
    jsonl.write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"train\.jsonl: record 1 \(line 2\): invalid JSON"):
        cached(jsonl, cache)
    assert [s.sample_id for s in cached(jsonl, cache, limit=1).samples] == ["a"]  # the bad line lies past it
    skipped = cached(jsonl, cache, on_bad_record="skip", limit=2)
    assert [s.sample_id for s in skipped.samples] == ["a", "b"] and skipped.skip_reasons == {
        "invalid_json": 1
    }
    broken = tmp_path / "data" / "broken.json"
    broken.write_text('[{"data": ')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 1"):
        cached(broken, cache)
    assert not any(p.name.startswith(".build-") for p in cache.iterdir())  # a failed build leaves nothing


def test_several_processes_build_the_same_cache(monet_root, tmp_path):
    one = cached(monet_root, tmp_path / "one")
    two = cached(monet_root, tmp_path / "two", num_proc=2)
    assert list(two.samples) == list(one.samples)


def test_data_mix_must_name_the_sub_datasets(monet_root, tmp_path):
    base = {"path": monet_root, "cache_dir": tmp_path / "cache"}
    for mix, problem in [
        ({"Visual_CoT": 1, "CogCom": 1}, "data.mix names 'CogCom', which is not a sub-dataset of"),
        ({"Visual_CoT": 1}, "data.mix has no weight for sub-dataset 'CogCoM'"),
        ({"Visual_CoT": 0, "CogCoM": 0}, "data.mix weights are all 0"),
    ]:
        with pytest.raises(DataError) as err:
            load_training_records(DataSection(**base, mix=mix), tmp_path / "run", direct)
        assert problem in str(err.value) and "\n" not in str(err.value)
    loaded = load_training_records(DataSection(**base, mix={"Visual_CoT": 3, "CogCoM": 1}), tmp_path, direct)
    assert len(loaded.samples) == 4


def test_a_negative_mix_weight_is_a_config_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", f"run.output_dir={tmp_path}", "data.mix.a=-1")
    assert "data.mix.a" in one_line_error(code, err)


# --- the sample order ---------------------------------------------------------------------------------------


def test_the_default_order_is_the_one_every_run_so_far_used():
    order = SampleOrder(range(10), seed=3, stage_index=1)
    assert order.indices(range(35)) == sample_indices(10, 3, 1, range(35))


def test_dropped_samples_are_never_drawn():
    order = SampleOrder([0, 2, 3, 5], seed=0, stage_index=0)
    for epoch in range(3):
        assert sorted(order.indices(range(epoch * 4, epoch * 4 + 4))) == [0, 2, 3, 5]


def test_mix_draws_each_sub_dataset_by_weight():
    sources = ["a"] * 6 + ["b"] * 90 + ["c"] * 4
    order = SampleOrder(
        range(100), seed=0, stage_index=0, sources=sources, mix={"a": 2.0, "b": 1.0, "c": 0.0}
    )
    assert apportion(100, {"a": 2.0, "b": 1.0}) == {"a": 67, "b": 33}
    for epoch in range(3):
        drawn = Counter(sources[i] for i in order.indices(range(epoch * 100, epoch * 100 + 100)))
        assert drawn == {"a": 67, "b": 33}
    # The small sub-dataset repeats, each of its samples as often as the others (give or take one).
    a_counts = Counter(i for i in order.indices(range(300)) if sources[i] == "a")
    assert set(a_counts) == set(range(6)) and max(a_counts.values()) - min(a_counts.values()) <= 1
    # b's 90 samples spread over epochs: none is drawn twice within its first 90 draws (epochs 0-1 and part of 2).
    b_drawn = [i for i in order.indices(range(200)) if sources[i] == "b"]
    assert len(b_drawn) == 66 and len(set(b_drawn)) == 66
    assert {i for i in order.indices(range(300)) if sources[i] == "b"} == set(range(6, 96))


def test_mix_weights_check_names_and_apportion_sums_exactly():
    assert mix_weights({"x": 1, "y": 0}, ["x", "y", "x"], "d") == {"x": 1.0, "y": 0.0}
    with pytest.raises(DataError, match="not a sub-dataset of d"):
        mix_weights({"x": 1, "z": 1}, ["x"], "d")
    for total in (1, 7, 100):
        assert sum(apportion(total, {"p": 1 / 3, "q": 1 / 3, "r": 1 / 3}).values()) == total


def test_length_grouping_sorts_within_groups_and_keeps_the_epoch():
    lengths = [(i * 37) % 101 for i in range(40)]
    order = SampleOrder(range(40), seed=1, stage_index=0, lengths=lengths, group_size=8)
    epoch = order.indices(range(40))
    assert sorted(epoch) == list(range(40))
    plain = SampleOrder(range(40), seed=1, stage_index=0).indices(range(40))
    for start in range(0, 40, 8):
        group = epoch[start : start + 8]
        assert sorted(group) == sorted(plain[start : start + 8])
        assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)


@pytest.mark.parametrize("grouped", [False, True])
def test_a_resumed_schedule_continues_the_uninterrupted_one(grouped):
    sources = ["a"] * 30 + ["b"] * 7

    def order() -> SampleOrder:  # rebuilt, as a resumed process does
        return SampleOrder(
            [i for i in range(37) if i != 4],
            seed=5,
            stage_index=2,
            sources=sources,
            mix={"a": 1.0, "b": 1.0},
            lengths=list(range(37)) if grouped else None,
            group_size=12 if grouped else None,
        )

    common = {"seed": 5, "stage_index": 2, "steps": 20, "batch_size": 3, "accum": 2, "world": 2}
    for rank in (0, 1):
        whole = micro_batch_schedule(37, start_step=0, rank=rank, order=order(), **common)
        resumed = micro_batch_schedule(37, start_step=7, rank=rank, order=order(), **common)
        assert resumed == whole[7 * 2 :]


# --- the layout cache and the length pre-filter ------------------------------------------------------------


class CountingMethod:
    """A method whose layouts are real (sft's) and counted, to see which ones the cache saves."""

    def __init__(self, method):
        self.inner, self.built = method, Counter()

    def layout(self, sample, stage):
        self.built[sample.sample_id] += 1
        return self.inner.layout(sample, stage)


@pytest.fixture(scope="module")
def sft():
    from latentkit.backbone import build_backbone
    from latentkit.config import ModelSection
    from latentkit.registry import get_method

    backbone = build_backbone(ModelSection())
    method_cls = get_method("sft")
    method = method_cls(method_cls.Config())
    method.setup(backbone)
    return method


def test_layouts_are_built_once_and_the_cache_is_bounded(monet_root, sft):
    samples = load_records(monet_root).samples
    counting = CountingMethod(sft)
    dataset = LayoutDataset(samples, counting, "sft", 4096, 0, cache_bytes=1 << 30)
    dataset.schedule = [[0, 1], [2, 3], [1, 0], [3, 2]]
    first = [dataset[i] for i in range(4)]
    assert set(counting.built.values()) == {1} and dataset.cache.hits == 4
    assert [layout.key for layout in first[2].layouts] == [samples[1].key, samples[0].key]
    assert first[2].input_ids[0].tolist() == first[0].input_ids[1].tolist()  # the same layout, reused
    assert pickle.loads(pickle.dumps(dataset)).cache.entries == {}  # workers start empty

    one = layout_bytes(dataset.build(0))
    bounded = LayoutDataset(samples, CountingMethod(sft), "sft", 4096, 0, cache_bytes=2 * one + one // 2)
    for index in (0, 1, 2, 0):
        bounded.build(index)
    assert bounded.method.built[samples[0].sample_id] == 2  # 0 was the least recently used when 2 came in
    assert bounded.cache.size <= bounded.cache.limit_bytes

    off = LayoutDataset(samples, CountingMethod(sft), "sft", 4096, 0, cache_bytes=0)
    off.build(0), off.build(0)
    assert off.method.built[samples[0].sample_id] == 2


def test_dataloader_workers_read_the_memory_mapped_samples(monet_root, tmp_path, sft):
    import torch

    samples = cached(monet_root, tmp_path / "cache").samples
    dataset = LayoutDataset(samples, sft, "sft", 4096, 0, cache_bytes=1 << 30)
    dataset.schedule = [[0, 1], [2, 3], [3, 0]]
    in_process = [dataset[i] for i in range(3)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1, collate_fn=lambda b: b)
    for mine, theirs in zip(in_process, loader, strict=True):
        assert theirs.keys == mine.keys and torch.equal(theirs.input_ids, mine.input_ids)
        assert torch.equal(theirs.pixel_values, mine.pixel_values)


def test_lengths_built_in_workers_or_striped_over_processes_agree(monet_root, tmp_path, sft):
    samples = cached(monet_root, tmp_path / "cache").samples
    dataset = LayoutDataset(samples, sft, "sft", 4096, 0, cache_bytes=1 << 30)
    direct_lengths = [len(sft.layout(sample, "sft")) for sample in samples]
    assert sample_lengths(dataset, 0, 1, lambda part: part, num_workers=2) == direct_lengths
    parts = [[(i, n) for i, n in enumerate(direct_lengths) if i % 2 == 1]]  # what process 1 would send
    assert sample_lengths(dataset, 0, 2, lambda mine: mine + parts[0]) == direct_lengths


def test_a_layout_larger_than_the_bound_is_not_kept(monet_root, sft):
    layout = sft.layout(load_records(monet_root).samples[0], "sft")
    cache = LayoutCache(limit_bytes=layout_bytes(layout) - 1)
    cache.put(0, layout)
    assert cache.get(0) is None and cache.size == 0


def long_dataset(root: Path) -> Path:
    """Two sub-datasets: `short` with four short records, `long` with two whose reasoning runs long."""
    write_dataset(root / "short", [make_record(f"short-{i}") for i in range(4)])
    long_records = [make_record(f"long-{i}") for i in range(2)]
    for record in long_records:
        record["data"][2]["content"][2]["text"] += " Let me think again." * 120
    write_dataset(root / "long", long_records)
    return root


@pytest.mark.slow
def test_over_long_samples_are_dropped_and_counted_before_training(tmp_path):
    data = long_dataset(tmp_path / "data")
    common = [f"data.path={data}", "train.steps=3", "data.group_by_length=true"]
    result = latentkit(
        *train_args(tmp_path, "filtered", *common, "data.max_length=400", "train.num_workers=1")
    )
    assert "dropped 2 of 6 samples longer than data.max_length=400" in result.stdout
    (event,) = [m for m in metrics(tmp_path / "filtered") if m.get("event") == "length_filter"]
    assert event["kept"] == 4 and event["dropped"] == 2 and event["longest"] > 400
    assert len([m for m in metrics(tmp_path / "filtered") if "loss" in m]) == 3

    # Every sample of `long` is over the limit, so its weight cannot be honoured: said before training, not ignored.
    mixed = train_args(
        tmp_path, "mixed", *common, "data.max_length=400", "data.mix.short=1", "data.mix.long=1"
    )
    failed = latentkit(*mixed, check=False)
    assert failed.returncode == 2 and "data.mix gives sub-dataset 'long' a weight" in failed.stderr
    assert not (tmp_path / "mixed" / "stages" / "sft" / "checkpoints").exists()

    failed = latentkit(*train_args(tmp_path, "none", f"data.path={data}", "data.max_length=20"), check=False)
    assert failed.returncode == 2 and "all 6 samples are longer than data.max_length=20" in failed.stderr
