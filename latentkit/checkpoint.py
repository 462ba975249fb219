"""Checkpoints (atomic, exact resume) and stage outputs (HF format + method modules, safetensors only for weights)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from latentkit.backbone import Backbone
from latentkit.backbone.lora import unwrap_lora
from latentkit.distributed import is_deepspeed_engine, is_sharded, load_state
from latentkit.errors import CheckpointError, writing
from latentkit.registry import Method

STATE_FILE = "trainer_state.json"
METHOD_FILE = "latentkit_method.json"
METHOD_MODULES_FILE = "method_modules.safetensors"
MANIFEST_FILE = "manifest.json"
SHARDED_DIR = "sharded"  # FSDP2 checkpoints: every process's shards of model and optimizer
DEEPSPEED_DIR = (
    "deepspeed"  # DeepSpeed checkpoints: the engine's model states and each process's ZeRO partition
)
_DEEPSPEED_TAG = "state"
_FINGERPRINT_BYTES = 1 << 20
_HASH_CHUNK = 1 << 24
_MODEL_FILE_SUFFIXES = frozenset(
    {".safetensors", ".json", ".jinja", ".txt", ".model", ".tiktoken", ".bin", ".py"}
)


def checkpoint_dir(stage_dir: Path, step: int) -> Path:
    return stage_dir / "checkpoints" / f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Every file's size and sha256 (sub-folders too: the shards), written last: a checkpoint without it never
    finished saving."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": entries}, indent=1) + "\n")


def verify_checkpoint(directory: Path) -> str | None:
    """What is wrong with a checkpoint (missing manifest, missing, truncated or changed file), or None."""
    try:
        files = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST_FILE}: its save never finished"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST_FILE} is unreadable ({exc})"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    if STATE_FILE not in files:
        return f"the manifest lists no {STATE_FILE}"
    return None


def latest_checkpoint(stage_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and every newer one that does not with its problem."""
    rejected = []
    for path in sorted((stage_dir / "checkpoints").glob("step-*"), reverse=True):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, rejected
        rejected.append((path, problem))
    return None, rejected


def set_aside(checkpoint: Path) -> Path:
    """Move a checkpoint that failed verification out of the way (kept for inspection, never loaded)."""
    target = checkpoint.with_name(f"corrupt-{checkpoint.name}")
    shutil.rmtree(target, ignore_errors=True)
    checkpoint.rename(target)
    return target


def remove_stale_temp_dirs(stage_dir: Path) -> None:
    """Temp dirs of saves that were interrupted (their checkpoints were never published)."""
    for staging in (stage_dir / "checkpoints").glob(".tmp-step-*"):
        shutil.rmtree(staging, ignore_errors=True)


def _save_rng_state(path: Path) -> None:
    """Every generator's state as safetensors (tensors) plus JSON metadata (the rest): no pickle to load."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{index}"] = state
    rest = {"python": [version, list(internal), gauss], "numpy": [kind, position, has_gauss, cached]}
    save_file(tensors, str(path), metadata={"rng": json.dumps(rest)})


def _load_rng_state(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing (a checkpoint from an older latentkit keeps its RNG in a pickle, which is not "
            "loaded): start that stage again, or resume from a checkpoint written by this version"
        )
    with safe_open(str(path), framework="pt") as handle:
        rest = json.loads(handle.metadata()["rng"])
    tensors = load_file(str(path))
    version, internal, gauss = rest["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, position, has_gauss, cached = rest["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda_names = sorted(
        (n for n in tensors if n.startswith("cuda_")), key=lambda n: int(n.removeprefix("cuda_"))
    )
    cuda = [tensors[name] for name in cuda_names]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    stage_dir: Path, step: int, accelerator: Any, module: nn.Module, optimizer, scheduler
) -> Path:
    """Every process writes its RNG state into a temp dir (and, sharded, its shards of the model and optimizer; under
    DeepSpeed, its part of the engine's checkpoint); the main process adds the rest and renames it."""
    final = checkpoint_dir(stage_dir, step)
    staging = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        with writing(staging):
            _save_rng_state(staging / f"rng-{accelerator.process_index}.safetensors")
            sharded = is_sharded(module) or is_deepspeed_engine(module)
            if is_deepspeed_engine(module):
                module.save_checkpoint(str(staging / DEEPSPEED_DIR), tag=_DEEPSPEED_TAG, save_latest=False)
            elif sharded:
                save_sharded(module, optimizer, staging / SHARDED_DIR)
            if accelerator.is_main_process:
                if not sharded:
                    save_model(accelerator.unwrap_model(module), str(staging / "model.safetensors"))
                    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
                torch.save(scheduler.state_dict(), staging / "scheduler.pt")
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {"step": step, "num_processes": accelerator.num_processes}
                (staging / STATE_FILE).write_text(json.dumps(state) + "\n")
                write_manifest(staging)
                staging.rename(final)
    except OSError:
        shutil.rmtree(
            staging, ignore_errors=True
        )  # frees the space a full disk needs; older checkpoints stay
        raise
    accelerator.wait_for_everyone()
    return final


def load_checkpoint_into(path: Path, accelerator: Any, module: nn.Module, optimizer, scheduler) -> int:
    state = json.loads((path / STATE_FILE).read_text())
    if state["num_processes"] != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was written by {state['num_processes']} processes; resume it with the same number "
            f"(got {accelerator.num_processes}) so the data order stays the same"
        )
    if (path / DEEPSPEED_DIR).is_dir() or is_deepspeed_engine(module):
        load_deepspeed(module, path)
    elif (path / SHARDED_DIR).is_dir():
        if not is_sharded(module):
            raise CheckpointError(
                f"{path} holds sharded (FSDP2) weights: resume it under the same accelerate config (FSDP)"
            )
        load_sharded(module, optimizer, path / SHARDED_DIR)
    else:
        if is_sharded(module):
            raise CheckpointError(
                f"{path} holds unsharded weights: resume it under the accelerate config it was written with"
            )
        load_model(
            accelerator.unwrap_model(module), str(path / "model.safetensors"), device=str(accelerator.device)
        )
        optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location=accelerator.device, weights_only=True)
        )
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _load_rng_state(path / f"rng-{accelerator.process_index}.safetensors")
    return int(state["step"])


def load_deepspeed(engine: Any, path: Path) -> None:
    """The engine's weights, fp32 master partitions and optimizer state (the scheduler is latentkit's own)."""
    if not (path / DEEPSPEED_DIR).is_dir() or not is_deepspeed_engine(engine):
        raise CheckpointError(
            f"{path} was written {'without' if is_deepspeed_engine(engine) else 'under'} DeepSpeed: resume it under "
            "the accelerate config it was written with"
        )
    loaded, _ = engine.load_checkpoint(
        str(path / DEEPSPEED_DIR), tag=_DEEPSPEED_TAG, load_lr_scheduler_states=False
    )
    if loaded is None:
        raise CheckpointError(f"{path / DEEPSPEED_DIR} holds no DeepSpeed checkpoint the engine can load")


def save_sharded(module: nn.Module, optimizer: Any, directory: Path) -> None:
    """Each process writes its shards of the model and optimizer (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(module, _torch_optimizer(optimizer))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded(module: nn.Module, optimizer: Any, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    inner = _torch_optimizer(optimizer)
    model_state, optimizer_state = get_state_dict(module, inner)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(module, inner, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer


def _with_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def prune_checkpoints(stage_dir: Path, keep: int) -> None:
    complete = sorted(p for p in (stage_dir / "checkpoints").glob("step-*") if (p / MANIFEST_FILE).is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old)


def replace_directory(staging: Path, target: Path) -> None:
    """Put a fully written `staging` directory in place of `target` (a reader never sees a half-written one)."""
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def publish_copy(source: Path, target: Path) -> None:
    staging = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    replace_directory(staging, target)


def save_final(
    backbone: Backbone,
    method: Method,
    stage: str,
    target: Path,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """A stage's output: HF-format backbone plus the method's own modules, written atomically. `weights`: the
    full state dict of the train module (`model.*`, `method_modules.*`) when the live weights are sharded."""
    staging = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(staging, ignore_errors=True)
    model_state, method_state = None, method.modules.state_dict()
    if weights is not None:
        model_state = _with_prefix(weights, "model.")
        method_state = _with_prefix(weights, "method_modules.")
    with writing(staging):
        backbone.save(staging, model_state)
        if len(list(method.modules.parameters())) > 0:
            save_file(
                {k: v.contiguous() for k, v in method_state.items()}, str(staging / METHOD_MODULES_FILE)
            )
        (staging / METHOD_FILE).write_text(json.dumps({"method": method.name, "stage": stage}) + "\n")
    replace_directory(staging, target)


def load_final_weights(module: nn.Module, final_dir: Path) -> None:
    """Start a stage from an earlier stage's final weights (e.g. Monet stage 3 from stage 1)."""
    if not (final_dir / METHOD_FILE).is_file():
        raise CheckpointError(f"{final_dir} is missing: run the stage that writes it first (train.stage=...)")
    load_model_weights(unwrap_lora(module.model), final_dir)
    if (final_dir / METHOD_MODULES_FILE).is_file():
        load_state(module.method_modules, load_file(str(final_dir / METHOD_MODULES_FILE)))


def model_files(model_dir: Path) -> list[Path]:
    """The files that make up a model directory: weights, configs, tokenizer and processor files at its top level
    and a LoRA `adapter/`; never outputs written beside them (eval results, diagnoses, temp files)."""
    candidates = [*model_dir.glob("*"), *model_dir.glob("adapter/*")]
    return sorted(
        p
        for p in candidates
        if p.is_file() and not p.name.startswith(".") and p.suffix in _MODEL_FILE_SUFFIXES
    )


def load_model_weights(model: nn.Module, final_dir: Path) -> None:
    """Copy the HF weights saved in `final_dir` into the live `model` (of the same class)."""
    # from_pretrained undoes any key renaming save_pretrained applied.
    saved = type(model).from_pretrained(final_dir, local_files_only=True, dtype=model.dtype)
    load_state(model, saved.state_dict())


def model_fingerprint(model_dir: Path, run_dir: Path | None) -> str:
    """sha256 over the run config and every model file's name, size and first and last MiB."""
    digest = hashlib.sha256()
    if run_dir is not None:
        digest.update((run_dir / "config.yaml").read_bytes())
    for path in model_files(model_dir):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(model_dir)}:{size}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(_FINGERPRINT_BYTES))
            if size > 2 * _FINGERPRINT_BYTES:
                handle.seek(-_FINGERPRINT_BYTES, 2)
                digest.update(handle.read())
    return digest.hexdigest()[:16]
