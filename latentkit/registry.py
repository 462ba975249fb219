"""Method registry: built-ins register with a decorator; third-party plugins through the entry-point group
`latentkit.methods` (value: "package.module:MethodClass"), imported only when a method is asked for.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel
from torch import nn

from latentkit.errors import RegistryError

if TYPE_CHECKING:
    from latentkit.backbone import Backbone
    from latentkit.decoding import DecodingPolicy, SamplingParams, Trajectory
    from latentkit.layout import Batch, Layout, LayoutBuilder
    from latentkit.masks import MaskSpec
    from latentkit.segments import Sample

ENTRY_POINT_GROUP = "latentkit.methods"
BUILTIN_MODULES = ("latentkit.methods.sft", "latentkit.methods.monet")


StageKind = Literal["supervised", "rl"]


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StageProgress:
    """Where a loss is computed within its stage: `step` is the 0-based optimizer step, of `total_steps`."""

    step: int
    total_steps: int

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps


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

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    stages: ClassVar[tuple[str, ...]]
    # Stages that are not supervised (today's loop), e.g. {"vlpo": "rl"}; the trainer runs each with its kind's loop.
    stage_kinds: ClassVar[dict[str, StageKind]] = {}

    def __init__(self, config: BaseModel):
        self.config = config
        # Trainable owned modules (projectors, VAE, ...): optimised, wrapped by DDP/FSDP, saved with the method.
        self.modules = nn.ModuleDict()
        # Frozen auxiliaries (vision encoders, a reference model): never optimised, wrapped or saved.
        self.auxiliaries = nn.ModuleDict()

    def setup(self, backbone: Backbone) -> None:
        """Add tokens and build owned modules; called once, before any layout."""
        self.backbone = backbone

    @classmethod
    def stage_kind(cls, stage: str) -> StageKind:
        return cls.stage_kinds.get(stage, "supervised")

    def add_auxiliary(self, name: str, module: nn.Module) -> nn.Module:
        """Declare a frozen auxiliary module (in eval mode, without gradients); the trainer moves it to its device."""
        module.eval()
        module.requires_grad_(False)
        self.auxiliaries[name] = module
        return module

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
    def loss(self, backbone: Backbone, batch: Batch, stage: str, progress: StageProgress) -> LossOutput: ...

    def prompt(self, sample: Sample) -> LayoutBuilder:
        """What generation continues: the system and user turns, then the assistant header; the vectors of
        `prompt_embeddings` sit right after the question's images (or open the user turn when it has none)."""
        from latentkit.chat import ResponseWeights, drop_aux_image, render_chat
        from latentkit.layout import LayoutBuilder

        builder = LayoutBuilder(self.backbone)
        vectors = self.prompt_embeddings(sample)
        insert = None if vectors is None else lambda b, index: b.add_embeddings(vectors, index)
        render_chat(builder, sample, drop_aux_image, ResponseWeights(), prompt_only=True, after_images=insert)
        return builder

    def prompt_embeddings(self, sample: Sample) -> torch.Tensor | None:
        """Hook: vectors [n, D] placed into the generation prompt (e.g. a sampled strategy prefix); None: none."""
        return None

    def decoding_policy(self) -> DecodingPolicy:
        """Hook: how this method decodes (`latentkit.decoding`); the default feeds every sampled token."""
        from latentkit.decoding import DecodingPolicy

        return DecodingPolicy()

    def log_probs(
        self, backbone: Backbone, trajectories: list[Trajectory], params: SamplingParams
    ) -> list[torch.Tensor]:
        """Hook for RL: per trajectory [n], the log-probability of every action under the current weights, with
        gradient. The default scores sampled tokens (0 elsewhere); a method whose policy samples continuous
        actions adds their densities."""
        from latentkit.decoding import token_log_probs

        return token_log_probs(backbone, trajectories, params)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    stages: tuple[str, ...]
    source: str


_registered: dict[str, tuple[type[Method], str]] = {}
_builtins_loaded = False


def _source_of(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def register_method(name: str):
    """Class decorator: `@register_method("sft")`."""

    def decorate(cls: type[Method]) -> type[Method]:
        _add(name, cls, _source_of(cls))
        return cls

    return decorate


def _add(name: str, cls: Any, source: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise RegistryError(f"method {name!r} from {source} is not a latentkit.registry.Method subclass")
    existing = _registered.get(name)
    if existing is not None and existing[0] is not cls:
        raise RegistryError(
            f"method name {name!r} is registered twice: by {existing[1]} and by {source}; rename one"
        )
    other_names = [
        other for other, (registered, _) in _registered.items() if registered is cls and other != name
    ]
    if other_names:
        raise RegistryError(
            f"{source} is already registered as {other_names[0]!r}; one class has one method name"
        )
    cls.name = name
    _registered[name] = (cls, source)


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def _plugin_entry_points() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in found:
            first = found[point.name]
            raise RegistryError(
                f"method name {point.name!r} is registered twice: by entry point {first.value} and by {point.value}"
            )
        found[point.name] = point
    return found


def _load_plugin(point: Any) -> None:
    try:
        cls = point.load()
    except Exception as exc:  # a broken plugin is the plugin's error, reported in one line
        raise RegistryError(
            f"plugin method {point.name!r} ({point.value}) failed to import: {exc!r}"
        ) from exc
    existing = _registered.get(point.name)
    if existing is None:
        _add(point.name, cls, f"plugin {point.value}")
    elif existing[0] is not cls:
        raise RegistryError(
            f"method name {point.name!r} is registered twice: by {existing[1]} and by plugin {point.value}; rename one"
        )


def get_method(name: str) -> type[Method]:
    _load_builtins()
    plugins = _plugin_entry_points()
    if name in plugins:
        _load_plugin(plugins[name])
    if name not in _registered:
        valid = sorted({*_registered, *plugins})
        raise RegistryError(
            f"unknown method {name!r}; valid methods: {', '.join(valid)} (see latentkit methods list)"
        )
    return _registered[name][0]


def list_methods() -> list[MethodInfo]:
    _load_builtins()
    for point in _plugin_entry_points().values():
        _load_plugin(point)
    return [
        MethodInfo(name, tuple(cls.stages), source) for name, (cls, source) in sorted(_registered.items())
    ]
