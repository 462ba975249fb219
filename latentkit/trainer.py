"""The trainer: one explicit loop over accelerate. Everything method-specific stays in the method.

Run directory (`runs/<name>/`): `config.yaml`, `metrics.jsonl`, `data/` (embedded task), per stage
`stages/<stage>/checkpoints/step-XXXXXXXX/` and `stages/<stage>/final/`, and `final/` after the last stage.
Checkpoints are written atomically (temp dir + rename) and hold model, optimizer, scheduler, every process's
RNG states and the step (under FSDP2 model and optimizer as every process's shards, under DeepSpeed the engine's
own checkpoint with each process's optimizer partition, and under ZeRO-3 its weight partition); the data order is a
pure function of (seed, stage, step), so resuming continues the exact batch sequence. Engines: DDP, or FSDP2 or
DeepSpeed ZeRO-2/ZeRO-3 when the accelerate launch asks for it (`latentkit.distributed`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentkit.backbone import Backbone, build_backbone, enable_activation_checkpointing
from latentkit.checkpoint import (
    latest_checkpoint,
    load_checkpoint_into,
    load_final_weights,
    prune_checkpoints,
    publish_copy,
    remove_stale_temp_dirs,
    save_checkpoint,
    save_final,
    set_aside,
)
from latentkit.config import (
    LatentkitConfig,
    TrainSection,
    effective_train,
    resolve_stages,
    save_config,
    selected_stages,
)
from latentkit.data import load_training_records
from latentkit.distributed import (
    Engine,
    build_models_whole,
    check_sharded,
    configure_deepspeed_stage,
    deepspeed_plugin,
    engage_fsdp,
    fsdp_plugin,
    full_state_dict,
    full_weights,
    is_partitioned,
    is_sharded,
    requested_engine,
    sharding_report,
)
from latentkit.errors import CheckpointError, ConfigError, DataError, writing
from latentkit.interrupt import StopRequest, TrainingInterrupted
from latentkit.layout import Batch
from latentkit.optim import (
    build_optimizer,
    build_scheduler,
    check_module_groups,
    freeze_and_group,
    frozen_groups,
    trainable_parameters,
)
from latentkit.registry import LossOutput, Method, StageContext, StageProgress, get_method
from latentkit.sampling import SampleOrder, epoch_permutation
from latentkit.segments import Sample
from latentkit.stage_data import LayoutDataset, stage_order

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def stage_autocast(mixed_precision: str, device_type: str) -> torch.autocast:
    """Autocast for a stage's `train.mixed_precision` ("no": off, also inside an enclosing autocast)."""
    return torch.autocast(
        device_type, dtype=_AUTOCAST_DTYPES.get(mixed_precision), enabled=mixed_precision != "no"
    )


class TrainModule(nn.Module):
    """Backbone model + the method's trainable modules as one module, so DDP/FSDP wrap and sync both (its frozen
    auxiliaries stay outside). `mixed_precision`: stage -> its setting, applied around that stage's loss."""

    def __init__(self, backbone: Backbone, method: Method, mixed_precision: dict[str, str] | None = None):
        super().__init__()
        self.model = backbone.model
        self.method_modules = method.modules
        self._backbone = backbone
        self._method = method
        self._mixed_precision = mixed_precision or {}

    def forward(
        self, batch: Batch | Callable[[Backbone], LossOutput], stage: str, progress: StageProgress
    ) -> LossOutput:
        """The method's loss on `batch`, or a loss closure (an RL stage's) run here so DDP/FSDP see it."""
        precision = self._mixed_precision.get(stage)
        device = self._backbone.device.type
        # accelerate fixes one precision when the Accelerator is built; this inner autocast overrides it per stage.
        with nullcontext() if precision is None else stage_autocast(precision, device):
            if callable(batch):
                return batch(self._backbone)
            return self._method.loss(self._backbone, batch, stage, progress)


@dataclass
class Run:
    config: LatentkitConfig
    method: Method
    backbone: Backbone
    directory: Path
    evaluator: Callable[[], dict[str, float]] | None = None  # train.eval_every; main process only
    stop: StopRequest = field(default_factory=StopRequest)  # Ctrl-C: stop after the step
    trainable: list[nn.Parameter] = field(default_factory=list)  # what each stage's train.freeze starts from
    engine: Engine = "ddp"  # what the accelerate launch asked for


def run_name(config: LatentkitConfig) -> str:
    if config.run.name:
        return config.run.name
    model = config.model.path.name if config.model.path is not None else config.model.preset
    return f"{config.run.method}-{model}"


def prepare_run_directory(config: LatentkitConfig, resume: bool) -> Path:
    directory = config.run.output_dir / run_name(config)
    saved = directory / "config.yaml"
    if resume:
        if not saved.is_file():
            raise CheckpointError(
                f"cannot resume: {saved} does not exist (run without --resume to start {directory})"
            )
        _check_same_config(saved, config)
    elif (directory / "stages").exists():
        raise CheckpointError(
            f"run directory {directory} already exists: pass --resume to continue it, or set run.name=... for a new run"
        )
    return directory


# `train` keys that change how a run is watched or saved, never its weights: a resume may change them.
RESUMABLE_TRAIN_KEYS = frozenset(
    {
        "stage",
        "until",
        "progress",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "num_workers",
        "wandb",
        "eval_every",
        "eval",
    }
)

# `data` keys that change where or how fast records and layouts are prepared, never what is drawn.
RESUMABLE_DATA_KEYS = frozenset({"cache_dir", "num_proc", "layout_cache_mb"})


def _check_same_config(saved: Path, config: LatentkitConfig) -> None:
    import yaml

    before, now = yaml.safe_load(saved.read_text()), config.model_dump(mode="json")
    for loaded in (before, now):
        loaded["train"] = {k: v for k, v in loaded.get("train", {}).items() if k not in RESUMABLE_TRAIN_KEYS}
        loaded["data"] = {k: v for k, v in loaded.get("data", {}).items() if k not in RESUMABLE_DATA_KEYS}
    for section in ("run", "model", "data", "train", "method"):
        key = _first_difference(before.get(section), now[section], section)
        if key is not None:
            raise ConfigError(
                f"cannot resume {saved.parent}: {key} differs from the saved config.yaml (resume with the same "
                "config, or start a new run with run.name=...)"
            )


def _first_difference(before: Any, now: Any, key: str) -> str | None:
    """The dotted key of the first value that differs (`train.stages.sft.lr`), or None when all agree."""
    if isinstance(before, dict) and isinstance(now, dict):
        for name in [*now, *(k for k in before if k not in now)]:
            found = _first_difference(before.get(name), now.get(name), f"{key}.{name}")
            if found is not None:
                return found
        return None
    return None if before == now else key


def sample_indices(num_samples: int, seed: int, stage_index: int, positions: range) -> list[int]:
    """Global sample positions -> dataset indices: a fresh seeded permutation every epoch."""
    permutations: dict[int, list[int]] = {}
    out = []
    for position in positions:
        epoch, offset = divmod(position, num_samples)
        if epoch not in permutations:
            permutations[epoch] = epoch_permutation(num_samples, seed, stage_index, epoch)
        out.append(permutations[epoch][offset])
    return out


def micro_batch_schedule(
    num_samples: int,
    seed: int,
    stage_index: int,
    start_step: int,
    steps: int,
    batch_size: int,
    accum: int,
    rank: int,
    world: int,
    order: SampleOrder | None = None,
) -> list[list[int]]:
    """This process's micro-batches for steps [start_step, steps): each step draws batch*world*accum samples, in
    `order` (default: every sample once per epoch, shuffled)."""
    per_step = batch_size * world * accum
    schedule = []
    for step in range(start_step, steps):
        for micro in range(accum):
            first = step * per_step + (micro * world + rank) * batch_size
            positions = range(first, first + batch_size)
            schedule.append(
                sample_indices(num_samples, seed, stage_index, positions)
                if order is None
                else order.indices(positions)
            )
    return schedule


EvaluatorFactory = Callable[[Method, LatentkitConfig, Path], Callable[[], dict[str, float]]]


def train(config: LatentkitConfig, resume: bool = False, evaluator: EvaluatorFactory | None = None) -> Path:
    """Run every stage of the method (or only `train.stage`) and return the run directory.

    `evaluator` builds the `train.eval_every` evaluation (the CLI and `latentkit.train` pass eval's); the
    trainer itself imports nothing from `latentkit.eval`."""
    if config.train.eval_every is not None and evaluator is None:
        raise ConfigError(
            "train.eval_every is set but no evaluator was given: use latentkit.train(...) or the CLI, or pass "
            "evaluator=latentkit.eval.periodic.training_evaluator"
        )
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    if not config.train.progress:  # also transformers' own bars (loading weights, writing shards)
        hf_logging.disable_progress_bar()
    try:
        return _train(config, resume, evaluator)
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        _reset_accelerate()


def _reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so a later `train` in this process may use other settings."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _train(config: LatentkitConfig, resume: bool, evaluator: EvaluatorFactory | None) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    method_cls = get_method(config.run.method)
    stages = list(method_cls.stages)
    config = config.model_copy(update={"train": resolve_stages(config.train, config.run.method, stages)})
    chosen = selected_stages(config.train, stages)
    for stage in chosen:
        kind = method_cls.stage_kind(stage)
        if kind not in STAGE_LOOPS:
            raise ConfigError(
                f"stage {stage!r} of {config.run.method} is a {kind!r} stage and this trainer has loops for "
                f"{', '.join(STAGE_LOOPS)} stages only; run the other stages with train.stage=..."
            )
    precision = {stage: effective_train(config.train, stage).mixed_precision for stage in stages}
    fp16 = [stage for stage in stages if precision[stage] == "fp16"]
    if fp16 and config.train.mixed_precision != "fp16":
        raise ConfigError(
            f"train.stages.{fp16[0]}.mixed_precision=fp16 needs train.mixed_precision=fp16 (the loss scaler is made "
            "when the run starts); use bf16 for that stage"
        )
    engine = requested_engine()
    kinds = {stage: method_cls.stage_kind(stage) for stage in chosen}
    plugin, checkpointing, zero = None, False, None
    if engine == "fsdp2":
        _check_fsdp_settings(config, precision, kinds)
        plugin, checkpointing = fsdp_plugin(config.train.mixed_precision, config.train.reduce_dtype)
    elif engine == "deepspeed":
        _check_deepspeed_settings(config, kinds)
        zero = deepspeed_plugin()
    directory = prepare_run_directory(config, resume)
    if zero is not None and not torch.cuda.is_available():
        from accelerate import PartialState

        PartialState(backend="gloo")  # accelerate names no backend for DeepSpeed on CPU
    accelerator = Accelerator(
        # without CUDA, torchrun-launched processes use gloo (MULTI_CPU); DeepSpeed runs only with cpu=False
        cpu=zero is None and not torch.cuda.is_available(),
        # the DeepSpeed engine keeps float32 weights: the loss runs under latentkit's autocast (`TrainModule`)
        mixed_precision="no" if zero is not None else config.train.mixed_precision,
        log_with="wandb" if config.train.wandb.mode != "disabled" else None,
        project_dir=str(directory),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        fsdp_plugin=plugin,
        deepspeed_plugin=zero,
        step_scheduler_with_optimizer=False,  # one schedule step per optimizer step, whatever the process count
    )
    if plugin is not None:
        engage_fsdp(accelerator, plugin)
    if zero is not None:
        build_models_whole()
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        save_config(config, directory / "config.yaml")
    accelerator.wait_for_everyone()

    set_seed(config.run.seed)
    backbone = build_backbone(config.model)
    if checkpointing and not config.model.gradient_checkpointing:
        enable_activation_checkpointing(backbone.model)
    method = method_cls(config.method)
    method.setup(backbone)
    method.auxiliaries.to(accelerator.device)
    if config.model.lora.enabled:
        from latentkit.backbone.lora import apply_lora

        lora = config.model.lora
        backbone.model = apply_lora(backbone.model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    for stage in stages:
        settings = effective_train(config.train, stage)
        check_module_groups(backbone, method, settings.freeze, settings.module_lr)
    run = Run(config, method, backbone, directory, engine=engine)

    def on_main_first(work):
        with accelerator.main_process_first():
            return work()

    records = load_training_records(config.data, directory, on_main_first)
    if not records.samples:
        raise DataError(
            f"no usable training records in {config.data.path or 'the embedded task'} (skipped {records.skipped})"
        )
    if records.skipped and accelerator.is_main_process:
        print(f"skipped {records.skipped} bad records: {dict(records.skip_reasons)}")
    if any(method_cls.stage_kind(stage) == "rl" for stage in chosen):
        from latentkit.rl.loop import check_scorers

        check_scorers(records.samples, config.train.rl)  # before any stage trains, not hours later

    if config.train.wandb.mode != "disabled":
        accelerator.init_trackers(
            config.train.wandb.project,
            config=config.model_dump(mode="json"),
            init_kwargs={
                "wandb": {"mode": config.train.wandb.mode, "dir": str(directory), "name": directory.name}
            },
        )
    if evaluator is not None and config.train.eval_every is not None and accelerator.is_main_process:
        run.evaluator = evaluator(method, config, directory)
    module: nn.Module = TrainModule(backbone, method, precision)
    if (
        engine == "ddp"
    ):  # FSDP2 shards it, DeepSpeed wraps it in each stage's prepare, with that stage's optimizer
        module = accelerator.prepare_model(module)
    run.trainable = trainable_parameters(backbone, method)
    selected = [(i, stage) for i, stage in enumerate(stages) if stage in chosen]
    with run.stop:
        for position, (stage_index, stage) in enumerate(selected):
            STAGE_LOOPS[method_cls.stage_kind(stage)](
                run, accelerator, module, records.samples, stage, stage_index
            )
            if position + 1 < len(selected) and _stop_requested(run, accelerator):
                raise TrainingInterrupted(
                    f"stage {stage} finished in {directory / 'stages' / stage / 'final'}; continue with the same "
                    "command plus --resume"
                )
    if accelerator.is_main_process:
        last = chosen[-1]
        publish_copy(directory / "stages" / last / "final", directory / "final")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"run finished: {directory} (final model in {directory / 'final'})")
    return directory


def _refuse_rl_stages(kinds: dict[str, str], engine: str) -> None:
    """`kinds`: the stages the run trains; only supervised ones run under `engine`."""
    for stage, kind in kinds.items():
        if kind != "supervised":
            names = list(kinds)
            before = names[: names.index(stage)]
            until = f"train.until={before[-1]}, then " if before else ""
            raise ConfigError(
                f"stage {stage!r} is a {kind!r} stage, which does not run under {engine} yet: run {until}stage "
                f"{stage} with DDP (configs/accelerate/ddp.yaml) and train.stage={stage}"
            )


def _check_deepspeed_settings(config: LatentkitConfig, kinds: dict[str, str]) -> None:
    """What DeepSpeed runs cannot do yet: RL stages, fp16 (DeepSpeed's own loss scaler), LoRA."""
    _refuse_rl_stages(kinds, "DeepSpeed")
    if config.train.mixed_precision == "fp16":
        raise ConfigError(
            "train.mixed_precision=fp16 is not supported under DeepSpeed (its fp16 engine is not driven): use bf16, "
            "or fp16 with DDP (configs/accelerate/ddp.yaml)"
        )
    if config.model.lora.enabled:
        raise ConfigError(
            "model.lora.enabled is not supported under DeepSpeed: train LoRA with DDP (configs/accelerate/ddp.yaml)"
        )


def _check_fsdp_settings(config: LatentkitConfig, precision: dict[str, str], kinds: dict[str, str]) -> None:
    """What FSDP2 runs cannot do yet: a per-stage compute precision, LoRA, RL stages (`kinds`: the stages the
    run trains)."""
    _refuse_rl_stages(kinds, "FSDP")
    for stage, value in precision.items():
        if value != config.train.mixed_precision:
            raise ConfigError(
                f"train.stages.{stage}.mixed_precision={value} differs from train.mixed_precision="
                f"{config.train.mixed_precision}: under FSDP the compute precision is one for the run (drop the override)"
            )
    if config.model.lora.enabled:
        raise ConfigError(
            "model.lora.enabled is not supported under FSDP: train LoRA with DDP (configs/accelerate/ddp.yaml)"
        )


@dataclass
class StageStart:
    """A stage ready for its first step: its settings, folder, optimizer, scheduler, the step it starts at, and the
    module to train (the stage's DeepSpeed engine, or the run's module)."""

    train: TrainSection
    directory: Path
    optimizer: Any
    scheduler: Any
    step: int
    model: nn.Module


def start_stage(
    run: Run,
    accelerator: Any,
    module: nn.Module,
    samples: list[Sample],
    stage: str,
    stage_index: int,
    before_resume: Callable[[], None] | None = None,
) -> StageStart | None:
    """Initial weights, the method's stage artifacts, optimizer and scheduler, and the resumed checkpoint; None
    when the stage has finished already. A stage starts from `stage_init`'s final weights or, without one, from the
    previous stage's (loaded from disk, so a resumed run or `train.stage=...` starts where the stage did).
    `before_resume` sees the stage's initial weights before a checkpoint replaces them (an RL reference)."""
    train_cfg = effective_train(run.config.train, stage)
    stage_dir = run.directory / "stages" / stage
    if (stage_dir / "final").is_dir():
        accelerator.print(f"stage {stage}: already finished in {stage_dir / 'final'}, skipping")
        return None
    stages = run.method.stages
    init_from = run.method.stage_init(stage) or (stages[stage_index - 1] if stage_index > 0 else None)
    if init_from is not None:
        load_final_weights(accelerator.unwrap_model(module), run.directory / "stages" / init_from / "final")
    context = StageContext(
        run_dir=run.directory,
        stage_dir=stage_dir,
        samples=samples,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
        log=lambda event: _log(run, accelerator, {"stage": stage, **event}),
        load_stage_weights=lambda name: load_final_weights(
            accelerator.unwrap_model(module), run.directory / "stages" / name / "final"
        ),
        progress=train_cfg.progress,
    )
    with full_weights(module), _run_precision(run, accelerator, stage):  # caches call submodules directly
        run.method.prepare_stage(stage, context)

    freeze = [*frozen_groups(run.backbone, train_cfg.freeze), *run.method.stage_freeze(stage)]
    groups = freeze_and_group(run.backbone, run.method, freeze, train_cfg.module_lr, run.trainable)
    optimizer = build_optimizer(groups, train_cfg)
    model = module
    if run.engine == "fsdp2":
        optimizer, scheduler = _prepare_fsdp2(run, accelerator, module, optimizer, train_cfg, stage)
    elif run.engine == "deepspeed":
        configure_deepspeed_stage(
            accelerator, train_cfg.batch_size, train_cfg.grad_accum, train_cfg.max_grad_norm
        )
        first = not is_partitioned(module)
        model, optimizer, scheduler = accelerator.prepare(
            module, optimizer, build_scheduler(optimizer, train_cfg)
        )
        if first and is_partitioned(module):  # ZeRO-3 partitions the module in place (it stays so)
            _log(
                run, accelerator, {"event": "sharded", "stage": stage, **sharding_report(module, accelerator)}
            )
    else:
        optimizer = accelerator.prepare_optimizer(optimizer)
        scheduler = build_scheduler(optimizer, train_cfg)
    if before_resume is not None:
        before_resume()
    start_step = 0
    checkpoint = _resume_checkpoint(accelerator, stage_dir)
    if checkpoint is not None:
        start_step = load_checkpoint_into(checkpoint, accelerator, model, optimizer, scheduler)
        accelerator.print(f"stage {stage}: resumed from {checkpoint} at step {start_step}")
        _log(run, accelerator, {"event": "resume", "stage": stage, "step": start_step})
    return StageStart(train_cfg, stage_dir, optimizer, scheduler, start_step, model)


def _prepare_fsdp2(
    run: Run, accelerator: Any, module: nn.Module, optimizer: Any, train_cfg: TrainSection, stage: str
) -> tuple[Any, Any]:
    """Model, optimizer and scheduler through one `accelerator.prepare` (FSDP2 needs them together): the first
    stage's call shards the module in place; later stages' calls only take their optimizer onto the shards."""
    first = not is_sharded(module)
    names = {id(p): name for name, p in module.named_parameters()}
    trainable = {names[id(p)] for p in run.trainable}
    prepared, optimizer, scheduler = accelerator.prepare(
        module, optimizer, build_scheduler(optimizer, train_cfg)
    )
    if prepared is not module:
        raise RuntimeError("accelerate replaced the FSDP2 module instead of sharding it in place")
    check_sharded(module)
    run.trainable = [p for name, p in module.named_parameters() if name in trainable]  # the sharded ones
    if first:
        _log(run, accelerator, {"event": "sharded", "stage": stage, **sharding_report(module, accelerator)})
    return optimizer, scheduler


def _run_precision(run: Run, accelerator: Any, stage: str):
    """Under FSDP2 the gathered weights are in the run's compute dtype: the paths outside the training forward
    run under the same autocast as the loss (inputs stay float32)."""
    if run.engine != "fsdp2":
        return nullcontext()
    return stage_autocast(effective_train(run.config.train, stage).mixed_precision, accelerator.device.type)


def finish_stage(
    run: Run, accelerator: Any, stage: str, stage_dir: Path, module: nn.Module | None = None
) -> None:
    """`final/`: the full weights in HF format (gathered from the shards under FSDP2 and ZeRO-3, every process
    taking part). A stage's DeepSpeed engine ends here (the next stage prepares its own on the same module)."""
    accelerator.wait_for_everyone()
    sharded = module is not None and (is_sharded(module) or is_partitioned(module))
    weights = full_state_dict(module) if sharded else None
    if accelerator.is_main_process:
        save_final(run.backbone, run.method, stage, stage_dir / "final", weights)
    accelerator.wait_for_everyone()
    if run.engine == "deepspeed":
        accelerator.free_memory()


def _run_stage(
    run: Run, accelerator: Any, module: nn.Module, samples: list[Sample], stage: str, stage_index: int
) -> None:
    """A supervised stage: the method's layouts and loss over the training samples."""
    config = run.config
    started = start_stage(run, accelerator, module, samples, stage, stage_index)
    if started is None:
        return
    train_cfg, start_step = started.train, started.step
    from accelerate.utils import gather_object

    pad_id, cache_bytes = run.backbone.tokenizer.pad_token_id, config.data.layout_cache_mb * 2**20
    dataset = LayoutDataset(samples, run.method, stage, config.data.max_length, pad_id, cache_bytes)
    step_samples = train_cfg.batch_size * accelerator.num_processes * train_cfg.grad_accum
    order, lengths = stage_order(
        dataset,
        config.data,
        config.run.seed,
        stage_index,
        step_samples,
        accelerator.process_index,
        accelerator.num_processes,
        gather_object,
        train_cfg.num_workers,
    )
    if lengths.dropped:
        accelerator.print(
            f"stage {stage}: dropped {lengths.dropped} of {len(samples)} samples longer than data.max_length="
            f"{config.data.max_length} tokens (longest {lengths.longest})"
        )
        _log(run, accelerator, {"event": "length_filter", "stage": stage, **vars(lengths)})
    dataset.schedule = micro_batch_schedule(
        len(samples),
        config.run.seed,
        stage_index,
        start_step,
        train_cfg.steps,
        train_cfg.batch_size,
        train_cfg.grad_accum,
        accelerator.process_index,
        accelerator.num_processes,
        order,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=train_cfg.num_workers,
        collate_fn=lambda batch: batch,
    )
    _loop(
        run,
        accelerator,
        started.model,
        started.optimizer,
        started.scheduler,
        iter(loader),
        stage,
        started.directory,
        start_step,
        train_cfg,
    )
    finish_stage(run, accelerator, stage, started.directory, module)


def _resume_checkpoint(accelerator: Any, stage_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; newer ones that do not are named and set aside, stale temp dirs go."""
    checkpoint, rejected = latest_checkpoint(stage_dir)
    accelerator.wait_for_everyone()  # every process has chosen before any checkpoint moves
    if accelerator.is_main_process:
        remove_stale_temp_dirs(stage_dir)
        for path, problem in rejected:
            moved = set_aside(path)
            older = (
                f"resuming from {checkpoint.name}" if checkpoint is not None else "starting the stage over"
            )
            print(
                f"checkpoint {path} is unusable ({problem}): moved to {moved.name}, {older}", file=sys.stderr
            )
    accelerator.wait_for_everyone()
    return checkpoint


def _loop(
    run: Run,
    accelerator: Any,
    module: nn.Module,
    optimizer,
    scheduler,
    batches,
    stage: str,
    stage_dir: Path,
    start_step: int,
    train_cfg: TrainSection,
) -> None:
    from tqdm.auto import tqdm

    trainable = [p for p in module.parameters() if p.requires_grad]
    deepspeed = run.engine == "deepspeed"
    bar = tqdm(
        total=train_cfg.steps,
        initial=start_step,
        desc=f"{run.config.run.method}:{stage}",
        disable=not (train_cfg.progress and accelerator.is_main_process),
    )
    module.train()
    for step in range(start_step, train_cfg.steps):
        started = time.perf_counter()
        loss = torch.zeros((), device=accelerator.device)
        averages: dict[str, float] = {}  # method metrics, averaged over micro-batches
        tokens = 0
        for micro in range(train_cfg.grad_accum):
            batch = next(batches).to(accelerator.device)
            last_micro = micro == train_cfg.grad_accum - 1
            with _accumulating(accelerator, module, last_micro, deepspeed):
                out = module(batch, stage, StageProgress(step, train_cfg.steps))
                # DeepSpeed divides by its accumulation steps itself, and steps on the last micro-batch
                accelerator.backward(out.loss if deepspeed else out.loss / train_cfg.grad_accum)
            loss += out.loss.detach() / train_cfg.grad_accum
            for key, value in out.metrics.items():
                averages[key] = averages.get(key, 0.0) + float(value) / train_cfg.grad_accum
            tokens += int(batch.valid.sum())
        grad_norm = None
        if train_cfg.max_grad_norm is not None:  # DeepSpeed has clipped in its step and returns the norm
            grad_norm = _full(accelerator.clip_grad_norm_(trainable, train_cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        bar.update(1)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage {stage} step {done}: loss is {float(loss)} (lower train.lr?)")
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            values = torch.tensor([float(loss), *averages.values(), tokens], device=accelerator.device)
            reduced = accelerator.reduce(values, "mean").tolist()
            record = {"stage": stage, "step": done, "loss": reduced[0], **dict(zip(averages, reduced[1:-1]))}
            record["tokens"] = reduced[-1] * accelerator.num_processes  # summed over processes
            record["lr"] = scheduler.get_last_lr()[0]
            record["step_time"] = time.perf_counter() - started
            if grad_norm is not None and math.isfinite(float(grad_norm)):
                record["grad_norm"] = float(grad_norm)
            _log(run, accelerator, record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        if train_cfg.eval_every is not None and (done % train_cfg.eval_every == 0 or done == train_cfg.steps):
            _evaluate(run, accelerator, module, stage, done)
        checkpoint_if_due(run, accelerator, module, optimizer, scheduler, stage, stage_dir, done, train_cfg)
    bar.close()


def _accumulating(accelerator: Any, module: nn.Module, last_micro: bool, deepspeed: bool):
    """Gradients sync on the last micro-batch only: DDP skips its all-reduce before it, and accelerate's DeepSpeed
    engine learns the accumulation boundary (it counts the micro-batches of this stage's engine)."""
    if deepspeed:
        return accelerator.accumulate(module)
    return nullcontext() if last_micro else accelerator.no_sync(module)


def checkpoint_if_due(
    run: Run,
    accelerator: Any,
    module: nn.Module,
    optimizer,
    scheduler,
    stage: str,
    stage_dir: Path,
    done: int,
    train_cfg: TrainSection,
) -> None:
    """After step `done`: a checkpoint every `checkpoint_every` steps, and one before stopping on Ctrl-C."""
    stop = done < train_cfg.steps and _stop_requested(run, accelerator)
    if (done % train_cfg.checkpoint_every == 0 or stop) and done < train_cfg.steps:
        saved = save_checkpoint(stage_dir, done, accelerator, module, optimizer, scheduler)
        if accelerator.is_main_process:
            prune_checkpoints(stage_dir, train_cfg.keep_checkpoints)
        if stop:
            raise TrainingInterrupted(
                f"stage {stage} stopped after step {done} of {train_cfg.steps}, checkpoint {saved}; continue "
                "with the same command plus --resume"
            )


def _stop_requested(run: Run, accelerator: Any) -> bool:
    """Whether any process got Ctrl-C (all processes agree, so they stop after the same step)."""
    if accelerator.num_processes == 1:
        return run.stop.requested
    flag = torch.tensor([float(run.stop.requested)], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() > 0)


def _full(value: Any) -> Any:
    """A DTensor (a gradient norm under FSDP2) as a plain tensor."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _evaluate(run: Run, accelerator: Any, module: nn.Module, stage: str, step: int) -> None:
    """Greedy accuracy on the eval split, on the main process; the others wait at the barrier (under FSDP2 each
    first gathers the weights, so the main process decodes without collectives)."""
    with full_weights(module), _run_precision(run, accelerator, stage):
        if run.evaluator is not None:
            module.eval()
            metrics = run.evaluator()
            module.train()
            _log(run, accelerator, {"stage": stage, "step": step, **metrics})
        accelerator.wait_for_everyone()


def _log(run: Run, accelerator: Any, record: dict[str, Any]) -> None:
    if accelerator.is_main_process:
        path = run.directory / "metrics.jsonl"
        with writing(path), open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    if "event" not in record:
        accelerator.log(
            {f"{record['stage']}/{k}": v for k, v in record.items() if k not in ("stage", "step")}
        )


def _run_rl_stage(
    run: Run, accelerator: Any, module: nn.Module, samples: list[Sample], stage: str, stage_index: int
) -> None:
    from latentkit.rl.loop import run_rl_stage  # the RL loop builds on this module's stage helpers

    run_rl_stage(run, accelerator, module, samples, stage, stage_index)


StageLoop = Callable[[Run, Any, nn.Module, list[Sample], str, int], None]
# One training loop per stage kind (docs/design.md, "Training").
STAGE_LOOPS: dict[str, StageLoop] = {"supervised": _run_stage, "rl": _run_rl_stage}
