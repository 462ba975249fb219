"""The RL stage kind (`Method.stage_kinds = {"<stage>": "rl"}`), one explicit loop:

    for every step:
        prompts      <- this process's share of the step's prompts (the same schedule as supervised batches)
        rollouts     <- G trajectories per prompt through the decoding engine, each prompt drawn G times
        rewards      <- the weighted reward functions (TRL's signature) on the completions
        advantages   <- group_advantages(rewards, G, estimator)
        old log-probs, reference log-probs <- the method's `log_probs` hook, without gradient
        mu times:    loss = policy_loss(log-probs, old, advantages) + beta * k3 KL to the reference; one update

The reference is the policy at the stage's start, a frozen auxiliary. Rollouts are seeded by (run seed, stage,
step, process), so a resumed stage repeats the rollouts an uninterrupted one makes. Checkpoints, metrics,
progress bars and Ctrl-C are the supervised loop's (`latentkit.trainer`).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from latentkit.backbone import Backbone
from latentkit.backbone.lora import unwrap_lora
from latentkit.config import RLSection
from latentkit.decoding import SamplingParams, Trajectory, decode
from latentkit.errors import ConfigError
from latentkit.registry import LossOutput, Method, StageProgress
from latentkit.rl.losses import aggregate, group_advantages, k3_kl, policy_loss
from latentkit.rl.rewards import combine_rewards
from latentkit.segments import Sample
from latentkit.synth import SYNTH_TASKS


@dataclass
class Rollouts:
    """One step's rollouts on this process: G consecutive trajectories per prompt, with what scored them."""

    samples: list[Sample]  # per trajectory (each prompt repeated G times)
    trajectories: list[Trajectory]
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    old_log_probs: list[torch.Tensor]  # per trajectory [n], no gradient
    ref_log_probs: list[torch.Tensor] | None
    metrics: dict[str, float]


def rollout_seed(seed: int, stage_index: int, step: int, process: int) -> int:
    digest = hashlib.sha256(f"rollout:{seed}:{stage_index}:{step}:{process}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def scorer_of(sample: Sample, rl: RLSection) -> str:
    """The accuracy reward's scorer: `train.rl.scorer`, else the synthetic task's own for its variant."""
    if rl.scorer is not None:
        return rl.scorer
    task = SYNTH_TASKS.get(sample.dataset)
    if task is None:
        raise ConfigError(
            f"sample {sample.sample_id} of dataset {sample.dataset!r} has no known scorer: set train.rl.scorer "
            "(e.g. boxed_exact, numeric)"
        )
    return task.scorers[sample.metadata.get("variant", task.default_variant)]


def generate_rollouts(
    method: Method,
    samples: list[Sample],
    rl: RLSection,
    params: SamplingParams,
    reference: Backbone | None,
) -> Rollouts:
    """G rollouts per prompt (the g-th with the prompt's g-th draw), scored, with old and reference log-probs."""
    backbone, group = method.backbone, rl.num_generations
    repeated = [sample for sample in samples for _ in range(group)]
    prompts = [
        method.prompt(sample, draw).build(sample.sample_id, sample.dataset)
        for sample in samples
        for draw in range(group)
    ]
    with torch.no_grad():
        trajectories = decode(backbone, prompts, params, method.decoding_policy())
    columns: dict[str, list[Any]] = {
        "answer": [s.answer for s in repeated],
        "choices": [list(s.choices) if s.choices else None for s in repeated],
        "metadata": [dict(s.metadata) for s in repeated],
        "scorer": [scorer_of(s, rl) for s in repeated],
        "finish_reason": [t.finish_reason for t in trajectories],
        "latent_blocks": [int(t.extras.get("latent_blocks", 0)) for t in trajectories],
    }
    completions = [t.text for t in trajectories]
    totals, metrics = combine_rewards(
        rl.rewards,
        [prompt_text(s) for s in repeated],
        completions,
        [t.token_ids for t in trajectories],
        columns,
    )
    for spec in rl.rewards:  # every process logs the same keys (a reward with no value here: NaN)
        for stat in ("mean", "std"):
            metrics.setdefault(f"reward/{spec.name}/{stat}", math.nan)
    rewards = torch.tensor(totals, dtype=torch.float32)
    advantages = group_advantages(rewards, group, rl.estimator)
    with torch.no_grad():
        old = [lp.detach() for lp in method.log_probs(backbone, trajectories, params)]
        ref = (
            None
            if reference is None
            else [lp.detach() for lp in method.log_probs(reference, trajectories, params)]
        )
    metrics.update(
        {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "completion_length": sum(len(t) for t in trajectories) / len(trajectories),
            "latent_trigger_rate": sum(b > 0 for b in columns["latent_blocks"]) / len(trajectories),
            "groups_all_equal": float(
                sum(bool((rewards[i : i + group] == rewards[i]).all()) for i in range(0, len(rewards), group))
            ),
        }
    )
    return Rollouts(repeated, trajectories, rewards, advantages, old, ref, metrics)


def prompt_text(sample: Sample) -> str:
    return "\n".join(s.text for s in sample.segments if s.role == "user" and s.kind == "text")


def padded(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    width = max(len(v) for v in values)
    out = torch.zeros(len(values), width, device=device)
    for row, value in enumerate(values):
        out[row, : len(value)] = value.to(device)
    return out


def rl_loss(method: Method, backbone: Backbone, rollouts: Rollouts, rl: RLSection, params: SamplingParams):
    """The clipped surrogate over every action position (tokens and, where the method declares densities,
    continuous inputs), plus beta x the k3 KL to the reference; a closure the wrapped module runs."""

    def compute(_: Backbone) -> LossOutput:
        device = backbone.device
        logp = padded(method.log_probs(backbone, rollouts.trajectories, params), device)
        old = padded(rollouts.old_log_probs, device)
        mask = padded([torch.tensor(t.is_action, dtype=torch.float32) for t in rollouts.trajectories], device)
        loss, diagnostics = policy_loss(
            logp,
            old,
            rollouts.advantages.to(device),
            mask,
            rl.epsilon,
            rl.epsilon_high,
            rl.dual_clip,
            rl.aggregation,
        )
        metrics = {key: float(value) for key, value in diagnostics.items()}
        if rollouts.ref_log_probs is not None:
            kl = aggregate(k3_kl(logp, padded(rollouts.ref_log_probs, device)), mask, rl.aggregation)
            loss = loss + rl.beta * kl
            metrics["kl"] = float(kl.detach())
        return LossOutput(loss, metrics)

    return compute


def frozen_reference(backbone: Backbone) -> Backbone:
    """The policy as it is now, frozen: a backbone view over a copy of the model."""
    reference = copy.copy(backbone)
    model = copy.deepcopy(unwrap_lora(backbone.model))
    model.eval()
    model.requires_grad_(False)
    reference.model = model
    return reference


def run_rl_stage(
    run: Any, accelerator: Any, module: nn.Module, samples: list[Sample], stage: str, stage_index: int
) -> None:
    """An RL stage of `run.method` over the training samples (prompts; gold answers in the records)."""
    from tqdm.auto import tqdm

    from latentkit import trainer

    config, rl = run.config, run.config.train.rl
    holder: dict[str, Backbone] = {}

    def snapshot_reference() -> None:
        if rl.beta > 0:
            holder["reference"] = frozen_reference(run.backbone)
            run.method.add_auxiliary(f"{stage}_reference", holder["reference"].model)

    started = trainer.start_stage(
        run, accelerator, module, samples, stage, stage_index, before_resume=snapshot_reference
    )
    if started is None:
        return
    train_cfg, optimizer, scheduler = started.train, started.optimizer, started.scheduler
    schedule = trainer.micro_batch_schedule(
        len(samples),
        config.run.seed,
        stage_index,
        started.step,
        train_cfg.steps,
        train_cfg.batch_size,
        1,
        accelerator.process_index,
        accelerator.num_processes,
    )
    trainable = [p for p in module.parameters() if p.requires_grad]
    bar = tqdm(
        total=train_cfg.steps,
        initial=started.step,
        desc=f"{config.run.method}:{stage}",
        disable=not (train_cfg.progress and accelerator.is_main_process),
    )
    for offset, step in enumerate(range(started.step, train_cfg.steps)):
        began = time.perf_counter()
        params = SamplingParams(
            max_new_tokens=rl.max_completion_length,
            temperature=rl.temperature,
            top_p=rl.top_p,
            seed=rollout_seed(config.run.seed, stage_index, step, accelerator.process_index),
        )
        module.eval()
        rollouts = generate_rollouts(
            run.method, [samples[i] for i in schedule[offset]], rl, params, holder.get("reference")
        )
        rolled = time.perf_counter()
        module.train()
        progress = StageProgress(step, train_cfg.steps)
        updates: dict[str, float] = {}
        for _ in range(rl.num_iterations):
            out = module(rl_loss(run.method, run.backbone, rollouts, rl, params), stage, progress)
            accelerator.backward(out.loss)
            grad_norm = None
            if train_cfg.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(trainable, train_cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates = {"loss": float(out.loss.detach()), **out.metrics}
            if grad_norm is not None:  # on every process alike, finite or not
                updates["grad_norm"] = float(grad_norm)
        scheduler.step()
        done = step + 1
        bar.update(1)
        if not math.isfinite(updates["loss"]):
            raise FloatingPointError(
                f"stage {stage} step {done}: loss is {updates['loss']} (lower train.lr?)"
            )
        if done % train_cfg.log_every == 0 or done == train_cfg.steps:
            values = {**rollouts.metrics, **updates}
            reduced = accelerator.reduce(
                torch.tensor(list(values.values()), device=accelerator.device), "mean"
            )
            record = {"stage": stage, "step": done, **dict(zip(values, reduced.tolist()))}
            record["lr"] = scheduler.get_last_lr()[0]
            record["rollout_time"] = rolled - began
            record["update_time"] = time.perf_counter() - rolled
            trainer._log(run, accelerator, record)
            bar.set_postfix(reward=f"{record['reward']:.3f}")
        if train_cfg.eval_every is not None and (done % train_cfg.eval_every == 0 or done == train_cfg.steps):
            trainer._evaluate(run, accelerator, module, stage, done)
        trainer.checkpoint_if_due(
            run, accelerator, module, optimizer, scheduler, stage, started.directory, done, train_cfg
        )
    bar.close()
    trainer.finish_stage(run, accelerator, stage, started.directory)
