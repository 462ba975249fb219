"""Training data: the embedded synthetic task (generated into the run directory) or records from `data.path`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from latentkit.config import DataSection
from latentkit.records import RECORD_SUFFIXES, LoadedRecords, load_records, load_split
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
    """Records of `data.split`; `on_main_first` runs data generation on the main process before the others read."""
    options = {
        "on_bad_record": data.on_bad_record,
        "latent_marker": data.latent_marker,
        "require_observation_after_aux": data.require_observation_after_aux,
        "limit": data.limit,
        "allow_outside_paths": data.allow_outside_paths,
    }
    folder_options = {**options, "split": data.split}
    if data.path is None:
        root = embedded_data_dir(run_dir, data)
        on_main_first(lambda: prepare_embedded_data(run_dir, data))
        return load_split(root, data.split, **options)
    path = Path(data.path)
    if path.is_dir() and any((path / f"{data.split}{suffix}").is_file() for suffix in RECORD_SUFFIXES):
        return load_split(path, data.split, **options)
    return load_records(path, **folder_options)
