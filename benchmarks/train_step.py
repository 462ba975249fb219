"""Trainer overhead benchmark: `latentkit.trainer.train` beside a bare training loop, tiny default on CPU.

Usage:
    python benchmarks/train_step.py                       # trainer vs bare loop (each in its own subprocess)
    python benchmarks/train_step.py --steps 100 --warmup 10 --batch-size 8 --repeats 3   # the defaults
    python benchmarks/train_step.py --quickstart --repeats 3   # `latentkit train --method sft` end to end

Both variants use the tiny default of `latentkit train --method sft` (preset tiny-qwen2.5-vl, float32, the
embedded synth-zoom task, batch 8, AdamW, linear warmup/decay schedule, grad clip 1.0), with
`train.steps = warmup + steps`, and the same seed, so they build the same model and see the same batches
(checked: the per-step losses of the two variants are printed side by side and should agree).

What one "step" is (the same in both variants): the wall time of one full iteration of the training loop,
from the end of the previous iteration to the end of this one. It includes building the batch (layouts
for every sample: tokenizing, opening and preprocessing the images, collating), forward, backward, gradient
clipping, optimizer and scheduler step and zero_grad. For the trainer it also includes everything else the
loop does per step with `log_every=1`: the DataLoader iterator, `batch.to(device)`, `float(loss)` and the
metrics dict, `accelerator.reduce`, the `metrics.jsonl` write, the progress-bar bookkeeping (bar disabled).

  * trainer: the real `train(config)` runs in-process; `latentkit.trainer._log` is wrapped (by this script,
    not in the library) to take a `time.perf_counter()` stamp right after each step's record is written,
    and `latentkit.trainer._loop` is wrapped to stamp the loop start. Step k's time is stamp[k] - stamp[k-1].
    The trainer's own `step_time` from metrics.jsonl is reported too ("in-loop"): it starts before
    `next(batches)` (so batch construction is inside it) and stops after `accelerator.reduce`, i.e. it
    excludes only the JSON write and the end-of-iteration checks.
    `checkpoint_every` is set above `train.steps`, so no checkpoint is written inside the timed loop; after
    the loop returns, the `_loop` wrapper calls `save_checkpoint` once into a scratch directory and times it.
  * bare: `build_backbone` + `SFT.setup` after `set_seed(seed)`, the same records, batches from the same
    `LayoutDataset` + `micro_batch_schedule`, `freeze_and_group` + `build_optimizer` + `build_scheduler`, then
    per step: `dataset[step]`, `method.loss`, `loss.backward()`, `clip_grad_norm_`, `optimizer.step()`,
    `scheduler.step()`, `zero_grad(set_to_none=True)`. No accelerate, no DataLoader, no logging; the loss
    value is kept (a `float()` of a CPU tensor) only to check that both variants compute the same thing.

The first `--warmup` steps of each run are not counted. Median step time is over the counted steps;
tokens/s is (sum of real, non-padding tokens of the counted steps) / (sum of their step times), since batch
lengths vary from step to step. Overhead % = (trainer median - bare median) / bare median.

Peak memory: each variant runs in its own fresh subprocess (this script re-invoked with `--variant`), and
the peak RSS reported is that subprocess's `ru_maxrss` (whole process: interpreter, torch, model, data).
The peak RSS reached before the timed loop starts (after setup) is printed as well.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN_NAME = "bench"


def tiny_config(output_dir: Path, total_steps: int, batch_size: int):
    """The `latentkit train --method sft` default, with benchmark-friendly logging/checkpoint settings."""
    from latentkit.config import build_config, raw_config
    from latentkit.registry import get_method

    overrides = [
        "run.method=sft",
        f"run.name={RUN_NAME}",
        f"run.output_dir={output_dir}",
        f"train.steps={total_steps}",
        f"train.batch_size={batch_size}",
        "train.log_every=1",
        "train.progress=false",
        f"train.checkpoint_every={total_steps + 1}",
    ]
    raw, where = raw_config(None, overrides)
    return build_config(get_method("sft").Config, raw, where)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def dir_size_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


# --- variants (each runs in its own subprocess) -------------------------------------------------------------


def run_trainer(output_dir: Path, total_steps: int, batch_size: int) -> dict:
    from latentkit import trainer

    config = tiny_config(output_dir, total_steps, batch_size)
    stamps: dict[int, tuple[float, float]] = {}
    info: dict = {}
    original_log, original_loop = trainer._log, trainer._loop

    def stamped_log(run, accelerator, record):
        original_log(run, accelerator, record)
        if "event" not in record:
            stamps[int(record["step"])] = (time.perf_counter(), time.process_time())

    def stamped_loop(run, accelerator, module, optimizer, scheduler, batches, stage, stage_dir, start_step):
        info["setup_peak_rss_mib"] = peak_rss_mib()
        info["loop_start"] = time.perf_counter()
        info["loop_start_cpu"] = time.process_time()
        original_loop(run, accelerator, module, optimizer, scheduler, batches, stage, stage_dir, start_step)
        info["loop_end"] = time.perf_counter()
        scratch = output_dir / "checkpoint-timing"
        started = time.perf_counter()
        saved = trainer.save_checkpoint(
            scratch, run.config.train.steps, accelerator, module, optimizer, scheduler
        )
        info["checkpoint_save_s"] = time.perf_counter() - started
        info["checkpoint_mib"] = dir_size_mib(saved)

    trainer._log, trainer._loop = stamped_log, stamped_loop
    started = time.perf_counter()
    try:
        directory = trainer.train(config)
    finally:
        trainer._log, trainer._loop = original_log, original_loop
    info["train_call_s"] = time.perf_counter() - started

    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "event" not in r]
    steps = []
    previous = (info["loop_start"], info["loop_start_cpu"])
    for record in records:
        step = int(record["step"])
        steps.append(
            {
                "step": step,
                "time": stamps[step][0] - previous[0],
                "cpu_time": stamps[step][1] - previous[1],
                "in_loop_time": record["step_time"],
                "tokens": record["tokens"],
                "loss": record["loss"],
            }
        )
        previous = stamps[step]
    return {"steps": steps, **info}


def run_bare(output_dir: Path, total_steps: int, batch_size: int) -> dict:
    import torch
    from accelerate.utils import set_seed

    from latentkit.backbone import build_backbone
    from latentkit.data import load_training_records
    from latentkit.optim import build_optimizer, build_scheduler, freeze_and_group, trainable_parameters
    from latentkit.registry import StageProgress, get_method
    from latentkit.stage_data import LayoutDataset, stage_order
    from latentkit.trainer import micro_batch_schedule

    config = tiny_config(output_dir, total_steps, batch_size)
    train_cfg = config.train
    if train_cfg.grad_accum != 1:
        raise SystemExit("the bare loop implements grad_accum=1 only")
    run_dir = output_dir / RUN_NAME
    run_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    method_cls = get_method(config.run.method)
    stage, stage_index = method_cls.stages[0], 0
    set_seed(config.run.seed)  # same seeding and order of construction as train()
    backbone = build_backbone(config.model)
    method = method_cls(config.method)
    method.setup(backbone)
    samples = load_training_records(config.data, run_dir, lambda work: work()).samples
    groups = freeze_and_group(
        backbone, method, train_cfg.freeze, train_cfg.module_lr, trainable_parameters(backbone, method)
    )
    optimizer = build_optimizer(groups, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg)
    trainable = [p for params in groups.values() for p in params]
    cache_bytes = config.data.layout_cache_mb * 2**20
    dataset = LayoutDataset(
        samples, method, stage, config.data.max_length, backbone.tokenizer.pad_token_id, cache_bytes
    )
    # As the trainer's stage start: every layout built once (length pre-filter), kept in the layout cache.
    order, _ = stage_order(
        dataset, config.data, config.run.seed, stage_index, train_cfg.batch_size, 0, 1, lambda part: part
    )
    dataset.schedule = micro_batch_schedule(
        len(samples), config.run.seed, stage_index, 0, train_cfg.steps, train_cfg.batch_size, 1, 0, 1, order
    )
    setup_s = time.perf_counter() - started
    setup_peak = peak_rss_mib()

    backbone.model.train()
    method.modules.train()
    steps = []
    loop_start = previous = time.perf_counter()
    previous_cpu = time.process_time()
    for step in range(train_cfg.steps):
        batch = dataset[step]
        t_batch = time.perf_counter()
        out = method.loss(backbone, batch, stage, StageProgress(step, train_cfg.steps))
        t_forward = time.perf_counter()
        out.loss.backward()
        t_backward = time.perf_counter()
        if train_cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, train_cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        now, now_cpu = time.perf_counter(), time.process_time()
        loss = float(out.loss.detach())
        tokens = int(batch.valid.sum())
        steps.append(
            {
                "step": step + 1,
                "time": now - previous,
                "cpu_time": now_cpu - previous_cpu,
                "tokens": tokens,
                "loss": loss,
                # phases (the float()/int() above and the loop bookkeeping fall into the next step's "batch")
                "phases": {
                    "batch": t_batch - previous,
                    "forward": t_forward - t_batch,
                    "backward": t_backward - t_forward,
                    "optimizer": now - t_backward,
                },
            }
        )
        previous, previous_cpu = now, now_cpu
    return {
        "steps": steps,
        "setup_s": setup_s,
        "setup_peak_rss_mib": setup_peak,
        "loop_start": loop_start,
        "loop_end": previous,
    }


def variant_main(args: argparse.Namespace) -> None:
    output_dir = Path(args.work_dir)
    total = args.warmup + args.steps
    run = run_trainer if args.variant == "trainer" else run_bare
    result = run(output_dir, total, args.batch_size)
    result["peak_rss_mib"] = peak_rss_mib()
    Path(args.result).write_text(json.dumps(result))


# --- driver ----------------------------------------------------------------------------------------------


def spawn_variant(variant: str, args: argparse.Namespace, out_dir: Path, repeat: int) -> dict:
    work_dir = out_dir / f"{variant}-{repeat}"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    result_file = out_dir / f"{variant}-{repeat}.json"
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--variant",
        variant,
        "--work-dir",
        str(work_dir),
        "--result",
        str(result_file),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
    ]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    result = json.loads(result_file.read_text())
    result["process_wall_s"] = time.perf_counter() - started
    result["load"] = (load_before, os.getloadavg()[0])
    if not args.keep:
        shutil.rmtree(work_dir, ignore_errors=True)
    return result


def summarize(runs: list[dict], warmup: int) -> dict:
    counted = [s for run in runs for s in run["steps"] if s["step"] > warmup]
    times = [s["time"] for s in counted]
    summary = {
        "steps": len(counted),
        "median_ms": 1000 * statistics.median(times),
        "median_cpu_ms": 1000 * statistics.median(s["cpu_time"] for s in counted),
        "p25_ms": 1000 * statistics.quantiles(times, n=4)[0] if len(times) > 1 else 1000 * times[0],
        "p90_ms": 1000 * statistics.quantiles(times, n=10)[-1] if len(times) > 1 else 1000 * times[0],
        "tokens_per_s": sum(s["tokens"] for s in counted) / sum(times),
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        "setup_peak_rss_mib": max(run["setup_peak_rss_mib"] for run in runs),
        "per_repeat_median_ms": [
            1000 * statistics.median(s["time"] for s in run["steps"] if s["step"] > warmup) for run in runs
        ],
    }
    if "phases" in counted[0]:
        summary["phases_ms"] = {
            name: 1000 * statistics.median(s["phases"][name] for s in counted)
            for name in counted[0]["phases"]
        }
    if "in_loop_time" in counted[0]:
        summary["in_loop_median_ms"] = 1000 * statistics.median(s["in_loop_time"] for s in counted)
    return summary


def environment() -> list[str]:
    import accelerate
    import torch
    import transformers

    model = "unknown"
    try:
        for line in subprocess.run(
            ["lscpu"], check=False, capture_output=True, text=True
        ).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return [
        f"date: {datetime.date.today().isoformat()}",
        f"cpu: {model}, os.cpu_count()={os.cpu_count()}, torch threads={torch.get_num_threads()}",
        (
            f"python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, accelerate {accelerate.__version__}"
        ),
    ]


def benchmark_main(args: argparse.Namespace) -> None:
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="latentkit-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"bare": [], "trainer": []}
    for repeat in range(args.repeats):  # alternate, so slow drifts of the machine hit both variants
        for variant in ("bare", "trainer"):
            print(
                f"[repeat {repeat + 1}/{args.repeats}] {variant}: {args.warmup}+{args.steps} steps ...",
                flush=True,
            )
            runs[variant].append(spawn_variant(variant, args, out_dir, repeat))
    bare, trainer = summarize(runs["bare"], args.warmup), summarize(runs["trainer"], args.warmup)
    overhead = 100 * (trainer["median_ms"] - bare["median_ms"]) / bare["median_ms"]

    print()
    for line in environment():
        print(line)
    print(
        f"tiny default (sft, tiny-qwen2.5-vl, synth-zoom), batch {args.batch_size}, "
        f"{args.warmup} warmup + {args.steps} counted steps per run, {args.repeats} run(s) per variant"
    )
    print()
    print("| variant | steps | median step time (ms) | tokens/s | peak RSS (MiB) | overhead vs bare |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| bare loop | {bare['steps']} | {bare['median_ms']:.1f} | {bare['tokens_per_s']:.0f} | "
        f"{bare['peak_rss_mib']:.0f} | - |"
    )
    print(
        f"| trainer | {trainer['steps']} | {trainer['median_ms']:.1f} | {trainer['tokens_per_s']:.0f} | "
        f"{trainer['peak_rss_mib']:.0f} | {overhead:+.1f}% |"
    )
    print()
    print(
        f"p25 / p90 step time (ms): bare {bare['p25_ms']:.1f} / {bare['p90_ms']:.1f}, "
        f"trainer {trainer['p25_ms']:.1f} / {trainer['p90_ms']:.1f}"
    )
    cpu_overhead = 100 * (trainer["median_cpu_ms"] - bare["median_cpu_ms"]) / bare["median_cpu_ms"]
    print(
        f"median process CPU time per step (ms, both threads): bare {bare['median_cpu_ms']:.1f}, "
        f"trainer {trainer['median_cpu_ms']:.1f} ({cpu_overhead:+.1f}%)"
    )
    print(
        "process wall time per run (s): "
        + "; ".join(f"{v} " + ", ".join(f"{r['process_wall_s']:.1f}" for r in rs) for v, rs in runs.items())
    )
    print(
        "median step time per run (ms): bare "
        + ", ".join(f"{m:.1f}" for m in bare["per_repeat_median_ms"])
        + "; trainer "
        + ", ".join(f"{m:.1f}" for m in trainer["per_repeat_median_ms"])
    )
    for variant, variant_runs in runs.items():
        loads = ", ".join(f"{r['load'][0]:.2f}->{r['load'][1]:.2f}" for r in variant_runs)
        print(f"1-min load average before->after each {variant} run: {loads}")
    print(
        f"trainer in-loop step_time from metrics.jsonl (excludes the JSON write): median "
        f"{trainer['in_loop_median_ms']:.1f} ms"
    )
    print(
        f"peak RSS before the loop (setup): bare {bare['setup_peak_rss_mib']:.0f} MiB, "
        f"trainer {trainer['setup_peak_rss_mib']:.0f} MiB"
    )
    phases = bare["phases_ms"]
    print(
        "bare loop, median per phase (ms): "
        + ", ".join(
            f"{name} {ms:.1f} ({100 * ms / sum(phases.values()):.0f}%)" for name, ms in phases.items()
        )
        + " [batch = LayoutDataset[i]: layouts (chat rendering, tokenizing, image preprocessing) + collate;"
        " forward = method.loss incl. the vision tower; optimizer = clip + AdamW + scheduler + zero_grad]"
    )
    first = runs["trainer"][0]
    print(
        f"trainer: train() call {first['train_call_s']:.1f} s, of which loop "
        f"{first['loop_end'] - first['loop_start']:.1f} s; one checkpoint save "
        f"{1000 * first['checkpoint_save_s']:.0f} ms ({first['checkpoint_mib']:.1f} MiB)"
    )
    pairs = list(zip(runs["bare"][0]["steps"], first["steps"]))
    max_diff = max(abs(b["loss"] - t["loss"]) for b, t in pairs)
    same_tokens = all(b["tokens"] == t["tokens"] for b, t in pairs)
    print(
        f"same batches: {'yes' if same_tokens else 'NO'} (tokens per step equal); loss step 1: bare "
        f"{pairs[0][0]['loss']:.4f} trainer {pairs[0][1]['loss']:.4f}; last: bare {pairs[-1][0]['loss']:.4f} "
        f"trainer {pairs[-1][1]['loss']:.4f}; max |diff| {max_diff:.2e}"
    )
    (out_dir / "summary.json").write_text(
        json.dumps({"bare": bare, "trainer": trainer, "overhead_pct": overhead, "args": vars(args)}, indent=1)
    )
    if not args.out_dir:
        shutil.rmtree(out_dir, ignore_errors=True)


def quickstart_main(args: argparse.Namespace) -> None:
    """Time the Quickstart command `latentkit train --method sft` end to end, each time as a fresh subprocess."""
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="latentkit-quickstart-"))
    script = Path(sys.executable).with_name("latentkit")
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "latentkit"]
    results = []
    for repeat in range(args.repeats):
        output_dir = out_dir / f"quickstart-{repeat}"
        shutil.rmtree(output_dir, ignore_errors=True)
        command = [*launcher, "train", "--method", "sft", f"run.output_dir={output_dir}"]
        print("$ " + " ".join(command), flush=True)
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        completed = subprocess.run(command, check=False, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if completed.returncode != 0:
            sys.stderr.write(completed.stdout + completed.stderr)
            raise SystemExit(f"quickstart failed with exit code {completed.returncode}")
        metrics = [
            json.loads(line) for line in next(output_dir.rglob("metrics.jsonl")).read_text().splitlines()
        ]
        metrics = [r for r in metrics if "event" not in r]
        results.append((wall, load_before, os.getloadavg()[0], metrics))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # max over the quickstart runs
    print()
    for line in environment():
        print(line)
    for wall, load_before, load_after, metrics in results:
        first, last = metrics[0], metrics[-1]
        step_ms = 1000 * statistics.median(r["step_time"] for r in metrics)
        print(
            f"quickstart `latentkit train --method sft`: {wall:.1f} s end to end "
            f"(1-min load average {load_before:.2f}->{load_after:.2f}); {last['step']} steps, "
            f"median in-loop step_time of the logged steps {step_ms:.1f} ms; "
            f"loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step {last['step']}"
        )
    metrics = results[-1][3]
    picks = sorted({round(i * (len(metrics) - 1) / 6) for i in range(7)})
    print(
        "loss curve (last run): "
        + ", ".join(f"step {metrics[i]['step']}: {metrics[i]['loss']:.3f}" for i in picks)
    )
    print(f"peak RSS of the quickstart process: {peak:.0f} MiB")
    if not args.out_dir:
        shutil.rmtree(out_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="counted steps per run (default 100)")
    parser.add_argument(
        "--warmup", type=int, default=10, help="uncounted steps at the start of each run (default 10)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="train.batch_size (default 8, the tiny default)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per variant, alternating; --quickstart: runs (default 3)"
    )
    parser.add_argument(
        "--out-dir", default=None, help="keep run dirs and JSON results here (default: temp, removed)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the per-variant run directories in --out-dir"
    )
    parser.add_argument(
        "--quickstart", action="store_true", help="time `latentkit train --method sft` end to end"
    )
    parser.add_argument("--variant", choices=("trainer", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2 or args.warmup < 0 or args.repeats < 1:
        parser.error("need --steps >= 2, --warmup >= 0, --repeats >= 1")
    if args.variant:
        variant_main(args)
    elif args.quickstart:
        quickstart_main(args)
    else:
        benchmark_main(args)


if __name__ == "__main__":
    main()
