"""The RL stage kind (`Method.stage_kinds = {"<stage>": "rl"}`), one explicit loop:

    for every step:
        prompts      <- this process's share of the step's prompts (the same schedule as supervised batches)
        rollouts     <- G trajectories per prompt through the decoding engine, from the method's rollout prompts
                        and policy (`rollout_prompts`, `rollout_policy`); with `latent_necessity`, re-rolls without
                        the latents
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
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from latentkit import trainer
from latentkit.backbone import Backbone
from latentkit.backbone.lora import unwrap_lora
from latentkit.config import RLSection
from latentkit.decoding import SamplingParams, Trajectory, decode
from latentkit.errors import ConfigError
from latentkit.registry import LossOutput, Method, StageProgress
from latentkit.rl.losses import aggregate, clip_fraction, group_advantages, k3_kl, policy_loss
from latentkit.rl.rewards import accuracy_reward, combine_rewards
from latentkit.segments import Sample
from latentkit.synth import SYNTH_TASKS

REFILL_SEED = 104_729  # refill prompts come from their own permutation stream, not the step schedule's
REROLL_SEED = 7_919  # the latent-necessity re-rolls sample from their own stream, not the rollouts'


@dataclass
class Rollouts:
    """One step's rollouts on this process: G consecutive trajectories per prompt, with what scored them."""

    samples: list[Sample]  # per trajectory (each prompt repeated G times)
    trajectories: list[Trajectory]
    rewards: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    # Per trajectory [n], no gradient; None with one update per rollout batch, whose policy is still the sampling one
    old_log_probs: list[torch.Tensor] | None
    ref_log_probs: list[torch.Tensor] | None
    metrics: dict[str, float]


def rollout_seed(seed: int, stage_index: int, step: int, process: int) -> int:
    digest = hashlib.sha256(f"rollout:{seed}:{stage_index}:{step}:{process}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def derived_seed(seed: int, purpose: str) -> int:
    """A seed of its own for `purpose` (e.g. a policy's latent noise), unrelated to the token sampler's `seed`."""
    digest = hashlib.sha256(f"{purpose}:{seed}".encode()).digest()
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


def check_scorers(samples: list[Sample], rl: RLSection) -> None:
    """A one-line ConfigError now if the accuracy reward has no scorer for some dataset of the prompts."""
    firsts = {sample.dataset: sample for sample in samples}
    for sample in firsts.values():
        scorer_of(sample, rl)


def decode_group_prompts(
    method: Method,
    samples: list[Sample],
    group: int,
    params: SamplingParams,
    progress: StageProgress,
    latents: bool = True,
) -> list[Trajectory]:
    """G trajectories per prompt, consecutive: the method's rollout prompts and policy (`latents=False`: both
    without the method's latent inputs), decoded without gradient."""
    prompts = [
        builder.build(sample.sample_id, sample.dataset)
        for sample in samples
        for builder in method.rollout_prompts(sample, group, progress, params.seed, latents)
    ]
    with torch.no_grad():
        policy = method.rollout_policy(derived_seed(params.seed, "policy"), latents)
        return decode(method.backbone, prompts, params, policy)


def generate_rollouts(
    method: Method,
    samples: list[Sample],
    rl: RLSection,
    params: SamplingParams,
    progress: StageProgress,
    reference: Backbone | None,
) -> Rollouts:
    """G rollouts per prompt, scored, with old and reference log-probs. With the `latent_necessity` reward, each
    rollout is paired with a re-roll of its prompt with the latents removed (its own seed stream), whose
    correctness the reward reads as the column `correct_without_latents`."""
    backbone, group = method.backbone, rl.num_generations
    repeated = [sample for sample in samples for _ in range(group)]
    trajectories = decode_group_prompts(method, samples, group, params, progress)
    columns: dict[str, list[Any]] = {
        "answer": [s.answer for s in repeated],
        "choices": [list(s.choices) if s.choices else None for s in repeated],
        "metadata": [dict(s.metadata) for s in repeated],
        "scorer": [scorer_of(s, rl) for s in repeated],
        "finish_reason": [t.finish_reason for t in trajectories],
        "latent_blocks": [int(t.extras.get("latent_blocks", 0)) for t in trajectories],
    }
    completions = [t.text for t in trajectories]
    necessity: dict[str, float] = {}
    if any(spec.name == "latent_necessity" for spec in rl.rewards):
        free = decode_group_prompts(
            method, samples, group, replace(params, seed=params.seed ^ REROLL_SEED), progress, latents=False
        )
        verdicts = accuracy_reward(
            [prompt_text(s) for s in repeated],
            [t.text for t in free],
            [t.token_ids for t in free],
            **{key: columns[key] for key in ("answer", "scorer", "choices", "metadata")},
        )
        columns["correct_without_latents"] = [None if v is None else v >= 1.0 for v in verdicts]
        scored = [v for v in verdicts if v is not None]
        necessity["accuracy_without_latents"] = sum(scored) / len(scored) if scored else math.nan
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
        old = None
        if rl.num_iterations > 1:
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
            "prompt_vectors_rate": sum(bool(t.prompt.embeddings) for t in trajectories) / len(trajectories),
            **necessity,
            "groups_all_equal": float(
                sum(bool((rewards[i : i + group] == rewards[i]).all()) for i in range(0, len(rewards), group))
            ),
        }
    )
    return Rollouts(repeated, trajectories, rewards, advantages, old, ref, metrics)


def informative_groups(rollouts: Rollouts, group: int) -> list[int]:
    """Indices of the groups whose rewards are not all equal (the others have zero advantage)."""
    rewards = rollouts.rewards
    return [
        g
        for g in range(len(rewards) // group)
        if not bool((rewards[g * group : (g + 1) * group] == rewards[g * group]).all())
    ]


def select_groups(rollouts: Rollouts, groups: list[int], group: int) -> Rollouts:
    rows = [g * group + i for g in groups for i in range(group)]
    ref = rollouts.ref_log_probs
    return Rollouts(
        [rollouts.samples[r] for r in rows],
        [rollouts.trajectories[r] for r in rows],
        rollouts.rewards[rows],
        rollouts.advantages[rows],
        None if rollouts.old_log_probs is None else [rollouts.old_log_probs[r] for r in rows],
        None if ref is None else [ref[r] for r in rows],
        rollouts.metrics,
    )


def joined(parts: list[Rollouts], metrics: dict[str, float]) -> Rollouts:
    refs, olds = [p.ref_log_probs for p in parts], [p.old_log_probs for p in parts]
    return Rollouts(
        [s for p in parts for s in p.samples],
        [t for p in parts for t in p.trajectories],
        torch.cat([p.rewards for p in parts]),
        torch.cat([p.advantages for p in parts]),
        None if any(o is None for o in olds) else [lp for o in olds for lp in o],  # type: ignore[union-attr]
        None if any(r is None for r in refs) else [lp for r in refs for lp in r],  # type: ignore[union-attr]
        metrics,
    )


def collect_rollouts(
    method: Method,
    prompts: list[Sample],
    refill: Any,
    rl: RLSection,
    params: SamplingParams,
    progress: StageProgress,
    reference: Backbone | None,
) -> Rollouts:
    """The step's rollouts; with `dynamic_sampling`, all-equal groups are dropped and `refill(round)` (fresh
    prompts, deterministic per round) tops them up, for at most `max_resample_rounds` rounds. The metrics are the
    first round's (the rewards as sampled), plus the groups dropped and the rounds taken. If no group has an
    advantage after the last round, the first round is kept as it is (its update is zero)."""
    first = generate_rollouts(method, prompts, rl, params, progress, reference)
    if not rl.dynamic_sampling:
        return first
    group, wanted = rl.num_generations, len(prompts)
    kept_groups = informative_groups(first, group)
    parts, dropped, rounds = [select_groups(first, kept_groups, group)], wanted - len(kept_groups), 0
    count = len(kept_groups)
    while count < wanted and rounds < rl.max_resample_rounds:
        rounds += 1
        more = generate_rollouts(
            method, refill(rounds), rl, replace(params, seed=params.seed + rounds), progress, reference
        )
        informative = informative_groups(more, group)
        keep = informative[: wanted - count]
        dropped += len(more.samples) // group - len(informative)
        parts.append(select_groups(more, keep, group))
        count += len(keep)
    metrics = {
        **first.metrics,
        "kept_groups": float(count),
        "dropped_groups": float(dropped),
        "resample_rounds": float(rounds),
    }
    if count == 0:
        return Rollouts(**{**first.__dict__, "metrics": metrics})
    return joined(parts, metrics)


def refill_prompts(
    samples: list[Sample],
    seed: int,
    stage_index: int,
    step: int,
    round_: int,
    rounds: int,
    batch: int,
    process: int,
    world: int,
) -> list[Sample]:
    """Dynamic sampling's fresh prompts for (step, round, process): their own seeded stream, disjoint per round
    and process, so a resumed step refills with the same prompts."""
    first = (((step * rounds + round_ - 1) * world) + process) * batch
    indices = trainer.sample_indices(
        len(samples), seed + REFILL_SEED, stage_index, range(first, first + batch)
    )
    return [samples[i] for i in indices]


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
        old = logp.detach() if rollouts.old_log_probs is None else padded(rollouts.old_log_probs, device)
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
        continuous = padded([t.is_continuous.float() for t in rollouts.trajectories], device).bool()
        tokens = mask.bool() & ~continuous
        for name, where in (("token", tokens), ("latent", mask.bool() & continuous)):
            fraction = clip_fraction(
                logp, old, rollouts.advantages.to(device), where, rl.epsilon, rl.epsilon_high
            )
            metrics[f"clip_fraction/{name}"] = float(fraction)
        # E[-log p] of the sampled tokens: a one-sample estimate of the sampling policy's entropy per token
        # (latent densities, known only up to their constant, are left out)
        metrics["entropy"] = float(-(old * tokens).sum() / tokens.sum().clamp_min(1))
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

        def refill(round_: int, step: int = step) -> list[Sample]:
            return refill_prompts(
                samples,
                config.run.seed,
                stage_index,
                step,
                round_,
                rl.max_resample_rounds,
                train_cfg.batch_size,
                accelerator.process_index,
                accelerator.num_processes,
            )

        progress = StageProgress(step, train_cfg.steps)
        rollouts = collect_rollouts(
            run.method,
            [samples[i] for i in schedule[offset]],
            refill,
            rl,
            params,
            progress,
            holder.get("reference"),
        )
        rolled = time.perf_counter()
        module.train()
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
