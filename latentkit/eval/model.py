"""Loading a trained model for evaluation: a run directory (its `final/`) or any stage output directory."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from latentkit.backbone import Backbone, build_backbone
from latentkit.checkpoint import METHOD_FILE, METHOD_MODULES_FILE, model_fingerprint
from latentkit.config import LatentkitConfig, apply_override, build_config, parse_override, read_yaml
from latentkit.errors import CheckpointError, ConfigError
from latentkit.eval.processes import eval_device
from latentkit.registry import Method, get_method

# Reading whole multi-GB weight files would make every eval slow; their ends and sizes identify them.


@dataclass
class EvalModel:
    backbone: Backbone
    method: Method
    config: LatentkitConfig
    model_dir: Path
    run_dir: Path | None
    stage: str | None
    fingerprint: str
    method_overrides: tuple[str, ...] = ()  # `method.key=value` decoding knobs given at load

    def describe(self) -> dict[str, object]:
        return {
            "method": self.method.name,
            "stage": self.stage,
            "run": str(self.run_dir) if self.run_dir else None,
            "model_dir": str(self.model_dir),
            "backbone": str(self.config.model.path) if self.config.model.path else self.config.model.preset,
            "fingerprint": self.fingerprint,
            "method_overrides": list(self.method_overrides),
            "dtype": self.config.model.dtype,
            "device": self.backbone.device.type,
        }


def resolve_model_dir(run: Path | None, checkpoint: Path | None) -> tuple[Path, Path | None]:
    """(model directory, run directory or None) from exactly one of --run / --checkpoint."""
    if (run is None) == (checkpoint is None):
        raise ConfigError(
            "pass exactly one of --run DIR (a training run) or --checkpoint DIR (a model directory)"
        )
    if run is not None:
        run = Path(run)
        if not (run / "config.yaml").is_file():
            raise CheckpointError(
                f"{run} is not a training run (no config.yaml): pass the run directory runs/<name>"
            )
        if not (run / "final" / METHOD_FILE).is_file():
            raise CheckpointError(
                f"run {run} has no final model in {run / 'final'}: finish training or pass --checkpoint"
            )
        return run / "final", run
    model_dir = Path(checkpoint)  # type: ignore[arg-type]
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(
            f"--checkpoint {model_dir} is not an HF-format model directory (no config.json)"
        )
    run_dir = next((parent for parent in model_dir.parents if (parent / "config.yaml").is_file()), None)
    return model_dir, run_dir


def load_eval_model(
    run: Path | None = None,
    checkpoint: Path | None = None,
    method_overrides: Sequence[str] = (),
    device: str | torch.device | None = None,
) -> EvalModel:
    """Backbone with the trained weights in the run's `model.dtype`, the method (config from the run) with its
    own modules, all on `device` (a name as `--device` takes it; default: cuda when there is one, else cpu).

    `method_overrides` (`method.key=value`) change decoding-time knobs of the method, e.g. its test-time K."""
    target = eval_device(str(device) if device is not None else None)
    model_dir, run_dir = resolve_model_dir(run, checkpoint)
    saved = json.loads((model_dir / METHOD_FILE).read_text()) if (model_dir / METHOD_FILE).is_file() else {}
    raw = read_yaml(run_dir / "config.yaml") if run_dir is not None else {}
    method_name = saved.get("method") or raw.get("run", {}).get("method", "sft")
    method_cls = get_method(method_name)
    if raw.get("run", {}).get("method", method_name) != method_name:
        raise CheckpointError(
            f"{model_dir} holds a {method_name!r} model but {run_dir}/config.yaml is for "
            f"{raw['run']['method']!r}: pass the model's own run directory"
        )
    for text in method_overrides:
        keys, value = parse_override(text)
        if keys[0] != "method" or len(keys) < 2:
            raise ConfigError(
                f"override {text!r} must set a method option (method.key=value), e.g. method.decode_force=true"
            )
        apply_override(raw, keys, value)
    where = str(run_dir / "config.yaml") if run_dir else "the defaults"
    config = build_config(method_cls.Config, raw, where + (" + overrides" if method_overrides else ""))
    # The saved weights have LoRA merged in and every token the method added.
    no_lora = config.model.lora.model_copy(update={"enabled": False})
    section = config.model.model_copy(update={"path": model_dir, "preset": None, "lora": no_lora})
    backbone = build_backbone(section)
    backbone.model.to(target)  # before `setup`, so what the method builds follows the backbone's device
    method = method_cls(config.method)
    method.setup(backbone)
    if (model_dir / METHOD_MODULES_FILE).is_file():
        method.modules.load_state_dict(load_file(str(model_dir / METHOD_MODULES_FILE)))
    backbone.model.eval()
    method.modules.eval()
    method.modules.to(backbone.device)
    method.auxiliaries.to(backbone.device)
    fingerprint = model_fingerprint(model_dir, run_dir)
    return EvalModel(
        backbone, method, config, model_dir, run_dir, saved.get("stage"), fingerprint, tuple(method_overrides)
    )
