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
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel
from torch import nn

from latentkit.errors import RegistryError

if TYPE_CHECKING:
    from PIL import Image

    from latentkit.backbone import Backbone
    from latentkit.decoding import DecodingPolicy, SamplingParams, Trajectory
    from latentkit.layout import Batch, Layout, LayoutBuilder
    from latentkit.masks import MaskSpec
    from latentkit.segments import Sample

ENTRY_POINT_GROUP = "latentkit.methods"
DISTRIBUTION = "latentkit"  # entry points of this distribution are the built-in methods


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

    name: ClassVar[str]  # set by the registry: the entry-point name
    Config: ClassVar[type[BaseModel]]
    stages: ClassVar[tuple[str, ...]]
    # Stages that are not supervised (today's loop), e.g. {"vlpo": "rl"}; the trainer runs each with its kind's loop.
    stage_kinds: ClassVar[dict[str, StageKind]] = {}
    # The method's embedded default beyond its `method:` section, laid under every run config that picks it (what a
    # config file or override sets wins), e.g. {"model": {"preset": "tiny-causal-lm"}, "data": {"task": ...}}.
    run_defaults: ClassVar[dict[str, Any]] = {}

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

    def stage_freeze(self, stage: str) -> tuple[str, ...]:
        """Module groups (names as in `train.freeze`) that `stage` never trains, on top of `train.freeze`: e.g. the
        language model while an owned module fits its frozen embeddings."""
        return ()

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

    def prompt(self, sample: Sample, draw: int = 0) -> LayoutBuilder:
        """What generation continues: the system and user turns, then the assistant header; the vectors of
        `prompt_embeddings` sit right after the question's images (or open the user turn when it has none).
        `draw` numbers the answers to one question (0 .. k-1 for pass@k)."""
        return self.prompt_with(sample, self.prompt_embeddings(sample, draw))

    def prompt_with(self, sample: Sample, vectors: torch.Tensor | None) -> LayoutBuilder:
        """`prompt`'s layout with the given prompt vectors [n, D] (None: none)."""
        from latentkit.chat import ResponseWeights, drop_aux_image, render_chat
        from latentkit.layout import LayoutBuilder

        builder = LayoutBuilder(self.backbone)
        insert = None if vectors is None else lambda b, index: b.add_embeddings(vectors, index)
        render_chat(builder, sample, drop_aux_image, ResponseWeights(), prompt_only=True, after_images=insert)
        return builder

    def prompt_embeddings(self, sample: Sample, draw: int = 0) -> torch.Tensor | None:
        """Hook: vectors [n, D] placed into the generation prompt (e.g. a sampled strategy prefix); None: none.
        A method that samples them draws its own for each `draw` (reproducibly: the same (sample, draw), the
        same vectors) and says so with `prompts_vary`."""
        return None

    def prompt_info(self, sample: Sample, draw: int = 0) -> dict[str, Any]:
        """Hook: what a reader should know about the prompt vectors of (sample, draw), shown by `latentkit
        generate` (e.g. the z a prefix was decoded from); JSON-ready. Default: nothing."""
        return {}

    @property
    def prompts_vary(self) -> bool:
        """Whether `prompt_embeddings` differ between draws, so that k greedy answers to one question differ
        (pass@k without token sampling)."""
        return False

    def decoding_policy(self) -> DecodingPolicy:
        """Hook: how this method decodes (`latentkit.decoding`); the default feeds every sampled token."""
        from latentkit.decoding import DecodingPolicy

        return DecodingPolicy()

    def rollout_prompts(
        self, sample: Sample, group: int, progress: StageProgress, seed: int, latents: bool = True
    ) -> list[LayoutBuilder]:
        """Hook for RL: the prompts of one question's `group` rollouts at `progress` through the stage, `seed`
        drawing whatever the method samples for them (fresh each step). `latents=False`: the same prompts with
        the method's latent inputs removed (the latent-necessity re-roll). Default: `prompt(sample, draw)` for
        draw 0 .. group-1, without prompt vectors when `latents` is False."""
        if latents:
            return [self.prompt(sample, draw) for draw in range(group)]
        return [self.prompt_with(sample, None) for _ in range(group)]

    def rollout_policy(self, seed: int, latents: bool = True) -> DecodingPolicy:
        """Hook for RL: the policy rollouts decode with (`seed` for any noise it samples); `latents=False`, the
        policy with its continuous steps removed. Default: `decoding_policy()`, and for a `ContinuousPolicy`
        without latents, the same with k = 0."""
        from latentkit.latent import ContinuousPolicy

        policy = self.decoding_policy()
        if not latents and isinstance(policy, ContinuousPolicy):
            return policy.varied(k=0)
        return policy

    def trajectory_images(self, trajectory: Trajectory) -> list[Image.Image]:
        """Hook for `latentkit generate --save-images`: the images the method drew while decoding `trajectory`, in
        order (e.g. the boards it imagined, through its own pixel decoder). Default: none; a method that draws
        images overrides it (`draws_images` tells)."""
        return []

    @property
    def draws_images(self) -> bool:
        """Whether this method overrides `trajectory_images`."""
        return type(self).trajectory_images is not Method.trajectory_images

    def oracle_latents(self, samples: list[Sample], run_dir: Path | None) -> list[torch.Tensor] | None:
        """Hook for `latentkit diagnose`: per sample [blocks, K, D], an oracle's hidden states at the sample's
        latent slots (e.g. made with the auxiliary images visible), which the latent engine's feedback feeds to
        the next slot (`latentkit.latent.Transplant` with shift 1); `run_dir` is the run the model comes from
        (None for a bare model directory). None: no oracle for these samples."""
        return None

    def latent_channel(
        self, samples: list[Sample], run_dir: Path | None
    ) -> dict[str, list[bool | None]] | None:
        """Hook for `latentkit diagnose`: the latent channel's validity check, teacher-forced on the gold
        responses. Per condition, whether each sample's answer is predicted (None: not scored): `with_aux` (the
        auxiliary images given), `oracle` (latents that carry them) and dummies (latents replaced). A valid channel:
        oracle near with_aux, dummies near chance. None: the method has no such check for these samples."""
        return None

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


def register(name: str, cls: type[Method]) -> None:
    """Register a method defined in this process (a notebook, a script, a test) under `name`. Installed
    methods come from entry points; this one is known to this process only (not to `accelerate launch`)."""
    point = _entry_points().get(name)
    if point is not None:
        raise RegistryError(
            f"method name {name!r} is already installed ({_source(point)}); pick another name"
        )
    if name in _registered and _registered[name] is not cls:
        raise RegistryError(f"method name {name!r} is already registered in this process; pick another name")
    _add(name, cls, f"{cls.__module__}:{cls.__qualname__}")


def get_method(name: str) -> type[Method]:
    points = _entry_points()
    if name in points:
        return _load(points[name])
    if name in _registered:
        return _registered[name]
    valid = ", ".join(sorted({*points, *_registered}))
    raise RegistryError(f"unknown method {name!r}; valid methods: {valid} (see latentkit methods list)")


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
