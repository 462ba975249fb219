"""Method registry: every method, built in or plugin, is an entry point of the group `latentkit.methods`
(name = "package.module:MethodClass"); latentkit declares its own in its pyproject.toml. The entry-point name is
the method's name. A method is imported only when asked for, or when all are listed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, distributions
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from latentkit.errors import RegistryError

if TYPE_CHECKING:
    from latentkit.backbone import Backbone
    from latentkit.eval.generate import StepFunction
    from latentkit.layout import Batch, Layout, LayoutBuilder
    from latentkit.masks import MaskSpec
    from latentkit.segments import Sample

ENTRY_POINT_GROUP = "latentkit.methods"
DISTRIBUTION = "latentkit"  # entry points of this distribution are the built-in methods


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StageContext:
    """What `Method.prepare_stage` may use: the run, this process's place in it, and the stage outputs so far."""

    run_dir: Path
    stage_dir: Path
    samples: list[Sample]
    process_index: int
    num_processes: int
    barrier: Callable[[], None]
    log: Callable[[dict[str, Any]], None]  # an event line in metrics.jsonl (main process)
    load_stage_weights: Callable[[str], None]  # load an earlier stage's final weights into the live model
    progress: bool = True

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0


class Method(ABC):
    """A latent-reasoning method: config, ordered stages, tokens/modules it owns, layouts, masks and losses."""

    name: ClassVar[str]  # set by the registry: the entry-point name
    Config: ClassVar[type[BaseModel]]
    stages: ClassVar[tuple[str, ...]]

    def __init__(self, config: BaseModel):
        self.config = config
        self.modules = (
            nn.ModuleDict()
        )  # modules the method owns (projectors, VAE, ...): trained and saved with it

    def setup(self, backbone: Backbone) -> None:
        """Add tokens and build owned modules; called once, before any layout."""
        self.backbone = backbone

    def stage_init(self, stage: str) -> str | None:
        """The earlier stage whose final weights this stage starts from (None: continue from the previous)."""
        return None

    def prepare_stage(self, stage: str, context: StageContext) -> None:
        """Build what a stage needs before its first step (e.g. cached teacher representations); called on every
        process after the stage's initial weights are loaded and before its optimizer exists."""

    @abstractmethod
    def layout(self, sample: Sample, stage: str) -> Layout: ...

    def mask(self, batch: Batch, stage: str) -> MaskSpec:
        """Attention structure of a batch; default causal with right padding hidden."""
        from latentkit.masks import causal_mask, with_padding

        size, length = batch.input_ids.shape
        return with_padding(causal_mask(size, length, batch.input_ids.device), batch.valid)

    @abstractmethod
    def loss(self, backbone: Backbone, batch: Batch, stage: str) -> LossOutput: ...

    def prompt(self, sample: Sample) -> LayoutBuilder:
        """What generation continues: the system and user turns, then the assistant header."""
        from latentkit.chat import ResponseWeights, drop_aux_image, render_chat
        from latentkit.layout import LayoutBuilder

        builder = LayoutBuilder(self.backbone)
        render_chat(builder, sample, drop_aux_image, ResponseWeights(), prompt_only=True)
        return builder

    def step_function(self) -> StepFunction | None:
        """Hook for latent decoding: a method returns its decoding state machine; None = plain tokens."""
        return None


@dataclass(frozen=True)
class MethodInfo:
    name: str
    stages: tuple[str, ...]
    source: str
    error: str | None = None  # why the method cannot be loaded (e.g. a plugin that fails to import)


_registered: dict[str, type[Method]] = {}


def _is_builtin(point: EntryPoint) -> bool:
    return point.dist is not None and point.dist.name == DISTRIBUTION


def _source(point: EntryPoint) -> str:
    """A built-in method by its import path, any other as `plugin <import path>`."""
    return point.value if _is_builtin(point) else f"plugin {point.value}"


def _entry_points() -> dict[str, EntryPoint]:
    """Every distribution's entry points, not only the first of each name on sys.path: a stale
    `latentkit.egg-info` in the working directory must not hide the installed metadata."""
    found: dict[str, EntryPoint] = {}
    for distribution in distributions():
        for point in distribution.entry_points.select(group=ENTRY_POINT_GROUP):
            first = found.setdefault(point.name, point)
            if first.value != point.value:
                sources = sorted(
                    (_source(first), _source(point)), key=lambda source: source.startswith("plugin ")
                )
                raise RegistryError(
                    f"method name {point.name!r} is registered twice: by {sources[0]} and by {sources[1]}; "
                    "rename one"
                )
    if not any(map(_is_builtin, found.values())):
        raise RegistryError(
            f"no built-in method is installed (latentkit's {ENTRY_POINT_GROUP} entry points are missing): "
            "reinstall latentkit, e.g. pip install -e ."
        )
    return found


def _load(point: EntryPoint) -> type[Method]:
    if point.name in _registered:
        return _registered[point.name]
    source = _source(point)
    try:
        cls = point.load()
    except Exception as exc:  # a broken plugin is the plugin's error, reported in one line
        raise RegistryError(f"method {point.name!r} ({source}) failed to import: {exc!r}") from exc
    _add(point.name, cls, source)
    return cls


def _add(name: str, cls: Any, source: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise RegistryError(f"method {name!r} from {source} is not a latentkit.registry.Method subclass")
    other_names = [other for other, registered in _registered.items() if registered is cls and other != name]
    if other_names:
        raise RegistryError(
            f"{source} is already registered as {other_names[0]!r}; one class has one method name"
        )
    cls.name = name
    _registered[name] = cls


def get_method(name: str) -> type[Method]:
    points = _entry_points()
    if name not in points:
        valid = ", ".join(sorted(points))
        raise RegistryError(f"unknown method {name!r}; valid methods: {valid} (see latentkit methods list)")
    return _load(points[name])


def list_methods() -> list[MethodInfo]:
    """Every method; one that cannot be loaded is listed with its error rather than hiding the others."""
    infos = []
    for name, point in sorted(_entry_points().items()):
        try:
            cls = _load(point)
        except RegistryError as exc:
            infos.append(MethodInfo(name, (), _source(point), str(exc)))
        else:
            infos.append(MethodInfo(name, tuple(cls.stages), _source(point)))
    return infos
