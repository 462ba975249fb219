"""Training data: the embedded synthetic task (generated into the run directory) or records from `data.path`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

from latentkit.config import DataSection
from latentkit.record_cache import CachedSamples, load_cached_records
from latentkit.records import RECORD_SUFFIXES, LoadedRecords, record_rules
from latentkit.sampling import mix_weights
from latentkit.synth import get_synth_task


def embedded_data_dir(run_dir: Path, data: DataSection) -> Path:
    return run_dir / "data" / data.task


def prepare_embedded_data(run_dir: Path, data: DataSection) -> Path:
    """Generate the synthetic task once (deterministic from its seed); later calls reuse it."""
    root = embedded_data_dir(run_dir, data)
    if not (root / "synth_info.json").is_file():
        synth, task = data.synth, get_synth_task(data.task)
        task.generate(
            root,
            n_train=synth.n_train,
            n_val=synth.n_val,
            n_test=synth.n_test,
            seed=synth.seed,
            variant=task.check_variant(synth.variant or task.default_variant),
            **task.parse_knobs([f"{name}={value}" for name, value in synth.knobs.items()]),
        )
    return root


def load_training_records(
    data: DataSection, run_dir: Path, on_main_first: Callable[[Callable[[], object]], object]
) -> LoadedRecords:
    """Records of `data.split` through the record cache, built once by the main process (after generating the
    embedded task) while the others wait, then memory-mapped by every process."""
    if data.path is None:
        on_main_first(lambda: prepare_embedded_data(run_dir, data))
        path = embedded_data_dir(run_dir, data)
    else:
        path = Path(data.path)
    split_files = [path / f"{data.split}{suffix}" for suffix in RECORD_SUFFIXES] if path.is_dir() else []
    path = next((f for f in split_files if f.is_file()), path)  # a folder with <split>.json(l): that file
    rules = record_rules(
        path,
        data.latent_marker,
        require_observation_after_aux=data.require_observation_after_aux,
        allow_outside_paths=data.allow_outside_paths,
    )
    cache_dir = data.cache_dir if data.cache_dir is not None else run_dir.parent / ".cache" / "records"

    def load() -> LoadedRecords:
        return load_cached_records(
            path,
            rules,
            cache_dir,
            split=data.split,
            on_bad_record=data.on_bad_record,
            limit=data.limit,
            num_proc=data.num_proc,
        )

    loaded = cast(LoadedRecords, on_main_first(load))
    if data.mix and isinstance(loaded.samples, CachedSamples):  # a bad data.mix fails before any stage starts
        mix_weights(data.mix, loaded.samples.sources, str(data.path or data.task))
    return loaded
