"""Where an eval runs: its device, and the processes of an `accelerate launch` that share its samples.

Work that can fail runs through `Processes.gather`: every process learns whether it failed anywhere and raises
then, so an error on one process never leaves another waiting in a later collective.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from latentkit.errors import ConfigError, LatentkitError

T = TypeVar("T")
DEVICE_TYPES = ("cpu", "cuda", "mps")


def _available(device: torch.device) -> bool:
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return count > 0 and (device.index is None or device.index < count)
    if device.type == "mps":
        return torch.backends.mps.is_available() and not device.index
    return device.index is None or device.index == 0


def eval_device(name: str | None = None) -> torch.device:
    """The device named by `--device` (default: cuda when there is one, else cpu), checked to exist. Under an
    `accelerate launch` on GPUs, `cuda` is each process's own GPU."""
    text = name if name is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ConfigError(f"--device {text!r} is not a device: use cpu, cuda, cuda:N or mps")
    if not _available(device):
        raise ConfigError(
            f"--device {text!r} is not available on this machine ({_inventory()}): pick one that is, e.g. cpu"
        )
    processes = eval_processes(device)
    if processes.count == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(
            f"--device {text} would put every process of the launch on one GPU: pass --device cuda (each "
            "process takes its own)"
        )
    from accelerate import PartialState

    return PartialState().device


def _inventory() -> str:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"{gpus} CUDA device{'s' if gpus != 1 else ''}" + (
        ", mps" if torch.backends.mps.is_available() else ""
    )


@dataclass(frozen=True)
class Processes:
    """This process's place among those answering one eval (one, unless started by `accelerate launch`)."""

    index: int = 0
    count: int = 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def all_gather(self, value: T) -> list[T]:
        """Every process's `value`, in process order (a collective: every process must call it)."""
        if self.count == 1:
            return [value]
        gathered: list[Any] = [None] * self.count
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def gather(self, compute: Callable[[], T]) -> list[T]:
        """Every process's `compute()`, in process order. If it raised on any process, every process raises
        (the failing one its own error, the others the first failure's), so none is left waiting later."""
        try:
            value = compute()
        except Exception as exc:
            self.all_gather((None, _portable(exc, self.index)))
            raise
        outcomes = self.all_gather((value, None))
        failure = next((error for _, error in outcomes if error is not None), None)
        if failure is not None:
            raise failure
        return [result for result, _ in outcomes]

    def from_main(self, compute: Callable[[], T]) -> T:
        """`compute()` on the main process only, its result on every process."""
        return self.gather(compute if self.is_main else _nothing)[0]  # type: ignore[return-value]

    def main_first(self, compute: Callable[[], T]) -> T:
        """`compute()` on the main process, then on the others (they read what it wrote, e.g. generated data);
        each keeps its own result (nothing is sent)."""
        kept: list[T] = []

        def keep() -> None:
            kept.append(compute())

        self.gather(keep if self.is_main else _nothing)
        self.gather(_nothing if self.is_main else keep)
        return kept[0]


def _nothing() -> None:
    return None


def _portable(error: Exception, index: int) -> Exception:
    """The error as the other processes raise it: a user error keeps its class and message, others say where."""
    if isinstance(error, LatentkitError):
        try:
            return type(error)(str(error))
        except TypeError:  # a subclass built from other arguments
            return LatentkitError(str(error))
    return RuntimeError(f"process {index} failed: {type(error).__name__}: {error}")


def eval_processes(device: torch.device) -> Processes:
    """The processes of this eval. Under `accelerate launch` their process group is made on first use (gloo
    for CPU evals, the GPU backend otherwise) and left at exit if nothing closed it before (a script calling
    `latentkit.evaluate`); alone, nothing is set up."""
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes > 1:
        # A gloo group still alive while the interpreter shuts down can abort the process ("terminate called
        # without an active exception"); registering the same function again adds nothing.
        atexit.unregister(close_processes)
        atexit.register(close_processes)
    return Processes(state.process_index, state.num_processes)


def close_processes() -> None:
    """Leave the launch's process group, if one was made (a command is done), and forget accelerate's state."""
    from accelerate.state import PartialState

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    PartialState._reset_state()
