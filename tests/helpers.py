"""Shared helpers for tests that run the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

# A small, fast embedded run: tiny Qwen2.5-VL on a few synth-zoom records.
FAST = [
    "data.synth.n_train=24",
    "data.synth.n_val=0",
    "data.synth.n_test=0",
    "train.batch_size=2",
    "train.progress=false",
    "train.log_every=1",
    "train.warmup_steps=2",
]


# Monet's three SFT stages, 2 steps each, on 11 samples: the striped caches give 2 processes unequal work (6 and 5
# samples); stage vlpo (RL) is left out (sharded engines run supervised stages only).
MONET_SFT_SHORT = [
    "--method",
    "monet",
    "method.num_latents=2",
    "data.synth.n_train=11",
    "train.steps=2",
    "train.checkpoint_every=1",
    "train.batch_size=1",
    "train.until=latent",
]


def assert_monet_sft_ran(run: Path) -> None:
    """Both of Monet's caches were built and the three SFT stages logged their two steps each, in order."""
    assert {m["cache"] for m in metrics(run) if m.get("event") == "cache_built"} == {"teacher", "targets"}
    stages = [m["stage"] for m in metrics(run) if "loss" in m]
    assert stages == ["warmup", "warmup", "distill", "distill", "latent", "latent"]


def train_args(out: Path, name: str, *extra: str) -> list[str]:
    return ["train", f"run.output_dir={out}", f"run.name={name}", *FAST, *extra]


def latentkit(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; `env`: variables added to this process's environment."""
    command = [sys.executable, "-m", "latentkit", *args]
    environment = {**os.environ, **env} if env else None
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, check=False, timeout=600, env=environment
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"latentkit {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}"
        )
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def relative_difference(a: dict, b: dict) -> float:
    """The relative L2 distance between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a)
    den = sum(float((b[k].double() ** 2).sum()) for k in a)
    return (num / den) ** 0.5


def assert_loads_in_transformers(run: Path) -> None:
    """`final/` loads with plain transformers, with no missing, unexpected or mismatched keys."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        run / "final", local_files_only=True, output_loading_info=True
    )
    assert not any(info.values()), info
    [embedding] = [v for k, v in final_weights(run).items() if k.endswith("embed_tokens.weight")]
    assert torch.equal(model.get_input_embeddings().weight, embedding)


def kill_when(args: list[str], checkpoint: Path, timeout: float = 300) -> None:
    """Run the CLI with `args` and SIGKILL it as soon as `checkpoint` exists (mid-run: it must not have ended)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "latentkit", *args], cwd=REPO, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(accelerate_config: Path, *args: str) -> list[str]:
    """`accelerate launch` of the CLI on a port of its own (two launches on one port join one process group)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    return [*launch, "--config_file", str(accelerate_config), "-m", "latentkit", *args]


def accelerate_launch(accelerate_config: Path, *args: str) -> subprocess.CompletedProcess:
    command = launch_command(accelerate_config, *args)
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"accelerate launch {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def kill_launch_when(
    accelerate_config: Path, args: list[str], checkpoint: Path, timeout: float = 300
) -> None:
    """`accelerate launch` of the CLI with `args`, SIGKILLed as soon as `checkpoint` exists (mid-run: it must not
    have ended): the training processes first (the launcher starts them in sessions of their own), then the
    launcher."""
    process = subprocess.Popen(launch_command(accelerate_config, *args), cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    for child in psutil.Process(process.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
