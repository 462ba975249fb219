"""Launched by tests/test_deepspeed.py: two optimizer steps of the `sft` method's training module under DeepSpeed
ZeRO through `accelerator.prepare`, on the processes of an `accelerate launch` (CPU, gloo). Prints one JSON line
per process. This checks what the engine itself does with latentkit's module, below the trainer.

    accelerate launch --config_file <deepspeed config> tests/deepspeed_step.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
from accelerate import Accelerator, PartialState

from latentkit.backbone import build_backbone
from latentkit.config import build_config, raw_config
from latentkit.data import load_training_records
from latentkit.layout import collate
from latentkit.optim import build_optimizer, build_scheduler, freeze_and_group, trainable_parameters
from latentkit.registry import StageProgress, get_method
from latentkit.trainer import TrainModule

BATCH = 2


def main(out: Path) -> None:
    # Without a GPU accelerate gives DeepSpeed no backend and leaves every process believing it is process 0 of 1.
    PartialState(backend="gloo")
    accelerator = Accelerator()
    accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = BATCH
    overrides = [
        "run.method=sft",
        f"run.output_dir={out}",
        "data.synth.n_train=8",
        f"train.batch_size={BATCH}",
    ]
    raw, where = raw_config(None, overrides)
    config = build_config(get_method("sft").Config, raw, where)
    torch.manual_seed(0)
    backbone = build_backbone(config.model)
    method = get_method("sft")(config.method)
    method.setup(backbone)
    with accelerator.main_process_first():
        samples = load_training_records(config.data, out / "run", lambda work: work()).samples
    trainable = trainable_parameters(backbone, method)
    groups = freeze_and_group(backbone, method, config.train.freeze, config.train.module_lr, trainable)
    optimizer = build_optimizer(groups, config.train)
    module = TrainModule(backbone, method)
    watched = next(p for p in module.parameters() if p.requires_grad)
    before = watched.detach().clone()
    engine, optimizer, scheduler = accelerator.prepare(
        module, optimizer, build_scheduler(optimizer, config.train)
    )
    start = accelerator.process_index * BATCH
    layouts = [method.layout(sample, "sft") for sample in samples[start : start + BATCH]]
    batch = collate(layouts, backbone.tokenizer.pad_token_id).to(accelerator.device)
    losses = []
    for step in range(2):
        loss = engine(batch, "sft", StageProgress(step, 2)).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    with deepspeed.zero.GatheredParameters([watched]):  # ZeRO-3 keeps only a shard outside the forward
        after = watched.detach().clone()
    everywhere = accelerator.gather(after.flatten()[:8].unsqueeze(0))
    report = {
        "process": accelerator.process_index,
        "processes": accelerator.num_processes,
        "engine": type(engine).__name__,
        "zero_stage": engine.zero_optimization_stage(),
        "losses": losses,
        "changed": bool((after != before).any()),
        "same_on_every_process": all(torch.equal(row, everywhere[0]) for row in everywhere),
        "local_elements_outside_forward": watched.numel(),
        "optimized_elements": sum(p.numel() for params in groups.values() for p in params),
    }
    if engine.zero_optimization_stage() == 2:  # this process's part of the fp32 master weights and Adam state
        report["optimizer_partition_elements"] = sum(
            part.numel() for part in engine.optimizer.single_partition_of_fp32_groups
        )
    # one write per line: the two processes share the pipe (print writes the newline apart, so lines could merge)
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
