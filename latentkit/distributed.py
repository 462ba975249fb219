"""Sharded training through accelerate: the engine a launch asked for, FSDP2 on any device (gloo on CPU), DeepSpeed
ZeRO-2 and ZeRO-3 (one engine per stage), and the paths outside the training forward (caches, eval, loading and
saving weights) on sharded weights.

Under FSDP2 a parameter is a DTensor holding this process's shard; under ZeRO-3 it is an empty tensor whose
partition (`ds_tensor`) holds this process's part of the flattened parameter. Code that calls submodules directly
(the backbone's `embed`, a cache's forward, the decoding engine) runs inside `full_weights`, which all-gathers every
parameter once on every process and keeps it gathered (under ZeRO-3 with the engine's fetch-and-release hooks
taken off): no collective runs until it exits, so processes may do unequal work there (a striped cache, an eval on
the main process) without one waiting on another.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from latentkit.errors import ConfigError

Engine = Literal["ddp", "fsdp2", "deepspeed"]
_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
REDUCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def requested_engine() -> Engine:
    """What `accelerate launch --config_file ...` asked for (accelerate passes its config to the processes)."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return "fsdp2"
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "ddp"


def fsdp_plugin(mixed_precision: str, reduce_dtype: str) -> tuple[Any, bool]:
    """The launch's FSDP settings with latentkit's precision policy, and whether it asked for activation
    checkpointing (applied as the backbone's own, which the latent fill can switch off; see `trainer`)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = FullyShardedDataParallelPlugin()  # reads the fsdp_config of the accelerate config file
    if plugin.fsdp_version != 2:
        raise ConfigError(
            f"the accelerate config asks for FSDP version {plugin.fsdp_version}: latentkit shards with FSDP2 only "
            "(set fsdp_config.fsdp_version: 2, as configs/accelerate/fsdp.yaml does)"
        )
    # fp32 master shards; all-gathered for compute in the run's precision; gradients reduced in `reduce_dtype`.
    plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=_COMPUTE_DTYPES.get(mixed_precision), reduce_dtype=REDUCE_DTYPES[reduce_dtype]
    )
    checkpointing = bool(plugin.activation_checkpointing)
    plugin.activation_checkpointing = False
    return plugin, checkpointing


def engage_fsdp(accelerator: Any, plugin: Any) -> None:
    """Run FSDP2 on the process group accelerate made. accelerate picks FSDP on accelerators only and turns a
    CPU launch into plain data parallelism; FSDP2 itself shards over gloo, so latentkit engages it there too."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
    if not accelerator.is_fsdp2:
        raise ConfigError(
            f"the accelerate config asks for FSDP but accelerate set up {state.distributed_type.value}: launch "
            "with more than one process (num_processes in the accelerate config)"
        )


DRIVEN_ZERO_STAGES = (2, 3)


def deepspeed_plugin() -> Any:
    """The launch's DeepSpeed settings (accelerate's config file), when latentkit drives them: DeepSpeed installed and
    a ZeRO stage the trainer runs. Call before the `Accelerator` exists."""
    from accelerate.utils import DeepSpeedPlugin, is_deepspeed_available

    if not is_deepspeed_available():
        raise ConfigError(
            'the accelerate config asks for DeepSpeed, which is not installed: pip install -e ".[deepspeed]" (or '
            "launch with configs/accelerate/fsdp.yaml)"
        )
    plugin = DeepSpeedPlugin()  # reads the deepspeed_config of the accelerate config file
    if plugin.zero_stage not in DRIVEN_ZERO_STAGES:
        raise ConfigError(
            f"the accelerate config asks for DeepSpeed ZeRO stage {plugin.zero_stage}, which latentkit's trainer does "
            "not drive: use configs/accelerate/deepspeed_zero2.yaml (zero_stage: 2) or deepspeed_zero3.yaml "
            "(zero_stage: 3)"
        )
    if plugin.zero_stage == 3 and plugin.zero3_init_flag:
        raise ConfigError(
            "the accelerate config asks for deepspeed_config.zero3_init_flag: true (unset means true under ZeRO-3), "
            "which latentkit does not drive: set zero3_init_flag: false, as configs/accelerate/deepspeed_zero3.yaml "
            "does (each stage's engine partitions the whole-built model)"
        )
    return plugin


def build_models_whole() -> None:
    """Call after the `Accelerator` exists. accelerate registers a ZeRO-3 config with transformers (whatever
    zero3_init_flag says), which then builds every model partitioned (`from_config`, `from_pretrained`) and makes
    `generate` wait on the other processes; latentkit builds models whole (the train module, the weights a stage
    loads) and lets each stage's engine partition the train module, so it takes the registration back."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def configure_deepspeed_stage(
    accelerator: Any, batch_size: int, grad_accum: int, max_grad_norm: float | None
) -> None:
    """A stage's batch, accumulation and clipping, handed to the DeepSpeed engine its `prepare` builds: the engine
    scales the loss by the accumulation steps and clips in its own step (accelerate's config values are replaced)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = grad_accum
    config["train_batch_size"] = batch_size * grad_accum * accelerator.num_processes
    config["gradient_clipping"] = 0.0 if max_grad_norm is None else max_grad_norm  # 0: no clipping
    accelerator.gradient_accumulation_steps = (
        grad_accum  # `accelerator.accumulate` marks the last micro-batch
    )


def is_deepspeed_engine(module: nn.Module) -> bool:
    deepspeed = sys.modules.get("deepspeed")  # never imported: no engine exists
    return deepspeed is not None and isinstance(module, deepspeed.DeepSpeedEngine)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def check_sharded(module: nn.Module) -> None:
    """A run that asked for FSDP shards, or stops here."""
    if not is_sharded(module):
        raise ConfigError(
            "the accelerate config asks for FSDP but no parameter was sharded: check fsdp_config in the accelerate "
            "config (fsdp_auto_wrap_policy, fsdp_transformer_layer_cls_to_wrap)"
        )


# The units `full_weights` holds gathered: loading weights inside it reshards them (FSDP's state_dict hooks do,
# wherever the load starts) and gathers them again afterwards.
_held: list[nn.Module] = []


def sharding_report(module: nn.Module, accelerator: Any) -> dict[str, Any]:
    """How the parameters are split: counts, DTensors (FSDP2) or ZeRO-3 partitions, and the elements each process
    holds (all take part; a ZeRO-3 partition counts its padding)."""
    from torch.distributed.tensor import DTensor

    params = list(module.parameters())
    local = sum(_local_numel(p) for p in params)
    held = accelerator.gather(torch.tensor([local], device=accelerator.device)).tolist()
    return {
        "parameters": len(params),
        "dtensors": sum(isinstance(p, DTensor) for p in params),
        "partitioned": sum(is_zero3_parameter(p) for p in params),
        "elements": sum(p.ds_numel if is_zero3_parameter(p) else p.numel() for p in params),
        "elements_per_process": held,
    }


def _local_numel(param: nn.Parameter) -> int:
    from torch.distributed.tensor import DTensor

    if is_zero3_parameter(param):
        return param.ds_tensor.numel()
    return param.to_local().numel() if isinstance(param, DTensor) else param.numel()


def _units(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _groups(unit: nn.Module) -> list[Any]:
    return list(unit._get_fsdp_state()._fsdp_param_groups)


@contextmanager
def full_weights(module: nn.Module) -> Iterator[None]:
    """Every parameter of `module` gathered for the block (all processes must enter; no-op unsharded).

    Inside, forwards through the module find their parameters gathered and leave them so, hence run no
    collective. Writes to the gathered parameters are not kept: load weights with `load_state`."""
    if is_partitioned(module):
        with _zero3_gathered(module):
            yield
        return
    units = _units(module)
    if not units:
        yield
        return
    # FSDP2 reshards after a forward when a group has a post-forward mesh; None keeps it gathered.
    saved = {id(g): g.post_forward_mesh_info for u in units for g in _groups(u)}
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    _held.extend(units)
    try:
        yield
    finally:
        del _held[-len(units) :]
        for unit in units:
            for group in _groups(unit):
                group.post_forward_mesh_info = saved[id(group)]
            unit.reshard()


def load_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """`module.load_state_dict(state)` for a full state dict, also into sharded parameters (every process
    holds `state` and keeps its own shard, no communication under FSDP2; under ZeRO-3 the parameters are gathered
    unless `full_weights` holds them) and inside `full_weights` (kept after it)."""
    if is_partitioned(module):
        with _zero3_gathered(module):
            _copy_state(module, state)
            _zero3_written.update(id(p) for p in module.parameters())
        return
    for unit in _held:
        for group in _groups(unit):
            group._to_sharded()  # the sharded parameters are the ones that persist
    try:
        _copy_state(module, state)
    finally:
        for unit in _held:
            unit.unshard()


def _copy_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    live = module.state_dict()
    missing = sorted(set(live) - set(state))
    unexpected = sorted(set(state) - set(live))
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, target in live.items():
            source = state[name].to(device=target.device, dtype=target.dtype)
            if isinstance(target, DTensor):
                shard = distribute_tensor(source, target.device_mesh, target.placements, src_data_rank=None)
                target.to_local().copy_(shard.to_local())
            else:
                target.copy_(source)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on CPU (all processes take part): on the main process under FSDP2 and ZeRO-3, on every
    process otherwise; other processes get an empty dict. ZeRO-3 gathers one parameter at a time."""
    if is_partitioned(module):
        return _zero3_state_dict(module)
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --- ZeRO-3 ---------------------------------------------------------------------------------------------------------
# A partitioned parameter carries DeepSpeed's `ds_*` attributes; its `data` is empty unless gathered, `ds_tensor`
# is this process's partition (the weights a ZeRO-3 engine starts from, and what persists when no engine exists).
# `_zero3_held`: the parameters `full_weights` holds gathered (by id); `_zero3_written`: those `load_state` wrote
# into while gathered, whose partitions are rewritten from the full tensor when the block ends.
_zero3_held: set[int] = set()
_zero3_written: set[int] = set()


def is_zero3_parameter(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def is_partitioned(module: nn.Module) -> bool:
    """Whether a ZeRO-3 engine has partitioned the module's parameters (they stay so after the engine ends)."""
    return any(is_zero3_parameter(p) for p in module.parameters())


@contextmanager
def _zero3_gathered(module: nn.Module) -> Iterator[None]:
    """The module's partitioned parameters gathered on every process (those an enclosing block holds stay as they
    are), with a live engine's hooks off so that forwards fetch and release nothing."""
    params = [p for p in module.parameters() if is_zero3_parameter(p) and id(p) not in _zero3_held]
    if not params:
        yield
        return
    # one collective; parameters still gathered since their last forward (DeepSpeed's persistent ones) are skipped
    params[0].all_gather(param_list=params)
    _zero3_held.update(id(p) for p in params)
    try:
        with _zero3_hooks_off(module):
            yield
    finally:
        _zero3_held.difference_update(id(p) for p in params)
        written = [p for p in params if id(p) in _zero3_written]
        kept = [p for p in params if id(p) not in _zero3_written]
        _zero3_written.difference_update(id(p) for p in written)
        if written:
            written[0].partition(param_list=written, has_been_updated=True)  # local: each keeps its slice
        if kept:
            kept[0].partition(param_list=kept)


@contextmanager
def _zero3_hooks_off(module: nn.Module) -> Iterator[None]:
    """A live ZeRO-3 engine fetches a submodule's parameters before its forward and releases them after (collectives
    every process must join): off for the block, registered again after it. No engine, no hooks: nothing to do."""
    offload = getattr(getattr(module, "optimizer", None), "parameter_offload", None)
    if not is_deepspeed_engine(module) or offload is None:
        yield
        return
    for param in module.parameters():
        param.ds_active_sub_modules.clear()
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks.clear()
    offload.backward_hooks.clear()
    try:
        yield
    finally:
        offload._register_deepspeed_module(offload.module)  # also invalidates the engine's prefetch trace


def _zero3_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on the main process (empty elsewhere), gathered one parameter at a time."""
    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    state = {}
    for name, value in module.state_dict(keep_vars=True).items():
        gathered = is_zero3_parameter(value) and id(value) not in _zero3_held
        if gathered:
            value.all_gather(param_list=[value])
        if main:
            state[name] = value.detach().cpu().clone()
        if gathered:
            value.partition(param_list=[value])
    return state
